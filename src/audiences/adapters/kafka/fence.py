"""Reading a partition to its real end, on any Kafka-compatible broker.

The embedded Tansu broker reports a high watermark of (base offset of the last
record batch + 1): after a multi-record batch, trusting it would silently skip
the rest of that batch. So readers that must see everything (changelog
recovery, definitions) first append a *fence* record — key `FENCE_KEY`, null
value — and read until they pass its offset, known from the delivery report.
Readers of these topics skip fence records; compaction keeps at most one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    Message,
    Producer,
    TopicPartition,
)

from audiences.errors import BrokerError

FENCE_KEY = b"__fence__"


def write_fences(
    producer: Producer, topic: str, partitions: list[int], timeout_s: float = 30.0
) -> dict[int, int]:
    """Append a fence to each partition; returns partition -> fence offset."""
    offsets: dict[int, int] = {}
    errors: list[str] = []

    def delivered(err: Any, msg: Message) -> None:
        if err is not None:
            errors.append(str(err))
        else:
            offsets[msg.partition()] = msg.offset()

    for partition in partitions:
        producer.produce(
            topic, key=FENCE_KEY, value=None, partition=partition, on_delivery=delivered
        )
    remaining = producer.flush(timeout_s)
    if errors or remaining or len(offsets) != len(partitions):
        raise BrokerError(
            f"cannot write fences to {topic}: {errors or 'timed out'}", retriable=True
        )
    return offsets


def read_to_fence(
    consumer: Consumer,
    topic: str,
    fences: dict[int, int],
    start: dict[int, int],
    timeout_s: float = 120.0,
) -> Iterator[Message]:
    """Yield every non-fence record of `topic` from `start` offsets up to each fence.

    `consumer` must not be subscribed (it is assigned here and unassigned after).
    """
    pending = {p for p, fence in fences.items() if start.get(p, 0) <= fence}
    consumer.assign([TopicPartition(topic, p, start.get(p, 0)) for p in sorted(pending)])
    deadline = time.monotonic() + timeout_s
    try:
        while pending:
            if time.monotonic() > deadline:
                raise BrokerError(f"timed out reading {topic} to its end", retriable=True)
            for msg in consumer.consume(1000, 0.2):
                error = msg.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        continue
                    raise BrokerError(f"reading {topic}: {error}", retriable=error.retriable())
                partition, offset = msg.partition(), msg.offset()
                if partition not in pending or offset > fences[partition]:
                    continue
                if offset == fences[partition]:
                    pending.discard(partition)
                if msg.key() != FENCE_KEY:
                    yield msg
    finally:
        consumer.unassign()


def read_to_end(
    consumer: Consumer, topic: str, partitions: int, idle_s: float = 1.0, timeout_s: float = 120.0
) -> Iterator[Message]:
    """Yield every record of `topic` from the oldest, without writing to it: up to the
    reported high watermarks, then until nothing more arrives for `idle_s` (the embedded
    broker reports a short high watermark after multi-record batches). For readers
    that may not append a fence (a changelog only its owners write)."""
    ends: dict[int, int] = {}
    for partition in range(partitions):
        _low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
        ends[partition] = int(high)
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    seen: dict[int, int] = {}
    deadline = time.monotonic() + timeout_s
    quiet_since = time.monotonic()
    try:
        while time.monotonic() < deadline:
            batch = consumer.consume(1000, 0.1)
            if batch:
                quiet_since = time.monotonic()
            for msg in batch:
                error = msg.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        continue
                    raise BrokerError(f"reading {topic}: {error}", retriable=error.retriable())
                yield msg
            # (the position, not the last record: transaction markers take offsets too)
            for tp in consumer.position([TopicPartition(topic, p) for p in ends]):
                seen[tp.partition] = tp.offset
            reached = all(seen.get(p, 0) >= end for p, end in ends.items())
            if reached and time.monotonic() - quiet_since >= idle_s:
                return
        raise BrokerError(f"timed out reading {topic} to its end", retriable=True)
    finally:
        consumer.unassign()


def read_until(
    consumer: Consumer, topic: str, partition: int, last: int, idle_s: float
) -> Callable[[int], Iterator[Message]]:
    """A reader of one partition from a given offset up to offset `last` (inclusive: a
    record the reader's owner appended, the true end). Fails when no record arrives for
    `idle_s` (no progress), however long the whole read takes."""

    def read(start: int) -> Iterator[Message]:
        consumer.assign([TopicPartition(topic, partition, start)])
        last_progress = time.monotonic()
        try:
            while True:
                batch = consumer.consume(10_000, 0.02)  # (returns early only when full)
                if not batch:
                    if time.monotonic() - last_progress > idle_s:
                        raise BrokerError(
                            f"no progress reading {topic}[{partition}] to offset {last} "
                            f"for {idle_s:.0f}s",
                            retriable=True,
                        )
                    continue
                last_progress = time.monotonic()
                for msg in batch:
                    error = msg.error()
                    if error is not None:
                        if error.code() == KafkaError._PARTITION_EOF:
                            continue
                        raise BrokerError(f"reading {topic}: {error}", retriable=True)
                    yield msg
                    if msg.offset() >= last:
                        return
        finally:
            consumer.unassign()

    return read
