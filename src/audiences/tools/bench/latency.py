"""`audiences bench --latency`: event -> transition latency and deadline lateness.

SPEC §11 asks for p99 event -> `Audience Entered` on the topic <= 50 ms at half
load, and windowed exits p99 <= 100 ms after their deadline. This runs the real
evaluator on the wall clock, on fresh topics, and produces events at a fixed
rate (by default half of the throughput `audiences bench` just measured):

- `Order Completed` of a new user each: enters `lat_buyers` at once, so its
  latency is event sent -> `Audience Entered` read from `audience-events`;
- every tenth event a `Latency Probe`: enters `lat_recent` and exits it 2 s
  later with no new event, so its lateness is deadline -> `Audience Exited`
  read from the topic.

"Read from the topic" is a consumer in this process with a 5 ms fetch wait, so
the figures include one fetch. Nothing here asserts speed.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from audiences.adapters.kafka.clients import KafkaClients
from audiences.adapters.kafka.topics import Topics, ensure_topics
from audiences.adapters.settings import Settings
from audiences.adapters.stream.definitions import apply_definitions
from audiences.adapters.stream.runtime import Runtime
from audiences.core.events import format_iso, parse_iso_ms
from audiences.errors import AudiencesError
from audiences.tools.bench.isolation import isolated_settings

PROBE_WINDOW_S = 2
DEFINITIONS: list[dict[str, Any]] = [
    {"key": "lat_buyers", "condition": {"performed": {"event": "Order Completed", "within": "1h"}}},
    {
        "key": "lat_recent",
        "condition": {"performed": {"event": "Latency Probe", "within": f"{PROBE_WINDOW_S}s"}},
    },
]


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
            for msg in consumer.consume(500, 0.05):
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


def measure_latency(
    base: Settings, run: str, partitions: int, rate: float, seconds: float, data_dir: Path
) -> dict[str, Any]:
    """Latencies at `rate` events/s for `seconds` (see the module docstring)."""
    if rate <= 0 or seconds <= 0:
        raise AudiencesError("latency: the rate and the duration must be positive")
    settings = isolated_settings(
        base, f"{run}-latency", f"{run}-latency-events", partitions, data_dir
    )
    topics = Topics.from_settings(settings)
    ensure_topics(settings, topics)
    apply_definitions(settings, topics, DEFINITIONS)
    evaluator = Runtime(settings, topics, KafkaClients(settings))  # wall clock: real deadlines
    worker = threading.Thread(target=evaluator.run, name="latency-evaluator", daemon=True)
    worker.start()
    outputs = _Outputs()
    reader = threading.Thread(
        target=_read, args=(settings.kafka_config(), topics.audience_events, outputs), daemon=True
    )
    try:
        if not evaluator.ready.wait(180):
            raise AudiencesError(f"latency: the evaluator did not start: {evaluator.failed!r}")
        reader.start()
        sent = _produce_at_rate(settings, topics.events, rate, seconds)
        probes = sum(1 for kind in sent.values() if kind[1] == "Latency Probe")
        expected = len(sent) + probes  # one Entered per event, one Exited per probe
        deadline = time.monotonic() + PROBE_WINDOW_S + 30
        while len(outputs.seen) < expected and time.monotonic() < deadline:
            if not worker.is_alive():
                raise AudiencesError(f"latency: the evaluator stopped: {evaluator.failed!r}")
            time.sleep(0.1)
    finally:
        outputs.stop.set()
        evaluator.stop()
        worker.join(60)
        if reader.is_alive():
            reader.join(10)
    event_latency: list[float] = []
    lateness: list[float] = []
    for received, message in list(outputs.seen):
        reason = message.get("properties", {}).get("reason", {})
        if reason.get("trigger") == "event" and message.get("event") == "Audience Entered":
            origin = sent.get(reason.get("messageId", ""))
            if origin is not None:
                event_latency.append(received - origin[0])
        elif reason.get("trigger") == "deadline":
            due_ms = parse_iso_ms(message.get("timestamp"))
            if due_ms is not None:
                lateness.append(received - due_ms / 1000)
    return {
        "rate_events_per_s": round(rate, 1),
        "seconds": seconds,
        "events": len(sent),
        "outputs": len(outputs.seen),
        "event_to_entered": percentiles(event_latency),
        "deadline_to_exited": percentiles(lateness),
    }


def _produce_at_rate(
    settings: Settings, topic: str, rate: float, seconds: float
) -> dict[str, tuple[float, str]]:
    """messageId -> (wall time sent, event name), sent evenly at `rate` per second."""
    producer = Producer({**settings.producer_config(), "linger.ms": 0})
    sent: dict[str, tuple[float, str]] = {}
    total = int(rate * seconds)
    started = time.monotonic()
    for n in range(total):
        wait = started + n / rate - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        name = "Latency Probe" if n % 10 == 9 else "Order Completed"
        user = f"lat-{n:07d}"
        message_id = f"lat-{n}"
        now = time.time()
        event = {
            "type": "track",
            "event": name,
            "userId": user,
            "messageId": message_id,
            "timestamp": format_iso(int(now * 1000)),
        }
        while True:
            try:
                producer.produce(topic, key=user.encode(), value=orjson.dumps(event))
                break
            except BufferError:
                producer.poll(0.01)
        sent[message_id] = (now, name)
        producer.poll(0)
    producer.flush(30)
    return sent
