"""One destination's sink: its own consumer group over `audience-events`, one lane per partition.

Why not a per-destination Faust agent on the app's shared consumer (and a
retry topic to park failures in)? Every agent of a Faust app is fed by one
consumer: a destination that is slow — down, throttled by its own
`rate_limit_per_s`, or answering 429 — fills its agent's buffer and stalls
every other agent. Parking failures in a retry topic removes the outage case
but not rate limits, and keeping a user's later messages behind a parked one
needs a durable "who is parked" index that survives restarts and rebalances.

So each destination runs as an asyncio task in the worker (started by
`SinkService` in `adapters/stream/sinks.py`) with a consumer group of its own,
`{app_id}-sink-{name}`. Its progress is independent of every other
destination's: an outage holds back only its own offsets, with nothing to
park and no index to rebuild. Guarantees:
- never blocking the others: separate consumers, HTTP connection pools and
  tasks; a down destination awaits backoffs, never a shared buffer;
- at least once: a partition's offset is committed only past messages that
  were delivered, skipped or durably dead-lettered; after a crash or a
  rebalance the rest is sent again, with the same `messageId`;
- order per user: a user's messages share a partition, and each partition
  is one lane that sends its batches in offset order, one at a time (lanes
  of different partitions run concurrently);
- bounded memory: a lane holding more than `queue_limit` messages pauses its
  partition until it drains below half.

A down destination backs off its own lanes; past `max_retry_age` (counted
from the record's timestamp on `audience-events`) the messages go to the DLQ,
so an outage longer than that costs dead letters (replayable), not progress.

A destination refusing our credentials (401/403) is paused by its `Deliverer`
(the lanes wait, nothing is committed past the held batch, a probe re-sends
it); one answering 410 Gone is stopped: the `Deliverer` raises
`DestinationGone`, the lanes end without committing, every partition is
paused (and stays paused on assignment), queued messages are dropped — they
stay in Kafka for a worker restarted with a fixed configuration — and `run()`
keeps polling, so the group and the other destinations carry on.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from audiences.adapters import metrics
from audiences.adapters.kafka.clients import KafkaClients
from audiences.adapters.kafka.topics import Topics
from audiences.adapters.settings import Settings
from audiences.adapters.sinks.config import Destination
from audiences.adapters.sinks.delivery import (
    Deliverer,
    DestinationGone,
    Transport,
    wall_clock_ms,
)
from audiences.adapters.sinks.dlq import (
    Item,
    decode,
    deliver_items,
    write_dead_letters,
)
from audiences.adapters.sinks.transport import make_transport
from audiences.errors import BrokerError

log = logging.getLogger(__name__)
POLL_TIMEOUT_S = 0.1
DLQ_RETRY_S = 1.0


@dataclass
class _Lane:
    partition: int
    queue: deque[Item] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    in_flight: int = 0
    task: asyncio.Task[None] | None = None


class SinkWorker:
    """Delivers every message of `audience-events` to one destination. `run()` until `stop()`.

    Its consumer and dead-letter producer (and a `kafka` destination's producer) are made
    by `clients`, the process's `KafkaClients`.
    """

    def __init__(
        self,
        settings: Settings,
        destination: Destination,
        *,
        clients: KafkaClients,
        transport: Transport | None = None,
        wall_ms: Callable[[], int] = wall_clock_ms,
        queue_limit: int | None = None,
    ) -> None:
        self.settings = settings
        self.destination = destination
        self.topics = Topics.from_settings(settings)
        self.group = clients.sink_group(destination.name)
        self.queue_limit = queue_limit or max(1000, 10 * destination.batch_size)
        self.assigned = threading.Event()  # set once partitions are assigned (tests, readiness)
        self._transport = transport or make_transport(destination, clients)
        self._wall_ms = wall_ms
        self._stop = threading.Event()  # stop() may come from any thread
        self._lanes: dict[int, _Lane] = {}
        self._owned: set[int] = set()
        self._done: dict[int, int] = {}  # partition -> next offset to commit (lanes write it)
        self._committed: dict[int, int] = {}
        self._revoked: list[int] = []  # set in rebalance callbacks, handled on the loop
        self._paused: set[int] = set()
        self._pause: set[int] = set()
        self._resume: set[int] = set()
        self._failure: BaseException | None = None
        self.gone = False  # stopped by a 410: nothing more is consumed or sent
        self.delivered = 0  # messages delivered / skipped / dead-lettered here (tests, logs)
        self.skipped = 0
        self.dead_lettered = 0
        self._depth = metrics.SINK_QUEUE_DEPTH.labels(destination=destination.name)
        self._consumer = clients.sink_consumer(destination.name)
        self._producer = clients.dead_letter_producer()
        self._deliverer = Deliverer(destination, self._transport, wall_ms=wall_ms)

    def stop(self) -> None:
        self._stop.set()

    @property
    def queue_depth(self) -> int:
        return sum(len(lane.queue) + lane.in_flight for lane in self._lanes.values())

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        # All consumer calls happen on this one thread: librdkafka runs rebalance
        # callbacks inside poll(), and pause/resume/commit must not race with it.
        kafka = ThreadPoolExecutor(1, thread_name_prefix=f"sink-{self.destination.name}")
        try:
            await loop.run_in_executor(kafka, self._subscribe)
            log.info(
                "sink %s: consuming %s as %s",
                self.destination.name,
                self.topics.audience_events,
                self.group,
            )
            while not self._stop.is_set():
                messages = await loop.run_in_executor(kafka, self._poll)
                self._drop_revoked()
                self._dispatch(messages)
                self._flow_control()
                if self._failure is not None:
                    raise self._failure
        finally:
            for lane in self._lanes.values():
                if lane.task is not None:
                    lane.task.cancel()
            await asyncio.gather(
                *(lane.task for lane in self._lanes.values() if lane.task is not None),
                return_exceptions=True,
            )
            await loop.run_in_executor(kafka, self._close)
            kafka.shutdown(wait=True)
            await self._transport.close()
            self._depth.set(0)

    # -- the consumer thread -----------------------------------------------------------------

    def _subscribe(self) -> None:
        self._consumer.subscribe(
            [self.topics.audience_events],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        consumer.incremental_assign(partitions)  # from the committed offsets
        if self.gone:
            consumer.pause(partitions)
            self._paused.update(tp.partition for tp in partitions)
        self._owned.update(tp.partition for tp in partitions)
        self.assigned.set()
        log.info("sink %s: assigned %s", self.destination.name, sorted(self._owned))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = [tp.partition for tp in partitions]
        self._commit([p for p in revoked if p in self._done], asynchronous=False)
        self._forget(revoked)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._forget([tp.partition for tp in partitions])

    def _forget(self, partitions: list[int]) -> None:
        for p in partitions:
            self._owned.discard(p)
            self._done.pop(p, None)
            self._committed.pop(p, None)
            self._paused.discard(p)
        self._revoked.extend(partitions)

    def _poll(self) -> list[Message]:
        topic = self.topics.audience_events
        if self._pause:
            self._consumer.pause([TopicPartition(topic, p) for p in self._pause])
            self._paused |= self._pause
            self._pause = set()
        if self._resume:
            self._consumer.resume([TopicPartition(topic, p) for p in self._resume])
            self._paused -= self._resume
            self._resume = set()
        done = dict(self._done)  # lanes update it on the event loop thread
        self._commit([p for p, o in done.items() if self._committed.get(p) != o])
        first = self._consumer.poll(POLL_TIMEOUT_S)
        if first is None:
            return []
        return [first, *self._consumer.consume(self.queue_limit, 0)]

    def _commit(self, partitions: list[int], asynchronous: bool = True) -> None:
        done = dict(self._done)
        offsets = [
            TopicPartition(self.topics.audience_events, p, done[p]) for p in partitions if p in done
        ]
        if not offsets:
            return
        try:
            self._consumer.commit(offsets=offsets, asynchronous=asynchronous)
        except KafkaException as exc:  # e.g. a rebalance in progress: the next commit covers it
            log.info("sink %s: commit deferred: %s", self.destination.name, exc)
            return
        for tp in offsets:
            self._committed[tp.partition] = tp.offset

    def _close(self) -> None:
        self._commit(list(self._done), asynchronous=False)
        self._consumer.close()
        self._producer.flush(10)

    # -- the event loop ------------------------------------------------------------------------

    def _drop_revoked(self) -> None:
        while self._revoked:
            partition = self._revoked.pop()
            lane = self._lanes.pop(partition, None)
            if lane is not None and lane.task is not None:
                lane.task.cancel()  # its records are the new owner's now (sent again there)

    def _dispatch(self, messages: list[Message]) -> None:
        if self.gone:
            return  # left uncommitted in Kafka
        for msg in messages:
            error = msg.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    log.warning("sink %s: consumer error: %s", self.destination.name, error)
                continue
            partition = msg.partition()
            lane = self._lanes.get(partition)
            if lane is None:
                lane = self._lanes[partition] = _Lane(partition)
                lane.task = asyncio.ensure_future(self._run_lane(lane))
            timestamp = msg.timestamp()[1]
            lane.queue.append(
                Item(
                    key=msg.key(),
                    value=msg.value() or b"",
                    message=decode(msg.value()),
                    source_topic=msg.topic(),
                    source_partition=partition,
                    source_offset=msg.offset(),
                    timestamp_ms=timestamp if timestamp > 0 else self._wall_ms(),
                )
            )
            lane.wake.set()
        self._depth.set(self.queue_depth)

    def _flow_control(self) -> None:
        if self.gone:
            self._pause |= self._owned - self._paused
            return
        for partition, lane in self._lanes.items():
            size = len(lane.queue)
            if size >= self.queue_limit and partition not in self._paused:
                self._pause.add(partition)
            elif size < self.queue_limit // 2 and partition in self._paused:
                self._resume.add(partition)

    async def _run_lane(self, lane: _Lane) -> None:
        try:
            while True:
                while not lane.queue:
                    lane.wake.clear()
                    await lane.wake.wait()
                count = min(self.destination.batch_size, len(lane.queue))
                batch = [lane.queue.popleft() for _ in range(count)]
                lane.in_flight = count
                await self._deliver(batch)
                lane.in_flight = 0
                if lane.partition in self._owned:
                    self._done[lane.partition] = batch[-1].source_offset + 1
                self._depth.set(self.queue_depth)
        except asyncio.CancelledError:
            raise
        except DestinationGone:
            self._stop_consuming()
        except BaseException as exc:
            log.exception("sink %s: lane %d failed", self.destination.name, lane.partition)
            self._failure = exc
            self._stop.set()

    def _stop_consuming(self) -> None:
        """After a 410: drop what is queued (uncommitted, it stays in Kafka); `_flow_control`
        pauses every partition."""
        self.gone = True
        for lane in self._lanes.values():
            lane.queue.clear()
            lane.in_flight = 0
        self._depth.set(0)

    async def _deliver(self, batch: list[Item]) -> None:
        first_seen = min(item.timestamp_ms for item in batch)
        outcomes = await deliver_items(self._deliverer, batch, first_seen)
        dead = [(item, o) for item, o in zip(batch, outcomes, strict=True) if o.kind == "dead"]
        self.delivered += sum(1 for o in outcomes if o.kind == "delivered")
        self.skipped += sum(1 for o in outcomes if o.kind == "skipped")
        while dead:
            try:
                await write_dead_letters(
                    self._producer, self.topics.audience_events_dlq, self.destination.name, dead
                )
                self.dead_lettered += len(dead)
                return
            except BrokerError as exc:  # never commit past a message the DLQ has not got
                log.error("sink %s: %s; retrying", self.destination.name, exc)
                await asyncio.sleep(DLQ_RETRY_S)
