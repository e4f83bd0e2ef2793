"""The state protocol on Apache Kafka itself, where the embedded broker falls short: a
changelog whose start was moved with DeleteRecords, and a local store that missed
writes another owner made before compaction removed them (tombstones included)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource
from harness import T0, Engine, M, assert_same_as_core, pure_outputs, track

from audiences.adapters.state.layout import Kind, changelog_key
from audiences.core.events import format_iso
from shared import wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.apache]
VIEWERS = {
    "key": "viewers",
    "condition": {"performed": {"event": "Product Viewed", "times": {"gte": 2}, "within": "1h"}},
}


def test_a_changelog_whose_start_moved_is_restored_from_what_is_left(
    apache_kafka_bootstrap: str, unique_name: Callable[..., str], tmp_path: Path
) -> None:
    """DeleteRecords removed the changelog's head (every profile was rewritten after it):
    a worker with no local state restores from the oldest record left instead of failing
    or silently starting from the end, and goes on with exactly the pure core's result."""
    engine = Engine(apache_kafka_bootstrap, unique_name("moved"), tmp_path / "data", partitions=1)
    try:
        engine.apply(VIEWERS)
        engine.start()
        users = [f"u{i}" for i in range(10)]
        first = [track(u, "Product Viewed", T0) for u in users]
        engine.send(*first)
        engine.settle()
        cut = _end(engine)  # everything so far is superseded by the next round
        second = [track(u, "Product Viewed", T0 + M) for u in users]
        engine.send(*second)
        engine.outputs(len(users))
        engine.settle()
        engine.stop()
        admin = AdminClient({"bootstrap.servers": apache_kafka_bootstrap})
        # (Kafka refuses DeleteRecords on a compact-only topic; with retention on top of
        # compaction, `compact,delete`, the start moves the same way.)
        _alter(admin, engine.topics.changelog, {"cleanup.policy": "compact,delete"})
        target = TopicPartition(engine.topics.changelog, 0, cut)

        def deleted() -> bool:  # (the broker applies the new policy asynchronously)
            try:
                moved = admin.delete_records([target])[target].result(timeout=30)
            except KafkaException as exc:
                if exc.args[0].code() == KafkaError.POLICY_VIOLATION:
                    return False
                raise
            assert moved.low_watermark == cut
            return True

        wait_for(deleted, 30, "DeleteRecords to be allowed")
        shutil.rmtree(engine.settings.data_dir)
        engine.start()
        third = [track(u, "Product Viewed", T0 + 2 * M) for u in users[:3]]
        engine.send(*third)
        expected = pure_outputs([VIEWERS], first + second + third, None)
        assert_same_as_core(engine.outputs(len(expected)), expected)
        assert engine.evaluator is not None
        assert engine.evaluator.partitions[0].position == len(first + second + third)
    finally:
        engine.close()


def test_a_store_that_missed_another_owners_deletion_is_not_trusted(
    apache_kafka_bootstrap: str, unique_name: Callable[..., str], tmp_path: Path
) -> None:
    """Worker A stops (keeping its store); worker B owns the partition and deletes a user;
    compaction removes that user's records, tombstone included; A comes back. A must not
    bring the deleted profile back from its store."""
    engine = Engine(apache_kafka_bootstrap, unique_name("stale"), tmp_path / "a", partitions=1)
    admin = AdminClient({"bootstrap.servers": apache_kafka_bootstrap})
    changelog = engine.topics.changelog
    try:
        # A changelog the cleaner works on within seconds (the engine keeps it if it exists).
        fast = {
            "cleanup.policy": "compact",
            "segment.ms": "100",
            "min.cleanable.dirty.ratio": "0.01",
            "delete.retention.ms": "100",
            "min.compaction.lag.ms": "0",
        }
        _alter(admin, changelog, fast)
        engine.apply(VIEWERS)
        engine.start()  # worker A
        engine.send(
            *(track(u, "Product Viewed", T0 + i) for i in range(2) for u in ("gone", "kept"))
        )
        engine.outputs(2)
        engine.settle()
        engine.stop()  # A's store stays on disk
        b_dir = tmp_path / "b"
        a_settings = engine.settings
        engine.settings = a_settings.replace(data_dir=str(b_dir))
        engine.start()  # worker B, another data dir
        engine.send(
            {
                "type": "delete",
                "userId": "gone",
                "timestamp": format_iso(T0 + M),
                "messageId": "delete-gone",
            }
        )
        exited = engine.outputs(3)[2]
        assert (exited["userId"], exited["event"]) == ("gone", "Audience Exited")
        engine.settle()
        engine.stop()
        profile = changelog_key(Kind.PROFILE, b"gone")
        _wait_compacted_away(apache_kafka_bootstrap, changelog, profile)
        engine.settings = a_settings
        engine.start()  # A again, with its old store
        runtime = engine.evaluator
        assert runtime is not None
        status = _profile_status(runtime, b"gone")
        assert status == "suppressed", status
        # A's store did not resurrect `gone`: its old deadline never fires an exit again
        engine.clock.advance_to(T0 + 2 * 60 * M)
        outputs = engine.outputs(5)  # only `kept` leaves the window
        assert outputs[3]["event"] == "User Deleted"  # (of the deletion of `gone`)
        assert [(o["userId"], o["event"]) for o in outputs[4:]] == [("kept", "Audience Exited")]
    finally:
        engine.close()


def _alter(admin: AdminClient, topic: str, configs: dict[str, str]) -> None:
    resource = ConfigResource(
        ConfigResource.Type.TOPIC,
        topic,
        incremental_configs=[
            ConfigEntry(name, value, incremental_operation=AlterConfigOpType.SET)
            for name, value in configs.items()
        ],
    )
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(timeout=30)


def _profile_status(runtime: object, key: bytes) -> str:
    partitions = runtime.partitions  # type: ignore[attr-defined]
    partition = partitions[0]
    if key in partition.suppressed:
        return "suppressed"
    return "present" if partition.durable_state(key) is not None else "missing"


def _end(engine: Engine) -> int:
    consumer = Consumer({"bootstrap.servers": engine.settings.kafka_bootstrap, "group.id": "end"})
    try:
        return int(
            consumer.get_watermark_offsets(TopicPartition(engine.topics.changelog, 0), 10)[1]
        )
    finally:
        consumer.close()


def _wait_compacted_away(bootstrap: str, topic: str, key: bytes) -> None:
    """Until no record with `key` is left (the cleaner only works on closed segments:
    a filler record, which recovery ignores, rolls them)."""
    filler = Producer({"bootstrap.servers": bootstrap})

    def gone() -> bool:
        filler.produce(topic, key=b"z-filler", value=b"", partition=0)
        filler.flush(10)
        consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": "compaction-check",
                "enable.auto.commit": False,
            }
        )
        try:
            consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
            _low, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), 10)
            keys = []
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                batch = consumer.consume(500, 0.3)
                keys += [m.key() for m in batch if m.error() is None]
                if consumer.position([TopicPartition(topic, 0)])[0].offset >= high:
                    break
            return key not in keys
        finally:
            consumer.close()

    wait_for(gone, 90, f"compaction to remove {key!r}")
