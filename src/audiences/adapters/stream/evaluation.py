"""One partition's batch of input records, evaluated: the runtime's per-event path.

For each record: parse it, check its time and its owner, load the profiles of the batch
(one multi-get), then `step` each event into its profile and send what it implies
(`PartitionState.apply` keeps the two atomic). Everything around it (consuming, sweeps,
checkpoints, rebalances) stays in `runtime.py`.

This module is compiled with mypyc together with the core (see `_core_build.
COMPILED_ADAPTERS`): it runs for every event, so it holds nothing but that path, and the
runtime passes in what it owns (the clock, the owner of a key, the misrouting counter).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import final

from confluent_kafka import Message

from audiences.adapters import metrics
from audiences.adapters.state.partition import PartitionState, Recorded
from audiences.adapters.stream.emitter import Emitter, Encoded, OversizedRecord, Refused, Rendered
from audiences.core.evaluator import StepResult
from audiences.core.events import Event, future_timestamp, parse_event
from audiences.errors import InvalidEventError

log = logging.getLogger("audiences.adapters.stream.runtime")  # the runtime's log, as before
# A test's stand-in for the core's parser (to simulate a parser bug); None: `parse_event`
# itself (see `partition.step_override`).
parse_override: Callable[[bytes, int], Event] | None = None
NOTHING: tuple[Rendered | None, Encoded | None, Refused | None] = (None, None, None)


@final
class Evaluation:
    """Evaluates batches of records for the runtime (owned by the runtime thread)."""

    def __init__(
        self,
        emitter: Emitter,
        owner_of: Callable[[bytes], int],
        count_misrouted: Callable[[int, int], None],
        newest_record_ms: dict[int, int],
    ) -> None:
        self.emitter = emitter
        self.owner_of = owner_of  # profile key -> the `events` partition that owns it
        self.count_misrouted = count_misrouted  # (found on, owner)
        self.newest_record_ms = newest_record_ms  # per partition: Kafka time, last batch
        # What the last event's step sends: rendered outputs, control and refused records.
        self.accepted = NOTHING

    def partition_batch(
        self, partition: PartitionState, batch: list[Message], now_ms: Callable[[], int]
    ) -> int | None:
        """Evaluate one partition's records; returns the Kafka time of the oldest."""
        number = partition.number
        emitter = self.emitter
        ahead = partition.ahead
        events: list[tuple[bytes, Event, Message, Recorded]] = []
        types: dict[str, int] = {}
        oldest_ms: int | None = None
        for msg in batch:
            offset: int = msg.offset()
            if offset < partition.position:
                continue  # already evaluated (a rewind re-delivers what was fetched)
            partition.position = offset + 1
            record_ms: int = msg.timestamp()[1]
            if oldest_ms is None:
                oldest_ms = record_ms
            value = msg.value() or b""
            try:
                override = parse_override
                if override is None:
                    event = parse_event(value, record_ms)
                else:
                    event = override(value, record_ms)
            # (each handler names its exception apart: compiled, a name has one type)
            except InvalidEventError as invalid:
                emitter.dead_letter(msg, invalid.reason, str(invalid))
                continue
            except Exception as exc:  # a parser bug must not stop the partition either
                log.exception("parsing failed at %s[%d]@%d", msg.topic(), number, offset)
                emitter.dead_letter(msg, "parse_error", repr(exc))
                continue
            future = future_timestamp(event, record_ms)
            if future is not None:
                emitter.dead_letter(msg, "future_timestamp", future)
                continue
            key = event.key.encode()
            owner = self.owner_of(key)
            if owner != number:
                emitter.forward(msg, owner)
                self.count_misrouted(number, owner)
                continue
            if ahead and offset < ahead.get(key, -1):
                continue  # the stored profile already reflects it (see recovery.py)
            events.append((key, event, msg, Recorded(value, record_ms)))
            types[event.type] = types.get(event.type, 0) + 1
            partition.observe(event.timestamp_ms)
        if batch:
            self.newest_record_ms[number] = batch[-1].timestamp()[1]
        if not events:
            return oldest_ms
        partition.load({entry[0] for entry in events}, now_ms())
        duplicates = suppressed = 0
        quarantined, suppressing = partition.quarantined, partition.suppressed
        for key, event, msg, recorded in events:
            if quarantined and key in quarantined and event.type != "delete":
                emitter.dead_letter(msg, "profile_quarantined", "the profile is quarantined")
                continue
            if suppressing and key in suppressing and event.type not in ("unsuppress", "delete"):
                suppressed += 1
                continue
            result = self.apply(partition, key, event, msg, recorded)
            if result is not None and result.duplicate:
                duplicates += 1
        for event_type, count in types.items():
            metrics.EVENTS_IN_BY_TYPE(event_type).inc(count)
        if duplicates:
            metrics.EVENTS_DUPLICATE.inc(duplicates)
        if suppressed:
            metrics.EVENTS_SUPPRESSED.inc(suppressed)
        return oldest_ms

    def apply(
        self,
        partition: PartitionState,
        key: bytes,
        event: Event,
        msg: Message,
        recorded: Recorded | None = None,
    ) -> StepResult | None:
        """One event into its profile, atomically with its outputs (or dead-lettered)."""
        try:
            result = partition.apply(
                key, partition.cache.get(key), event, event.key, self.accept, recorded
            )
        except OversizedRecord as oversized:  # (not `exc`: see partition_batch)
            self.emitter.dead_letter(msg, "oversized_output", str(oversized))
            return None
        except Exception as exc:  # a bug must not stop the partition: park it
            log.exception(
                "evaluation failed at %s[%d]@%d", msg.topic(), partition.number, msg.offset()
            )
            self.emitter.dead_letter(msg, "evaluation_error", repr(exc))
            return None
        assert result is not None
        rendered, controls, refused = self.accepted
        if rendered:
            self.emitter.send(rendered, result.transitions)
        if controls:
            self.emitter.send_controls(controls)
        if refused:
            self.emitter.send_refusals(refused, msg)
        return result

    def accept(self, result: StepResult) -> None:
        """Encode what an event's step sends, before its profile records the step (a
        failure here rolls the profile back: no state without its outputs, and no
        outputs without their state); `apply` sends it once the step is recorded.
        A method, not a closure per event: this runs for every event."""
        emitter = self.emitter
        self.accepted = (
            emitter.render(result.transitions, result.state) if result.transitions else None,
            emitter.encode_controls(result.controls) if result.controls else None,
            Emitter.encode_refusals(result.refused) if result.refused else None,
        )
