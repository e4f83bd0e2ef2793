"""Everything the runtime writes outside the changelog: outputs (`audience-events`),
identity control records and forwarded events (`events`), dead letters (`events-dlq`).

They go through one idempotent producer as they happen — the loop never waits
for them — and are acknowledged together at each checkpoint, before the state
that implies them is written (see state/checkpoint.py).

Records the engine writes to `events` for a profile (merge requests, state
hand-overs, events re-sent to a merged profile's user, records found on the
wrong partition) go to the partition that owns the profile *by the engine's
rule*, murmur2 of the key (`kafka/partitioner.py`), named explicitly: routing
never depends on a producer's partitioner setting.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import orjson
from confluent_kafka import TIMESTAMP_CREATE_TIME, Message, Producer

from audiences.adapters import metrics
from audiences.adapters.kafka.topics import Topics
from audiences.adapters.state.checkpoint import DurabilityError
from audiences.core.evaluator import Control, Output, Transition
from audiences.core.outputs import render_output
from audiences.core.state import UserState

log = logging.getLogger(__name__)
FORWARDED_FROM = "audiences-forwarded-from"  # header of a record moved to its owner partition
# The producer's message.max.bytes (librdkafka's default) less room for the record's key,
# headers and batch overhead: a record above it would be refused when sent.
MAX_RECORD_BYTES = 1_000_000 - 64 * 1024
Rendered = list[tuple[bytes, bytes]]  # (key, value) of outputs, rendered before anything is sent
Encoded = list[tuple[bytes, bytes, int]]  # (key, value, partition) of control records


class OversizedRecord(ValueError):
    """An output or control record the producer would refuse (checked before sending)."""


class Emitter:
    def __init__(
        self, producer: Producer, topics: Topics, owner_of: Callable[[bytes], int]
    ) -> None:
        self.producer = producer
        self.topics = topics
        self.owner_of = owner_of  # profile key -> its `events` partition
        self._errors: list[str] = []
        self._transitions: dict[tuple[str, bool], int] = {}  # flushed to metrics per checkpoint

    @staticmethod
    def render(outputs: list[Output], state: UserState) -> Rendered:
        """The output messages of one step, all or nothing (a rendering that raises
        sends none of them, so no output exists without the state that implies it)."""
        traits, anonymous = state.traits, state.anonymous
        rendered = [
            (
                output.profile_key.encode(),
                orjson.dumps(render_output(output, traits, anonymous=anonymous)),
            )
            for output in outputs
        ]
        for key, value in rendered:
            if len(key) + len(value) > MAX_RECORD_BYTES:
                raise OversizedRecord(f"an output of {len(value)} bytes")
        return rendered

    def send(self, rendered: Rendered, outputs: list[Output]) -> None:
        topic = self.topics.audience_events
        produce, delivered = self.producer.produce, self._delivered
        for key, value in rendered:
            try:  # the hot path: no optional arguments (each costs microseconds)
                produce(topic, key=key, value=value, on_delivery=delivered)
            except BufferError:
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
        self._produce(
            self.topics.events_dlq,
            msg.key(),
            msg.value(),
            headers=[
                ("error", detail.encode("utf-8", "replace")[:2000]),
                ("error_reason", reason.encode()),
                ("source_topic", msg.topic().encode()),
                ("source_partition", str(msg.partition()).encode()),
                ("source_offset", str(msg.offset()).encode()),
            ],
        )
        metrics.EVENTS_INVALID.labels(reason).inc()

    def flush(self, timeout_s: float = 60.0) -> None:
        """Wait until everything sent is acknowledged; raises DurabilityError otherwise."""
        for (audience, entered), count in self._transitions.items():
            metrics.TRANSITIONS.labels(audience, "entered" if entered else "exited").inc(count)
        self._transitions.clear()
        remaining = self.producer.flush(timeout_s)
        if remaining or self._errors:
            errors, self._errors = self._errors[:5], []
            raise DurabilityError(f"records not acknowledged by Kafka: {errors or 'timed out'}")

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
        while True:
            try:
                self.producer.produce(
                    topic, key=key, value=value, on_delivery=self._delivered, **kwargs
                )
                return
            except BufferError:  # the queue is full: let Kafka catch up (backpressure)
                self.producer.poll(0.05)

    def _delivered(self, err: object, msg: Message) -> None:
        if err is not None:
            self._errors.append(f"{msg.topic()}: {err}")
