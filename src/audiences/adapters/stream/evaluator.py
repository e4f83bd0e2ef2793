"""The evaluator: batch consumption of `events`, per-user state, deadlines, outputs.

It runs in a thread of its own inside the Faust worker (see `app.py`) and owns
a confluent-kafka consumer (own group, cooperative-sticky), a producer, and one
RocksDB store per assigned partition (DESIGN.md explains why this beats a Faust
agent + Table by an order of magnitude).

A batch, per partition: parse -> multi-get states (cache, then RocksDB) ->
`step` per event -> produce outputs, one changelog record per changed profile
and a batch marker -> flush -> one WriteBatch (states, due-index, checkpoints)
-> commit input offsets. A crash anywhere loses nothing:
- before the flush completes: the batch is redone from the last checkpoint;
  outputs may repeat, with the same messageIds;
- after the flush, before the store write: recovery replays the changelog;
- the changelog only counts a batch whose marker it holds (records of a batch
  cut short by a crash are ignored), so no update is applied twice or half.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from audiences.adapters import metrics
from audiences.adapters.kafka.fence import read_to_fence, write_fences
from audiences.adapters.kafka.topics import Topics
from audiences.adapters.settings import Settings
from audiences.adapters.state.store import (
    CHANGELOG_OFFSET,
    INPUT_OFFSET,
    JUDGED_CATALOG,
    STREAM_TIME,
    USER,
    PartitionStore,
    due_key,
)
from audiences.adapters.stream.definitions import DefinitionsLog
from audiences.core.definitions import Catalog
from audiences.core.definitions.conditions import ALL_EVENTS, route_of
from audiences.core.evaluator import Control, Output, Tick, Transition, step
from audiences.core.events import CONTROL_TYPES, Event, parse_event
from audiences.core.outputs import render_output
from audiences.core.state import NEVER, UserState
from audiences.errors import BrokerError, InvalidEventError

log = logging.getLogger(__name__)
MARKER_PREFIX = b"__batch__:"
CONSUME_WAIT_S = 0.005  # longest wait for a batch to fill
REJUDGE_CHUNK = 1000  # profiles re-judged per partition per loop turn after a change
SUPPRESSED = b"\x00suppressed:"  # changelog/state key prefix of a deleted user's marker
META_PREFIX = b"\x00"  # keys that are not profiles (suppression markers, partition meta)
COMPLETE_TRACKERS = b"\x00meta:trackers"  # tracker ids whose history this partition holds
COUNTS = b"\x00meta:counts"  # {"sizes": {audience: members}, "users": profiles}
REPLAY_CHUNK = 5000  # events re-read per loop turn (all replaying partitions)
REPLAY_MAX_IDLE_TURNS = 50  # ~10 s without a record before a backfill gives up waiting
Clock = Callable[[], int]


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class Partition:
    """One assigned `events` partition: its store, hot cache and position."""

    number: int
    store: PartitionStore
    position: int  # next input offset to evaluate
    session: str  # id of this ownership: changelog records name the batch they belong to
    batch_seq: int = 0
    stream_time_ms: int = 0  # latest event time evaluated: the clock while catching up
    cache: dict[bytes, UserState] = field(default_factory=dict)
    suppressed: set[bytes] = field(default_factory=set)  # deleted users: events dropped
    rejudge_from: bytes | None = None  # definitions changed: next profile key to re-judge
    complete_trackers: set[str] = field(default_factory=set)  # history replayed or live
    trackers_recorded: bool = False  # COMPLETE_TRACKERS is in the changelog
    sizes: dict[str, int] = field(default_factory=dict)  # members per audience
    users: int = 0  # profiles stored
    counts_changed: bool = False
    replay: Replay | None = None  # backfill in progress (the partition is paused meanwhile)


@dataclass
class Replay:
    """Re-reading `events` [start, end) of one partition for trackers new to it."""

    trackers: frozenset[str]
    start: int
    end: int  # the partition's position when the replay began (exclusive)
    next_offset: int
    idle_turns: int = 0  # consecutive turns that found no record


@dataclass
class _Staged:
    """What one batch changes in one partition, before it is durable."""

    states: dict[bytes, UserState | None] = field(default_factory=dict)  # None = erased
    old_wakes: dict[bytes, int] = field(default_factory=dict)
    stale_due: list[bytes] = field(default_factory=list)
    raw: dict[bytes, bytes | None] = field(default_factory=dict)  # markers, meta; None = delete


class Evaluator:
    """Blocking loop; `run()` in a thread, `stop()` from anywhere."""

    def __init__(self, settings: Settings, topics: Topics, clock: Clock = wall_clock_ms) -> None:
        self.settings = settings
        self.topics = topics
        self.clock = clock
        self.data_dir = Path(settings.data_dir) / settings.app_id
        self.partitions: dict[int, Partition] = {}
        self.ready = threading.Event()
        self.failed: BaseException | None = None
        # Told the assigned partitions after every rebalance (the web API's worker registry).
        self.on_partitions: Callable[[list[int]], None] | None = None
        self._stop = threading.Event()
        self._delivery_errors: list[str] = []
        self._changelog_ends: dict[int, int] = {}
        self._drained = False
        self._transition_counts: dict[tuple[str, bool], int] = {}  # flushed to metrics per batch
        base = settings.kafka_config()
        self._producer = Producer(
            {
                **settings.producer_config(),
                "enable.idempotence": True,
                "linger.ms": 2,
                "compression.type": "lz4",
            }
        )
        self._consumer = Consumer(
            {
                **settings.group_consumer_config(f"{settings.app_id}-evaluator"),
                "fetch.wait.max.ms": settings.fetch_wait_ms,
            }
        )
        self._recovery_consumer = Consumer(
            {**base, "group.id": f"{settings.app_id}-recovery", "enable.auto.commit": False}
        )
        self._replay_consumer = Consumer(
            {
                **base,
                "group.id": f"{settings.app_id}-backfill",
                "enable.auto.commit": False,
                "enable.partition.eof": False,
                "auto.offset.reset": "earliest",  # an offset retention removed: the oldest left
                "fetch.wait.max.ms": settings.fetch_wait_ms,
            }
        )
        self._replay_assigned: set[int] = set()
        self.definitions = DefinitionsLog(settings, topics)

    # -- lifecycle -------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:
            self.failed = exc
            log.exception("evaluator stopped on an error")
            raise
        finally:
            self._close()

    def _run(self) -> None:
        # Batches allocate many short-lived objects; the default gen-0 threshold (700)
        # makes the collector run every few events. Long-lived state is frozen on assign.
        gc.set_threshold(50_000, 50, 100)
        self.definitions.load(self._producer)
        self._consumer.subscribe(
            [self.topics.events],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        tick_s = self.settings.tick_interval_ms / 1000
        last_sweep = 0.0
        while not self._stop.is_set():
            # A short wait: consume() returns early only for a full batch, so a long one
            # would hold every small batch back (latency); sweeps keep their own pace.
            messages = self._consumer.consume(self.settings.batch_size, CONSUME_WAIT_S)
            self._drained = len(messages) < self.settings.batch_size
            if self.definitions.poll():
                for partition in self.partitions.values():
                    partition.rejudge_from = b""
                    if partition.replay is None:
                        self._plan_backfill(partition)
            if messages:
                self._process(messages)
            if time.monotonic() - last_sweep >= tick_s:
                self._sweep()
                last_sweep = time.monotonic()
            self._replay()
            self._rejudge()

    def _close(self) -> None:
        try:
            for number in list(self.partitions):
                self._release(number, commit=True)
            self._consumer.close()
        except Exception:  # the broker may be gone: closing must not hide the first error
            log.warning("closing the consumer failed", exc_info=True)
        self._recovery_consumer.close()
        self._replay_consumer.close()
        self.definitions.close()

    # -- rebalance -------------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, assigned: list[TopicPartition]) -> None:
        self.ready.clear()
        start = []
        fences = write_fences(
            self._producer, self.topics.changelog, [tp.partition for tp in assigned]
        )
        for tp in assigned:
            partition = self._recover(tp.partition, fences[tp.partition])
            self.partitions[tp.partition] = partition
            start.append(TopicPartition(tp.topic, tp.partition, partition.position))
        consumer.incremental_assign(start)
        for tp in assigned:
            self._plan_backfill(self.partitions[tp.partition])
        gc.collect()
        gc.freeze()  # recovered state and catalog are long-lived: keep them out of GC scans
        log.info("assigned partitions %s", sorted(self.partitions))
        self.ready.set()
        self._partitions_changed()

    def _on_revoke(self, consumer: Consumer, revoked: list[TopicPartition]) -> None:
        for tp in revoked:
            self._release(tp.partition, commit=True)
        log.info("revoked %s; now %s", [tp.partition for tp in revoked], sorted(self.partitions))
        self._partitions_changed()

    def _on_lost(self, consumer: Consumer, lost: list[TopicPartition]) -> None:
        for tp in lost:
            self._release(tp.partition, commit=False)
        log.warning("lost partitions %s", [tp.partition for tp in lost])
        self._partitions_changed()

    def _partitions_changed(self) -> None:
        if self.on_partitions is not None:
            self.on_partitions(sorted(self.partitions))

    def _release(self, number: int, *, commit: bool) -> None:
        partition = self.partitions.pop(number, None)
        if partition is None:
            return
        if commit:
            tp = TopicPartition(self.topics.events, number, partition.position)
            try:
                self._consumer.commit(offsets=[tp], asynchronous=False)
            except Exception:  # the store checkpoint is the source of truth anyway
                log.warning("commit on release of partition %d failed", number, exc_info=True)
        partition.store.close()
        with contextlib.suppress(KeyError):  # never published
            metrics.STATE_USERS.remove(str(number))
        for audience in partition.sizes:
            metrics.AUDIENCE_SIZE.labels(audience).set(0)
        self._publish_counts()

    def _recover(self, number: int, fence: int) -> Partition:
        """Open the partition's store and bring it up to date from the changelog
        (up to `fence`, a record this worker appended: the real end, see fence.py)."""
        started = time.monotonic()
        store = PartitionStore(self.data_dir / f"p{number}")
        checkpoint = store.get_meta(INPUT_OFFSET, -1)
        changelog_from = store.get_meta(CHANGELOG_OFFSET, 0)
        fences = {number: fence}
        # Pass 1: read; a batch counts only if its marker was written (see module doc).
        records: list[tuple[str, int, int, bytes, bytes | None, int]] = []
        complete: dict[str, int] = {}
        position = checkpoint
        stream_time = store.get_meta(STREAM_TIME, 0)
        for msg in read_to_fence(
            self._recovery_consumer, self.topics.changelog, fences, {number: changelog_from}
        ):
            key = msg.key() or b""
            header = _changelog_header(msg)
            if header is None:
                continue
            offset, session, seq, wake = header
            if key.startswith(MARKER_PREFIX):
                complete[session] = max(complete.get(session, -1), seq)
                position = max(position, offset)
                stream_time = max(stream_time, int(msg.value() or 0))
            elif offset > checkpoint:
                records.append((session, seq, offset, key, msg.value(), wake))
        # Pass 2: apply complete batches in log order (last write wins).
        batch = store.new_batch()
        applied = 0
        for session, seq, _offset, key, value, wake in records:
            if seq > complete.get(session, -1):
                continue
            if value is None:
                batch.delete(USER + key)
            else:
                batch.put(USER + key, value)
                if wake != NEVER:
                    batch.put(due_key(wake, key), b"")
            applied += 1
        position = max(position, self._committed(number), 0)
        batch.put(INPUT_OFFSET, str(position).encode())
        batch.put(CHANGELOG_OFFSET, str(fences[number] + 1).encode())
        store.write(batch)
        log.info(
            "partition %d recovered: %d changelog records applied in %.3fs, resuming at offset %d",
            number,
            applied,
            time.monotonic() - started,
            position,
        )
        partition = Partition(
            number, store, position, session=os.urandom(6).hex(), stream_time_ms=stream_time
        )
        partition.suppressed = {key[len(SUPPRESSED) :] for key in store.user_keys(SUPPRESSED)}
        if store.get_text(JUDGED_CATALOG) != self.definitions.catalog.fingerprint:
            partition.rejudge_from = b""
        tracked = store.get_states([COMPLETE_TRACKERS])[0]
        # A store from before backfills existed: what it tracks is taken as complete.
        partition.complete_trackers = (
            set(orjson.loads(tracked))
            if tracked is not None
            else _replayable(self.definitions.catalog)
        )
        partition.trackers_recorded = tracked is not None
        counted = store.get_states([COUNTS])[0]
        if counted is not None:
            counts = orjson.loads(counted)
            partition.sizes, partition.users = counts["sizes"], counts["users"]
        else:  # a store from before counts were kept: count once
            partition.counts_changed = True
            for key, data in store.states_from(b"", None):
                if key.startswith(META_PREFIX):
                    continue
                partition.users += 1
                for audience, membership in orjson.loads(data)[6].items():
                    if membership[0]:
                        partition.sizes[audience] = partition.sizes.get(audience, 0) + 1
        return partition

    def _committed(self, number: int) -> int:
        """The group's committed offset of a partition; -1 if it cannot be had.

        Only a hint (the store and changelog checkpoints are the truth; it matters for
        records that changed no state, e.g. dead letters): on a loaded machine the
        request can time out, and that must not kill the evaluator mid-rebalance."""
        for attempt in range(3):
            try:
                committed = self._consumer.committed(
                    [TopicPartition(self.topics.events, number)], timeout=10
                )
                return int(committed[0].offset)
            except KafkaException as exc:
                log.warning("committed offset of partition %d (try %d): %s", number, attempt, exc)
        return -1

    # -- batches ---------------------------------------------------------------------------

    def _process(self, messages: list[Message]) -> None:
        started = time.perf_counter()
        log.debug("batch of %d records", len(messages))
        by_partition: dict[int, list[Message]] = {}
        for msg in messages:
            error = msg.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    log.warning("consume error: %s", error)
                continue
            by_partition.setdefault(msg.partition(), []).append(msg)
        staged: dict[int, _Staged] = {}
        types: dict[str, int] = {}
        duplicates = suppressed = 0
        oldest_ms = NEVER  # Kafka timestamp of the batch's oldest record
        catalog = self.definitions.catalog
        for number, batch in by_partition.items():
            partition = self.partitions.get(number)
            if partition is None or partition.replay is not None:
                continue  # (a replaying partition is paused; it resumes at its position)
            events: list[tuple[bytes, Event, Message]] = []
            for msg in batch:
                if msg.offset() < partition.position:
                    continue  # already applied before a restart
                record_ms = msg.timestamp()[1]
                oldest_ms = min(oldest_ms, record_ms)
                try:
                    event = parse_event(msg.value() or b"", record_ms)
                except InvalidEventError as exc:
                    self._dead_letter(msg, exc)
                    continue
                events.append((event.key.encode(), event, msg))
                types[event.type] = types.get(event.type, 0) + 1
                if event.timestamp_ms > partition.stream_time_ms:
                    partition.stream_time_ms = event.timestamp_ms
            stage = staged[number] = _Staged()
            states = self._load(partition, {key for key, _, _ in events}, stage)
            for key, event, msg in events:
                if key in partition.suppressed and event.type != "unsuppress":
                    suppressed += 1
                    continue
                try:
                    result = step(states.get(key), event, catalog, key.decode())
                except Exception as exc:  # a bug must not stop the worker: park the event
                    log.exception(
                        "evaluation failed at %s[%d]@%d", msg.topic(), number, msg.offset()
                    )
                    self._dead_letter(msg, InvalidEventError("evaluation_error", repr(exc)))
                    continue
                self._emit(result.transitions, result.state, partition)
                if key not in states and not result.erase:
                    partition.users += 1
                    partition.counts_changed = True
                if result.controls:
                    self._send_controls(result.controls)
                if result.erase:
                    if states.pop(key, None) is not None:
                        partition.users -= 1
                        partition.counts_changed = True
                    stage.states[key] = None
                    self._suppress(partition, stage, key, True)
                    continue
                if event.type == "unsuppress":
                    self._suppress(partition, stage, key, False)
                states[key] = stage.states[key] = result.state
                duplicates += result.duplicate
            partition.position = max(partition.position, batch[-1].offset() + 1)
        self._make_durable(staged)
        if oldest_ms < NEVER:
            metrics.PROCESSING_LATENCY.observe(max(0.0, time.time() - oldest_ms / 1000))
        for event_type, count in types.items():
            metrics.EVENTS_IN.labels(event_type).inc(count)
        if duplicates:
            metrics.EVENTS_DUPLICATE.inc(duplicates)
        if suppressed:
            metrics.EVENTS_SUPPRESSED.inc(suppressed)
        self._consumer.commit(
            offsets=[
                TopicPartition(self.topics.events, n, self.partitions[n].position)
                for n in staged
                if n in self.partitions
            ],
            asynchronous=True,
        )
        metrics.BATCH_DURATION.observe(time.perf_counter() - started)

    def _sweep(self) -> None:
        """Fire due deadlines of every assigned partition (idle users included).

        A caught-up partition runs on the wall clock. A partition that is still
        catching up runs on its stream time (the latest event time evaluated):
        firing a deadline before the events that precede it would be processed
        would change the result, and replays must give the same transitions.
        """
        wall = self.clock()
        catalog = self.definitions.catalog
        staged: dict[int, _Staged] = {}
        for number, partition in self.partitions.items():
            if partition.replay is not None:
                continue  # its clock stands still until the backfill is done
            now = wall if self._caught_up(partition) else min(wall, partition.stream_time_ms)
            due = list(partition.store.due(now))
            if not due:
                continue
            stage = staged[number] = _Staged()
            states = self._load(partition, {key for _, key in due}, stage)
            for wake, key in due:
                stage.stale_due.append(due_key(wake, key))
                metrics.DEADLINE_LATENESS.observe(max(0, wall - wake) / 1000)
            for key in {key for _, key in due}:
                state = states.get(key)
                if state is None:
                    continue
                result = step(state, Tick(now), catalog, key.decode())
                stage.states[key] = result.state
                self._emit(result.transitions, result.state, partition)
        if staged:
            self._make_durable(staged)

    def _rejudge(self) -> None:
        """After definitions change, judge every stored profile on the new catalog, a
        chunk per loop turn: deleted audiences exit their members, edited ones emit
        real differences, new ones take in the profiles (`backfill`), even for users
        who send nothing more. Profiles met by events meanwhile adopt it on their own."""
        catalog = self.definitions.catalog
        staged: dict[int, _Staged] = {}
        finished: list[Partition] = []
        for number, partition in self.partitions.items():
            start = partition.rejudge_from
            if start is None or partition.replay is not None:
                continue
            rows = partition.store.states_from(start, REJUDGE_CHUNK + 1)
            chunk = rows[:REJUDGE_CHUNK]
            partition.rejudge_from = rows[REJUDGE_CHUNK][0] if len(rows) > REJUDGE_CHUNK else None
            if partition.rejudge_from is None:
                finished.append(partition)
            keys = {key for key, _ in chunk if not key.startswith(META_PREFIX)}
            stage = _Staged()
            states = self._load(partition, keys, stage)
            for key in sorted(keys):
                state = states.get(key)
                if (
                    state is None
                    or state.catalog_fingerprint == catalog.fingerprint
                    or state.merged_into is not None  # a forwarding stub judges nothing
                ):
                    continue
                result = step(state, Tick(state.clock_ms), catalog, key.decode())
                stage.states[key] = result.state
                self._emit(result.transitions, result.state, partition)
            if stage.states:
                staged[number] = stage
        if staged:
            self._make_durable(staged)
        for partition in finished:
            partition.store.put_text(JUDGED_CATALOG, catalog.fingerprint)

    # -- backfill ----------------------------------------------------------------------------

    def _plan_backfill(self, partition: Partition) -> None:
        """New trackers (a new audience or trait with `backfill: true`) have no history in
        stored profiles: re-read the partition's retained events for them first.

        The partition is paused meanwhile (its events, deadlines and re-judging wait), so
        the replayed history and live events reach the new trackers in log order."""
        missing = _replayable(self.definitions.catalog) - partition.complete_trackers
        if not missing:
            if partition.trackers_recorded:
                self._report_progress(partition)
            else:  # record it, so a worker taking the partition over knows it too
                self._complete_trackers(partition, set())
            return
        tp = TopicPartition(self.topics.events, partition.number)
        start = self._log_start(self._consumer, partition.number)
        if partition.position <= start:
            self._complete_trackers(partition, missing)  # nothing before: live is complete
            return
        partition.replay = Replay(frozenset(missing), start, partition.position, start)
        self._consumer.pause([tp])
        log.info(
            "partition %d: backfilling %d new trackers over offsets %d..%d",
            partition.number,
            len(missing),
            start,
            partition.position,
        )
        self._report_progress(partition)

    def _log_start(self, consumer: Consumer, number: int) -> int:
        """The oldest retained offset of an events partition (0 if the broker does not
        answer: reading from 0 then starts at the oldest record anyway)."""
        try:
            low, _high = consumer.get_watermark_offsets(
                TopicPartition(self.topics.events, number), timeout=10
            )
        except KafkaException as exc:
            log.warning("log start of partition %d unknown: %s", number, exc)
            return 0
        return max(0, int(low))

    def _replay(self) -> None:
        """One chunk of every running backfill (other partitions flow in between)."""
        replaying = {n: p for n, p in self.partitions.items() if p.replay is not None}
        if set(replaying) != self._replay_assigned:
            self._replay_consumer.assign(
                [
                    TopicPartition(self.topics.events, n, p.replay.next_offset)
                    for n, p in replaying.items()
                    if p.replay is not None
                ]
            )
            self._replay_assigned = set(replaying)
        if not replaying:
            return
        by_partition: dict[int, list[Message]] = {}
        for msg in self._replay_consumer.consume(REPLAY_CHUNK, 0.2):
            if msg.error() is None:
                by_partition.setdefault(msg.partition(), []).append(msg)
        catalog = self.definitions.catalog
        for number, partition in replaying.items():
            replay = partition.replay
            assert replay is not None
            records = [m for m in by_partition.get(number, ()) if m.offset() >= replay.next_offset]
            if records:
                replay.idle_turns = 0
            else:  # retention may have removed the rest; never wait forever
                replay.next_offset = max(
                    replay.next_offset, self._log_start(self._consumer, number)
                )
                replay.idle_turns += 1
                if replay.idle_turns > REPLAY_MAX_IDLE_TURNS:
                    log.warning(
                        "partition %d: backfill found nothing past offset %d (end %d); done",
                        number,
                        replay.next_offset,
                        replay.end,
                    )
                    replay.next_offset = replay.end
            stage = _Staged()
            events: list[tuple[bytes, Event]] = []
            for msg in records:
                if msg.offset() >= replay.end:
                    replay.next_offset = replay.end
                    break
                replay.next_offset = msg.offset() + 1
                try:
                    event = parse_event(msg.value() or b"", msg.timestamp()[1])
                except InvalidEventError:
                    continue
                if event.type not in CONTROL_TYPES:
                    events.append((event.key.encode(), event))
            states = self._load(partition, {key for key, _ in events}, stage)
            for key, event in events:
                state = states.get(key)
                if state is None or state.merged_into is not None or key in partition.suppressed:
                    continue
                if _replay_event(state, event, catalog, replay.trackers):
                    stage.states[key] = state
            if stage.states:
                self._make_durable({number: stage})
            if replay.next_offset >= replay.end:
                self._finish_replay(partition, replay)
            else:
                self._report_progress(partition)

    def _finish_replay(self, partition: Partition, replay: Replay) -> None:
        partition.replay = None
        self._replay_assigned.discard(partition.number)  # a next replay starts elsewhere
        self._complete_trackers(partition, set(replay.trackers))
        partition.rejudge_from = b""  # now judge everyone on the whole history
        tp = TopicPartition(self.topics.events, partition.number, partition.position)
        self._consumer.resume([tp])
        self._consumer.seek(tp)
        log.info("partition %d: backfill done", partition.number)
        if self._replayable_missing(partition):
            self._plan_backfill(partition)  # definitions changed during the replay

    def _replayable_missing(self, partition: Partition) -> bool:
        return bool(_replayable(self.definitions.catalog) - partition.complete_trackers)

    def _complete_trackers(self, partition: Partition, trackers: set[str]) -> None:
        partition.complete_trackers |= trackers
        partition.trackers_recorded = True
        stage = _Staged()
        stage.raw[COMPLETE_TRACKERS] = orjson.dumps(sorted(partition.complete_trackers))
        self._make_durable({partition.number: stage})
        self._report_progress(partition)

    def _report_progress(self, partition: Partition) -> None:
        """Per partition, for `audiences apply --wait`: the catalog it is for, and how
        far the backfill is (finished = nothing left to replay for that catalog)."""
        replay = partition.replay
        record = {
            "catalog": self.definitions.catalog.fingerprint,
            "partition": partition.number,
            "done": replay.next_offset - replay.start if replay else 0,
            "total": replay.end - replay.start if replay else 0,
            "finished": replay is None,
        }
        self._producer.produce(
            self.topics.progress,
            key=f"backfill:{partition.number}".encode(),
            value=orjson.dumps(record),
            on_delivery=self._delivered,
        )
        self._producer.poll(0)

    def _caught_up(self, partition: Partition) -> bool:
        """No records waiting: the last consume drained the queue and the position is at
        the high watermark librdkafka last saw (on Tansu that can be the start of the
        last record batch, whose records the drained consume already returned)."""
        tp = TopicPartition(self.topics.events, partition.number)
        _low, high = self._consumer.get_watermark_offsets(tp, cached=True)
        if high is None or high < 0:
            return False
        metrics.CONSUMER_LAG.labels(str(partition.number)).set(max(0, high - partition.position))
        return self._drained and partition.position >= high

    def _load(
        self, partition: Partition, keys: set[bytes], stage: _Staged
    ) -> dict[bytes, UserState]:
        cache = partition.cache
        states: dict[bytes, UserState] = {}
        missing = []
        for key in keys:
            state = cache.get(key)
            if state is None:
                missing.append(key)
            else:
                states[key] = state
        if missing:
            for key, data in zip(missing, partition.store.get_states(missing), strict=True):
                if data is not None:
                    states[key] = UserState.decode(data)
        for key in keys:
            state = states.get(key)
            stage.old_wakes[key] = state.wake_ms if state is not None else NEVER
        return states

    def _emit(self, transitions: list[Output], state: UserState, partition: Partition) -> None:
        for transition in transitions:
            output = render_output(transition, state.traits, anonymous=state.anonymous)
            self._producer.produce(
                self.topics.audience_events,
                key=transition.profile_key.encode(),
                value=orjson.dumps(output),
                on_delivery=self._delivered,
            )
            if isinstance(transition, Transition):
                counted = (transition.audience_key, transition.entered)
                self._transition_counts[counted] = self._transition_counts.get(counted, 0) + 1
                sizes = partition.sizes
                key = transition.audience_key
                sizes[key] = sizes.get(key, 0) + (1 if transition.entered else -1)
                partition.counts_changed = True

    def _send_controls(self, controls: tuple[Control, ...]) -> None:
        """Identity records travel through the events topic, keyed by the profile they
        are for (SPEC §4); they are flushed with the batch, before its offsets commit."""
        for target, record in controls:
            self._producer.produce(
                self.topics.events,
                key=target.encode(),
                value=orjson.dumps(record),
                on_delivery=self._delivered,
            )

    def _suppress(self, partition: Partition, stage: _Staged, key: bytes, on: bool) -> None:
        if on:
            partition.suppressed.add(key)
        else:
            partition.suppressed.discard(key)
        stage.raw[SUPPRESSED + key] = b"1" if on else None

    def _dead_letter(self, msg: Message, exc: InvalidEventError) -> None:
        self._producer.produce(
            self.topics.events_dlq,
            key=msg.key(),
            value=msg.value(),
            headers=[
                ("error", str(exc).encode()),
                ("error_reason", exc.reason.encode()),
                ("source_topic", msg.topic().encode()),
                ("source_partition", str(msg.partition()).encode()),
                ("source_offset", str(msg.offset()).encode()),
            ],
            on_delivery=self._delivered,
        )
        metrics.EVENTS_INVALID.labels(exc.reason).inc()

    def _delivered(self, err: object, msg: Message) -> None:
        if err is not None:
            self._delivery_errors.append(f"{msg.topic()}: {err}")

    def _changelog_delivered(self, err: object, msg: Message) -> None:
        if err is not None:
            self._delivery_errors.append(f"{msg.topic()}: {err}")
        else:
            partition = msg.partition()
            self._changelog_ends[partition] = max(
                self._changelog_ends.get(partition, -1), msg.offset()
            )

    def _make_durable(self, staged: dict[int, _Staged]) -> None:
        """Changelog records -> flush (outputs too) -> batch markers -> flush -> one
        WriteBatch per partition. Input offsets are committed by the caller after this."""
        encoded: dict[int, list[tuple[bytes, bytes | None, int]]] = {}
        changelog = self.topics.changelog
        for number, stage in staged.items():
            partition = self.partitions[number]
            if partition.counts_changed:
                counts = {"sizes": partition.sizes, "users": partition.users}
                stage.raw[COUNTS] = orjson.dumps(counts)
                partition.counts_changed = False
            partition.batch_seq += 1
            tag = f"{partition.position} {partition.session} {partition.batch_seq}"
            rows = encoded[number] = []
            for key, state in [*stage.states.items(), *stage.raw.items()]:
                data: bytes | None
                if isinstance(state, UserState):
                    data, wake = state.encode(), state.wake_ms
                else:  # a tombstone (erased profile, lifted suppression) or a marker
                    data, wake = state, NEVER
                rows.append((key, data, wake))
                self._producer.produce(
                    changelog,
                    key=key,
                    value=data,
                    partition=number,
                    headers=[("cl", f"{tag} {wake}".encode())],
                    on_delivery=self._changelog_delivered,
                )
        # Markers go out only once outputs and changelog records are acknowledged:
        # Kafka orders records within a partition, not across topics.
        self._flush()
        for number in staged:
            partition = self.partitions[number]
            self._producer.produce(
                changelog,
                key=MARKER_PREFIX + partition.session.encode(),
                value=str(partition.stream_time_ms).encode(),
                partition=number,
                headers=[
                    (
                        "cl",
                        f"{partition.position} {partition.session} {partition.batch_seq} {NEVER}".encode(),
                    )
                ],
                on_delivery=self._changelog_delivered,
            )
        self._flush()
        for number, stage in staged.items():
            partition = self.partitions[number]
            batch = partition.store.new_batch()
            for stale in stage.stale_due:
                batch.delete(stale)
            for key, data, wake in encoded[number]:
                if data is None:
                    batch.delete(USER + key)
                else:
                    batch.put(USER + key, data)
                old_wake = stage.old_wakes.get(key, NEVER)
                if old_wake != wake:
                    if old_wake != NEVER:
                        batch.delete(due_key(old_wake, key))
                    if wake != NEVER:
                        batch.put(due_key(wake, key), b"")
            batch.put(INPUT_OFFSET, str(partition.position).encode())
            batch.put(STREAM_TIME, str(partition.stream_time_ms).encode())
            batch.put(CHANGELOG_OFFSET, str(self._changelog_ends.get(number, -1) + 1).encode())
            partition.store.write(batch)
            self._cache(partition, stage.states)

    def _publish_counts(self) -> None:
        totals: dict[str, int] = {}
        for partition in list(self.partitions.values()):
            metrics.STATE_USERS.labels(str(partition.number)).set(partition.users)
            for audience, size in partition.sizes.items():
                totals[audience] = totals.get(audience, 0) + size
        for audience, size in totals.items():
            metrics.AUDIENCE_SIZE.labels(audience).set(size)

    def _flush(self) -> None:
        self._publish_counts()
        for (audience, entered), count in self._transition_counts.items():
            metrics.TRANSITIONS.labels(audience, "entered" if entered else "exited").inc(count)
        self._transition_counts.clear()
        remaining = self._producer.flush(60)
        if remaining or self._delivery_errors:
            errors, self._delivery_errors = self._delivery_errors[:5], []
            raise BrokerError(
                f"outputs not acknowledged by Kafka: {errors or 'timed out'}", retriable=True
            )

    def _cache(self, partition: Partition, states: dict[bytes, UserState | None]) -> None:
        cache = partition.cache
        for key, state in states.items():
            if state is None:
                cache.pop(key, None)
            else:
                cache[key] = state
        limit = max(1, self.settings.state_cache_size // max(1, len(self.partitions)))
        if len(cache) > limit:
            for key in list(cache)[: len(cache) - limit + limit // 10]:
                del cache[key]


def _replayable(catalog: Catalog) -> set[str]:
    """Trackers that count history (not `backfill: false` ones, which start at creation)."""
    return {t.id for t in catalog.trackers.values() if not t.from_ms}


def _replay_event(
    state: UserState, event: Event, catalog: Catalog, trackers: frozenset[str]
) -> bool:
    """Fold a past event into the trackers being backfilled only (no judging)."""
    route = route_of(event.type, event.name)
    changed = False
    for group in (
        catalog.trackers_by_event.get(route) if route is not None else None,
        catalog.trackers_by_event.get(ALL_EVENTS),
    ):
        for tracker in group or ():
            if tracker.id in trackers and tracker.update(state, event, state.clock_ms):
                changed = True
    return changed


def _changelog_header(msg: Message) -> tuple[int, str, int, int] | None:
    for name, value in msg.headers() or ():
        if name == "cl" and value is not None:
            offset, session, seq, wake = value.decode().split(" ")
            return int(offset), session, int(seq), int(wake)
    return None
