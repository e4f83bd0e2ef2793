"""The state protocol on the in-memory store: namespaces, checkpoints, recovery, rollback.

A `FakeChangelog` stands in for the changelog topic (a list of records, with
transactions that either land whole or, to play a broker without read_committed,
in part); everything else is the real code: `PartitionState.apply`, the
checkpoint's encoding and `recovery.restore`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest

from audiences.adapters.kafka.topics import Topics
from audiences.adapters.settings import Settings
from audiences.adapters.state.checkpoint import Checkpoint, DurabilityError, PartitionFenced, Step
from audiences.adapters.state.layout import (
    NEVER,
    Family,
    Header,
    Kind,
    Meta,
    changelog_key,
    encode_header,
)
from audiences.adapters.state.partition import PartitionState, Recorded
from audiences.adapters.state.recovery import Record, profiles_in, restore
from audiences.adapters.state.store import MemoryStore
from audiences.adapters.stream.emitter import Emitter
from audiences.adapters.stream.evaluation import Evaluation
from audiences.core.definitions import build_catalog, validate_definition
from audiences.core.evaluator import Tick, step
from audiences.core.events import Event, format_iso, parse_event
from audiences.core.state import UserState

T0 = 1_767_225_600_000
M = 60_000
VIEWERS = {
    "key": "viewers",
    "condition": {"performed": {"event": "Product Viewed", "times": {"gte": 2}, "within": "1h"}},
}
CATALOG = build_catalog({"viewers": (validate_definition(VIEWERS), 1)})
# User ids that look like the engine's own keys, old and new.
HOSTILE = [
    "\u0000meta:counts",
    "__batch__:x",
    "\u0000suppressed:alice",
    "__fence__",
    "\u0000",
    "position",
    "m",
    "p",
    "o",
    "counts",
]


class FakeRecord:
    def __init__(self, offset: int, key: bytes, value: bytes | None, header: Header) -> None:
        self._offset, self._key, self._value = offset, key, value
        self._headers = encode_header(header)

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value

    def headers(self) -> list[tuple[str, bytes]] | None:
        return self._headers


class FakeChangelog:
    """One changelog partition. `land` limits how many records of the next transaction
    reach the log (a cut-short checkpoint on a broker that shows uncommitted records)."""

    def __init__(self) -> None:
        self.records: list[FakeRecord] = []
        self.land: int | None = None

    def append(self, key: bytes, value: bytes | None, header: Header) -> int:
        offset = self.records[-1].offset() + 1 if self.records else 0
        self.records.append(FakeRecord(offset, key, value, header))
        return offset

    def claim(self, session: str) -> int:
        return self.append(changelog_key(Kind.OWNER, session.encode()), b"{}", Header(-1, NEVER))

    def read(self, start: int) -> Iterator[Record]:
        yield from (r for r in self.records if r.offset() >= start)  # (compaction leaves gaps)


class FakeWriter:
    """The changelog side of a checkpoint (stands in for `ChangelogWriter`)."""

    def __init__(self, log: FakeChangelog) -> None:
        self.log = log
        self.pending: list[tuple[bytes, bytes | None, Header]] = []
        self.last_offset = -1

    def begin(self, records: list[tuple[bytes, bytes | None, Header]]) -> None:
        self.pending = list(records)

    def commit(self) -> None:
        landing = self.pending if self.log.land is None else self.pending[: self.log.land]
        for key, value, header in landing:
            self.last_offset = self.log.append(key, value, header)
        if self.log.land is not None:
            self.log.land = None
            raise DurabilityError("the broker went away mid-transaction")

    def abort(self) -> None:
        self.pending = []


def event(user: str, name: str, at_ms: int, kind: str = "track", **extra: Any) -> Event:
    return parse_event(record(user, name, at_ms, kind, **extra), at_ms)


def record(user: str, name: str, at_ms: int, kind: str = "track", **extra: Any) -> bytes:
    raw = {
        "type": kind,
        "userId": user,
        "timestamp": format_iso(at_ms),
        "messageId": f"{user}-{name}-{at_ms}",
        **extra,
    }
    if kind == "track":
        raw["event"] = name
    return orjson.dumps(raw)


def partition_over(store: MemoryStore, log: FakeChangelog, session: str = "s1") -> PartitionState:
    fence = log.claim(session)
    restored = restore(
        store, log.read, partition=0, fence=fence, session=session, topic_id="topic-a"
    )
    return PartitionState(
        0,
        store,
        position=restored.position or 0,
        stream_time_ms=restored.stream_time_ms,
        catalog=CATALOG,
        cache_limit=1000,
        ahead={k: at for k, at in restored.ahead.items() if at > (restored.position or 0)},
    )


def feed(partition: PartitionState, events: list[tuple[int, Event]]) -> None:
    for offset, item in events:
        partition.position = offset + 1
        key = item.key.encode()
        if partition.ahead and offset < partition.ahead.get(key, -1):
            continue
        if key in partition.suppressed and item.type not in ("unsuppress", "delete"):
            continue
        partition.load([key], 0)
        partition.apply(key, partition.cache.get(key), item, item.key)


def commit(partition: PartitionState, log: FakeChangelog, fail_after: Step | None = None) -> None:
    checkpoint = Checkpoint(seal_outputs=lambda: lambda: None, commit_offsets=lambda _: None)
    if fail_after is not None:

        def fail(step: Step) -> None:
            if step is fail_after:
                raise DurabilityError(f"injected after {step.value}")

        checkpoint.after_step = fail
    checkpoint.commit([partition], {0: FakeWriter(log)})  # type: ignore[dict-item]


def pure(events: list[Event]) -> dict[str, UserState]:
    states: dict[str, UserState] = {}
    for item in events:
        result = step(states.get(item.key), item, CATALOG, item.key)
        states[item.key] = result.state
    return states


def profiles(store: MemoryStore) -> dict[str, list[Any]]:
    return {
        key.decode(): UserState.decode(value).to_json()
        for key, value in store.scan(Family.PROFILES)
    }


def test_hostile_user_ids_are_ordinary_profiles_after_a_restore() -> None:
    log = FakeChangelog()
    partition = partition_over(MemoryStore(), log)
    stream = [
        (i, event(user, "Product Viewed", T0 + i * M))
        for i, user in enumerate([*HOSTILE, "alice", *HOSTILE])
    ]
    feed(partition, stream)
    commit(partition, log)
    restored = MemoryStore()
    again = partition_over(restored, log, session="s2")
    assert profiles(restored) == {k: s.to_json() for k, s in pure([e for _, e in stream]).items()}
    assert again.suppressed == set() and again.quarantined == set()  # alice is not deleted
    assert again.position == len(stream)
    # the partition's own meta is where it belongs, whatever the ids were
    counts = orjson.loads(restored.get(Family.META, Meta.COUNTS.value) or b"{}")
    assert counts == {"sizes": {"viewers": len(HOSTILE)}, "users": len(HOSTILE) + 1}


def test_a_deleted_user_stays_deleted_and_nobody_else_is() -> None:
    log = FakeChangelog()
    partition = partition_over(MemoryStore(), log)
    feed(
        partition,
        [
            (0, event("alice", "Product Viewed", T0)),
            (1, event("\u0000suppressed:alice", "Product Viewed", T0)),
            (2, event("bob", "Product Viewed", T0)),
            (3, event("bob", "x", T0 + M, kind="delete")),
            (4, event("bob", "Product Viewed", T0 + 2 * M)),
        ],
    )
    commit(partition, log)
    restored = MemoryStore()
    again = partition_over(restored, log, session="s2")
    assert again.suppressed == {b"bob"}
    assert set(profiles(restored)) == {"alice", "\u0000suppressed:alice"}


@pytest.mark.parametrize("step_name", list(Step))
def test_a_failed_checkpoint_commits_nothing_ahead_of_durable_state(step_name: Step) -> None:
    """Fail after each step of the sequence; the next owner (or a rewind) ends with exactly
    the pure core's state, and never skips an event."""
    log = FakeChangelog()
    partition = partition_over(MemoryStore(), log)
    stream = [(i, event(f"u{i % 3}", "Product Viewed", T0 + i * M)) for i in range(12)]
    feed(partition, stream[:6])
    commit(partition, log)
    committed_before = partition.committed
    feed(partition, stream[6:])
    with pytest.raises(DurabilityError):
        commit(partition, log, fail_after=step_name)
    if step_name is not Step.OFFSETS:  # only the last step runs after positions are marked
        assert partition.committed == committed_before
    # A new owner (fresh store) restores and redoes input from the durable position.
    store = MemoryStore()
    again = partition_over(store, log, session="s2")
    feed(again, [(o, e) for o, e in stream if o >= again.position])
    commit(again, log)
    assert profiles(store) == {k: s.to_json() for k, s in pure([e for _, e in stream]).items()}


def test_a_checkpoint_cut_short_is_not_applied_twice() -> None:
    """Without read_committed, part of a transaction can be visible: the profiles that landed
    are ahead of the position, and their input below it is skipped when redone."""
    log = FakeChangelog()
    partition = partition_over(MemoryStore(), log)
    stream = [(i, event(f"u{i % 4}", "Product Viewed", T0 + i * M)) for i in range(16)]
    feed(partition, stream[:8])
    commit(partition, log)
    feed(partition, stream[8:])
    log.land = 2  # two profile records of the next checkpoint land, its position does not
    with pytest.raises(DurabilityError):
        commit(partition, log)
    store = MemoryStore()
    again = partition_over(store, log, session="s2")
    assert again.position == 8 and len(again.ahead) == 2
    feed(again, [(o, e) for o, e in stream if o >= again.position])
    commit(again, log)
    assert profiles(store) == {k: s.to_json() for k, s in pure([e for _, e in stream]).items()}
    assert not again.ahead


@pytest.fixture
def half_applying_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """`step` as the partition calls it mutates the profile half-way, then raises, on a
    `Boom` event (a bug in the core)."""
    from audiences.adapters.state import partition as module

    real = step

    def half_then_raise(state: Any, item: Any, catalog: Any, key: str) -> Any:
        result = real(state, item, catalog, key)
        if getattr(item, "name", None) == "Boom":
            result.state.traits["half"] = "applied"
            result.state.trackers.clear()
            raise RuntimeError("simulated bug")
        return result

    monkeypatch.setattr(module, "step_override", half_then_raise)


@pytest.mark.usefixtures("half_applying_step")
def test_a_failing_step_leaves_no_trace() -> None:
    """`step` mutates what it is given; a raise half-way must not leave a half-applied
    profile behind (it would be persisted with the user's next event)."""
    log = FakeChangelog()
    partition = partition_over(MemoryStore(), log)
    good = [event("u", "Product Viewed", T0), event("u", "Product Viewed", T0 + M)]
    feed(partition, [(0, good[0])])
    commit(partition, log)
    feed(partition, [(1, good[1])])
    with pytest.raises(RuntimeError):
        feed(partition, [(2, event("u", "Boom", T0 + 2 * M))])
    state = partition.cache[b"u"]
    assert state.to_json() == pure(good)["u"].to_json()
    assert partition.dirty[b"u"] is state and len(partition.inputs_of(b"u")) == 1


def test_a_landed_checkpoint_evicts_the_oldest_clean_profiles_beyond_the_cache_limit() -> None:
    log = FakeChangelog()
    partition = partition_over(MemoryStore(), log)
    partition.cache_limit = 10
    first = [event(f"u{n:02d}", "Product Viewed", T0 + n) for n in range(20)]
    feed(partition, list(enumerate(first)))
    _records, batch, encoded = partition.encode_interval()
    partition.store.write(batch)
    partition.seal(encoded)
    later = [event(f"u{n:02d}", "Product Viewed", T0 + M + n) for n in range(3)]
    feed(partition, [(20 + n, item) for n, item in enumerate(later)])  # dirty: cache only
    partition.landed()
    # 20 - 10 over the limit, and a tenth of it more: the oldest 11 of those not dirty
    assert [key.decode() for key in partition.cache] == [
        *(f"u{n:02d}" for n in range(3)),
        *(f"u{n:02d}" for n in range(14, 20)),
    ]
    evicted = partition.load([b"u05"], 0)[b"u05"]  # read back from the store
    assert evicted.to_json() == pure(first)["u05"].to_json()
    assert partition.cache[b"u00"].to_json() == pure([first[0], later[0]])["u00"].to_json()


class FakeMessage:
    """What `Evaluation` reads of a consumed Kafka record."""

    def __init__(self, offset: int, value: bytes, at_ms: int) -> None:
        self._offset, self._value, self._at_ms = offset, value, at_ms

    def offset(self) -> int:
        return self._offset

    def timestamp(self) -> tuple[int, int]:
        return (1, self._at_ms)

    def value(self) -> bytes:
        return self._value

    def key(self) -> bytes | None:
        return None

    def headers(self) -> None:
        return None

    def topic(self) -> str:
        return "events"

    def partition(self) -> int:
        return 0


class FakeProducer:
    def __init__(self) -> None:
        self.produced: list[tuple[str, bytes | None]] = []

    def produce(
        self, topic: str, key: bytes | None = None, value: bytes | None = None, **_: Any
    ) -> None:
        self.produced.append((topic, value))

    def poll(self, timeout: float = 0) -> int:
        return 0


@pytest.mark.usefixtures("half_applying_step")
def test_the_journal_keeps_records_and_a_rollback_parses_them_again() -> None:
    """An interval's inputs are journaled as the records they were parsed from (one
    object each, not the parsed tree); rolling a profile back parses them again into
    the same events."""
    log = FakeChangelog()
    partition = partition_over(MemoryStore(), log)
    producer = FakeProducer()
    topics = Topics.from_settings(Settings())
    emitter = Emitter(producer, topics, lambda _key: 0, space_id="test")  # type: ignore[arg-type]
    evaluation = Evaluation(emitter, lambda _key: 0, lambda _found, _owner: None, {})
    times = [T0, T0 + M, T0 + 2 * M]
    values = [
        record("u", name, at)
        for name, at in zip(["Product Viewed"] * 2 + ["Boom"], times, strict=True)
    ]
    messages = [
        FakeMessage(i, value, at) for i, (value, at) in enumerate(zip(values, times, strict=True))
    ]

    evaluation.partition_batch(partition, messages[:2], lambda: 0)  # type: ignore[arg-type]
    journaled = [item for _key, item, _catalog in partition.journal]
    assert [type(item) for item in journaled] == [Recorded, Recorded]
    assert [item.value for item in journaled] == values[:2]  # type: ignore[union-attr]

    evaluation.partition_batch(partition, messages[2:], lambda: 0)  # type: ignore[arg-type]
    good = [event("u", "Product Viewed", at) for at in times[:2]]
    assert partition.cache[b"u"].to_json() == pure(good)["u"].to_json()
    assert [item.raw for item in partition.inputs_of(b"u")] == [e.raw for e in good]  # type: ignore[union-attr]
    assert [t for t, _ in producer.produced][-1] == topics.events_dlq  # the failing event


@pytest.fixture
def real_step(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    """`step` as the partition calls it raises on a `Boom` event (a bug in the core);
    returns the real one."""
    from audiences.adapters.state import partition as module

    real = step

    def raise_on_boom(state: Any, item: Any, catalog: Any, key: str) -> Any:
        if getattr(item, "name", None) == "Boom":
            raise RuntimeError("simulated bug")
        return real(state, item, catalog, key)

    monkeypatch.setattr(module, "step_override", raise_on_boom)
    return real


def test_a_rollback_replays_each_input_with_the_catalog_it_was_applied_with(
    real_step: Callable[..., Any],
) -> None:
    """Definitions can change between two checkpoints; putting a profile back must not
    re-judge its earlier inputs on the newer catalog."""
    buyers = {"key": "buyers", "condition": {"performed": {"event": "Order Completed"}}}
    older = build_catalog({"buyers": (validate_definition(buyers), 1)})
    log = FakeChangelog()
    partition = partition_over(MemoryStore(), log)
    partition.catalog = older  # views are not tracked yet
    first, second = event("u", "Product Viewed", T0), event("u", "Product Viewed", T0 + M)
    feed(partition, [(0, first)])
    partition.catalog = CATALOG  # now they are
    feed(partition, [(1, second)])
    expected = real_step(real_step(None, first, older, "u").state, second, CATALOG, "u").state
    assert partition.cache[b"u"].to_json() == expected.to_json()
    with pytest.raises(RuntimeError):
        feed(partition, [(2, event("u", "Boom", T0 + 2 * M))])
    assert partition.cache[b"u"].to_json() == expected.to_json()
    replayed_on_newer = real_step(
        real_step(None, first, CATALOG, "u").state, second, CATALOG, "u"
    ).state
    assert replayed_on_newer.to_json() != expected.to_json()  # (the test can tell them apart)


def test_an_undecodable_stored_profile_is_quarantined() -> None:
    store = MemoryStore()
    log = FakeChangelog()
    partition = partition_over(store, log)
    from audiences.adapters.state.store import StoreBatch

    batch = StoreBatch()
    batch.put(Family.PROFILES, b"broken", b"[99, not json")
    store.write(batch)
    assert partition.load([b"broken"], T0) == {}
    assert b"broken" in partition.quarantined
    commit(partition, log)
    again = partition_over(MemoryStore(), log, session="s2")
    assert again.quarantined == {b"broken"}


def test_restore_discards_a_store_it_cannot_trust() -> None:
    log = FakeChangelog()
    store = MemoryStore()
    partition = partition_over(store, log, session="mine")
    feed(partition, [(0, event("kept", "Product Viewed", T0))])
    commit(partition, log)
    # Another worker owns the partition for a while and deletes the user...
    other = partition_over(MemoryStore(), log, session="theirs")
    feed(other, [(1, event("kept", "x", T0 + M, kind="delete"))])
    commit(other, log)
    # ... and compaction removes the superseded profile, then the tombstone: only the
    # suppression marker is left.
    log.records = [r for r in log.records if r.key() != changelog_key(Kind.PROFILE, b"kept")]
    # Back to the first worker: its store still has the profile; it must not come back.
    restored = restore(
        store,
        log.read,
        partition=0,
        fence=log.claim("mine-again"),
        session="mine-again",
        topic_id="topic-a",
    )
    assert restored.rebuilt is not None and "another worker" in restored.rebuilt
    assert profiles(store) == {}
    assert store.get(Family.SUPPRESSED, b"kept") is not None


def test_restore_discards_a_store_of_another_changelog() -> None:
    log = FakeChangelog()
    store = MemoryStore()
    partition = partition_over(store, log)
    feed(partition, [(0, event("u", "Product Viewed", T0))])
    commit(partition, log)
    fresh = FakeChangelog()  # the changelog topic was deleted and recreated
    restored = restore(
        store, fresh.read, partition=0, fence=fresh.claim("s2"), session="s2", topic_id="topic-b"
    )
    assert restored.rebuilt is not None and "recreated" in restored.rebuilt
    assert profiles(store) == {} and restored.position is None


def test_restore_discards_a_checkpoint_beyond_the_end_of_the_log() -> None:
    log = FakeChangelog()
    store = MemoryStore()
    partition = partition_over(store, log)
    feed(partition, [(i, event("u", "Product Viewed", T0 + i)) for i in range(5)])
    commit(partition, log)
    truncated = FakeChangelog()  # same topic id, but shorter than the store's checkpoint
    restored = restore(
        store,
        truncated.read,
        partition=0,
        fence=truncated.claim("s2"),
        session="s2",
        topic_id="topic-a",
    )
    assert restored.rebuilt is not None and "beyond" in restored.rebuilt


def test_restore_streams_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    from audiences.adapters.state import recovery

    monkeypatch.setattr(recovery, "CHUNK", 7)
    writes: list[int] = []
    log = FakeChangelog()
    partition = partition_over(MemoryStore(), log)
    stream = [(i, event(f"u{i}", "Product Viewed", T0 + i)) for i in range(100)]
    feed(partition, stream)
    commit(partition, log)
    store = MemoryStore()
    original = store.write
    store.write = lambda batch, **kw: (writes.append(len(batch)), original(batch, **kw))[1]  # type: ignore[method-assign]
    partition_over(store, log, session="s2")
    assert max(writes) <= 7 + 1 and len(writes) > 10
    assert profiles(store) == {k: s.to_json() for k, s in pure([e for _, e in stream]).items()}


def test_a_wipe_cut_short_leaves_a_store_that_is_never_trusted() -> None:
    from audiences.adapters.state import recovery

    log = FakeChangelog()
    store = MemoryStore()
    partition = partition_over(store, log)
    feed(partition, [(i, event(f"u{i}", "Product Viewed", T0 + i)) for i in range(20)])
    commit(partition, log)
    original, writes = store.write, []

    def crash_after_first(batch: Any, **kw: Any) -> None:
        if writes:
            raise OSError("killed")
        writes.append(batch)
        original(batch, **kw)

    store.write = crash_after_first  # type: ignore[method-assign]
    with pytest.raises(OSError):
        recovery._wipe(store)
    store.write = original  # type: ignore[method-assign]
    # the profiles are still there, but the store no longer claims any checkpoint
    assert len(profiles(store)) == 20
    assert recovery._distrust(store, 10_000, "topic-a") == "a restore was cut short"


RESTORE_THEN_DIE = """
import os, sys
sys.path.insert(0, {tests!r})
from test_state_protocol import FakeChangelog, event, feed, commit, partition_over, T0
from audiences.adapters.state.recovery import restore
from audiences.adapters.state.store import MemoryStore, RocksDictStore
from pathlib import Path
log = FakeChangelog()
partition = partition_over(MemoryStore(), log)
feed(partition, [(i, event(f"u{{i}}", "Product Viewed", T0 + i)) for i in range(500)])
commit(partition, log)
store = RocksDictStore(Path({path!r}))
restore(store, log.read, partition=0, fence=log.claim("s2"), session="s2", topic_id="t")
os._exit(0)  # as kill -9 would: no close, nothing flushed on the way out
"""


def test_a_restore_is_on_disk_when_it_returns(tmp_path: Any) -> None:
    """Recovery writes without RocksDB's log (speed): it flushes before it says done, so
    a worker killed right after a restore finds every profile and a trustworthy store."""
    import subprocess
    import sys
    from pathlib import Path

    from audiences.adapters.state import recovery
    from audiences.adapters.state.store import RocksDictStore

    path = tmp_path / "store"
    script = RESTORE_THEN_DIE.format(tests=str(Path(__file__).parent), path=str(path))
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    store = RocksDictStore(path)
    try:
        assert recovery._distrust(store, 10_000, "t") is None
        assert len(store.scan(Family.PROFILES)) == 500
    finally:
        store.close()


def test_records_of_other_layouts_are_ignored() -> None:
    log = FakeChangelog()
    log.records.append(FakeRecord(0, b"alice", b"[2, 0]", Header(0, NEVER)))
    log.records[0]._headers = [("cl", b"0 abc 1 0")]  # the previous layout's header
    assert profiles_in(log.read(0)) == {}
    store = MemoryStore()
    partition_over(store, log)
    assert profiles(store) == {}


def test_sweeps_use_deadlines_of_restored_profiles() -> None:
    log = FakeChangelog()
    partition = partition_over(MemoryStore(), log)
    feed(
        partition,
        [(0, event("u", "Product Viewed", T0)), (1, event("u", "Product Viewed", T0 + M))],
    )
    commit(partition, log)
    store = MemoryStore()
    partition_over(store, log, session="s2")
    due = store.scan(Family.DUE)
    assert [int.from_bytes(k[:8], "big") for k, _ in due] == [T0 + 60 * M]
    state = UserState.decode(store.get(Family.PROFILES, b"u") or b"")
    assert step(state, Tick(T0 + 61 * M), CATALOG, "u").transitions[0].entered is False


def _views(user: str, at_ms: int, offset: int) -> list[tuple[int, Event]]:
    """Two views a minute apart: `viewers` until the first leaves the hour (a deadline
    at `at_ms` + 1h)."""
    return [
        (offset, event(user, "Product Viewed", at_ms)),
        (offset + 1, event(user, "Product Viewed", at_ms + M)),
    ]


def test_a_sweep_seeks_from_the_earliest_deadline_left() -> None:
    """`due` starts where the previous sweep left off (the entries of fired deadlines
    are deleted: seeking from the start of the index would step over each), and a
    later checkpoint's earlier deadline moves that start back."""
    log = FakeChangelog()
    store = MemoryStore()
    partition = partition_over(store, log)
    feed(partition, _views("u1", T0, 0) + _views("u2", T0 + 2 * M, 2))
    commit(partition, log)
    seeks: list[bytes] = []
    scan = store.scan

    def recorded(family: Family, start: bytes = b"", *args: Any, **kwargs: Any) -> Any:
        if family is Family.DUE:
            seeks.append(start)
        return scan(family, start, *args, **kwargs)

    store.scan = recorded  # type: ignore[method-assign]
    assert partition.due(T0 + 60 * M, 10) == [(T0 + 60 * M, b"u1")]
    assert partition.due_from == T0 + 62 * M  # the next deadline: the next sweep's work
    seeks.clear()
    assert partition.due(T0 + 61 * M, 10) == []
    assert seeks == []  # nothing can be due before the earliest deadline left: no seek
    assert partition.due(T0 + 62 * M - 1, 10) == [] and seeks == []
    feed(partition, _views("u0", T0 - 20 * M, 4))  # a deadline before the ones left
    commit(partition, log)
    assert partition.due_from == T0 + 40 * M
    assert partition.due(T0 + 61 * M, 10) == [(T0 + 40 * M, b"u0"), (T0 + 60 * M, b"u1")]
    assert partition.due(T0 + 62 * M, 1) == [(T0 + 62 * M, b"u2")]  # (a chunk: `limit`)
    assert partition.due_from == T0 + 62 * M
    assert partition.due(T0 + 62 * M, 1) == [(T0 + 62 * M, b"u2")]
    assert partition.due(T0 + 62 * M, 10) == [(T0 + 62 * M, b"u2")]
    assert partition.due_from == NEVER  # none left


def test_a_deadline_sealed_while_a_sweep_runs_is_found_once_it_lands() -> None:
    """A sweep while a checkpoint is in flight does not see its deadlines (not in the
    store yet) and moves on past them; landing moves the start back."""
    log = FakeChangelog()
    store = MemoryStore()
    partition = partition_over(store, log)
    feed(partition, _views("late", T0 + 30 * M, 0))
    commit(partition, log)
    checkpoint = Checkpoint(seal_outputs=lambda: lambda: None, commit_offsets=lambda _: None)
    gate = Gate(Step.CHANGELOG)
    checkpoint.after_step = gate
    feed(partition, _views("early", T0, 2))
    flight = checkpoint.start([partition], {0: FakeWriter(log)})  # type: ignore[dict-item]
    assert flight is not None and gate.reached.wait(10)
    assert partition.due(T0 + 61 * M, 10) == []  # in flight: not in the store yet
    assert partition.due_from == T0 + 90 * M
    gate.release.set()
    checkpoint.land(flight)
    assert partition.due_from == T0 + 60 * M
    assert partition.due(T0 + 61 * M, 10) == [(T0 + 60 * M, b"early")]


# -- pipelined checkpoints: the loop goes on while one interval becomes durable ---------


class Gate:
    """Holds the durability thread in a step until released (the loop goes on meanwhile)."""

    def __init__(self, at: Step) -> None:
        self.at = at
        self.reached = threading.Event()
        self.release = threading.Event()

    def __call__(self, step: Step) -> None:
        if step is self.at:
            self.reached.set()
            assert self.release.wait(10), "never released"


def test_the_loop_evaluates_the_next_interval_while_one_is_in_flight() -> None:
    log = FakeChangelog()
    store = MemoryStore()
    partition = partition_over(store, log)
    stream = [(i, event(f"u{i % 3}", "Product Viewed", T0 + i * M)) for i in range(12)]
    acked = threading.Event()
    checkpoint = Checkpoint(seal_outputs=lambda: acked.wait, commit_offsets=lambda _: None)
    gate = Gate(Step.CHANGELOG)
    checkpoint.after_step = gate
    feed(partition, stream[:6])
    flight = checkpoint.start([partition], {0: FakeWriter(log)})  # type: ignore[dict-item]
    assert flight is not None and not partition.dirty and partition.inflight is not None
    feed(partition, stream[6:])  # the loop goes on
    assert not log.records[1:], "nothing durable before the outputs are acknowledged"
    acked.set()
    assert gate.reached.wait(10)
    assert profiles(store) == {} and partition.committed == 0  # changelog written, not the store
    gate.release.set()
    checkpoint.land(flight)
    assert partition.committed == 6 and partition.inflight is None
    assert set(partition.dirty) == {b"u0", b"u1", b"u2"}  # the second interval waits its turn
    assert profiles(store) == {k: s.to_json() for k, s in pure([e for _, e in stream[:6]]).items()}
    checkpoint.after_step = None
    checkpoint.commit([partition], {0: FakeWriter(log)})  # type: ignore[dict-item]
    assert profiles(store) == {k: s.to_json() for k, s in pure([e for _, e in stream]).items()}
    again = partition_over(MemoryStore(), log, session="s2")
    assert again.position == 12


def test_a_rollback_during_a_flight_starts_from_the_sealed_interval(
    real_step: Callable[..., Any],
) -> None:
    """The store is one interval behind while a checkpoint is in flight: a profile put back
    after a failing input is its sealed state plus this interval's inputs."""
    log = FakeChangelog()
    partition = partition_over(MemoryStore(), log)
    good = [event("u", "Product Viewed", T0 + i * M) for i in range(3)]
    checkpoint = Checkpoint(seal_outputs=lambda: lambda: None, commit_offsets=lambda _: None)
    gate = Gate(Step.OUTPUTS)
    checkpoint.after_step = gate
    feed(partition, [(0, good[0]), (1, good[1])])
    flight = checkpoint.start([partition], {0: FakeWriter(log)})  # type: ignore[dict-item]
    assert flight is not None and gate.reached.wait(10)
    feed(partition, [(2, good[2])])
    with pytest.raises(RuntimeError):
        feed(partition, [(3, event("u", "Boom", T0 + 3 * M))])
    assert partition.cache[b"u"].to_json() == pure(good)["u"].to_json()
    gate.release.set()
    checkpoint.land(flight)


def test_a_user_deleted_in_the_sealed_interval_is_not_loaded_back_from_the_store() -> None:
    log = FakeChangelog()
    store = MemoryStore()
    partition = partition_over(store, log)
    feed(partition, [(0, event("bob", "Product Viewed", T0))])
    commit(partition, log)
    feed(partition, [(1, event("bob", "x", T0 + M, kind="delete"))])
    checkpoint = Checkpoint(seal_outputs=lambda: lambda: None, commit_offsets=lambda _: None)
    gate = Gate(Step.OUTPUTS)
    checkpoint.after_step = gate
    flight = checkpoint.start([partition], {0: FakeWriter(log)})  # type: ignore[dict-item]
    assert flight is not None and gate.reached.wait(10)
    assert store.get(Family.PROFILES, b"bob") is not None  # the store has not heard yet
    assert partition.load([b"bob"], 0) == {}
    gate.release.set()
    checkpoint.land(flight)
    assert store.get(Family.PROFILES, b"bob") is None


def test_a_partition_fenced_in_flight_gives_the_others_their_interval_back() -> None:
    """A partition taken over fails the checkpoint for all, after every output was
    acknowledged: the kept partition's next checkpoint writes both intervals."""
    logs = [FakeChangelog(), FakeChangelog()]
    stores = [MemoryStore(), MemoryStore()]
    kept = partition_over(stores[0], logs[0])
    taken = partition_over(stores[1], logs[1])
    taken.number = 1

    class FencedWriter(FakeWriter):
        def commit(self) -> None:
            raise PartitionFenced([1], "a newer owner")

    writers: dict[int, Any] = {0: FakeWriter(logs[0]), 1: FencedWriter(logs[1])}
    stream = [(i, event(f"u{i % 2}", "Product Viewed", T0 + i * M)) for i in range(8)]
    feed(kept, stream[:4])
    feed(taken, stream[:4])
    checkpoint = Checkpoint(seal_outputs=lambda: lambda: None, commit_offsets=lambda _: None)
    flight = checkpoint.start([kept, taken], writers)
    assert flight is not None
    feed(kept, stream[4:])  # the next interval, evaluated while the first was in flight
    with pytest.raises(PartitionFenced):
        checkpoint.land(flight)
    assert kept.inflight is None and kept.committed == 0
    checkpoint.commit([kept], writers)
    assert kept.committed == 8
    assert profiles(stores[0]) == {k: s.to_json() for k, s in pure([e for _, e in stream]).items()}
    again = partition_over(MemoryStore(), logs[0], session="s2")
    assert again.position == 8


def test_size_history_is_checkpointed_restored_and_the_same_on_replay() -> None:
    """Buckets of entered per audience-minute (the transition's own time) go to the
    changelog with the checkpoint, come back on a restore into an empty store, and a
    replay of the same input writes the same records."""

    def run(log: FakeChangelog) -> PartitionState:
        partition = partition_over(MemoryStore(), log)
        stream = [
            (0, event("ann", "Product Viewed", T0)),
            (1, event("ann", "Product Viewed", T0 + 10_000)),  # enters in minute 0
            (2, event("bob", "Product Viewed", T0 + 30_000)),
            (3, event("bob", "Product Viewed", T0 + 2 * M)),  # enters in minute 2
        ]
        feed(partition, stream[:2])
        commit(partition, log)
        feed(partition, stream[2:])
        commit(partition, log)
        return partition

    log = FakeChangelog()
    partition = run(log)
    expected = {T0: (1, 0), T0 + 2 * M: (1, 0)}
    assert partition.history.buckets("viewers", 0) == expected
    history_records = [
        (r.key(), r.value()) for r in log.records if (r.key() or b"")[:1] == Kind.HISTORY.value
    ]
    assert len(history_records) == 2
    restored = partition_over(MemoryStore(), log, session="s2")
    assert restored.history.buckets("viewers", 0) == expected
    assert restored.counts.sizes == {"viewers": 2}

    replayed = FakeChangelog()
    run(replayed)
    assert [
        (r.key(), r.value()) for r in replayed.records if (r.key() or b"")[:1] == Kind.HISTORY.value
    ] == history_records


def test_a_failed_checkpoint_writes_the_size_history_again() -> None:
    log = FakeChangelog()
    partition = partition_over(MemoryStore(), log)
    feed(
        partition,
        [(0, event("ann", "Product Viewed", T0)), (1, event("ann", "Product Viewed", T0 + 1))],
    )
    with pytest.raises(DurabilityError):
        commit(partition, log, fail_after=Step.OUTPUTS)
    # the runtime rewinds: the partition is reopened from durable state and re-fed
    again = partition_over(MemoryStore(), log, session="s1")
    assert again.history.buckets("viewers", 0) == {}
    feed(
        again,
        [(0, event("ann", "Product Viewed", T0)), (1, event("ann", "Product Viewed", T0 + 1))],
    )
    commit(again, log)
    assert partition_over(MemoryStore(), log, session="s3").history.buckets("viewers", 0) == {
        T0: (1, 0)
    }
