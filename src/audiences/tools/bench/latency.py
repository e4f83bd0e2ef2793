"""The latency phase of `audiences bench`: event -> Entered and deadline -> Exited, at a paced load.

SPEC §12 asks for p99 event -> `Audience Entered` on the topic <= 50 ms at half
load, and windowed exits p99 <= 100 ms after their deadline. This runs the
real runtime in a worker process of its own (`engine_worker`, mode `serve`:
wall clock, real deadlines) on fresh topics, with the bench's audience
definitions plus `lat_recent` (a `Latency Probe` within 2 s), while this
process produces live traffic at a fixed rate (by default half the
throughput the catch-up phase measured):

- the bench workload's events (another seed), each stamped with the time it
  is sent; every Entered they cause is measured, event sent -> `Audience
  Entered` read back from `audience-events`;
- every tenth event a `Latency Probe` of a new user: enters `lat_recent` at
  once and exits 2 s later with no new event: its lateness is deadline ->
  `Audience Exited` read back from the topic.

"Read back" is a consumer in this process with a 5 ms fetch wait, polled every
2 ms, so the figures include one fetch. Nothing here asserts speed.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from audiences.adapters.kafka.topics import Topics, ensure_topics
from audiences.adapters.settings import Settings
from audiences.adapters.stream.definitions import apply_definitions
from audiences.core.events import format_iso, parse_iso_ms
from audiences.errors import AudiencesError
from audiences.tools.bench.isolation import isolated_settings
from audiences.tools.bench.workload import SEED, generate, render

PROBE_WINDOW_S = 2
# librdkafka's default: a live producer batches for 5 ms (one request per record would
# cost the broker, on the same 2 cores, more than the engine). Counted in the latency.
PRODUCER_LINGER_MS = 5
PROBE = "Latency Probe"
PROBE_DEFINITION: dict[str, Any] = {
    "key": "lat_recent",
    "condition": {"performed": {"event": PROBE, "within": f"{PROBE_WINDOW_S}s"}},
}


@dataclass
class _Outputs:
    """Transitions as a reader sees them: (received wall time, message)."""

    seen: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)


def _read(bootstrap_config: dict[str, Any], topic: str, outputs: _Outputs) -> None:
    consumer = Consumer(
        {
            **bootstrap_config,
            "group.id": f"latency-reader-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 5,
        }
    )
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        while not outputs.stop.is_set():
            # consume(n, timeout) returns only when n records came or the timeout passed:
            # a short timeout keeps the reader's own delay under 2 ms.
            for msg in consumer.consume(500, 0.002):
                if msg.error() is None and msg.value() is not None:
                    outputs.seen.append((time.time(), orjson.loads(msg.value())))
    finally:
        consumer.close()


def percentiles(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"count": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    ordered = sorted(values)

    def at(share: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(share * len(ordered)))] * 1000, 1)

    return {
        "count": len(ordered),
        "p50_ms": at(0.50),
        "p99_ms": at(0.99),
        "max_ms": round(ordered[-1] * 1000, 1),
    }


def prepare(
    base: Settings,
    run: str,
    partitions: int,
    definitions: list[dict[str, Any]],
    data_dir: Path,
) -> Settings:
    """Fresh topics and definitions for the latency worker; its settings."""
    settings = isolated_settings(
        base, f"{run}-latency", f"{run}-latency-events", partitions, data_dir
    )
    topics = Topics.from_settings(settings)
    ensure_topics(settings, topics)
    apply_definitions(settings, topics, [*definitions, PROBE_DEFINITION])
    return settings


def measure(
    settings: Settings,
    rate: float,
    seconds: float,
    users: int,
    workload: str,
    alive: Any,
) -> dict[str, Any]:
    """Send at `rate` for `seconds` to the latency worker of `settings` (already serving);
    `alive()` says whether the worker still runs."""
    if rate <= 0 or seconds <= 0:
        raise AudiencesError("latency: the rate and the duration must be positive")
    topics = Topics.from_settings(settings)
    outputs = _Outputs()
    reader = threading.Thread(
        target=_read, args=(settings.kafka_config(), topics.audience_events, outputs), daemon=True
    )
    reader.start()
    try:
        time.sleep(1.0)  # the reader is assigned before anything is sent
        sent = _produce_at_rate(settings, topics.events, rate, seconds, users, workload)
        probes = sum(1 for _, name in sent.values() if name == PROBE)
        deadline = time.monotonic() + PROBE_WINDOW_S + 30
        while time.monotonic() < deadline:
            exits = sum(
                1
                for _, m in list(outputs.seen)
                if m.get("event") == "Audience Exited"
                and m.get("properties", {}).get("reason", {}).get("trigger") == "deadline"
            )
            if exits >= probes:
                break
            if not alive():
                raise AudiencesError("latency: the engine worker stopped")
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        outputs.stop.set()
        reader.join(10)
    event_latency: list[float] = []
    lateness: list[float] = []
    trace: list[tuple[str, float, float]] = []  # (kind, when it started, latency)
    for received, message in list(outputs.seen):
        reason = message.get("properties", {}).get("reason", {})
        if reason.get("trigger") == "event" and message.get("event") == "Audience Entered":
            origin = sent.get(reason.get("messageId", ""))
            if origin is not None:
                event_latency.append(received - origin[0])
                trace.append(("entered", origin[0], received - origin[0]))
        elif reason.get("trigger") == "deadline":
            due_ms = parse_iso_ms(message.get("timestamp"))
            if due_ms is not None:
                lateness.append(received - due_ms / 1000)
                trace.append(("exited", due_ms / 1000, received - due_ms / 1000))
    trace_path = os.environ.get("AUDIENCES_BENCH_LATENCY_TRACE")
    if trace_path:  # every measurement, for looking at latency over time
        Path(trace_path).write_bytes(orjson.dumps(sorted(trace, key=lambda row: row[1])))
    return {
        "rate_events_per_s": round(rate, 1),
        "seconds": seconds,
        "events": len(sent),
        "probes": probes,
        "outputs": len(outputs.seen),
        "event_to_entered": percentiles(event_latency),
        "deadline_to_exited": percentiles(lateness),
    }


def _produce_at_rate(
    settings: Settings, topic: str, rate: float, seconds: float, users: int, workload: str
) -> dict[str, tuple[float, str]]:
    """messageId -> (wall time sent, event name), sent evenly at `rate` per second."""
    total = int(rate * seconds)
    rows = generate(total, users, workload, SEED + 1).rows  # other users' days, same shape
    producer = Producer({**settings.producer_config(), "linger.ms": PRODUCER_LINGER_MS})
    sent: dict[str, tuple[float, str]] = {}
    started = time.monotonic()
    for n in range(total):
        wait = started + n / rate - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        now = time.time()
        if n % 10 == 9:
            user = f"lat-{n:07d}"
            message_id = f"lat-{n}"
            name = PROBE
            key, value = (
                user.encode(),
                orjson.dumps(
                    {
                        "type": "track",
                        "event": PROBE,
                        "userId": user,
                        "messageId": message_id,
                        "timestamp": format_iso(int(now * 1000)),
                    }
                ),
            )
        else:
            key, value = render(n, rows[n], at=int(now * 1000))
            message_id = f"bench-{n:09d}"
            name = "workload"
        while True:
            try:
                producer.produce(topic, key=key, value=value)
                break
            except BufferError:
                producer.poll(0.01)
        sent[message_id] = (now, name)
        producer.poll(0)
    producer.flush(30)
    return sent
