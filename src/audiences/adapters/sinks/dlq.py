"""Dead letters of the sinks (`audience-events-dlq`, SPEC §1) and their replay.

A dead letter is the original record (key and value as on `audience-events`)
with headers: `destination`, `error_reason` (rejected | retries_exhausted | too_large |
invalid_message), `status` (HTTP status, empty when there was none),
`response` (an excerpt of the response body), `error` (one readable line), and
`source_topic` / `source_partition` / `source_offset` of the original record.

`audiences dlq replay --destination NAME` re-sends the dead letters of one
destination that arrived since its last replay (a consumer group
`{app_id}-dlq-replay-{name}` remembers where it stopped; `--from-beginning`
re-sends all). It reads to a fence (`adapters/kafka/fence.py`), so the end is
exact on every broker; messages that fail again are dead-lettered again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import orjson
from confluent_kafka import KafkaError, Message, Producer, TopicPartition

from audiences.adapters import metrics
from audiences.adapters.kafka.clients import KafkaClients
from audiences.adapters.kafka.fence import read_to_fence, write_fences
from audiences.adapters.kafka.topics import Topics
from audiences.adapters.settings import Settings
from audiences.adapters.sinks.config import Destination
from audiences.adapters.sinks.delivery import Deliverer, Outcome, Transport, wall_clock_ms
from audiences.errors import BrokerError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    """One output message on its way to a destination, with where it came from."""

    key: bytes | None
    value: bytes
    message: dict[str, Any] | None  # None: not a JSON object (dead-lettered as invalid_message)
    source_topic: str
    source_partition: int
    source_offset: int
    timestamp_ms: int


def decode(value: bytes | None) -> dict[str, Any] | None:
    try:
        message = orjson.loads(value or b"")
    except orjson.JSONDecodeError:
        return None
    return message if isinstance(message, dict) else None


INVALID = Outcome("dead", "invalid_message", error="not a JSON object")


def dead_letter_headers(destination: str, item: Item, outcome: Outcome) -> list[tuple[str, bytes]]:
    status = "" if outcome.status is None else str(outcome.status)
    error = outcome.error or f"HTTP {status}: {outcome.response[:200]}"
    return [
        ("destination", destination.encode()),
        ("error_reason", outcome.reason.encode()),
        ("status", status.encode()),
        ("response", outcome.response.encode()),
        ("error", error.encode()),
        ("source_topic", item.source_topic.encode()),
        ("source_partition", str(item.source_partition).encode()),
        ("source_offset", str(item.source_offset).encode()),
    ]


def header(msg: Message, name: str) -> str | None:
    for key, value in msg.headers() or ():
        if key == name:
            return value.decode() if value is not None else ""
    return None


async def produce_and_wait(
    producer: Producer,
    topic: str,
    records: Iterable[tuple[bytes | None, bytes, list[tuple[str, bytes]]]],
    timeout_s: float = 30.0,
) -> None:
    """Produce `records` and wait for every acknowledgement (BrokerError otherwise)."""
    errors: list[str] = []

    def delivered(err: KafkaError | None, _msg: Any) -> None:
        if err is not None:
            errors.append(str(err))

    count = 0
    for key, value, headers in records:
        producer.produce(topic, key=key, value=value, headers=headers, on_delivery=delivered)
        count += 1
    if not count:
        return
    remaining = await asyncio.get_running_loop().run_in_executor(None, producer.flush, timeout_s)
    if errors or remaining:
        raise BrokerError(f"cannot write to {topic}: {errors or 'timed out'}", retriable=True)


async def write_dead_letters(
    producer: Producer, topic: str, destination: str, dead: list[tuple[Item, Outcome]]
) -> None:
    await produce_and_wait(
        producer,
        topic,
        ((item.key, item.value, dead_letter_headers(destination, item, o)) for item, o in dead),
    )
    for _item, outcome in dead:
        metrics.SINK_DLQ.labels(destination=destination, reason=outcome.reason).inc()
        log.warning("%s: dead-lettered a message (%s)", destination, outcome.reason)


@dataclass
class ReplayReport:
    found: int = 0
    delivered: int = 0
    skipped: int = 0
    dead_lettered: int = 0
    invalid: int = 0  # not JSON: can never be delivered, left where they are


def replay_dead_letters(
    clients: KafkaClients,
    destination: Destination,
    transport: Transport,
    *,
    from_beginning: bool = False,
    max_retry_age_ms: int = 60_000,
) -> ReplayReport:
    """Re-send the dead letters of `destination` (blocking; runs its own event loop), with
    the clients of `clients` (the app's `KafkaClients`)."""
    settings = clients.settings
    topics = Topics.from_settings(settings)
    topic = topics.audience_events_dlq
    consumer = clients.dlq_replay_consumer(destination.name)
    producer = clients.dead_letter_producer()
    try:
        partitions = sorted(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
        fences = write_fences(producer, topic, partitions)
        start = {p: 0 for p in partitions}
        if not from_beginning:
            committed = consumer.committed([TopicPartition(topic, p) for p in partitions], 10)
            for tp in committed:
                if tp.offset >= 0:  # OFFSET_INVALID (< 0): nothing committed yet
                    start[tp.partition] = tp.offset
        per_partition: dict[int, list[Item]] = {}
        for msg in read_to_fence(consumer, topic, fences, start):
            if header(msg, "destination") != destination.name:
                continue
            per_partition.setdefault(msg.partition(), []).append(_dead_item(msg))
        report = asyncio.run(
            _replay(
                settings,
                destination,
                transport,
                producer,
                per_partition,
                max_retry_age_ms,
            )
        )
        consumer.commit(
            offsets=[TopicPartition(topic, p, fence + 1) for p, fence in fences.items()],
            asynchronous=False,
        )
        return report
    finally:
        consumer.close()


def _dead_item(msg: Message) -> Item:
    """A dead letter as an item again, keeping the provenance of the original record."""
    return Item(
        key=msg.key(),
        value=msg.value() or b"",
        message=decode(msg.value()),
        source_topic=header(msg, "source_topic") or "",
        source_partition=int(header(msg, "source_partition") or -1),
        source_offset=int(header(msg, "source_offset") or -1),
        timestamp_ms=msg.timestamp()[1],
    )


async def _replay(
    settings: Settings,
    destination: Destination,
    transport: Transport,
    producer: Producer,
    per_partition: dict[int, list[Item]],
    max_retry_age_ms: int,
) -> ReplayReport:
    report = ReplayReport()
    # a replay is a one-off command: a 401/403/410 dead-letters the letters again (replayable
    # later) instead of pausing or stopping it
    deliverer = Deliverer(
        replace(destination, max_retry_age_ms=max_retry_age_ms),
        transport,
        hold_auth_failures=False,
    )
    dlq_topic = Topics.from_settings(settings).audience_events_dlq
    try:
        for items in per_partition.values():
            for start in range(0, len(items), destination.batch_size):
                batch = items[start : start + destination.batch_size]
                chunk = [item for item in batch if item.message is not None]
                report.invalid += len(batch) - len(chunk)
                outcomes = await deliver_items(deliverer, chunk, wall_clock_ms())
                dead = [
                    (item, o) for item, o in zip(chunk, outcomes, strict=True) if o.kind == "dead"
                ]
                await write_dead_letters(producer, dlq_topic, destination.name, dead)
                report.found += len(batch)
                report.delivered += sum(1 for o in outcomes if o.kind == "delivered")
                report.skipped += sum(1 for o in outcomes if o.kind == "skipped")
                report.dead_lettered += len(dead)
    finally:
        await transport.close()
    return report


async def deliver_items(
    deliverer: Deliverer, items: list[Item], first_seen_ms: int
) -> list[Outcome]:
    """Outcomes of `items` in order; undecodable ones are `invalid_message` without a send."""
    valid = [(i, item.message) for i, item in enumerate(items) if item.message is not None]
    outcomes: list[Outcome] = [INVALID] * len(items)
    if len(valid) < len(items):
        metrics.SINK_DELIVERIES.labels(
            destination=deliverer.destination.name, outcome="dead_lettered"
        ).inc(len(items) - len(valid))
    if valid:
        results = await deliverer.deliver([message for _, message in valid], first_seen_ms)
        for (i, _), outcome in zip(valid, results, strict=True):
            outcomes[i] = outcome
    return outcomes
