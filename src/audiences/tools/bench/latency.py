"""The latency phase of `audiences bench`: event -> Entered and deadline -> Exited, at a paced load.

SPEC §12 asks for p99 event -> `Audience Entered` on the topic <= 50 ms at half
load, and windowed exits p99 <= 100 ms after their deadline. This runs the
real runtime in a worker process of its own (`engine_worker`, mode `serve`:
wall clock, real deadlines) on fresh topics, with the bench's audience
definitions plus `lat_recent` (a `Latency Probe` within 2 s), while this
process produces live traffic at a fixed rate (by default half the
throughput the catch-up phase measured):

- the bench workload's events (another seed), each stamped with the time it
  is sent; every Entered they cause is measured;
- every tenth event a `Latency Probe` of a new user: enters `lat_recent` at
  once and exits 2 s later with no new event: its lateness is measured from
  that deadline.

"On the topic" is read from the records: the latency topics are set to
`message.timestamp.type=LogAppendTime`, so an event's delivery report and an
output read back carry the broker's append time. The headline figures are event
appended -> `Audience Entered` appended, and deadline -> `Audience Exited`
appended: what the engine adds, whatever the bench's producer and the broker,
on the same two cores, take to get an event onto the topic (under a broker
short of CPU that took up to 0.9 s, which earlier runs counted as the
engine's). End to end figures ride along: sent -> read back by a consumer in
this process (5 ms fetch wait, polled every 2 ms). A broker that does not
stamp append times (the embedded one) gets only those, and `clock` says so.
The first `warmup` seconds of traffic (5 by default) are reported apart: the
live worker starts on fresh topics and an empty store, and its first seconds
(stores, caches and the broker's new logs filling) are not the steady state
the targets are about. This process runs without its garbage collector
meanwhile (a full collection here paused the producer and the reader for
100-150 ms). Nothing here asserts speed.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import (
    OFFSET_BEGINNING,
    TIMESTAMP_LOG_APPEND_TIME,
    Consumer,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import (
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    ResourceType,
)

from audiences.adapters.kafka.clients import KafkaClients
from audiences.adapters.kafka.topics import Topics, ensure_topics
from audiences.adapters.settings import Settings
from audiences.adapters.stream.definitions import apply_definitions
from audiences.core.events import format_iso, parse_iso_ms
from audiences.errors import AudiencesError
from audiences.tools.bench.isolation import isolated_settings
from audiences.tools.bench.workload import SEED, Row, generate, render

log = logging.getLogger(__name__)

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
    """Transitions as a reader sees them: (received wall time, Kafka timestamp (ms) if it
    is the broker's append time else None, message)."""

    seen: list[tuple[float, int | None, dict[str, Any]]] = field(default_factory=list)
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
                    outputs.seen.append((time.time(), _appended(msg), orjson.loads(msg.value())))
    finally:
        consumer.close()


def _appended(msg: Any) -> int | None:
    """The broker's append time of a record (ms), if its topic stamps it."""
    kind, ms = msg.timestamp()
    return int(ms) if kind == TIMESTAMP_LOG_APPEND_TIME else None


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
    _stamp_appends(settings, [topics.events, topics.audience_events])
    apply_definitions(settings, topics, [*definitions, PROBE_DEFINITION])
    return settings


def _stamp_appends(settings: Settings, names: list[str]) -> None:
    """Have the broker stamp each record of `names` with its append time, so that "on the
    topic" is read from the records themselves (SPEC §12: event -> Entered *on the
    topic*). A broker that refuses (the embedded one) keeps producer times: the figures
    then fall back to sent -> read back, and say so (`clock`)."""
    admin = KafkaClients(settings).admin()
    entry = ConfigEntry(
        "message.timestamp.type",
        "LogAppendTime",
        incremental_operation=AlterConfigOpType.SET,
    )
    resources = [
        ConfigResource(ResourceType.TOPIC, name, incremental_configs=[entry]) for name in names
    ]
    try:
        for future in admin.incremental_alter_configs(resources).values():
            future.result(timeout=10)
    except Exception as exc:  # (a broker without it: measured from the clients' side)
        log.warning("latency: append times not available (%s): measuring sent -> read", exc)


def measure(
    settings: Settings,
    rate: float,
    seconds: float,
    warmup: float,
    users: int,
    workload: str,
    alive: Any,
) -> dict[str, Any]:
    """Send at `rate` for `warmup` + `seconds` to the latency worker of `settings` (already
    serving); what the events of the first `warmup` seconds cause is reported apart.
    `alive()` says whether the worker still runs."""
    if rate <= 0 or seconds <= 0 or warmup < 0:
        raise AudiencesError("latency: the rate and the duration must be positive")
    topics = Topics.from_settings(settings)
    outputs = _Outputs()
    warm = int(rate * warmup)  # records numbered below it: the warm-up's
    rows = generate(warm + int(rate * seconds), users, workload, SEED + 1).rows
    appended = [0] * len(rows)  # per record sent: its append time (ms), if stamped
    reader = threading.Thread(
        target=_read, args=(settings.kafka_config(), topics.audience_events, outputs), daemon=True
    )
    # This process is the instrument: a full collection here (over the workload, what is
    # sent and what is read back) took 100-150 ms every few seconds, a pause the figures
    # counted as the engine's. Nothing measured makes cycles: no collector meanwhile.
    gc.collect()
    gc.freeze()
    gc.disable()
    reader.start()
    try:
        time.sleep(1.0)  # the reader is assigned before anything is sent
        sent = _produce_at_rate(settings, topics.events, rate, rows, appended)
        probes = sum(1 for _, name, _ in sent.values() if name == PROBE)
        deadline = time.monotonic() + PROBE_WINDOW_S + 30
        while time.monotonic() < deadline:
            exits = sum(
                1
                for _, _, m in list(outputs.seen)
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
        gc.enable()
        gc.unfreeze()
    # On the topic -> on the topic, from the broker's append times (SPEC §12); and end to
    # end, sent -> read back by this process (adds the producer's and the reader's legs).
    # Each for the measured records and for the warm-up's.
    figures: dict[str, list[float]] = {
        f"{when}{what}": []
        for when in ("", "warmup_")
        for what in ("entered", "exited", "entered_read", "exited_read")
    }
    stamped = True  # every figure from append times
    # (kind, start, sent -> read back, on the topic -> on the topic or -1)
    trace: list[tuple[str, float, float, float]] = []
    for received, output_ms, message in list(outputs.seen):
        reason = message.get("properties", {}).get("reason", {})
        if reason.get("trigger") == "event" and message.get("event") == "Audience Entered":
            origin = sent.get(reason.get("messageId", ""))
            if origin is None:
                continue
            start, _, number = origin
            input_ms = appended[number]
            kind, read = "entered", received - start
            topic = (output_ms - input_ms) / 1000 if output_ms is not None and input_ms else None
        elif reason.get("trigger") == "deadline":
            due_ms = parse_iso_ms(message.get("timestamp"))
            user = str(message.get("userId") or "")
            if due_ms is None or not user.startswith("lat-"):
                continue
            number = int(user[4:])
            start = due_ms / 1000
            kind, read = "exited", received - start
            topic = (output_ms - due_ms) / 1000 if output_ms is not None else None
        else:
            continue
        when = "warmup_" if number < warm else ""
        figures[f"{when}{kind}_read"].append(read)
        if topic is None:
            stamped = False
        else:
            figures[f"{when}{kind}"].append(topic)
        trace.append((kind, start, read, -1.0 if topic is None else topic))
    if not stamped:
        for when in ("", "warmup_"):
            for kind in ("entered", "exited"):
                figures[f"{when}{kind}"] = figures[f"{when}{kind}_read"]
    trace_path = os.environ.get("AUDIENCES_BENCH_LATENCY_TRACE")
    if trace_path:  # every measurement, for looking at latency over time
        Path(trace_path).write_bytes(orjson.dumps(sorted(trace, key=lambda row: row[1])))
    return {
        "rate_events_per_s": round(rate, 1),
        "seconds": seconds,
        "events": len(sent) - warm,
        "probes": sum(1 for n in range(warm, len(rows)) if n % 10 == 9),
        "outputs": len(outputs.seen),
        "clock": "on the topic (append times)" if stamped else "sent -> read back",
        "event_to_entered": percentiles(figures["entered"]),
        "deadline_to_exited": percentiles(figures["exited"]),
        "sent_to_entered_read": percentiles(figures["entered_read"]),
        "deadline_to_exited_read": percentiles(figures["exited_read"]),
        "warmup": {
            "seconds": warmup,
            "events": warm,
            "event_to_entered": percentiles(figures["warmup_entered"]),
            "deadline_to_exited": percentiles(figures["warmup_exited"]),
        },
    }


# Records are rendered before the clock starts, stamped with this time, which each one's
# send replaces (bytes.replace) with the time it is sent: rendering them while pacing cost
# this process, on the engine's two cores, a tenth of its CPU (py-spy).
_UNSENT = format_iso(0).encode()


def _prerender(rows: list[Row]) -> list[tuple[bytes, bytes, str, str]]:
    """(key, value stamped _UNSENT, messageId, event name) of each record to send: the
    workload's rows, every tenth replaced by a `Latency Probe` of a user of its own."""
    records = []
    for n, row in enumerate(rows):
        if n % 10 == 9:
            user, message_id = f"lat-{n:07d}", f"lat-{n}"
            body = {
                "type": "track",
                "event": PROBE,
                "userId": user,
                "messageId": message_id,
                "timestamp": _UNSENT.decode(),
            }
            records.append((user.encode(), orjson.dumps(body), message_id, PROBE))
        else:
            key, value = render(n, row, at=0)
            records.append((key, value, f"bench-{n:09d}", "workload"))
    return records


def _produce_at_rate(
    settings: Settings, topic: str, rate: float, rows: list[Row], appended: list[int]
) -> dict[str, tuple[float, str, int]]:
    """messageId -> (wall time sent, event name, number), one per row (`appended[number]`:
    its append time, from its delivery report, if the topic stamps it), sent evenly at
    `rate` per second, each stamped with the time it is sent: each millisecond, the
    records due by then (a sleep per record would cost this process, on the engine's
    cores, a system call per record)."""
    records = _prerender(rows)
    # Ordered by one request in flight, not by idempotence: an idempotent producer's thread
    # spins while a request is unanswered, on the cores the engine and the broker share.
    producer = Producer({**settings.ordered_producer_config(), "linger.ms": PRODUCER_LINGER_MS})
    produce, poll, clock, wall = producer.produce, producer.poll, time.monotonic, time.time
    sent: dict[str, tuple[float, str, int]] = {}
    stamp_ms, stamp = -1, b""

    def acked(n: int) -> Callable[[Any, Any], None]:
        def delivered(err: Any, msg: Any) -> None:
            if err is None:
                appended[n] = _appended(msg) or 0

        return delivered

    started = clock()
    for n, (key, value, message_id, name) in enumerate(records):
        while started + n / rate > clock():
            time.sleep(0.001)
        now = wall()
        now_ms = int(now * 1000)
        if now_ms != stamp_ms:  # (tens of records share a millisecond at these rates)
            stamp_ms, stamp = now_ms, format_iso(now_ms).encode()
        value = value.replace(_UNSENT, stamp, 1)
        while True:
            try:
                produce(topic, key=key, value=value, on_delivery=acked(n))
                break
            except BufferError:
                poll(0.01)
        sent[message_id] = (now, name, n)
        poll(0)
    producer.flush(30)
    return sent
