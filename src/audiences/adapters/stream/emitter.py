"""Everything the runtime writes outside the changelog: outputs (`audience-events`),
identity control records and forwarded events (`events`), dead letters (`events-dlq`).

They go through one producer as they happen, in order (one request in flight:
`Settings.ordered_producer_config`) — the loop never waits for them — and are
acknowledged together at each checkpoint, before the state
that implies them is written (see state/checkpoint.py).

Records the engine writes to `events` for a profile (merge requests, state
hand-overs, events re-sent to a merged profile's user, records found on the
wrong partition) go to the partition that owns the profile *by the engine's
rule*, murmur2 of the key (`core/partitioning.py`), named explicitly: routing
never depends on a producer's partitioner setting.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import orjson
from confluent_kafka import TIMESTAMP_CREATE_TIME, Message, Producer

from audiences.adapters import metrics
from audiences.adapters.kafka.deadletter import dead_letter_headers
from audiences.adapters.kafka.topics import Topics
from audiences.adapters.state.checkpoint import DurabilityError
from audiences.core.evaluator import Control, Output, Refusal, Transition
from audiences.core.outputs import render_output
from audiences.core.state import UserState

log = logging.getLogger(__name__)
FORWARDED_FROM = "audiences-forwarded-from"  # header of a record moved to its owner partition
# The producer's message.max.bytes (librdkafka's default) less room for the record's key,
# headers and batch overhead: a record above it would be refused when sent.
MAX_RECORD_BYTES = 1_000_000 - 64 * 1024
ACK_TIMEOUT_S = 60.0  # a checkpoint waiting longer for its outputs fails (and is redone)
Rendered = list[tuple[bytes, bytes]]  # (key, value) of outputs, rendered before anything is sent
Encoded = list[tuple[bytes, bytes, int]]  # (key, value, partition) of control records
Refused = list[tuple[bytes, bytes, str, str]]  # (key, value, reason, detail) of refused events


class OversizedRecord(ValueError):
    """An output or control record the producer would refuse (checked before sending)."""


class Deliveries:
    """The delivery reports of one checkpoint interval's records (the producer's
    `on_delivery` for each of them). Reports arrive on whichever thread polls the
    producer: the durability thread waiting for them, or the loop thread when the
    producer's queue is full."""

    __slots__ = ("_lock", "acked", "errors", "sent")

    def __init__(self) -> None:
        self.sent = 0  # counted by the loop thread as it produces
        self.acked = 0
        self.errors: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, err: object, msg: Message) -> None:
        with self._lock:
            self.acked += 1
            if err is not None:
                self.errors.append(f"{msg.topic()}: {err}")


class Emitter:
    def __init__(
        self,
        producer: Producer,
        topics: Topics,
        owner_of: Callable[[bytes], int],
        *,
        space_id: str,
    ) -> None:
        self.producer = producer
        self.topics = topics
        self.owner_of = owner_of  # profile key -> its `events` partition
        self.space_id = space_id  # outputs' context.personas.space_id (SPEC §5)
        self._deliveries = Deliveries()  # of the current interval
        self._transitions: dict[tuple[str, bool], int] = {}  # flushed to metrics per checkpoint
        self.outputs_sent = 0  # output records produced since the start (the bench reads it)

    def render(self, outputs: list[Output], state: UserState) -> Rendered:
        """The output messages of one step, all or nothing (a rendering that raises
        sends none of them, so no output exists without the state that implies it)."""
        traits, anonymous, space_id = state.traits, state.anonymous, self.space_id
        rendered = [
            (
                output.profile_key.encode(),
                orjson.dumps(render_output(output, traits, space_id=space_id, anonymous=anonymous)),
            )
            for output in outputs
        ]
        for key, value in rendered:
            if len(key) + len(value) > MAX_RECORD_BYTES:
                raise OversizedRecord(f"an output of {len(value)} bytes")
        return rendered

    def send(self, rendered: Rendered, outputs: list[Output]) -> None:
        topic = self.topics.audience_events
        produce, delivered = self.producer.produce, self._deliveries
        delivered.sent += len(rendered)
        self.outputs_sent += len(rendered)
        for key, value in rendered:
            try:  # the hot path: no optional arguments (each costs microseconds)
                produce(topic, key=key, value=value, on_delivery=delivered)
            except BufferError:
                delivered.sent -= 1  # counted again by _produce
                self._produce(topic, key, value)
        counts = self._transitions
        for output in outputs:
            if isinstance(output, Transition):
                counted = (output.audience_key, output.entered)
                counts[counted] = counts.get(counted, 0) + 1

    def encode_controls(self, controls: tuple[Control, ...]) -> Encoded:
        """Identity records (SPEC §4), each for the partition owning the profile it is for,
        encoded and checked before anything is sent."""
        encoded = []
        for target, record in controls:
            key = target.encode()
            value = orjson.dumps(record)
            if len(key) + len(value) > MAX_RECORD_BYTES:
                raise OversizedRecord(f"a {record.get('type')} record of {len(value)} bytes")
            encoded.append((key, value, self.owner_of(key)))
        return encoded

    @staticmethod
    def encode_refusals(refused: tuple[Refusal, ...]) -> Refused:
        """Events whose identity link was refused, as `events-dlq` records (key, value,
        reason, detail), checked before anything is sent."""
        encoded = []
        for refusal in refused:
            key = refusal.key.encode()
            value = orjson.dumps(refusal.record)
            if len(key) + len(value) > MAX_RECORD_BYTES:
                raise OversizedRecord(f"a refused event of {len(value)} bytes")
            encoded.append((key, value, refusal.reason, refusal.detail))
        return encoded

    def send_refusals(self, encoded: Refused, msg: Message) -> None:
        """Dead-letter refused events; the source headers name the record that decided."""
        for key, value, reason, detail in encoded:
            self._dead_letter(key, value, reason, detail, msg)

    def send_controls(self, encoded: Encoded) -> None:
        for key, value, partition in encoded:
            self._produce(self.topics.events, key, value, partition)

    def forward(self, msg: Message, owner: int) -> None:
        """A record found on a partition that does not own its profile, moved to the owner."""
        headers = [*(msg.headers() or ()), (FORWARDED_FROM, str(msg.partition()).encode())]
        kind, timestamp = msg.timestamp()
        self._produce(
            self.topics.events,
            msg.key(),
            msg.value(),
            owner,
            headers,
            # the record's own time: an event without a time of its own keeps it
            timestamp if kind == TIMESTAMP_CREATE_TIME else None,
        )

    def dead_letter(self, msg: Message, reason: str, detail: str) -> None:
        self._dead_letter(msg.key(), msg.value(), reason, detail, msg)

    def _dead_letter(
        self, key: bytes | None, value: bytes | None, reason: str, detail: str, msg: Message
    ) -> None:
        self._produce(
            self.topics.events_dlq,
            key,
            value,
            headers=dead_letter_headers(reason, detail, msg.topic(), msg.partition(), msg.offset()),
        )
        metrics.EVENTS_INVALID.labels(reason).inc()

    def seal(self) -> Callable[[], None]:
        """End the current interval: everything sent from now on belongs to the next one.
        Returns the wait for the sealed interval's acknowledgements (it raises
        DurabilityError if any record was refused or the wait timed out)."""
        for (audience, entered), count in self._transitions.items():
            metrics.TRANSITIONS_BY_AUDIENCE(audience, "entered" if entered else "exited").inc(count)
        self._transitions.clear()
        sealed, self._deliveries = self._deliveries, Deliveries()
        return lambda: self._wait(sealed, ACK_TIMEOUT_S)

    def _wait(self, deliveries: Deliveries, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        poll = self.producer.poll
        while deliveries.acked < deliveries.sent and time.monotonic() < deadline:
            poll(0.005)
        if deliveries.errors or deliveries.acked < deliveries.sent:
            errors = deliveries.errors[:5] or [
                f"{deliveries.sent - deliveries.acked} not acknowledged in {timeout_s:g} s"
            ]
            raise DurabilityError(f"records not acknowledged by Kafka: {errors}")

    def _produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        timestamp: int | None = None,
    ) -> None:
        kwargs: dict[str, object] = {}
        if partition is not None:
            kwargs["partition"] = partition
        if headers:
            kwargs["headers"] = headers
        if timestamp is not None:
            kwargs["timestamp"] = timestamp
        deliveries = self._deliveries
        while True:
            try:
                self.producer.produce(topic, key=key, value=value, on_delivery=deliveries, **kwargs)
                deliveries.sent += 1
                return
            except BufferError:  # the queue is full: let Kafka catch up (backpressure)
                self.producer.poll(0.05)
