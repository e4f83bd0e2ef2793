"""Backfills: history for trackers new to a partition, without pausing it.

A new audience or computed trait with `backfill: true` may need history that
stored profiles do not have (a new event filter or window kind: new trackers).
A second cursor re-reads the partition's retained `events` from the oldest
record and folds each past event into those trackers only, while the live
cursor goes on with the partition's *pending* catalog
(`Catalog.with_pending`): live events do not touch the new trackers, and
audiences and traits that depend on them are frozen (not judged, no output).
The history cursor chases the live one; when it reaches the live position the
new trackers have seen every event exactly once and in log order, the
partition switches to the full catalog, and re-judging lets everybody in at
once — no storm, no partial history. Each loop turn folds at most one chunk,
so live events and deadlines wait at most one chunk.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import orjson
from confluent_kafka import Consumer, KafkaException, Message, Producer, TopicPartition

from audiences.adapters.kafka.topics import Topics
from audiences.adapters.state.partition import Fold, PartitionState
from audiences.core.definitions import Catalog
from audiences.core.events import CONTROL_TYPES, future_timestamp, parse_event

log = logging.getLogger(__name__)
CHUNK = 5000  # history records folded per loop turn (all backfilling partitions)
MAX_IDLE_TURNS = 200  # turns without a history record before giving up (retention removed it)


@dataclass
class Backfill:
    """The history cursor of one partition."""

    catalog: str  # fingerprint of the full catalog it backfills for
    trackers: frozenset[str]
    start: int  # oldest retained offset when it began
    next_offset: int
    idle_turns: int = 0


def replayable(catalog: Catalog) -> set[str]:
    """Trackers that count history (not `backfill: false` ones, which start at creation)."""
    return {t.id for t in catalog.trackers.values() if not t.from_ms}


class Backfills:
    """Runs the history cursors of every backfilling partition over one consumer."""

    def __init__(self, consumer: Consumer, producer: Producer, topics: Topics) -> None:
        self.consumer = consumer
        self.producer = producer  # for progress reports
        self.topics = topics
        self._assigned: dict[int, int] = {}  # partition -> id of the cursor it was assigned for

    def plan(self, partition: PartitionState, full: Catalog, log_start: int) -> None:
        """Point `partition` at `full`, or at its pending variant with a history cursor
        when `full` has trackers whose history the partition lacks."""
        if partition.complete_trackers is None:
            # Never recorded: what the catalog tracks was live since this state began.
            partition.record_trackers(replayable(full))
        assert partition.complete_trackers is not None
        tracked = replayable(full)
        if not partition.complete_trackers <= tracked:
            # Profiles drop the data of trackers the catalog no longer has when they adopt
            # it: such an id (an edited window's former one) is no longer complete, and
            # must be backfilled if a later catalog brings it back.
            partition.record_trackers(partition.complete_trackers & tracked)
        missing = frozenset(tracked - partition.complete_trackers)
        partition.rejudge_from = b""
        running = partition.backfill
        if running is not None and running.trackers & missing:
            # A catalog change during a backfill (an edit of another audience): the cursor
            # goes on for the trackers it has folded part of the history into — starting
            # over would fold that part twice. Trackers new since wait, frozen, for the
            # next backfill, which `_finish` plans.
            running.trackers = running.trackers & missing
            running.catalog = full.fingerprint
            partition.catalog = full.with_pending(missing)
            log.info(
                "partition %d: the catalog changed; the backfill of %d trackers goes on, %d "
                "more wait for it",
                partition.number,
                len(running.trackers),
                len(missing - running.trackers),
            )
        elif missing and partition.position > log_start:
            partition.catalog = full.with_pending(missing)
            partition.backfill = Backfill(full.fingerprint, missing, log_start, log_start)
            log.info(
                "partition %d: backfilling %d new trackers over offsets %d..%d (live events "
                "go on meanwhile)",
                partition.number,
                len(missing),
                log_start,
                partition.position,
            )
        else:
            if missing:  # no history to read: live is complete
                partition.record_trackers(partition.complete_trackers | missing)
            partition.catalog = full
            partition.backfill = None
        self.report(partition, full.fingerprint)

    def turn(self, partitions: dict[int, PartitionState], full: Catalog) -> None:
        """Fold one chunk of history for every backfilling partition."""
        running = {n: p for n, p in partitions.items() if p.backfill is not None}
        cursors = {n: id(p.backfill) for n, p in running.items()}
        if cursors != self._assigned:  # a backfill started, ended or restarted
            self.consumer.assign(
                [
                    TopicPartition(self.topics.events, n, p.backfill.next_offset)
                    for n, p in sorted(running.items())
                    if p.backfill is not None
                ]
            )
            self._assigned = cursors
        if not running:
            return
        by_partition: dict[int, list[Message]] = {}
        for msg in self.consumer.consume(CHUNK, 0.0):
            if msg.error() is None:
                by_partition.setdefault(msg.partition(), []).append(msg)
        for number, partition in running.items():
            backfill = partition.backfill
            assert backfill is not None
            if self._fold(partition, backfill, by_partition.get(number, [])):
                # It read records the live cursor has not evaluated yet: read them again
                # once it has (or switch to the full catalog now if caught up).
                self.consumer.seek(TopicPartition(self.topics.events, number, backfill.next_offset))
            if backfill.next_offset >= partition.position:
                self._finish(partition, backfill, full)

    def _fold(self, partition: PartitionState, backfill: Backfill, records: list[Message]) -> bool:
        """Fold `records` below the live position; True if some were not (read ahead)."""
        records = [m for m in records if m.offset() >= backfill.next_offset]
        if not records:
            backfill.idle_turns += 1
            if backfill.idle_turns > MAX_IDLE_TURNS:
                log.warning(
                    "partition %d: backfill found nothing past offset %d (live at %d); done",
                    partition.number,
                    backfill.next_offset,
                    partition.position,
                )
                backfill.next_offset = partition.position
            return False
        backfill.idle_turns = 0
        events = []
        read_ahead = False
        for msg in records:
            if msg.offset() >= partition.position:
                read_ahead = True  # not evaluated live yet: folded once it has been
                break
            backfill.next_offset = msg.offset() + 1
            record_ms = msg.timestamp()[1]
            try:
                event = parse_event(msg.value() or b"", record_ms)
            except Exception:  # dead-lettered when it was evaluated live
                continue
            if future_timestamp(event, record_ms) is not None:
                continue  # dead-lettered live too: it never counts
            if event.type not in CONTROL_TYPES:
                events.append((event.key.encode(), event))
        partition.load({key for key, _ in events}, partition.clock_ms())
        for key, event in events:
            state = partition.cache.get(key)
            if state is None or state.merged_into is not None or partition.is_blocked(key):
                continue  # (records on the wrong partition: their forwarded copy counts)
            try:
                partition.apply(key, state, Fold(event, backfill.trackers), event.key)
            except Exception:  # a profile that cannot fold history skips it
                log.exception("partition %d: folding history failed", partition.number)
        self.report(partition, backfill.catalog)
        return read_ahead

    def _finish(self, partition: PartitionState, backfill: Backfill, full: Catalog) -> None:
        partition.backfill = None
        assert partition.complete_trackers is not None
        partition.record_trackers(partition.complete_trackers | backfill.trackers)
        log.info("partition %d: backfill done", partition.number)
        self.plan(partition, full, backfill.start)  # the full catalog (or what is still new)

    def report(self, partition: PartitionState, catalog: str) -> None:
        """Progress per partition for `audiences apply --wait` ({app_id}-progress)."""
        backfill = partition.backfill
        record = {
            "catalog": catalog,
            "partition": partition.number,
            "done": backfill.next_offset - backfill.start if backfill else 0,
            "total": partition.position - backfill.start if backfill else 0,
            "finished": backfill is None,
        }
        try:
            self.producer.produce(
                self.topics.progress,
                key=f"backfill:{partition.number}".encode(),
                value=orjson.dumps(record),
            )
            self.producer.poll(0)
        except (BufferError, KafkaException) as exc:  # progress is informative only
            log.warning("backfill progress not reported: %s", exc)

    def close(self) -> None:
        self.consumer.close()
