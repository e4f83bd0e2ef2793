"""The Apache Kafka broker (`ApacheKafka`, `apache_kafka_bootstrap`) does what we need it for.

These are the features the embedded Tansu broker lacks: DeleteRecords moving
the log start, transactions (fencing, ``read_committed``) and a log cleaner
that really removes superseded records and tombstones.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from audiences.errors import BrokerError

pytestmark = [pytest.mark.kafka, pytest.mark.apache]

COMPACTION_WAIT_S = 60.0


def _create_topic(bootstrap: str, name: str, config: dict[str, str] | None = None) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    new = NewTopic(name, num_partitions=1, replication_factor=1, config=config or {})
    admin.create_topics([new])[name].result(timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        topic = admin.list_topics(topic=name, timeout=5).topics.get(name)
        if topic is not None and topic.error is None and len(topic.partitions) == 1:
            return
        time.sleep(0.1)
    raise AssertionError(f"topic {name} did not appear")


def _consumer(bootstrap: str, isolation: str = "read_uncommitted") -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "unused",  # assign() only: no group membership, no commits
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "isolation.level": isolation,
            "fetch.wait.max.ms": 50,
        }
    )


def _read_all(
    bootstrap: str, topic: str, *, start: int = 0, isolation: str = "read_uncommitted"
) -> list[Message]:
    """Every record of partition 0 from `start` up to the end the broker reports."""
    consumer = _consumer(bootstrap, isolation)
    try:
        tp = TopicPartition(topic, 0)
        # read_committed consumers get the last stable offset as their end
        _, end = consumer.get_watermark_offsets(tp, timeout=10)
        consumer.assign([TopicPartition(topic, 0, start)])
        records: list[Message] = []
        deadline = time.monotonic() + 30
        while (not records or records[-1].offset() < end - 1) and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                # aborted records and transaction markers leave offsets no record has
                if consumer.position([tp])[0].offset >= end:
                    break
                continue
            assert msg.error() is None, msg.error()
            records.append(msg)
        return records
    finally:
        consumer.close()


def _values(records: list[Message]) -> list[str]:
    return [m.value().decode() for m in records]


def test_round_trip_through_a_consumer_group(
    apache_kafka_bootstrap: str, unique_name: Callable[..., str]
) -> None:
    topic, group = unique_name("t"), unique_name("g")
    _create_topic(apache_kafka_bootstrap, topic)
    producer = Producer({"bootstrap.servers": apache_kafka_bootstrap, "linger.ms": 5})
    sent = [f"m{i}" for i in range(20)]
    for value in sent:
        producer.produce(topic, key=value[-1], value=value)
    assert producer.flush(15) == 0

    consumer = Consumer(
        {
            "bootstrap.servers": apache_kafka_bootstrap,
            "group.id": group,
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 1000,
            "auto.offset.reset": "earliest",
        }
    )
    try:
        consumer.subscribe([topic])
        received: list[str] = []
        deadline = time.monotonic() + 60
        while len(received) < len(sent) and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None:
                assert msg.error() is None, msg.error()
                received.append(msg.value().decode())
        assert received == sent
        consumer.commit(asynchronous=False)
        committed = consumer.committed([TopicPartition(topic, 0)], timeout=10)
        assert committed[0].offset == len(sent)
    finally:
        consumer.close()


def test_delete_records_moves_the_log_start(
    apache_kafka_bootstrap: str, unique_name: Callable[..., str]
) -> None:
    topic = unique_name("t")
    _create_topic(apache_kafka_bootstrap, topic)
    producer = Producer({"bootstrap.servers": apache_kafka_bootstrap})
    for i in range(10):
        producer.produce(topic, value=f"v{i}")
    assert producer.flush(15) == 0

    admin = AdminClient({"bootstrap.servers": apache_kafka_bootstrap})
    futures = admin.delete_records([TopicPartition(topic, 0, 6)])
    (deleted,) = [f.result(timeout=30) for f in futures.values()]
    assert deleted.low_watermark == 6

    consumer = _consumer(apache_kafka_bootstrap)
    try:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
    finally:
        consumer.close()
    assert (low, high) == (6, 10)
    # Offset 0 is out of range now: auto.offset.reset=earliest resumes at the new log start.
    records = _read_all(apache_kafka_bootstrap, topic, start=0)
    assert [m.offset() for m in records] == [6, 7, 8, 9]
    assert _values(records) == ["v6", "v7", "v8", "v9"]


def test_transactions_fence_a_zombie_and_read_committed_skips_aborted_records(
    apache_kafka_bootstrap: str, unique_name: Callable[..., str]
) -> None:
    topic, tid = unique_name("t"), unique_name("tx")
    _create_topic(apache_kafka_bootstrap, topic)
    config = {"bootstrap.servers": apache_kafka_bootstrap, "transactional.id": tid}

    first = Producer(config)
    first.init_transactions(30)
    first.begin_transaction()
    first.produce(topic, value="committed-1")
    first.commit_transaction(30)

    first.begin_transaction()
    first.produce(topic, value="aborted")
    assert first.flush(15) == 0
    first.abort_transaction(30)

    # A zombie: `first` is mid-transaction when a new instance takes over its id.
    first.begin_transaction()
    first.produce(topic, value="zombie")
    assert first.flush(15) == 0
    second = Producer(config)
    second.init_transactions(30)  # bumps the epoch and aborts the zombie's transaction
    with pytest.raises(KafkaException) as fenced:
        first.commit_transaction(30)
    error: KafkaError = fenced.value.args[0]
    # librdkafka raises the broker's PRODUCER_FENCED as its fatal local _FENCED error
    assert error.code() in (KafkaError.PRODUCER_FENCED, KafkaError._FENCED), error
    assert error.fatal(), error

    second.begin_transaction()
    second.produce(topic, value="committed-2")
    second.commit_transaction(30)

    committed = _read_all(apache_kafka_bootstrap, topic, isolation="read_committed")
    assert _values(committed) == ["committed-1", "committed-2"]
    everything = _read_all(apache_kafka_bootstrap, topic, isolation="read_uncommitted")
    assert _values(everything) == ["committed-1", "aborted", "zombie", "committed-2"]


def test_the_log_cleaner_removes_superseded_records_and_tombstones(
    apache_kafka_bootstrap: str, unique_name: Callable[..., str]
) -> None:
    topic = unique_name("t")
    _create_topic(
        apache_kafka_bootstrap,
        topic,
        {
            "cleanup.policy": "compact",
            "segment.ms": "100",
            "min.cleanable.dirty.ratio": "0",
            "delete.retention.ms": "0",
            "min.compaction.lag.ms": "0",
        },
    )
    producer = Producer({"bootstrap.servers": apache_kafka_bootstrap, "linger.ms": 0})
    for key, value in (("a", "a1"), ("b", "b1"), ("a", "a2"), ("b", None)):
        producer.produce(topic, key=key, value=value)
        assert producer.flush(15) == 0

    def keyed() -> list[tuple[str, str | None]]:
        records = _read_all(apache_kafka_bootstrap, topic)
        return [
            (m.key().decode(), m.value().decode() if m.value() is not None else None)
            for m in records
            if m.key() != b"filler"
        ]

    assert keyed() == [("a", "a1"), ("b", "b1"), ("a", "a2"), ("b", None)]
    # The cleaner never touches the active segment, and a segment rolls only when
    # a record arrives after segment.ms: keep appending a filler record while
    # waiting. A tombstone goes in a second pass, after delete.retention.ms.
    deadline = time.monotonic() + COMPACTION_WAIT_S
    seen = keyed()
    while seen != [("a", "a2")]:
        if time.monotonic() > deadline:
            pytest.fail(
                f"the log cleaner did not compact {topic} within {COMPACTION_WAIT_S:.0f}s: "
                f"records for a and b are still {seen}, expected only ('a', 'a2')"
            )
        producer.produce(topic, key="filler", value="x")
        assert producer.flush(15) == 0
        time.sleep(0.5)
        seen = keyed()


def test_leaving_the_with_block_stops_the_jvm_and_removes_its_storage() -> None:
    from audiences.adapters.kafka.apache import ApacheKafka, ApacheKafkaUnavailable

    kafka = ApacheKafka()
    try:
        with kafka:
            pid, log_path = kafka.pid, kafka.log_path
            assert pid is not None and log_path is not None and kafka.is_running()
            assert kafka.controller_port not in (None, kafka.port)
            assert kafka.start() == kafka.bootstrap  # idempotent while running
            admin = AdminClient({"bootstrap.servers": kafka.bootstrap})
            assert admin.list_topics(timeout=10).brokers
            storage = Path(log_path).parent
            assert (storage / "data" / "meta.properties").is_file()
    except ApacheKafkaUnavailable as exc:
        pytest.skip(f"no Apache Kafka broker: {exc}")

    assert not kafka.is_running()
    assert kafka.port is None and kafka.controller_port is None and kafka.log_path is None
    assert not storage.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(BrokerError, match="is not started"):
        _ = kafka.bootstrap
