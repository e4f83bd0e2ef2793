"""Edits judged on the history they need (SPEC §3 "Editing a definition", issue 11).

A `performed` tracker's id names what it keeps (horizon, kept count): an edit that
needs more history than the current tracker kept gets a new tracker, which the runtime
backfills like a new audience's (`Catalog.with_pending` + `fold_history`); an edit the
kept data covers keeps the tracker — same id, same data, nothing to backfill.
Memberships are checked against the oracle, which reads the whole log.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from factories import T0, D, S, make_event
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audiences.adapters.kafka.topics import Topics
from audiences.adapters.stream.backfill import Backfills, replayable
from audiences.core.definitions import build_catalog, validate_definition
from audiences.core.definitions.catalog import Catalog
from audiences.core.definitions.conditions import PerformedTracker
from audiences.core.evaluator import Output, Tick, Transition, fold_history, step
from audiences.core.events import Event, parse_event
from audiences.core.oracle import is_member
from audiences.core.state import UserState

ORDER = "Order Completed"


def performed(times: dict[str, int], **window: Any) -> dict[str, Any]:
    return {"performed": {"event": ORDER, "times": times, **window}}


def docs_of(*docs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {doc["key"]: validate_definition(doc) for doc in docs}


def compiled(
    docs: dict[str, dict[str, Any]], version: int, previous: Catalog | None = None
) -> Catalog:
    return build_catalog({k: (d, version) for k, d in docs.items()}, previous=previous)


def to_backfill(full: Catalog, old: Catalog) -> frozenset[str]:
    """What a runtime that ran `old` since the log began backfills for `full`
    (`Backfills.plan`: the replayable trackers it holds no complete history of)."""
    return frozenset(replayable(full) - replayable(old))


def orders(user: str, *times: int) -> list[Event]:
    return [make_event(ts=ts, event=ORDER, userId=user) for ts in times]


class Profile:
    """One profile driven as the runtime drives it: a Tick at every wake before the next
    input, the codec between inputs; outputs tagged with the phase they came in."""

    def __init__(self, user: str = "u1") -> None:
        self.user = user
        self.state: UserState | None = None
        self.outputs: list[tuple[int, Output]] = []
        self.phase = 0

    def send(self, item: Event | Tick, catalog: Catalog) -> None:
        until = item.timestamp_ms if isinstance(item, Event) else item.at_ms
        while self.state is not None and self.state.wake_ms < until:
            self._step(Tick(self.state.wake_ms), catalog)
        self._step(item, catalog)

    def _step(self, item: Event | Tick, catalog: Catalog) -> None:
        result = step(self.state, item, catalog, self.user)
        self.state = UserState.decode(result.state.encode())
        self.outputs += [(self.phase, output) for output in result.transitions]

    def member(self, key: str) -> bool:
        assert self.state is not None
        membership = self.state.members.get(key)
        return membership is not None and membership.member

    def changes(self, phase: int) -> list[tuple[str, bool, int]]:
        return [
            (o.audience_key, o.entered, o.at_ms)
            for p, o in self.outputs
            if p == phase and isinstance(o, Transition)
        ]


def edit(profile: Profile, old: Catalog, full: Catalog, history: list[Event]) -> None:
    """Apply the edit from `old` to `full` at the profile's clock as the runtime does:
    with a backfill of the trackers it lacks (the pending catalog, then the history
    cursor over the same log, then the full catalog), or straight to `full`."""
    assert profile.state is not None
    pending = to_backfill(full, old)
    if pending:
        frozen = full.with_pending(pending)
        profile.send(Tick(profile.state.clock_ms), frozen)  # adopted: frozen, no output
        for event in history:
            fold_history(profile.state, event, frozen, pending)
    profile.send(Tick(profile.state.clock_ms), full)


# -- the two edits of the issue --------------------------------------------------------------

GTE3_30D = docs_of({"key": "loyal", "condition": performed({"gte": 3}, within="30d")})
GTE10_30D = docs_of({"key": "loyal", "condition": performed({"gte": 10}, within="30d")})


def test_raising_the_count_backfills_and_judges_every_kept_order() -> None:
    """`gte 3 within 30d` -> `gte 10`: the old tracker kept 4 timestamps per user; the
    edited audience needs 11. A user with 12 orders stays in, one with 5 leaves."""
    old = compiled(GTE3_30D, 1)
    full = compiled(GTE10_30D, 2, previous=old)
    (old_id,) = old.trackers
    (new_id,) = full.trackers
    for user, count, stays in (("twelve", 12, True), ("five", 5, False)):
        history = orders(user, *(T0 + n * D for n in range(count)))
        t = history[-1].timestamp_ms
        profile = Profile(user)
        for event in history:
            profile.send(event, old)
        assert profile.state is not None
        assert len(profile.state.trackers[old_id]) == 4  # what the old tracker kept
        assert profile.changes(0) == [("loyal", True, T0 + 2 * D)]
        profile.phase = 1
        edit(profile, old, full, history)
        assert profile.member("loyal") is stays is is_member(GTE10_30D, "loyal", history, t)
        # the member who stays hears nothing; the one who does not qualify exits once
        assert profile.changes(1) == ([] if stays else [("loyal", False, t)])
        assert profile.state.trackers[new_id] == [e.timestamp_ms for e in history][-11:]
    assert new_id != old_id  # the 4 kept timestamps are not read as if they were 11
    assert to_backfill(full, old) == {new_id}


def test_widening_the_window_backfills_the_older_orders() -> None:
    """`gte 3 within 7d` -> `within 30d`: orders older than 7 days were dropped by the old
    tracker; the edited audience counts them again from the backfill."""
    week = docs_of({"key": "regular", "condition": performed({"gte": 3}, within="7d")})
    month = docs_of({"key": "regular", "condition": performed({"gte": 3}, within="30d")})
    old = compiled(week, 1)
    full = compiled(month, 2, previous=old)
    history = orders("u1", T0, T0 + 8 * D, T0 + 16 * D, T0 + 20 * D)
    t = history[-1].timestamp_ms
    profile = Profile()
    for event in history:
        profile.send(event, old)
    assert not profile.member("regular")
    assert profile.state is not None
    assert list(profile.state.trackers.values()) == [[T0 + 16 * D, T0 + 20 * D]]
    edit(profile, old, full, history)
    assert profile.member("regular") is True is is_member(month, "regular", history, t)
    assert profile.changes(0) == [("regular", True, t)]
    # and it leaves when the oldest of the three counted orders is 30 days old
    profile.send(Tick(T0 + 38 * D), full)
    assert profile.changes(0)[-1] == ("regular", False, T0 + 8 * D + 30 * D)
    assert not is_member(month, "regular", history, T0 + 38 * D)
    assert set(full.trackers).isdisjoint(old.trackers)  # a new tracker, backfilled


def test_narrowing_edits_keep_the_tracker_its_data_and_plan_no_backfill() -> None:
    """`gte 10` -> `gte 3` and `30d` -> `7d` need no more than was kept: the tracker keeps
    its id (and what it keeps), the partition plans no backfill, the answers are exact."""
    old = compiled(GTE10_30D, 1)
    narrower = {
        "count": GTE3_30D,
        "window": docs_of({"key": "loyal", "condition": performed({"gte": 10}, within="7d")}),
        "both": docs_of({"key": "loyal", "condition": performed({"gte": 2}, within="1d")}),
    }
    history = orders("u1", *(T0 + n * D // 2 for n in range(12)))
    t = history[-1].timestamp_ms
    for name, docs in narrower.items():
        full = compiled(docs, 2, previous=old)
        assert set(full.trackers) == set(old.trackers), name
        (tracker,) = full.trackers.values()
        assert isinstance(tracker, PerformedTracker)
        assert (tracker.horizon_ms, tracker.keep) == (30 * D, 11), name  # as kept
        assert not to_backfill(full, old)
        partition = _Partition(set(replayable(old)), position=100, catalog=old)
        backfills = Backfills(None, _Producer(), _TOPICS)  # type: ignore[arg-type]
        backfills.plan(partition, full, log_start=0)  # type: ignore[arg-type]
        assert partition.backfill is None and partition.catalog is full, name
        profile = Profile()
        for event in history:
            profile.send(event, old)
        assert profile.state is not None
        kept = dict(profile.state.trackers)
        profile.send(Tick(t), full)
        assert profile.state.trackers == kept, name  # the same data serves the edit
        assert profile.member("loyal") == is_member(docs, "loyal", history, t), name
    # and a fresh compile of the narrower need (no previous catalog) is a new tracker
    assert set(compiled(GTE3_30D, 2).trackers) != set(old.trackers)


def test_a_widening_edit_is_planned_as_a_backfill_of_the_new_tracker_only() -> None:
    buyers = docs_of({"key": "buyers", "condition": {"performed": {"event": ORDER}}})
    old = compiled({**GTE3_30D, **buyers}, 1)
    full = compiled({**GTE10_30D, **buyers}, 2, previous=old)
    partition = _Partition(set(replayable(old)), position=100, catalog=old)
    Backfills(None, _Producer(), _TOPICS).plan(partition, full, 0)  # type: ignore[arg-type]
    assert partition.backfill is not None
    assert partition.backfill.trackers == set(full.trackers) - set(old.trackers)
    assert partition.catalog.frozen_audiences == {"loyal"}  # buyers goes on live
    # the former id leaves the record of complete trackers with the catalog: its data is
    # dropped by profiles, so a later catalog bringing it back backfills it again
    assert partition.complete_trackers == set(replayable(old)) & set(full.trackers)


def test_a_catalog_change_during_a_backfill_lets_the_cursor_go_on() -> None:
    """Another edit while a backfill runs must not restart it from the oldest offset: the
    history already folded into its trackers would be folded twice (12 orders counted as
    24). Its cursor goes on; trackers new since wait, frozen, for the next backfill."""
    buyers = {"key": "buyers", "condition": {"performed": {"event": ORDER}}}
    old = compiled(docs_of(buyers, *GTE3_30D.values()), 1)
    full = compiled(docs_of(buyers, *GTE10_30D.values()), 2, previous=old)
    partition = _Partition(set(replayable(old)), position=100, catalog=old)
    backfills = Backfills(_Consumer(), _Producer(), _TOPICS)  # type: ignore[arg-type]
    backfills.plan(partition, full, 0)  # type: ignore[arg-type]
    running = partition.backfill
    assert running is not None
    running.next_offset = 60  # history folded up to here
    renamed = docs_of({**buyers, "name": "Buyers"}, *GTE10_30D.values())
    again = compiled(renamed, 3, previous=full)
    backfills.plan(partition, again, 0)  # type: ignore[arg-type]
    assert partition.backfill is running and running.next_offset == 60
    assert running.catalog == again.fingerprint
    # an edit that needs another new tracker: frozen now, backfilled after this one
    widened = {"key": "buyers", "condition": {"performed": {"event": "Returned"}}}
    later = compiled(docs_of(widened, *GTE10_30D.values()), 4, previous=again)
    backfills.plan(partition, later, 0)  # type: ignore[arg-type]
    assert partition.backfill is running and running.trackers == set(to_backfill(full, old))
    assert partition.catalog.pending == set(later.trackers)
    assert partition.catalog.frozen_audiences == {"buyers", "loyal"}
    running.next_offset = 100  # caught up: the next backfill starts over for the rest
    backfills.turn({0: partition}, later)  # type: ignore[dict-item, arg-type]
    follow = partition.backfill
    assert follow is not None and follow is not running and follow.next_offset == 0
    assert follow.trackers == set(later.trackers) - set(full.trackers)


def test_tracker_ids_name_what_they_keep() -> None:
    def ids(*conditions: dict[str, Any]) -> set[str]:
        docs = docs_of(*({"key": f"a{n}", "condition": c} for n, c in enumerate(conditions)))
        return set(compiled(docs, 1).trackers)

    window = ids(performed({"gte": 3}, within="30d"))
    assert window != ids(performed({"gte": 10}, within="30d"))
    assert window != ids(performed({"gte": 3}, within="7d"))
    assert window == ids(performed({"lte": 3}, within="30d"))  # N + 1 = 4 kept too
    between = ids(performed({"gte": 1}, between=["1d", "7d"]))
    assert between == ids(performed({"gte": 5}, between=["2d", "7d"]))  # keeps all 7d
    assert between != ids(performed({"gte": 1}, between=["1d", "8d"]))
    # a plain count keeps a number, whatever the leaves: its id did not change
    counts = ids(performed({"gte": 3}))
    assert counts == ids(performed({"gte": 10})) == {_legacy_count_id()}
    # one tracker serves every leaf of its events: kept for the widest and largest
    (shared,) = ids(performed({"gte": 3}, within="30d"), performed({"gte": 10}, within="7d"))
    assert shared not in window | ids(performed({"gte": 10}, within="7d"))


def _legacy_count_id() -> str:
    from audiences.core.definitions.conditions import tracker_id

    return tracker_id("p", {"e": ORDER, "w": None, "m": "count"})


# -- any edit of a shared window tracker: the oracle's memberships --------------------------

OTHER = {"key": "steady", "condition": performed({"gte": 2}, within="20s")}  # shares it


def leaf(op: str, n: int, mode: str, span: int) -> dict[str, Any]:
    if mode == "window":
        return performed({op: n}, within=f"{span}s")
    return performed({op: n}, between=[f"{span // 4}s", f"{span}s"])


leaves = st.builds(
    leaf,
    st.sampled_from(["gte", "lt", "eq"]),
    st.integers(1, 5),
    st.sampled_from(["window", "between"]),
    st.sampled_from([10, 20, 40]),
)


def need(conditions: list[dict[str, Any]], mode: str) -> tuple[int, int] | None:
    """(horizon, kept count) one tracker needs for the `mode` leaves among `conditions`,
    computed from the documents (independently of the compiler)."""
    horizon, keep, found = 0, 0, False
    for condition in conditions:
        body = condition["performed"]
        if ("within" in body) != (mode == "window"):
            continue
        found = True
        span = body["within"] if mode == "window" else body["between"][1]
        horizon = max(horizon, int(span[:-1]) * S)
        ((_op, n),) = body["times"].items()
        keep = max(keep, n + 1) if mode == "window" else 0
    return (horizon, keep) if found else None


@dataclass
class _Partition:
    """What `Backfills.plan` reads and writes of a partition."""

    complete_trackers: set[str] | None
    position: int
    catalog: Catalog
    number: int = 0
    backfill: Any = None
    rejudge_from: bytes | None = None

    def record_trackers(self, trackers: set[str]) -> None:
        self.complete_trackers = trackers


class _Consumer:
    def assign(self, partitions: list[Any]) -> None:
        pass

    def consume(self, count: int, timeout: float) -> list[Any]:
        return []


class _Producer:
    def produce(self, *args: Any, **kwargs: Any) -> None:
        pass

    def poll(self, timeout: float) -> int:
        return 0


_TOPICS = Topics("events", "audience-events", "defs", "dlq", "adlq", "changelog", "p", "w")

raw_event = st.fixed_dictionaries({"event": st.sampled_from([ORDER, ORDER, "Viewed"])})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.integers(0, 9), raw_event), min_size=1, max_size=30),
    leaves,
    leaves,
    st.data(),
)
def test_edits_give_the_memberships_the_whole_log_implies(
    draws: list[tuple[int, dict[str, str]]],
    before: dict[str, Any],
    after: dict[str, Any],
    data: st.DataObject,
) -> None:
    history, now = [], T0
    for index, (gap_s, raw) in enumerate(draws):
        now += gap_s * S
        body = {"type": "track", "userId": "u1", "messageId": f"m{index}", "timestamp": now}
        history.append(parse_event(body | raw, now))
    cut = data.draw(st.integers(1, len(history)), "edited after event #")
    v1 = docs_of({"key": "edited", "condition": before}, OTHER)
    v2 = docs_of({"key": "edited", "condition": after}, OTHER)
    old = compiled(v1, 1)
    full = compiled(v2, 2, previous=old)

    end = history[-1].timestamp_ms + 100 * S
    run = Profile()
    for event in history[:cut]:
        run.send(event, old)
    assert run.state is not None
    t = run.state.clock_ms
    run.phase = 1
    edit(run, old, full, history[:cut])
    for key in v2:  # at the edit: what the whole log up to it implies
        assert run.member(key) == is_member(v2, key, history[:cut], t), key
    run.phase = 2
    for event in history[cut:]:
        run.send(event, full)
    run.send(Tick(end), full)
    for key in v2:
        assert run.member(key) == is_member(v2, key, history, end), key

    # after the edit: the very transitions of the edited definitions from the start
    natural = compiled(v2, 2)  # (no previous catalog: keeps only what v2 needs)
    from_start = Profile()
    for index, event in enumerate(history):
        from_start.phase = int(index >= cut)
        from_start.send(event, natural)
    from_start.phase = 1
    from_start.send(Tick(end), natural)
    assert run.changes(2) == from_start.changes(1)

    # backfilled exactly when the kept data does not cover the new need
    mode = "window" if "within" in after["performed"] else "between"
    kept = need([before, OTHER["condition"]], mode)
    needed = need([after, OTHER["condition"]], mode)
    assert needed is not None
    covered = kept is not None and kept[0] >= needed[0] and kept[1] >= needed[1]
    assert bool(to_backfill(full, old)) is not covered
    assert set(full.trackers) <= set(old.trackers) or not covered
