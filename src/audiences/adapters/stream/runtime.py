"""The runtime: the loop that drives the pure core over Kafka, and partition ownership.

It runs in a thread of its own inside the Faust worker (see `app.py`) and owns,
for every `events` partition assigned to it (own consumer group,
cooperative-sticky): a `PartitionState` (store, decoded profiles, what changed)
and a transactional `ChangelogWriter`. One loop turn:

    consume a batch -> definitions changed? -> per partition: parse, route, `step`
    each event, produce its outputs at once (evaluation.py) -> fire one chunk of due deadlines ->
    fold one chunk of backfill history -> re-judge one chunk -> every commit interval
    (AUDIENCES_COMMIT_INTERVAL_MS; CATCH_UP_COMMIT_FACTOR times that while a backlog
    fills every batch): checkpoint (state/checkpoint.py), then answer queued API
    queries (queries.py)

Failures stay where they happen:
- a record that cannot be parsed or evaluated (or whose outputs cannot be
  rendered) goes to `events-dlq` with its reason; the profile is left exactly as
  it was before it (`PartitionState.apply`);
- a profile whose stored state, deadline or re-judging fails is quarantined;
- a record found on a partition that does not own its profile (a producer with
  another partitioner) is moved to the owner and counted;
- a checkpoint that cannot complete (Kafka trouble) rewinds the partitions to
  their durable state and redoes the input: nothing is committed ahead of it.
Only repeated failures of the loop itself stop the worker (crash-only: the next
start resumes from durable state).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from audiences.adapters import metrics
from audiences.adapters.kafka.clients import KafkaClients
from audiences.adapters.kafka.fence import read_until
from audiences.adapters.kafka.topics import Topics, partition_count, topic_ids
from audiences.adapters.settings import Settings
from audiences.adapters.state.checkpoint import (
    ChangelogWriter,
    Checkpoint,
    DurabilityError,
    Flight,
    PartitionFenced,
    owner_record,
)
from audiences.adapters.state.partition import PartitionState
from audiences.adapters.state.recovery import Restored, restore
from audiences.adapters.state.store import RocksDictStore, StateStore
from audiences.adapters.stream import timers
from audiences.adapters.stream.backfill import Backfills
from audiences.adapters.stream.definitions import DefinitionsLog
from audiences.adapters.stream.emitter import Emitter
from audiences.adapters.stream.evaluation import Evaluation
from audiences.adapters.stream.heap import FrozenHeap
from audiences.adapters.stream.queries import PartitionHistory, QueryPort
from audiences.core.partitioning import partition_for
from audiences.core.state import UserState
from audiences.errors import BrokerError

log = logging.getLogger(__name__)
CONSUME_WAIT_S = 0.005  # longest wait for a batch to fill (latency)
REJUDGE_CHUNK = 1000  # profiles re-judged per partition per loop turn
MAX_UNCOMMITTED = 25_000  # inputs applied since the last checkpoint that force the next
# (and, with one in flight, wait for it): what a worker holds beyond its cache is at most
# twice this many inputs' profiles, decoded and encoded, and their records. The bench's
# memory phase (every input a new profile): 318-323 MB per 1M profiles held at 50,000,
# 270-287 at 25,000; catch-up checkpoints per 1M events: 35-36 -> 43-44.
# While consumes return full batches (a backlog), checkpoints are this many commit
# intervals apart: each costs the worker ~30 ms of CPU beyond its encodes (transactions,
# store writes; `audiences bench`: 130 -> 22 checkpoints at 10x, 23.1 -> 19.5 CPU-s per
# 1M events). The interval's changes are held meanwhile, decoded and encoded: peak RSS
# 405-420 MB at 1x, 516-550 at 5x, 612-628 at 10x. Outputs still go out as they are
# made; a crash redoes < MAX_UNCOMMITTED inputs.
CATCH_UP_COMMIT_FACTOR = 5
MAX_LOOP_FAILURES = 5  # consecutive failed turns before the worker gives up
RESTORE_THREADS = 2  # partitions restored at once (see _open_all; 4 measured slower on 2 cores)
RECOVERY_IDLE_S = 60.0  # a changelog read that makes no progress this long fails
MISROUTED_LOG_EVERY_S = 60.0
LIVE_LAG_RECORDS = 100  # at most this many records waiting ...
LIVE_RECORD_AGE_MS = 1000  # ... the newest appended this recently: a live partition
# A restored partition, before the runtime takes it: number, store, writer, session.
Recovered = tuple[int, StateStore, ChangelogWriter, str, Restored]
Clock = Callable[[], int]


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def commit_interval_s(configured_s: float, *, backlog: bool) -> float:
    """Seconds between checkpoints: AUDIENCES_COMMIT_INTERVAL_MS, or CATCH_UP_COMMIT_FACTOR
    times that while the last consume came back full (0, every turn, stays 0)."""
    return configured_s * CATCH_UP_COMMIT_FACTOR if backlog else configured_s


class Runtime:
    """Blocking loop; `run()` in a thread, `stop()` from anywhere."""

    def __init__(
        self,
        settings: Settings,
        topics: Topics,
        clients: KafkaClients,
        queries: QueryPort | None = None,
        clock: Clock = wall_clock_ms,
        worker_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.topics = topics
        self.clients = clients
        self.queries = queries or QueryPort()
        self.clock = clock
        self.worker_id = worker_id or f"{os.uname().nodename}-{os.getpid()}"
        self.data_dir = settings.data_dir and os.path.join(settings.data_dir, settings.app_id)
        self.partitions: dict[int, PartitionState] = {}
        self.writers: dict[int, ChangelogWriter] = {}
        self.ready = threading.Event()
        self.failed: BaseException | None = None
        # Told the owned partitions after every rebalance (the worker registry).
        self.on_partitions: Callable[[list[int]], None] | None = None
        # Opens a partition's store (tests swap in an in-memory one).
        self.open_store: Callable[[int], StateStore] = self._open_rocksdb
        self._stop = threading.Event()
        self._stopping = False  # in the final shutdown: revoked stores are kept
        self._drained = False
        self._tick_s = settings.tick_interval_ms / 1000
        self._commit_s = settings.commit_interval_ms / 1000
        self._last_checkpoint = 0.0
        self._last_sweep = 0.0
        self._more_due = False
        self._misrouted = 0
        self._misrouted_logged = 0.0
        self._published_audiences: set[str] = set()  # AUDIENCE_SIZE children set
        self.events_partitions = 0
        self._topic_ids: dict[str, str | None] = {}
        self._consumer: Consumer = clients.events_consumer()
        # Changelog readers of the restores (more are made when partitions restore at once).
        self._changelog_readers = [clients.changelog_reader()]
        self._producer = clients.output_producer()
        self.emitter = Emitter(
            self._producer, topics, self.owner_of, space_id=settings.space_id or settings.app_id
        )
        self._newest_record_ms: dict[int, int] = {}  # per partition: Kafka time, last batch
        self.evaluation = Evaluation(
            self.emitter, self.owner_of, self._count_misrouted, self._newest_record_ms
        )
        self.checkpoint = Checkpoint(self.emitter.seal, self._commit_offsets)
        self._flight: Flight | None = None  # the checkpoint in flight, if any
        self._deferred: BaseException | None = None  # a failure met in a rebalance callback
        self.definitions = DefinitionsLog(
            topics.definitions, clients.definitions_consumer(), clients.producer({"linger.ms": 0})
        )
        self.backfills = Backfills(clients.history_reader(), self._producer, topics)
        self.heap = FrozenHeap()

    # -- lifecycle -------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:
            self.failed = exc
            log.exception("the runtime stopped on an error")
            self._close(checkpoint=False)  # what it holds may be half a turn: redo it
            raise
        self._close(checkpoint=True)

    def _run(self) -> None:
        self.heap.start()
        admin = self.clients.admin()
        self.events_partitions = partition_count(admin, self.topics.events) or 0
        if not self.events_partitions:
            raise BrokerError(f"topic {self.topics.events} does not exist", retriable=True)
        self.queries.partitions = self.events_partitions
        self._topic_ids = topic_ids(admin, [self.topics.events, self.topics.changelog])
        self.definitions.load()
        self.queries.publish(self.definitions.snapshot())
        self._consumer.subscribe(
            [self.topics.events],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        self.queries.serving = True
        failures = 0
        while not self._stop.is_set():
            try:
                self._turn()
                failures = 0
            except PartitionFenced as exc:
                # The outputs were acknowledged before the changelog step: the other
                # partitions' state is whole, their next checkpoint writes it.
                log.warning("%s; dropping them", exc)
                for number in exc.partitions:
                    self._drop(number)
                self._partitions_changed()
            except (DurabilityError, BrokerError, KafkaException) as exc:
                failures += 1
                if failures > MAX_LOOP_FAILURES:
                    raise
                log.warning("checkpoint failed (%s); rewinding to durable state", exc)
                self._rewind(list(self.partitions), backoff_s=min(5.0, 0.2 * 2**failures))
            except Exception:
                failures += 1
                if failures > MAX_LOOP_FAILURES:
                    raise
                log.exception("a loop turn failed; rewinding to durable state")
                self._rewind(list(self.partitions), backoff_s=min(5.0, 0.2 * 2**failures))

    def _close(self, *, checkpoint: bool) -> None:
        """Stop: on a clean stop everything evaluated is made durable first (a restart then
        emits no duplicate). Stores are kept."""
        self._stopping = True
        self.queries.stop_serving()
        if self._flight is not None:
            try:
                self._land()
            except Exception:  # the broker may be gone: the next start redoes the interval
                log.warning("the last checkpoint in flight failed", exc_info=True)
                checkpoint = False
        if checkpoint:
            try:
                self.checkpoint.commit(list(self.partitions.values()), self.writers)
            except Exception:  # the broker may be gone: the next start redoes the interval
                log.warning("the final checkpoint failed", exc_info=True)
        for number in list(self.partitions):
            self._release(number)
        try:
            self._consumer.close()
        except Exception:  # closing must not hide the first error
            log.warning("closing the consumer failed", exc_info=True)
        for reader in self._changelog_readers:
            reader.close()
        self.backfills.close()
        self.definitions.close()
        self._producer.flush(10)

    # -- the loop --------------------------------------------------------------------------

    def _turn(self) -> None:
        messages = self._consumer.consume(self.settings.batch_size, CONSUME_WAIT_S)
        if self._deferred is not None:  # a checkpoint failed during a rebalance
            failure, self._deferred = self._deferred, None
            raise failure
        self._drained = len(messages) < self.settings.batch_size
        if self.definitions.poll():
            self._catalog_changed()
        if messages:
            self._process(messages)
        if (
            self._more_due
            or time.monotonic() - self._last_sweep >= self._tick_s
            or (self._drained and self._deadline_passed())
        ):
            self._sweep()
        self.backfills.turn(self.partitions, self.definitions.catalog)
        for partition in list(self.partitions.values()):
            timers.rejudge(partition, REJUDGE_CHUNK, self.emitter)
        waiting = sum(len(p.journal) for p in self.partitions.values())
        if self._flight is not None and (self._flight.done() or waiting >= MAX_UNCOMMITTED):
            self._land()  # (waits for it when too much is waiting: backpressure)
            self.queries.serve(_View(self))  # right after it: the stores hold everything
        interval = commit_interval_s(self._commit_s, backlog=not self._drained)
        if self._flight is None and (
            time.monotonic() - self._last_checkpoint >= interval or waiting >= MAX_UNCOMMITTED
        ):
            self._checkpoint()
            if self._flight is None:  # nothing changed: the stores hold everything already
                self.queries.serve(_View(self))
        self.heap.turn()

    def _sweep(self) -> None:
        """Fire a chunk of due deadlines in every partition (again next turn while more
        are due, else after the tick interval). A caught-up partition runs on the wall
        clock; one still catching up on its stream time, so a backlog replays exactly."""
        self._last_sweep = time.monotonic()
        wall = self.clock()
        more = False
        for partition in list(self.partitions.values()):
            now = wall if self._caught_up(partition) else min(wall, partition.clock_ms())
            more |= timers.sweep(partition, now, wall, self.settings.sweep_chunk, self.emitter)
        self._more_due = more

    def _deadline_passed(self) -> bool:
        """Whether a partition's earliest deadline in its index is past on the wall clock:
        live, a deadline fires on the next loop turn (a few ms) instead of the next tick.
        (A partition still catching up may find nothing due on its stream time: cheap,
        as `due` seeks past the deadlines fired before.)"""
        wall = self.clock()
        return any(p.due_from <= wall for p in self.partitions.values())

    def _checkpoint(self) -> None:
        """Seal the interval and start making it durable (every `commit_interval_s`, or
        sooner when much is waiting): the loop goes on meanwhile."""
        self._last_checkpoint = time.monotonic()
        partitions = list(self.partitions.values())
        self._flight = self.checkpoint.start(partitions, self.writers)
        for partition in partitions:
            for what, count in partition.dropped.items():
                metrics.STATE_DROPPED.labels(what).inc(count)
            partition.dropped.clear()
        self._publish_counts()

    def _land(self) -> None:
        """Wait for the checkpoint in flight and finish it (raises what it met)."""
        flight, self._flight = self._flight, None
        if flight is None:
            return
        self.checkpoint.land(flight)
        metrics.CHECKPOINT_DURATION.observe(time.perf_counter() - flight.started)
        self._landed(flight)

    def _landed(self, flight: Flight) -> None:
        """A checkpoint became durable (a seam for the bench's stopwatch)."""

    def _settle_flight(self) -> None:
        """Before the partitions change hands or are rewound: no checkpoint may be in
        flight. One that fails here is raised by the next loop turn (rewinding)."""
        if self._flight is None:
            return
        try:
            self._land()
        except BaseException as exc:
            if self._deferred is None:
                self._deferred = exc

    def _process(self, messages: list[Message]) -> None:
        started = time.perf_counter()
        by_partition: dict[int, list[Message]] = {}
        oldest_ms = None
        for msg in messages:
            error = msg.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    log.warning("consume error: %s", error)
                continue
            by_partition.setdefault(msg.partition(), []).append(msg)
        evaluate = self.evaluation.partition_batch
        for number, batch in by_partition.items():
            partition = self.partitions.get(number)
            if partition is not None:
                ms = evaluate(partition, batch, self.clock)
                if ms is not None and (oldest_ms is None or ms < oldest_ms):
                    oldest_ms = ms
        if oldest_ms is not None:
            metrics.PROCESSING_LATENCY.observe(max(0.0, time.time() - oldest_ms / 1000))
        metrics.BATCH_DURATION.observe(time.perf_counter() - started)

    def owner_of(self, key: bytes) -> int:
        """The `events` partition that owns a profile key: murmur2, as Java's default
        partitioner (and librdkafka's `murmur2_random`) computes it (compiled: ~0.1 µs,
        cheaper than a cache of keys, and no memory per profile)."""
        return partition_for(key, self.events_partitions)

    def _count_misrouted(self, found: int, owner: int) -> None:
        metrics.MISROUTED_EVENTS.inc()
        self._misrouted += 1
        now = time.monotonic()
        if now - self._misrouted_logged >= MISROUTED_LOG_EVERY_S:
            self._misrouted_logged = now
            log.warning(
                "%d records of %s were on a partition that does not own their profile (e.g. "
                "found on %d, owned by %d) and were forwarded to the owner. Producers of %s "
                "must partition by key with murmur2, the Java client's default: set "
                "partitioner=murmur2_random on librdkafka clients (confluent-kafka, "
                "kafkajs' Java-compatible partitioner, ...). Forwarding costs a second write "
                "and can reorder a user's events.",
                self._misrouted,
                self.topics.events,
                found,
                owner,
                self.topics.events,
            )

    def _caught_up(self, partition: PartitionState) -> bool:
        """No records waiting, or only live traffic: the last consume drained the queue,
        and either the position is at the high watermark librdkafka last saw (on the
        embedded broker that can be the start of the last record batch, whose records
        the drained consume returned), or a few records are in flight and the newest
        evaluated one was appended within LIVE_RECORD_AGE_MS of the clock. Under a live
        stream the cached watermark is nearly always a few records ahead; the stream
        time, a low percentile of recent event times, lags a second there, and
        deadlines fired on it would be that late."""
        tp = TopicPartition(self.topics.events, partition.number)
        _low, high = self._consumer.get_watermark_offsets(tp, cached=True)
        if high is None or high < 0:
            return False
        lag = max(0, high - partition.position)
        metrics.CONSUMER_LAG.labels(str(partition.number)).set(lag)
        if not self._drained:
            return False
        if lag == 0:
            return True
        newest = self._newest_record_ms.get(partition.number)
        return (
            lag <= LIVE_LAG_RECORDS
            and newest is not None
            and abs(self.clock() - newest) <= LIVE_RECORD_AGE_MS
        )

    def _catalog_changed(self) -> None:
        self.queries.publish(self.definitions.snapshot())
        full = self.definitions.catalog
        for partition in self.partitions.values():
            self.backfills.plan(partition, full, self._log_start(partition.number))

    def _commit_offsets(self, positions: dict[int, int]) -> None:
        offsets = [
            TopicPartition(self.topics.events, n, position)
            for n, position in positions.items()
            if n in self.partitions
        ]
        if not offsets:
            return
        try:
            self._consumer.commit(offsets=offsets, asynchronous=True)
        except KafkaException as exc:  # a hint only: recovery reads the changelog
            log.info("committing offsets failed: %s", exc)

    def _publish_counts(self) -> None:
        totals: dict[str, int] = {}
        hidden = self.definitions.catalog.account_hidden  # (per-user predicates: not audiences)
        for partition in self.partitions.values():
            metrics.STATE_USERS.labels(str(partition.number)).set(partition.counts.users)
            for audience, size in partition.counts.sizes.items():
                if audience not in hidden:
                    totals[audience] = totals.get(audience, 0) + size
        for audience, size in totals.items():
            metrics.AUDIENCE_SIZE.labels(audience).set(size)
        for audience in self._published_audiences - totals.keys():
            # no partition here counts it any more (all moved to other workers): a frozen
            # value would be summed with the new owners' across the deployment
            with contextlib.suppress(KeyError):
                metrics.AUDIENCE_SIZE.remove(audience)
        self._published_audiences = set(totals)

    # -- ownership -------------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, assigned: list[TopicPartition]) -> None:
        self.ready.clear()
        self._settle_flight()
        start = []
        for partition in self._open_all([tp.partition for tp in assigned]):
            start.append(TopicPartition(self.topics.events, partition.number, partition.position))
        consumer.incremental_assign(start)
        self.heap.rebalanced()
        log.info("assigned partitions %s", sorted(self.partitions))
        self.ready.set()
        self._partitions_changed()

    def _on_revoke(self, consumer: Consumer, revoked: list[TopicPartition]) -> None:
        numbers = [tp.partition for tp in revoked if tp.partition in self.partitions]
        self._settle_flight()
        if self._deferred is not None:  # the next owner redoes what is not durable
            log.warning("no checkpoint on revoke: the one in flight failed (%s)", self._deferred)
        else:
            try:
                self.checkpoint.commit([self.partitions[n] for n in numbers], self.writers)
            except Exception:  # the next owner redoes what is not durable
                log.warning("checkpoint on revoke failed", exc_info=True)
        for number in numbers:
            self._release(number, discard=not self._stopping)
        log.info("revoked %s; now %s", numbers, sorted(self.partitions))
        self._partitions_changed()

    def _on_lost(self, consumer: Consumer, lost: list[TopicPartition]) -> None:
        self._settle_flight()
        for tp in lost:
            self._drop(tp.partition)
        log.warning("lost partitions %s", [tp.partition for tp in lost])
        self._partitions_changed()

    def _partitions_changed(self) -> None:
        self.queries.owned = frozenset(self.partitions)
        if self.on_partitions is not None:
            self.on_partitions(sorted(self.partitions))

    def _open_all(self, numbers: list[int]) -> list[PartitionState]:
        """Take the partitions the group just assigned. Their restores run side by side,
        up to RESTORE_THREADS at once, each with a changelog reader of its own: a restore
        waits on the broker and the disk about half of its time (GIL released), so the
        others use it. Every partition that restored is taken even if another failed;
        then the first failure is raised."""
        if len(numbers) <= 1:
            return [self._open(number) for number in numbers]
        threads = min(RESTORE_THREADS, len(numbers))
        while len(self._changelog_readers) < threads:
            self._changelog_readers.append(self.clients.changelog_reader())
        idle: queue.SimpleQueue[Consumer] = queue.SimpleQueue()
        for reader in self._changelog_readers[:threads]:
            idle.put(reader)

        def recover(number: int) -> Recovered:
            reader = idle.get()  # (one is free: no more tasks run than readers)
            try:
                return self._recover(number, None, reader)
            finally:
                idle.put(reader)

        with ThreadPoolExecutor(threads, thread_name_prefix="restore") as pool:
            futures = [pool.submit(recover, number) for number in numbers]
            outcomes = [future.exception() or future.result() for future in futures]
        opened: list[PartitionState] = []
        failure: BaseException | None = None
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                failure = failure or outcome
            else:
                opened.append(self._adopt(*outcome))
        if failure is not None:
            raise failure
        return opened

    def _open(
        self, number: int, rewind: tuple[ChangelogWriter, str] | None = None
    ) -> PartitionState:
        """Take partition `number` (the group just assigned it): fence former owners,
        restore state, find the position. With `rewind` (the partition's own writer and
        ownership session), re-read this owner's durable state instead, fencing nobody:
        a worker that lost the partition without knowing yet is refused (PartitionFenced)
        rather than taking it back from the new owner."""
        return self._adopt(*self._recover(number, rewind, self._changelog_readers[0]))

    def _recover(
        self, number: int, rewind: tuple[ChangelogWriter, str] | None, reader: Consumer
    ) -> Recovered:
        """Open partition `number`'s store, claim (or mark) its changelog and restore the
        store from it (safe to run for several partitions at once: it touches nothing
        else of the runtime)."""
        store = self.open_store(number)
        try:
            if rewind is None:
                writer = ChangelogWriter(
                    self.clients.changelog_producer(number),
                    self.topics.changelog,
                    number,
                    timeout_s=30.0,
                )
                session = uuid.uuid4().hex
                record = owner_record(self.worker_id, session, self.clock())
                fence = writer.claim(session.encode(), record)
            else:
                writer, session = rewind
                record = owner_record(self.worker_id, session, self.clock())
                fence = writer.mark(session.encode(), record)
            restored = restore(
                store,
                read_until(reader, self.topics.changelog, number, fence, RECOVERY_IDLE_S),
                partition=number,
                fence=fence,
                session=session,
                topic_id=self._topic_ids.get(self.topics.changelog),
            )
        except BaseException:
            store.close()
            raise
        return number, store, writer, session, restored

    def _adopt(
        self,
        number: int,
        store: StateStore,
        writer: ChangelogWriter,
        session: str,
        restored: Restored,
    ) -> PartitionState:
        """The restored partition becomes this runtime's: its state, position and writer."""
        metrics.RECOVERY_RECORDS.inc(restored.records)
        partition = PartitionState(
            number,
            store,
            position=0,
            stream_time_ms=restored.stream_time_ms,
            catalog=self.definitions.catalog,
            cache_limit=max(1, self.settings.state_cache_size // max(1, self.events_partitions)),
        )
        partition.session = session
        position = self._start_position(partition, restored.position)
        partition.position = partition.committed = position
        partition.ahead = {k: at for k, at in restored.ahead.items() if at > position}
        if restored.ahead:
            partition.recount()  # a checkpoint was cut short: its counts may not be in
        self.partitions[number] = partition
        self.writers[number] = writer
        self.backfills.plan(partition, self.definitions.catalog, self._log_start(number))
        if partition.judged == self.definitions.catalog.fingerprint:
            partition.rejudge_from = None  # everyone was judged on this catalog already
        return partition

    def _start_position(self, partition: PartitionState, restored: int | None) -> int:
        """Where `events` is read from: the changelog's position, checked against the topic
        (recreated: start over; retention moved its start: from the oldest left)."""
        number = partition.number
        same_topic = partition.check_events_topic(self._topic_ids.get(self.topics.events))
        low = self._log_start(number)
        if restored is None:
            committed = self._committed(number)
            return max(committed, low) if committed >= 0 else low
        if not same_topic:
            log.warning(
                "partition %d: topic %s was recreated (new topic id): reading it from its "
                "start instead of offset %d",
                number,
                self.topics.events,
                restored,
            )
            return low
        if restored < low:
            log.warning(
                "partition %d: offsets %d..%d of %s are gone (retention or DeleteRecords) "
                "before they were evaluated",
                number,
                restored,
                low,
                self.topics.events,
            )
            return low
        return restored

    def _release(self, number: int, *, discard: bool = False) -> None:
        """Give partition `number` up (after its last checkpoint). `discard`: delete the
        local store too — another worker owns the partition now, and a store that
        missed its writes must never be trusted again (recovery also checks)."""
        partition = self.partitions.pop(number, None)
        writer = self.writers.pop(number, None)
        if writer is not None:
            try:
                writer.close()
            except Exception:
                log.warning("closing the changelog producer of %d failed", number, exc_info=True)
        if partition is None:
            return
        if discard:
            partition.store.destroy()
        else:
            partition.store.close()
        self._forget_series(number)
        self._publish_counts()

    def _forget_series(self, number: int) -> None:
        """Remove partition `number`'s labelled series from /metrics: the worker no longer
        holds it, and a value frozen at its last update (a lag that never moves again)
        would be read as this worker's, next to the new owner's."""
        for gauge in metrics.PARTITION_SERIES:
            with contextlib.suppress(KeyError):  # never published
                gauge.remove(str(number))

    def _drop(self, number: int) -> None:
        """Another worker owns `number`: forget it without writing anything."""
        self._release(number, discard=True)

    def _rewind(self, numbers: list[int], backoff_s: float = 0.0) -> None:
        """Throw away what the partitions hold in memory and start again from their durable
        state (store + changelog), re-reading input from the durable position. No
        partition is claimed anew: one another worker took meanwhile is dropped."""
        if self._flight is not None:
            wait([self._flight.future])  # whatever its outcome: the rewind redoes it
            self._flight = None
        self._deferred = None  # the rewind deals with it
        if backoff_s:
            time.sleep(backoff_s)
        for number in numbers:
            partition = self.partitions.pop(number, None)
            writer = self.writers.pop(number, None)
            if partition is None or writer is None:
                continue
            writer.abort()
            partition.store.close()
            try:
                reopened = self._open(number, rewind=(writer, partition.session))
            except PartitionFenced:
                log.warning("partition %d was taken over meanwhile; dropping it", number)
                writer.close()
                self.open_store(number).destroy()
                self._forget_series(number)
                continue
            self._consumer.seek(TopicPartition(self.topics.events, number, reopened.position))
        self._partitions_changed()

    def _committed(self, number: int) -> int:
        """The group's committed offset (-1 if none or unknown): used only when the
        changelog has no position at all (a partition never checkpointed)."""
        for attempt in range(3):
            try:
                committed = self._consumer.committed(
                    [TopicPartition(self.topics.events, number)], timeout=10
                )
                return int(committed[0].offset)
            except KafkaException as exc:
                log.warning("committed offset of partition %d (try %d): %s", number, attempt, exc)
        return -1

    def _log_start(self, number: int) -> int:
        """The oldest retained offset of an `events` partition (0 if unknown)."""
        try:
            low, _high = self._consumer.get_watermark_offsets(
                TopicPartition(self.topics.events, number), timeout=10
            )
        except KafkaException as exc:
            log.warning("log start of partition %d unknown: %s", number, exc)
            return 0
        return max(0, int(low))

    def _open_rocksdb(self, number: int) -> StateStore:
        from pathlib import Path

        return RocksDictStore(Path(self.data_dir) / f"p{number}")


class _View:
    """The runtime's state as queries see it (on the runtime thread, after a checkpoint:
    the stores hold everything evaluated so far). Profiles are decoded afresh."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    def owned(self) -> list[int]:
        return sorted(self._runtime.partitions)

    def partition_of(self, key: bytes) -> int:
        return self._runtime.owner_of(key)

    def profile(self, partition: int, key: bytes) -> tuple[str, UserState | None]:
        state = self._runtime.partitions[partition]
        if key in state.suppressed:
            return "suppressed", None
        if key in state.quarantined:
            return "quarantined", None
        stored = state.durable_state(key)
        return ("missing", None) if stored is None else ("ok", stored)

    def profiles(
        self, partition: int, start: bytes, limit: int
    ) -> tuple[list[tuple[bytes, UserState]], bytes | None]:
        state = self._runtime.partitions[partition]
        rows, resume = state.stored_profiles(start, limit)
        found = []
        for key, data in rows:
            if key in state.quarantined:
                continue
            try:
                found.append((key, UserState.decode(data)))
            except Exception:  # quarantined at its next use
                continue
        return found, resume

    def sizes(self) -> dict[int, dict[str, int]]:
        return {n: dict(p.counts.sizes) for n, p in self._runtime.partitions.items()}

    def history(self, audience: str, from_ms: int) -> dict[int, PartitionHistory]:
        return {
            n: PartitionHistory(
                p.counts.sizes.get(audience, 0), p.history.buckets(audience, from_ms)
            )
            for n, p in self._runtime.partitions.items()
        }

    def now(self) -> int:
        return self._runtime.clock()
