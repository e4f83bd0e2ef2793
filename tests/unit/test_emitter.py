"""What the runtime produces outside the changelog: checked before anything is sent, and
records for a profile addressed to the partition that owns it."""

from __future__ import annotations

from typing import Any

import pytest

from audiences.adapters.kafka.topics import Topics
from audiences.adapters.settings import Settings
from audiences.adapters.state.checkpoint import DurabilityError
from audiences.adapters.stream.emitter import MAX_RECORD_BYTES, Emitter, OversizedRecord
from audiences.core.evaluator import Transition, merge_request
from audiences.core.partitioning import partition_for
from audiences.core.state import UserState


class FakeProducer:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def produce(self, topic: str, **kwargs: Any) -> None:
        self.sent.append({"topic": topic, **kwargs})


def emitter() -> tuple[Emitter, FakeProducer]:
    producer = FakeProducer()
    topics = Topics.from_settings(Settings())
    return Emitter(producer, topics, lambda key: partition_for(key, 8), space_id="spa_1"), producer  # type: ignore[arg-type]


def test_control_records_go_to_the_partition_owning_their_profile() -> None:
    sender, producer = emitter()
    controls = ((f"anon-{n}", merge_request(f"anon-{n}", "u1", 0)) for n in range(20))
    sender.send_controls(sender.encode_controls(tuple(controls)))
    assert len(producer.sent) == 20
    for record in producer.sent:
        assert record["topic"] == "events"
        assert record["partition"] == partition_for(record["key"], 8)


def test_a_record_the_producer_would_refuse_is_refused_before_anything_is_sent() -> None:
    sender, producer = emitter()
    huge = {"type": "merge", "stage": "state", "properties": {"state": "x" * MAX_RECORD_BYTES}}
    with pytest.raises(OversizedRecord):
        sender.encode_controls((("u1", {"type": "merge"}), ("u2", huge)))
    assert producer.sent == []


class AckingProducer(FakeProducer):
    """Holds delivery reports until `poll`, then calls them (as librdkafka does)."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[tuple[Any, str, Exception | None]] = []
        self.fail: set[bytes] = set()

    def produce(self, topic: str, **kwargs: Any) -> None:
        super().produce(topic, **kwargs)
        error = RuntimeError("refused") if kwargs.get("key") in self.fail else None
        self.pending.append((kwargs["on_delivery"], topic, error))

    def poll(self, timeout: float = 0) -> int:
        ready, self.pending = self.pending, []
        for callback, topic, error in ready:
            callback(error, _Msg(topic))
        return len(ready)


class _Msg:
    def __init__(self, topic: str) -> None:
        self._topic = topic

    def topic(self) -> str:
        return self._topic


def test_a_sealed_interval_waits_for_its_own_records_only() -> None:
    producer = AckingProducer()
    sender = Emitter(producer, Topics.from_settings(Settings()), lambda key: 0, space_id="spa_1")  # type: ignore[arg-type]
    sender.send([(b"a", b"1"), (b"b", b"2")], [])
    wait_first = sender.seal()
    producer.fail = {b"c"}
    sender.send([(b"c", b"3")], [])  # the next interval: refused, but not the first's business
    wait_second = sender.seal()
    wait_first()  # polls: every report arrives, the first interval's are fine
    with pytest.raises(DurabilityError, match="refused"):
        wait_second()


def test_an_interval_whose_records_are_not_acknowledged_in_time_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from audiences.adapters.stream import emitter as module

    monkeypatch.setattr(module, "ACK_TIMEOUT_S", 0.05)
    producer = AckingProducer()
    sender = Emitter(producer, Topics.from_settings(Settings()), lambda key: 0, space_id="spa_1")  # type: ignore[arg-type]
    sender.send([(b"a", b"1")], [])
    producer.pending.clear()  # its report never comes
    wait = sender.seal()
    with pytest.raises(DurabilityError, match="1 not acknowledged"):
        wait()


def test_outputs_sent_counts_every_output_record_produced() -> None:
    """The bench reads this count (no wrapper around `send` on the measured path)."""
    sender, producer = emitter()
    entered = Transition("vip", 1, "VIP", "u1", True, 1_000, 1, 1_000, "event", "m1")
    exited = Transition("vip", 1, "VIP", "u2", False, 2_000, 2, 2_000, "deadline", None)
    state = UserState()
    sender.send(sender.render([entered], state), [entered])
    sender.send(sender.render([entered, exited], state), [entered, exited])
    assert sender.outputs_sent == 3 == len(producer.sent)
    assert {record["topic"] for record in producer.sent} == {"audience-events"}
