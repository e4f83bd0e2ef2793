"""Our producers place keys where `partition_for` says (and Java clients would)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from audiences.adapters.settings import Settings
from audiences.core.partitioning import partition_for

pytestmark = pytest.mark.kafka


def test_producer_partitions_match_partition_for(
    kafka_bootstrap: str, unique_name: Callable[..., str]
) -> None:
    topic = unique_name("murmur")
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    admin.create_topics([NewTopic(topic, 5, 1)])[topic].result(10)
    producer = Producer(Settings(kafka_bootstrap=kafka_bootstrap).producer_config())
    placed: dict[bytes, int] = {}

    def delivered(err: Any, msg: Any) -> None:
        assert err is None, err
        placed[msg.key()] = msg.partition()

    keys = [f"user-{n}".encode() for n in range(60)]
    for key in keys:
        producer.produce(topic, key=key, value=b"{}", on_delivery=delivered)
    assert producer.flush(30) == 0
    assert placed == {key: partition_for(key, 5) for key in keys}
