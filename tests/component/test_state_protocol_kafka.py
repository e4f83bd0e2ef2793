"""The runtime's state protocol through the real Kafka protocol: checkpoints that fail at
any step, routing that does not trust the producer's partitioner, fencing of a former
owner, quarantine, store lifecycle, topic checks and re-judging that writes only what
changed. Each compares with the pure core where outputs are involved."""

from __future__ import annotations

import os
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from harness import T0, Engine, H, M, S, assert_same_as_core, pure_outputs, track

from audiences.adapters.kafka.clients import KafkaClients
from audiences.adapters.kafka.topics import TopicMismatch, Topics, ensure_topics
from audiences.adapters.state.checkpoint import ChangelogWriter, DurabilityError, Step
from audiences.adapters.state.layout import NEVER, Header, Kind, changelog_key
from audiences.adapters.state.store import RocksDictStore
from audiences.adapters.stream.runtime import Runtime
from audiences.core.events import format_iso
from audiences.core.partitioning import partition_for
from audiences.core.state import UserState
from shared import isolated_settings, wait_for

pytestmark = pytest.mark.kafka

FREQUENT = {
    "key": "frequent_viewers",
    "condition": {"performed": {"event": "Product Viewed", "times": {"gte": 3}, "within": "1h"}},
}
BUYERS = {"key": "buyers", "condition": {"performed": {"event": "Order Completed"}}}


def views(user: str, start_ms: int, count: int) -> list[dict[str, Any]]:
    return [track(user, "Product Viewed", start_ms + i * M) for i in range(count)]


# -- 1. a committed offset is never ahead of durable state --------------------------------


@pytest.mark.parametrize("step", list(Step), ids=[s.value for s in Step])
def test_a_checkpoint_that_fails_at_any_step_loses_nothing(engine: Engine, step: Step) -> None:
    engine.apply(FREQUENT)
    engine.start()
    first = [e for user in ("a", "b", "c") for e in views(user, T0, 2)]
    engine.send(*first)
    engine.settle()
    failed = threading.Event()

    def fail_once(at: Step) -> None:
        if at is step and not failed.is_set():
            failed.set()
            raise DurabilityError(f"injected after the {at.value} step")

    assert engine.evaluator is not None
    engine.evaluator.checkpoint.after_step = fail_once
    second = [e for user in ("a", "b", "c", "d") for e in views(user, T0 + 10 * M, 2)]
    engine.send(*second)
    wait_for(failed.is_set, 30, "the injected failure")
    expected = pure_outputs([FREQUENT], first + second, None)
    seen = engine.outputs(len(expected))
    assert_same_as_core(seen, expected)
    # The state the failure left behind is the core's: a fresh store restores it from the
    # changelog and the next events build on it.
    engine.stop()
    import shutil

    shutil.rmtree(engine.settings.data_dir)
    engine.start()
    third = views("d", T0 + 30 * M, 1)
    engine.send(*third)
    expected = pure_outputs([FREQUENT], first + second + third, None)
    assert_same_as_core(engine.outputs(len(expected)), expected)


def test_a_changelog_record_the_broker_refuses_fails_the_checkpoint_wherever_it_sits(
    apache_kafka_bootstrap: str, unique_name: Callable[..., str], tmp_path: Path
) -> None:
    """Only a transaction's last record reports its delivery (`ChangelogWriter.begin`): a
    record the broker refuses before it must still fail the commit, so the interval is
    never taken for durable; the writer's next transaction goes through."""
    name = unique_name("refused")
    settings = isolated_settings(apache_kafka_bootstrap, name, str(tmp_path))
    topic = f"{name}-changelog"
    admin = AdminClient({"bootstrap.servers": apache_kafka_bootstrap})
    # The broker refuses batches over 20 kB on this topic; the producer would send 1 MB.
    created = admin.create_topics([NewTopic(topic, 1, 1, config={"max.message.bytes": "20000"})])
    created[topic].result(30)
    writer = ChangelogWriter(KafkaClients(settings).changelog_producer(0), topic, 0, 30)
    writer.claim(b"worker-a", b"{}")
    claimed = writer.last_offset
    small = [(changelog_key(Kind.PROFILE, b"u%d" % n), b"{}", Header(n, NEVER)) for n in range(3)]
    refused = (changelog_key(Kind.PROFILE, b"big"), os.urandom(60_000), Header(3, NEVER))
    writer.begin([*small[:2], refused, small[2]])
    with pytest.raises(DurabilityError):
        writer.commit()
    writer.close()  # (a refused batch leaves the idempotent producer unusable: a new one)
    writer = ChangelogWriter(KafkaClients(settings).changelog_producer(0), topic, 0, 30)
    writer.claim(b"worker-a", b"{}")
    writer.begin(small)
    writer.commit()
    assert writer.last_offset > claimed
    writer.close()
    reader = Consumer(
        {
            "bootstrap.servers": apache_kafka_bootstrap,
            "group.id": f"{name}-reader",
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
        }
    )
    reader.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    keys: list[bytes] = []
    while True:
        msg = reader.poll(10)
        assert msg is not None, "the changelog's end was not reached"
        if msg.error():
            break  # (partition EOF)
        keys.append(msg.key())
    reader.close()
    # The committed log: the two claims, then only the last transaction's records.
    owner = changelog_key(Kind.OWNER, b"worker-a")
    assert keys == [owner, owner, *(key for key, _value, _header in small)]


def test_outputs_flow_while_a_checkpoint_waits_on_the_broker(engine: Engine) -> None:
    """Durability is pipelined: while one interval's changelog transaction is held, the
    loop evaluates the next events and their outputs reach the topic at once; nothing is
    committed until the held checkpoint lands."""
    engine.apply(BUYERS)
    engine.start()
    engine.send(track("a", "Order Completed", T0))
    engine.outputs(1)
    engine.settle()
    runtime = engine.evaluator
    assert runtime is not None
    held, release = threading.Event(), threading.Event()

    def hold(at: Step) -> None:  # on the durability thread
        if at is Step.OUTPUTS and not release.is_set():
            held.set()
            release.wait(30)

    runtime.checkpoint.after_step = hold
    committed = {n: p.committed for n, p in runtime.partitions.items()}
    engine.send(track("b", "Order Completed", T0 + M))
    wait_for(held.is_set, 30, "a checkpoint to be held")
    engine.send(track("c", "Order Completed", T0 + 2 * M))
    users = [o["userId"] for o in engine.outputs(3)]
    assert sorted(users) == ["a", "b", "c"]
    assert {n: p.committed for n, p in runtime.partitions.items()} == committed
    release.set()
    engine.settle()
    assert sum(p.committed for p in runtime.partitions.values()) == 3


# -- 7. routing that does not depend on the producer --------------------------------------


def test_records_on_the_wrong_partition_reach_the_owner_of_their_profile(
    kafka_bootstrap: str, unique_name: Callable[..., str], tmp_path: Path
) -> None:
    """An anonymous visitor's page views and the identify that links them, produced with
    librdkafka's default partitioner (CRC32) instead of the engine's murmur2: the merge
    still happens and the user enters the audience their anonymous history qualifies for."""
    partitions = 4
    engine = Engine(kafka_bootstrap, unique_name("route"), tmp_path / "data", partitions=partitions)
    try:
        pricing = {
            "key": "pricing_lookers",
            "condition": {"page_viewed": {"url": "*/pricing*", "times": {"gte": 2}}},
        }
        engine.apply(pricing)
        # ids whose CRC32 and murmur2 partitions differ (for both the visitor and the user)
        anonymous, user = _misrouted_id("anon", partitions), _misrouted_id("user", partitions)
        producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 5})  # defaults
        for i in range(2):
            page = {
                "type": "page",
                "anonymousId": anonymous,
                "timestamp": format_iso(T0 + i * S),
                "messageId": f"page-{i}",
                "properties": {"url": "https://shop.example/pricing"},
            }
            producer.produce(engine.topics.events, key=anonymous.encode(), value=orjson.dumps(page))
        identify = {
            "type": "identify",
            "userId": user,
            "anonymousId": anonymous,
            "timestamp": format_iso(T0 + M),
            "messageId": "identify-1",
            "traits": {"email": "u@example.com"},
        }
        producer.produce(engine.topics.events, key=user.encode(), value=orjson.dumps(identify))
        producer.flush(10)
        engine.start()
        (entered,) = engine.outputs(1)
        assert (entered["userId"], entered["event"]) == (user, "Audience Entered")
        assert entered["properties"]["audience_key"] == "pricing_lookers"
        from prometheus_client import REGISTRY

        assert (REGISTRY.get_sample_value("audiences_misrouted_events_total") or 0) >= 3
    finally:
        engine.close()


def _misrouted_id(prefix: str, partitions: int) -> str:
    for n in range(1000):
        candidate = f"{prefix}-{n}"
        key = candidate.encode()
        if zlib.crc32(key) % partitions != partition_for(key, partitions):
            return candidate
    raise AssertionError("no id found")


# -- 5. fencing: a former owner cannot write state the next owner restores ----------------


def test_a_former_owner_cannot_write_state_the_next_owner_restores(
    kafka_bootstrap: str, unique_name: Callable[..., str], tmp_path: Path
) -> None:
    """Worker A is blocked mid-checkpoint until the group gives its partition to B; B goes
    on; A is released and tries to write the state of its (older) interval. A third
    instance restoring from the changelog must get exactly the pure core's state."""
    engine = Engine(kafka_bootstrap, unique_name("zombie"), tmp_path / "data", partitions=1)
    engine.settings = engine.settings.replace(max_poll_interval_ms=7000)
    engine.apply(FREQUENT, BUYERS)
    clients = KafkaClients(engine.settings)
    runtimes: list[tuple[Runtime, threading.Thread]] = []

    def start(name: str) -> Runtime:
        settings = engine.settings.replace(data_dir=str(tmp_path / name))
        runtime = Runtime(settings, engine.topics, KafkaClients(settings), clock=engine.clock)
        thread = threading.Thread(target=runtime.run, daemon=True)
        thread.start()
        runtimes.append((runtime, thread))
        return runtime

    try:
        a = start("a")
        wait_for(a.ready.is_set, 60, "A to own the partition")
        first = views("u", T0, 2)
        engine.send(*first)
        wait_for(lambda: a.partitions[0].committed >= 2, 30, "A to checkpoint")
        # Block A inside its next checkpoint (after it evaluated the event).
        blocked, release = threading.Event(), threading.Event()
        seal = a.checkpoint.seal_outputs

        def stuck_seal() -> Callable[[], None]:
            # On A's loop thread, the interval sealed: A stops polling (the group evicts
            # it) and its durability thread writes the interval only once released.
            partition = a.partitions.get(0)
            if partition is not None and partition.inflight and partition.inflight.dirty:
                blocked.set()
                release.wait(60)
            return seal()

        a.checkpoint.seal_outputs = stuck_seal
        late = [track("u", "Order Completed", T0 + 5 * M)]
        engine.send(*late)
        wait_for(blocked.is_set, 30, "A to block mid-checkpoint")
        b = start("b")
        wait_for(lambda: 0 in b.partitions, 60, "B to take the partition over")
        more = [*views("u", T0 + 10 * M, 2), track("v", "Order Completed", T0 + 11 * M)]
        engine.send(*more)
        wait_for(lambda: b.partitions[0].committed >= 6, 30, "B to evaluate and checkpoint")
        release.set()  # A goes on with what it had: its writes must not count
        wait_for(lambda: 0 not in a.partitions, 30, "A to learn it lost the partition")
        for runtime, thread in runtimes:
            runtime.stop()
            thread.join(60)
        runtimes.clear()
        # A third instance restores from the changelog alone.
        c = start("c")
        wait_for(lambda: 0 in c.partitions, 60, "C to restore")
        c.stop()
        runtimes[0][1].join(60)
        runtimes.clear()
        store = RocksDictStore(tmp_path / "c" / engine.settings.app_id / "p0")
        try:
            from audiences.core.definitions import build_catalog, validate_definition
            from audiences.core.evaluator import step
            from audiences.core.events import parse_event

            catalog = build_catalog(
                {d["key"]: (validate_definition(d), 1) for d in (FREQUENT, BUYERS)}
            )
            expected: dict[str, UserState] = {}
            for raw in first + late + more:
                event = parse_event(raw, T0)
                expected[event.key] = step(expected.get(event.key), event, catalog, event.key).state
            from audiences.adapters.state.layout import Family

            for user, state in expected.items():
                stored = store.get(Family.PROFILES, user.encode())
                assert stored is not None, user
                assert UserState.decode(stored).to_json() == state.to_json(), user
        finally:
            store.close()
    finally:
        for runtime, thread in runtimes:
            runtime.stop()
            thread.join(60)
        engine.close()
        del clients


# -- 3. a profile that makes the engine fail is quarantined; the partition goes on -------


def test_a_profile_that_cannot_be_stored_is_quarantined_and_the_rest_goes_on(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from audiences.adapters.state import partition

    def encode(state: UserState) -> bytes:
        if state.traits.get("poison"):
            raise ValueError("Integer exceeds 64-bit range")
        return state.encode()

    monkeypatch.setattr(partition, "encode_override", encode)
    engine.apply(BUYERS)
    engine.start()
    poison = {
        "type": "identify",
        "userId": "p",
        "timestamp": format_iso(T0),
        "messageId": "poison-1",
        "traits": {"poison": True},
    }
    engine.send(poison)
    engine.settle()  # its checkpoint found it cannot be encoded: quarantined
    engine.send(track("p", "Order Completed", T0 + 2 * S), track("ok", "Order Completed", T0))
    outputs = engine.outputs(1)
    assert [o["userId"] for o in outputs] == ["ok"]
    letters = engine.dead_letters(1)
    assert dict(letters[0].headers())["error_reason"] == b"profile_quarantined"
    from prometheus_client import REGISTRY

    quarantined = REGISTRY.get_sample_value(
        "audiences_profiles_quarantined_total", {"reason": "unencodable_state"}
    )
    assert quarantined is not None and quarantined >= 1
    # Deleting the user lifts the quarantine; the partition never stopped.
    engine.send({"type": "delete", "userId": "p", "timestamp": format_iso(T0 + M)})
    engine.send(track("ok3", "Order Completed", T0 + M))
    outputs = engine.outputs(3)
    assert sorted((o["userId"], o["event"]) for o in outputs[1:]) == [
        ("ok3", "Audience Entered"),
        ("p", "User Deleted"),
    ]
    engine.settle()
    assert engine.evaluator is not None
    assert all(b"p" not in p.quarantined for p in engine.evaluator.partitions.values())


# -- 6. lifecycle against the log ---------------------------------------------------------


def test_a_partition_given_away_leaves_no_store_behind(
    kafka_bootstrap: str, unique_name: Callable[..., str], tmp_path: Path
) -> None:
    engine = Engine(kafka_bootstrap, unique_name("life"), tmp_path / "data", partitions=2)
    try:
        engine.apply(BUYERS)
        engine.start()
        engine.send(*(track(f"u{i}", "Order Completed", T0 + i) for i in range(10)))
        engine.outputs(10)
        engine.settle()
        assert engine.evaluator is not None
        base = Path(engine.settings.data_dir) / engine.settings.app_id
        assert sorted(p.name for p in base.iterdir()) == ["p0", "p1"]
        # A second runtime joins: one partition moves; its store here is deleted.
        other = Runtime(
            engine.settings.replace(data_dir=str(tmp_path / "other")),
            engine.topics,
            KafkaClients(engine.settings),
            clock=engine.clock,
        )
        thread = threading.Thread(target=other.run, daemon=True)
        thread.start()
        try:
            wait_for(lambda: len(other.partitions) == 1, 60, "the partitions to split")
            wait_for(lambda: len(engine.evaluator.partitions) == 1, 30, "the revocation")  # type: ignore[union-attr]
            kept = [f"p{n}" for n in engine.evaluator.partitions]  # type: ignore[union-attr]
            assert sorted(p.name for p in base.iterdir()) == kept
        finally:
            other.stop()
            thread.join(60)
    finally:
        engine.close()


def test_topics_that_contradict_the_engine_are_refused(
    kafka_bootstrap: str, unique_name: Callable[..., str], tmp_path: Path
) -> None:
    settings = isolated_settings(kafka_bootstrap, unique_name("topics"), str(tmp_path))
    topics = Topics.from_settings(settings)
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    for future in admin.create_topics(
        [
            NewTopic(topics.events, 4, 1),
            NewTopic(topics.changelog, 2, 1, config={"cleanup.policy": "compact"}),
        ]
    ).values():
        future.result()
    with pytest.raises(TopicMismatch, match=r"has 2 partitions but .* has 4"):
        ensure_topics(settings, topics)


# -- 4. re-judging writes only profiles that changed ---------------------------------------


def test_an_edit_rewrites_only_the_profiles_it_changes(engine: Engine) -> None:
    engine.apply(BUYERS, FREQUENT)
    engine.start()
    engine.send(*(track(f"b{i}", "Order Completed", T0 + i) for i in range(20)))
    engine.send(*views("viewer", T0, 3))
    engine.outputs(21)
    engine.settle()
    before = _profile_records(engine)
    # Renaming `frequent_viewers` (a new version) changes nothing for anybody's state.
    engine.apply({**FREQUENT, "name": "Frequent viewers"})
    runtime = engine.evaluator
    assert runtime is not None

    def judged() -> bool:
        fingerprint = runtime.definitions.catalog.fingerprint
        return all(p.judged == fingerprint for p in list(runtime.partitions.values()))

    wait_for(judged, 30, "the re-judging pass")
    engine.settle()
    after = _profile_records(engine)
    assert after == before  # 21 profiles were re-judged; none changed, none was written


def _profile_records(engine: Engine) -> int:
    topic = engine.topics.changelog
    consumer = Consumer(
        {"bootstrap.servers": engine.settings.kafka_bootstrap, "group.id": "count-profiles"}
    )
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        count, idle = 0, 0
        while idle < 3:
            batch = consumer.consume(500, 0.3)
            idle = 0 if batch else idle + 1
            count += sum(
                1
                for m in batch
                if m.error() is None
                and (m.key() or b"").startswith(changelog_key(Kind.PROFILE, b""))
            )
        return count
    finally:
        consumer.close()


# -- 8. the API reads through the query port: no Kafka writes on reads ---------------------


def test_api_reads_write_nothing_to_kafka(engine: Engine, tmp_path: Path) -> None:
    from apiserver import Worker

    engine.apply(BUYERS)
    worker = Worker(engine.settings, tmp_path / "w", engine.clock).start().wait_ready()
    try:
        engine.send(track("u1", "Order Completed", T0))
        engine.outputs(1)
        wait_for(lambda: worker("GET", "/v1/users/u1").status == 200, 30, "the profile")
        ends = _ends(engine, [engine.topics.definitions, engine.topics.changelog])
        for _ in range(3):
            for path in (
                "/v1/audiences",
                "/v1/audiences/buyers",
                "/v1/users/u1",
                "/v1/users/u1/explain/buyers",
                "/v1/audiences/buyers/members",
                "/v1/audiences/buyers/history",
            ):
                assert worker("GET", path).status == 200, path
            assert worker("POST", "/v1/audiences/preview", BUYERS).status == 200
        time.sleep(0.5)  # let any stray write land before looking (there must be none)
        assert _ends(engine, [engine.topics.definitions, engine.topics.changelog]) == ends
    finally:
        worker.stop()


def _ends(engine: Engine, topics: list[str]) -> dict[tuple[str, int], int]:
    consumer = Consumer({"bootstrap.servers": engine.settings.kafka_bootstrap, "group.id": "ends"})
    try:
        ends = {}
        for topic in topics:
            for p in consumer.list_topics(topic, timeout=10).topics[topic].partitions:
                ends[(topic, p)] = consumer.get_watermark_offsets(TopicPartition(topic, p), 10)[1]
        return ends
    finally:
        consumer.close()


def test_a_recreated_events_topic_is_read_from_its_start(engine: Engine) -> None:
    """`events` deleted and created again (new topic id): its offsets restart at 0, below
    the checkpoint. The new records are evaluated, not skipped as already seen."""
    engine.apply(BUYERS)
    engine.start()
    engine.send(*(track(f"old{i}", "Order Completed", T0 + i) for i in range(5)))
    engine.outputs(5)
    engine.settle()
    engine.stop()
    admin = AdminClient({"bootstrap.servers": engine.settings.kafka_bootstrap})
    for future in admin.delete_topics([engine.topics.events]).values():
        future.result()
    wait_for(
        lambda: engine.topics.events not in admin.list_topics(timeout=10).topics,
        30,
        "the topic to be deleted",
    )
    for future in admin.create_topics([NewTopic(engine.topics.events, 2, 1)]).values():
        future.result()
    engine.send(track("new", "Order Completed", T0 + H))
    engine.start()
    outputs = engine.outputs(6)
    assert outputs[5]["userId"] == "new"


def test_a_backfill_does_not_hold_live_events_back(
    kafka_bootstrap: str, unique_name: Callable[..., str], tmp_path: Path
) -> None:
    """A new audience over history no stored profile tracks is backfilled by a second
    cursor while live events go on: a live event's transition comes out while the history
    is still being read, and the backfilled audience enters everybody at once at the end
    (no storm), exactly as the pure core over the whole log says."""
    engine = Engine(kafka_bootstrap, unique_name("backfill"), tmp_path / "data", partitions=1)
    try:
        engine.apply(BUYERS)
        history = [track(f"h{n % 2000:04d}", "Product Viewed", T0 + n) for n in range(100_000)]
        producer = Producer(
            {"bootstrap.servers": kafka_bootstrap, "linger.ms": 20, "partitioner": "murmur2_random"}
        )
        for event in history:
            producer.produce(
                engine.topics.events, key=event["userId"].encode(), value=orjson.dumps(event)
            )
            producer.poll(0)
        producer.flush(60)
        engine.start()
        engine.settle(timeout=120)
        assert engine.outputs(0) == []  # nobody bought: BUYERS has no member
        viewers = {"key": "viewers", "condition": {"performed": {"event": "Product Viewed"}}}
        engine.apply(viewers)  # its tracker is new: 100,000 events of history to fold
        assert engine.evaluator is not None
        wait_for(lambda: engine.evaluator.partitions[0].backfill is not None, 30, "the backfill")  # type: ignore[union-attr]
        live = track("live-buyer", "Order Completed", T0 + H)
        engine.send(live)
        outputs = engine.outputs(2001, timeout=120)
        first = outputs[0]
        assert (first["userId"], first["properties"]["audience_key"]) == ("live-buyer", "buyers")
        # ... and it came out before the backfill finished (Kafka append times)
        catalog = engine.evaluator.definitions.catalog.fingerprint
        finished_ms = _backfill_finished_at(engine, catalog)
        live_ms = engine._outputs.seen[0].timestamp()[1]
        assert live_ms < finished_ms, (
            f"the live event waited for the backfill ({live_ms} >= {finished_ms})"
        )
        expected = pure_outputs([BUYERS, viewers], [*history, live], None)
        # the backfilled members enter once, on re-judging (trigger "definition")
        entered = {o["userId"] for o in outputs[1:] if o["event"] == "Audience Entered"}
        assert entered == {f"h{n:04d}" for n in range(2000)}
        assert {o["properties"]["reason"]["trigger"] for o in outputs[1:]} == {"definition"}
        assert (
            len([m for m in expected.values() if m["properties"]["audience_key"] == "viewers"])
            == 2000
        )
    finally:
        engine.close()


def _backfill_finished_at(engine: Engine, catalog: str) -> int:
    """Kafka time of the first progress report saying partition 0 finished `catalog`."""
    consumer = Consumer(
        {"bootstrap.servers": engine.settings.kafka_bootstrap, "group.id": "progress-check"}
    )
    try:
        consumer.assign([TopicPartition(engine.topics.progress, 0, OFFSET_BEGINNING)])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for msg in consumer.consume(500, 0.3):
                if msg.error() is not None or msg.value() is None:
                    continue
                report = orjson.loads(msg.value())
                if report["catalog"] == catalog and report["finished"]:
                    return int(msg.timestamp()[1])
        raise AssertionError("no report of the backfill finishing")
    finally:
        consumer.close()


def test_a_definition_that_cannot_be_compiled_does_not_stop_the_worker(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stored definition that validates but makes compiling fail (a compiler bug, say)
    is left out with an error; every other audience goes on. One nested too deep for the
    JSON decoder is ignored the same way."""
    from audiences.adapters.stream import definitions as module

    real = module.build_catalog

    def fragile(definitions: Any, retired: Any = None, previous: Any = None) -> Any:
        if "poison" in definitions:
            raise RecursionError("maximum recursion depth exceeded")
        return real(definitions, retired, previous)

    monkeypatch.setattr(module, "build_catalog", fragile)
    engine.apply(BUYERS)
    engine.start()
    producer = Producer({"bootstrap.servers": engine.settings.kafka_bootstrap})
    poison = {"key": "poison", "version": 1, "condition": {"performed": {"event": "X"}}}
    producer.produce(engine.topics.definitions, key=b"poison", value=orjson.dumps(poison))
    deep: str = '{"performed": {"event": "X"}}'
    for _ in range(2000):
        deep = '{"not": ' + deep + "}"
    producer.produce(
        engine.topics.definitions,
        key=b"deep",
        value=('{"key": "deep", "version": 1, "condition": ' + deep + "}").encode(),
    )
    producer.flush(10)
    engine.send(track("after", "Order Completed", T0))
    (entered,) = engine.outputs(1)
    assert (entered["userId"], entered["properties"]["audience_key"]) == ("after", "buyers")
    runtime = engine.evaluator
    assert runtime is not None
    wait_for(lambda: runtime.definitions.offset >= 3, 10, "the runtime to read both")
    assert runtime.failed is None
    assert set(runtime.definitions.definitions) == {"buyers"}


# -- 5. partitions assigned together restore side by side --------------------------------


def test_partitions_assigned_together_restore_side_by_side(
    kafka_bootstrap: str,
    unique_name: Callable[..., str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker that lost its disk restores its four partitions side by side, each with
    a changelog reader of its own, to exactly the pure core's state; a partition whose
    restore fails does not keep the others from being taken, and its error is raised."""
    from audiences.adapters.state.layout import Family
    from audiences.adapters.stream import runtime as runtime_module
    from audiences.core.definitions import build_catalog, validate_definition
    from audiences.core.evaluator import step
    from audiences.core.events import parse_event

    engine = Engine(kafka_bootstrap, unique_name("restore"), tmp_path / "a", partitions=4)
    engine.apply(FREQUENT, BUYERS)
    sent = [event for i in range(16) for event in views(f"u{i}", T0 + i * S, 3)]
    runtime: Runtime | None = None
    try:
        engine.start()
        engine.send(*sent)
        engine.settle()
        engine.stop()
        # Partitions 0 and 1 restore at the same time, or this barrier breaks (20 s).
        together = threading.Barrier(2, timeout=20)
        restore = runtime_module.restore

        def restore_side_by_side(*args: Any, **kwargs: Any) -> Any:
            if kwargs["partition"] in (0, 1):
                together.wait()
            return restore(*args, **kwargs)

        monkeypatch.setattr(runtime_module, "restore", restore_side_by_side)
        engine.settings = engine.settings.replace(data_dir=str(tmp_path / "b"))
        engine.start()
        assert sorted(engine.evaluator.partitions) == [0, 1, 2, 3]  # type: ignore[union-attr]
        engine.stop()
        catalog = build_catalog({d["key"]: (validate_definition(d), 1) for d in (FREQUENT, BUYERS)})
        expected: dict[str, UserState] = {}
        for raw in sent:
            event = parse_event(raw, T0)
            expected[event.key] = step(expected.get(event.key), event, catalog, event.key).state
        assert {partition_for(user.encode(), 4) for user in expected} == {0, 1, 2, 3}
        for user, state in expected.items():
            number = partition_for(user.encode(), 4)
            store = RocksDictStore(tmp_path / "b" / engine.settings.app_id / f"p{number}")
            try:
                stored = store.get(Family.PROFILES, user.encode())
            finally:
                store.close()
            assert stored is not None, user
            assert UserState.decode(stored).to_json() == state.to_json(), user

        # A third worker whose store of partition 3 cannot be opened takes the other three.
        monkeypatch.setattr(runtime_module, "restore", restore)
        settings = engine.settings.replace(data_dir=str(tmp_path / "c"))
        runtime = Runtime(settings, engine.topics, KafkaClients(settings), clock=engine.clock)
        open_store = runtime.open_store

        def failing_store(number: int) -> Any:
            if number == 3:
                raise OSError("the disk of partition 3 is gone")
            return open_store(number)

        runtime.open_store = failing_store
        with pytest.raises(OSError, match="partition 3"):
            runtime._open_all([0, 1, 2, 3])
        assert sorted(runtime.partitions) == [0, 1, 2]
        assert all(p.counts.users > 0 for p in runtime.partitions.values())
    finally:
        if runtime is not None:
            for number in list(runtime.partitions):
                runtime._release(number)
            for reader in runtime._changelog_readers:
                reader.close()
        engine.close()
