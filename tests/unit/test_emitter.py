"""What the runtime produces outside the changelog: checked before anything is sent, and
records for a profile addressed to the partition that owns it."""

from __future__ import annotations

from typing import Any

import pytest

from audiences.adapters.kafka.partitioner import partition_for
from audiences.adapters.kafka.topics import Topics
from audiences.adapters.settings import Settings
from audiences.adapters.stream.emitter import MAX_RECORD_BYTES, Emitter, OversizedRecord
from audiences.core.evaluator import merge_request


class FakeProducer:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def produce(self, topic: str, **kwargs: Any) -> None:
        self.sent.append({"topic": topic, **kwargs})


def emitter() -> tuple[Emitter, FakeProducer]:
    producer = FakeProducer()
    topics = Topics.from_settings(Settings())
    return Emitter(producer, topics, lambda key: partition_for(key, 8)), producer  # type: ignore[arg-type]


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
