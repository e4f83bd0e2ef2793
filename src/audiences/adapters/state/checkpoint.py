"""The commit sequence, and its invariant: a committed input offset is never ahead of
durable state.

Between checkpoints the runtime only works in memory: outputs are produced as
they happen, profiles become dirty, positions advance. A checkpoint then makes
that interval durable, always in this order (`Step`):

1. ENCODE      dirty profiles, suppressions, quarantines, partition meta and the
               position become changelog records and one store `WriteBatch` per
               partition (a profile that cannot be encoded is quarantined), and
               the interval is *sealed*: the partition starts a new one;
2. OUTPUTS     every output, identity control record, forwarded event and dead
               letter of the sealed interval is acknowledged (the emitter counts
               each interval's deliveries), before any state that implies them
               exists;
3. CHANGELOG   each partition's records go out in one Kafka transaction of that
               partition's own transactional producer (`transactional.id`
               `{app_id}-changelog-{partition}`): a worker that took the partition
               over called `init_transactions` with the same id and the broker
               refuses every later write of the former owner (fencing);
4. STORE       the `WriteBatch` (states, due-index, suppressions, meta, position,
               changelog offset) is written to the local RocksDB;
5. OFFSETS     the input positions are committed to the consumer group (a hint for
               tools and lag metrics: recovery reads the position from the
               changelog, which is never behind the committed offset).

Pipelined, one deep: ENCODE runs on the loop thread (it reads the profiles the
loop mutates); OUTPUTS, CHANGELOG and STORE run on a durability thread while the
loop evaluates the next interval (they wait on the broker and the disk, with
the GIL released); the loop thread lands the checkpoint when it is done
(OFFSETS, then the partitions forget the sealed interval), and only then seals
the next one. While an interval is in flight, its encoded profiles are the
durable base of a rollback and of a load (`PartitionState.inflight`).

A failure at any step raises before the positions are marked committed, and
the runtime rewinds the partitions it was checkpointing: in-memory state is
dropped and re-read from the store and the changelog, input is re-read from the
last durable position. Re-done input gives the same outputs with the same
`messageId`s (the core is deterministic).

On a broker without transactions support for readers (the embedded broker
accepts transactions and fences former owners, but shows every record, even of
an aborted transaction), step 3 can be cut short: some records of a checkpoint
land, its position record does not. Each state record carries the position it
reflects, so recovery knows which profiles are *ahead* of the position and
skips their input below it (see recovery.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum

import orjson
from confluent_kafka import KafkaError, KafkaException, Message, Producer

from audiences.adapters.state.layout import (
    NEVER,
    Family,
    Header,
    Kind,
    Meta,
    changelog_key,
    encode_header,
)
from audiences.adapters.state.partition import ChangelogRecord, PartitionState
from audiences.adapters.state.store import Batch
from audiences.errors import BrokerError

log = logging.getLogger(__name__)
CHANGELOG_MESSAGE_MAX_BYTES = 1_000_000


class Step(StrEnum):
    """The steps of a checkpoint, in order (names for logs and failure injection)."""

    ENCODE = "encode"
    OUTPUTS = "outputs"
    CHANGELOG = "changelog"
    STORE = "store"
    OFFSETS = "offsets"


class DurabilityError(BrokerError):
    """A checkpoint could not complete: the interval is not durable (rewind and redo)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retriable=True)


class PartitionFenced(BrokerError):
    """Other workers own these partitions now: this one must drop them without writing."""

    def __init__(self, partitions: list[int], detail: str) -> None:
        names = ", ".join(str(p) for p in partitions)
        super().__init__(f"partition(s) {names} taken over: {detail}", retriable=False)
        self.partitions = partitions


class ChangelogWriter:
    """The transactional producer of one partition's changelog."""

    def __init__(self, producer: Producer, topic: str, partition: int, timeout_s: float) -> None:
        self.producer = producer
        self.topic = topic
        self.partition = partition
        self.timeout_s = timeout_s
        self.last_offset = -1  # of the latest record acknowledged
        self._errors: list[str] = []
        self._open = False

    def claim(self, owner: bytes, value: bytes) -> int:
        """Fence every former owner, then append this owner's record; returns its offset
        (the log's true end: recovery reads up to it). Only for a partition the consumer
        group just assigned: it takes the partition from whoever wrote before."""
        self._call(self.producer.init_transactions, self.timeout_s)
        return self.mark(owner, value)

    def mark(self, owner: bytes, value: bytes) -> int:
        """Append this owner's record again (no fencing: if another worker claimed the
        partition meanwhile, this is refused with PartitionFenced); returns its offset."""
        self.begin([(changelog_key(Kind.OWNER, owner), value, Header(-1, NEVER))])
        self.commit()
        return self.last_offset

    def begin(self, records: list[ChangelogRecord]) -> None:
        """Open a transaction with `records`. Only the last one reports its delivery
        (`last_offset`): any record that fails puts the transaction in librdkafka's
        abortable state and `commit` raises, so a callback per record (~1 µs each, on
        the GIL) would only say it again."""
        self._call(self.producer.begin_transaction)
        self._open = True
        produce = self.producer.produce
        last = len(records) - 1
        for index, (key, value, header) in enumerate(records):
            while True:
                try:
                    produce(
                        self.topic,
                        key=key,
                        value=value,
                        partition=self.partition,
                        headers=encode_header(header),
                        on_delivery=self._delivered if index == last else None,
                    )
                    break
                except BufferError:
                    self.producer.poll(0.05)

    def commit(self) -> None:
        try:
            self._call(self.producer.commit_transaction, self.timeout_s)
        finally:
            self._open = False
        if self._errors:
            errors, self._errors = self._errors[:3], []
            raise DurabilityError(f"changelog records of partition {self.partition}: {errors}")

    def abort(self) -> None:
        if self._open:
            self._open = False
            try:
                self.producer.abort_transaction(self.timeout_s)
            except KafkaException as exc:
                log.warning("partition %d: aborting a transaction failed: %s", self.partition, exc)

    def close(self) -> None:
        self.abort()
        self.producer.flush(1)

    def _delivered(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self._errors.append(str(err))
        elif msg.offset() > self.last_offset:
            self.last_offset = msg.offset()

    def _call(self, func: Callable[..., object], *args: object) -> None:
        try:
            func(*args)
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            if isinstance(error, KafkaError) and (
                error.code() in (KafkaError._FENCED, KafkaError.PRODUCER_FENCED)
                or (error.fatal() and "fenc" in error.str().lower())
            ):
                raise PartitionFenced([self.partition], error.str()) from exc
            self.abort()
            raise DurabilityError(f"changelog of partition {self.partition}: {exc}") from exc


@dataclass
class Flight:
    """One checkpoint between its seal (on the loop thread) and its landing."""

    staged: list[tuple[PartitionState, list[ChangelogRecord], Batch]]
    future: Future[None]
    started: float = field(default_factory=time.perf_counter)

    @property
    def partitions(self) -> list[PartitionState]:
        return [partition for partition, _records, _batch in self.staged]

    def done(self) -> bool:
        return self.future.done()


class Checkpoint:
    """Runs the commit sequence for the runtime's partitions, pipelined one deep: the loop
    thread encodes and seals an interval (`start`), a durability thread of its own waits
    for the outputs' acknowledgements and writes the changelog and the store while the
    loop evaluates the next interval, and the loop thread `land`s it (offsets, then the
    partitions forget it). A new checkpoint starts only after the previous one landed."""

    def __init__(
        self,
        seal_outputs: Callable[[], Callable[[], None]],
        commit_offsets: Callable[[dict[int, int]], None],
    ) -> None:
        # Marks the end of the interval's outputs; returns a wait for their acks.
        self.seal_outputs = seal_outputs
        self.commit_offsets = commit_offsets
        self._durability = ThreadPoolExecutor(max_workers=1, thread_name_prefix="durability")
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="changelog-commit")
        # Test seam: called after each step; a test makes it raise to prove the invariant.
        self.after_step: Callable[[Step], None] | None = None

    def commit(self, partitions: list[PartitionState], writers: dict[int, ChangelogWriter]) -> None:
        """Make every change of `partitions` durable now, or raise (nothing marked
        committed). No checkpoint of theirs may be in flight."""
        flight = self.start(partitions, writers)
        if flight is not None:
            self.land(flight)

    def start(
        self, partitions: list[PartitionState], writers: dict[int, ChangelogWriter]
    ) -> Flight | None:
        """ENCODE and seal every changed partition, then hand the durable steps to the
        durability thread; None if nothing changed."""
        changed = [p for p in partitions if p.changed]
        if not changed:
            return None
        encoded = [(p, *p.encode_interval()) for p in changed]
        self._step(Step.ENCODE)
        for partition, _records, _batch, profiles in encoded:
            partition.seal(profiles)
        staged = [(partition, records, batch) for partition, records, batch, _ in encoded]
        wait_outputs = self.seal_outputs()
        future = self._durability.submit(self._make_durable, staged, writers, wait_outputs)
        return Flight(staged, future)

    def land(self, flight: Flight) -> None:
        """Wait for `flight`, then OFFSETS. On failure nothing is marked committed and the
        error is raised: on PartitionFenced the other partitions take their interval back
        (their outputs were acknowledged), on any other error every partition still holds
        it sealed and must be rewound."""
        try:
            flight.future.result()
        except PartitionFenced as exc:
            for partition in flight.partitions:
                if partition.number not in exc.partitions:
                    partition.unseal()
            raise
        for partition in flight.partitions:
            partition.landed()
        self.commit_offsets({p.number: p.committed for p in flight.partitions})
        self._step(Step.OFFSETS)

    def _make_durable(
        self,
        staged: list[tuple[PartitionState, list[ChangelogRecord], Batch]],
        writers: dict[int, ChangelogWriter],
        wait_outputs: Callable[[], None],
    ) -> None:
        """OUTPUTS, CHANGELOG, STORE (on the durability thread)."""
        wait_outputs()
        self._step(Step.OUTPUTS)
        self._write_changelog(staged, writers)
        self._step(Step.CHANGELOG)
        for partition, _records, batch in staged:
            offset = writers[partition.number].last_offset + 1
            batch.put(Family.META, Meta.CHANGELOG_OFFSET.value, str(offset).encode())
            partition.store.write(batch)
        self._step(Step.STORE)

    def _write_changelog(
        self,
        staged: list[tuple[PartitionState, list[ChangelogRecord], Batch]],
        writers: dict[int, ChangelogWriter],
    ) -> None:
        """One transaction per partition; the commits wait side by side. Raises
        PartitionFenced naming every partition another worker took, else the first
        other error; every open transaction is aborted then."""
        fenced: list[int] = []
        errors: list[BaseException] = []
        begun = []
        for partition, records, _batch in staged:
            try:
                writers[partition.number].begin(records)
                begun.append(partition.number)
            except PartitionFenced:
                fenced.append(partition.number)
            except BaseException as exc:
                errors.append(exc)
        if not errors:
            commits: list[tuple[int, Future[None] | None]] = (
                [(begun[0], None)]
                if len(begun) == 1
                else [(n, self._pool.submit(writers[n].commit)) for n in begun]
            )
            for number, future in commits:
                try:
                    writers[number].commit() if future is None else future.result()
                except PartitionFenced:
                    fenced.append(number)
                except BaseException as exc:
                    errors.append(exc)
        if fenced or errors:
            for partition, _records, _batch in staged:
                writers[partition.number].abort()
            if errors:
                raise errors[0]
            raise PartitionFenced(fenced, "a newer owner's producer fenced this one")

    def _step(self, step: Step) -> None:
        if self.after_step is not None:
            self.after_step(step)


def owner_record(worker: str, session: str, at_ms: int) -> bytes:
    return orjson.dumps({"worker": worker, "session": session, "at_ms": at_ms})
