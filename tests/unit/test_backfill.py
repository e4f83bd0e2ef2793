"""A non-blocking backfill: `Catalog.with_pending` while history is folded into new
trackers with `fold_history`, then the full catalog (SPEC §3 "backfill: true")."""

from __future__ import annotations

from typing import Any

from factories import T0, H, S, audience, feed, make_event
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audiences.core.definitions import build_catalog, validate_definition
from audiences.core.definitions.catalog import Catalog
from audiences.core.definitions.conditions import SequenceTracker
from audiences.core.evaluator import Output, Tick, TraitChange, Transition, fold_history, step
from audiences.core.events import Event, parse_event
from audiences.core.oracle import is_member
from audiences.core.state import NEVER, UserState

VIEWS_1H = audience(
    "viewers", {"performed": {"event": "Viewed", "times": {"gte": 2}, "within": "1h"}}
)
BUYERS = audience("buyers", {"performed": {"event": "Bought"}})
CARTS = audience(
    "abandoners",
    {
        "sequence": {
            "steps": [{"event": "Added"}],
            "then_not": {"event": "Bought", "within": "2h"},
            "match_on": "properties.cart",
        }
    },
)
LOYAL = audience("loyal", {"all": [{"in_audience": "abandoners"}, {"in_audience": "buyers"}]})
NO_CARTS = audience("no_carts", {"not": {"in_audience": "abandoners"}})  # true at once
ORDERS = {"key": "orders", "kind": "count", "event": "Bought", "within": "7d"}
REPEAT = audience("repeat", {"computed": {"name": "orders", "op": "gte", "value": 2}})


def catalog(*docs: dict[str, Any]) -> Catalog:
    return build_catalog({doc["key"]: (validate_definition(doc), 1) for doc in docs})


def new_trackers(full: Catalog, old: Catalog) -> frozenset[str]:
    """What a runtime backfills: trackers the full catalog has and the old one had not."""
    return frozenset(full.trackers) - frozenset(old.trackers)


def test_with_pending_freezes_what_depends_on_pending_trackers() -> None:
    old = catalog(BUYERS, VIEWS_1H)
    full = catalog(BUYERS, VIEWS_1H, CARTS, LOYAL, NO_CARTS, ORDERS, REPEAT)
    pending = new_trackers(full, old)
    assert len(pending) == 2  # the funnel's and the computed trait's
    frozen = full.with_pending(pending)
    frozen_keys = {"abandoners", "loyal", "no_carts", "repeat"}
    assert frozen.frozen_audiences == frozen_keys
    assert frozen.frozen_traits == {"orders"}
    assert frozen.frozen_positions == {full.index[k] for k in frozen_keys}
    assert set(frozen.trackers) == set(full.trackers)  # adopting it keeps their data
    routed = {t.id for group in frozen.trackers_by_event.values() for t in group}
    assert routed == set(full.trackers) - pending
    # deterministic, distinct from the full catalog's, and from other pending sets
    assert frozen.fingerprint == full.with_pending(pending).fingerprint != full.fingerprint
    (one, _other) = sorted(pending)
    assert full.with_pending(frozenset({one})).fingerprint != frozen.fingerprint
    assert full.with_pending(frozenset({one})).with_pending(pending).fingerprint == (
        frozen.fingerprint
    )
    # nothing pending: the catalog itself; the full catalog tests nothing on the hot path
    assert full.with_pending(frozenset()) is full
    assert full.with_pending(frozenset({"unknown"})) is full
    assert not full.pending and not full.frozen_positions and not full.frozen_traits


def test_live_events_leave_pending_trackers_alone_and_frozen_audiences_silent() -> None:
    old = catalog(BUYERS, VIEWS_1H)
    full = catalog(BUYERS, VIEWS_1H, CARTS, LOYAL, NO_CARTS, ORDERS, REPEAT)
    pending = new_trackers(full, old)
    frozen = full.with_pending(pending)
    state, outputs = feed(old, [make_event(ts=T0, event="Viewed")])
    events = [
        make_event(ts=T0 + 1, event="Added", properties={"cart": "c1"}),
        make_event(ts=T0 + 2, event="Bought", properties={"cart": "c2"}),
        make_event(ts=T0 + 3, event="Bought", properties={"cart": "c3"}),
        make_event(ts=T0 + 4, event="Viewed"),
    ]
    state, outputs = feed(frozen, events, state=state)
    assert state is not None
    assert [(o.audience_key, o.entered) for o in outputs if isinstance(o, Transition)] == [
        ("buyers", True),
        ("viewers", True),
    ]
    assert not any(isinstance(o, TraitChange) for o in outputs)
    assert not set(state.trackers) & pending
    assert set(state.members) == {"buyers", "viewers"}
    assert state.computed == {}
    # nothing due for frozen audiences: ticks judge nothing and never spin
    state, outputs = feed(frozen, [Tick(T0 + 3 * H)], state=state)
    assert state is not None
    assert [(o.audience_key, o.entered) for o in outputs if isinstance(o, Transition)] == [
        ("viewers", False)
    ]
    assert state.wake_ms == NEVER


def test_a_frozen_member_keeps_its_membership_and_deadline_until_the_switch() -> None:
    """An edited audience whose new version needs a new tracker: members stay members
    (nobody exits while history is rebuilt), their deadline waits for the switch, and
    then only real differences are announced."""
    v1 = audience("hot", {"performed": {"event": "Viewed", "within": "1h"}})
    v2 = audience(
        "hot",
        {
            "any": [
                {"performed": {"event": "Viewed", "within": "1h"}},
                {"performed": {"event": "Liked"}},
            ]
        },
    )
    old = catalog(v1)
    full = build_catalog({"hot": (validate_definition(v2), 2)})
    frozen = full.with_pending(new_trackers(full, old))
    assert frozen.frozen_audiences == {"hot"}
    state, _ = feed(old, [make_event(ts=T0, event="Liked"), make_event(ts=T0, event="Viewed")])
    assert state is not None and state.members["hot"].member
    assert state.wake_ms == T0 + H
    result = step(state, Tick(T0 + 2 * H), frozen, "u1")  # adopts it; the deadline waits
    assert result.transitions == []
    assert result.next_wake_ms == NEVER
    assert state.members["hot"].member and state.members["hot"].wake_ms == T0 + H
    decoded = UserState.decode(state.encode())  # (the codec's wake counts frozen ones)
    result = step(decoded, Tick(T0 + 3 * H), frozen, "u1")
    assert result.transitions == [] and result.next_wake_ms == NEVER
    # the backfill folds the Liked event in; the full catalog finds `hot` still true
    assert fold_history(decoded, make_event(ts=T0, event="Liked"), frozen, frozen.pending)
    result = step(decoded, Tick(decoded.clock_ms), full, "u1")
    assert result.transitions == []  # an unchanged member hears nothing
    assert decoded.members["hot"].member


def test_an_edited_trait_keeps_its_value_until_the_switch() -> None:
    v1 = {"key": "orders", "kind": "count", "event": "Bought", "within": "7d"}
    v2 = {**v1, "within": "30d"}  # a new window: a new tracker, its history rebuilt
    old = build_catalog({"orders": (v1, 1)})
    full = build_catalog({"orders": (v2, 2), "repeat": (validate_definition(REPEAT), 1)})
    frozen = full.with_pending(new_trackers(full, old))
    assert frozen.frozen_traits == {"orders"} and frozen.frozen_audiences == {"repeat"}
    history = [make_event(ts=T0 + i * H, event="Bought") for i in range(2)]
    state, outputs = feed(old, history)
    assert state is not None and state.computed["orders"][0] == 2
    live = make_event(ts=T0 + 2 * H, event="Bought")
    state, outputs = feed(frozen, [live], state=state)
    assert state is not None
    assert outputs == []  # not "0", the value of an empty new tracker
    assert state.computed["orders"][0] == 2
    for event in [*history, live]:
        fold_history(state, event, frozen, frozen.pending)
    state, outputs = feed(full, [Tick(state.clock_ms)], state=state)
    assert [(o.trait_key, o.value) for o in outputs if isinstance(o, TraitChange)] == [
        ("orders", 3)
    ]
    assert [(o.audience_key, o.entered) for o in outputs if isinstance(o, Transition)] == [
        ("repeat", True)
    ]


def test_fold_history_folds_only_the_given_trackers_and_judges_nothing() -> None:
    old = catalog(BUYERS)
    full = catalog(BUYERS, CARTS, ORDERS, REPEAT)
    pending = new_trackers(full, old)
    state, _ = feed(old, [make_event(ts=T0 + H, event="Viewed")])
    assert state is not None
    before = (state.clock_ms, dict(state.members), state.seen.to_json())
    bought = make_event(ts=T0, event="Bought", properties={"cart": "c1"})
    assert fold_history(state, bought, full, pending)
    # the funnel keeps the order too: its checkout may come later in the log (SPEC §11)
    (funnel,) = [t.id for t in full.trackers.values() if isinstance(t, SequenceTracker)]
    assert set(state.trackers) == {full.traits["orders"].id, funnel}
    assert (state.clock_ms, dict(state.members), state.seen.to_json()) == before
    assert not fold_history(state, make_event(ts=T0, event="Other"), full, pending)
    assert not fold_history(state, bought, full, frozenset())  # (not the buyers' tracker)


# -- the same memberships as the full catalog from the start ----------------------------

OLD = [
    {"key": "no_orders", "condition": {"not": {"performed": {"event": "Bought", "within": "30s"}}}},
    {"key": "viewers", "condition": {"performed": {"event": "Viewed", "times": {"gte": 2}}}},
]
NEW = [
    {  # a funnel with a step window, a follow-up and match_on
        "key": "funnel",
        "condition": {
            "sequence": {
                "steps": [{"event": "Viewed"}, {"event": "Added", "within": "20s"}],
                "then_not": {"event": "Bought", "within": "15s"},
                "match_on": "properties.cart",
                "active_for": "60s",
            }
        },
    },
    {  # a windowed count
        "key": "frequent",
        "condition": {"performed": {"event": "Added", "times": {"gte": 3}, "within": "40s"}},
    },
    {"key": "earlier", "condition": {"performed": {"event": "Bought", "between": ["10s", "35s"]}}},
    {  # did not: true at once for a new profile, so it must wait for the history
        "key": "idle",
        "condition": {"not": {"performed": {"event": "Added", "within": "30s"}}},
    },
    {"key": "orders_1m", "kind": "count", "event": "Bought", "within": "60s"},
    {"key": "repeat", "condition": {"computed": {"name": "orders_1m", "op": "gte", "value": 2}}},
    {
        "key": "hesitant",
        "condition": {"all": [{"in_audience": "funnel"}, {"in_audience": "viewers"}]},
    },
]
OLD_CATALOG = build_catalog({d["key"]: (validate_definition(d), 1) for d in OLD})
FULL_DOCS = {d["key"]: validate_definition(d) for d in [*OLD, *NEW]}
FULL_CATALOG = build_catalog({k: (d, 1) for k, d in FULL_DOCS.items()})
PENDING = new_trackers(FULL_CATALOG, OLD_CATALOG)
AUDIENCES = [k for k, d in FULL_DOCS.items() if "condition" in d]
NEW_AUDIENCES = [d["key"] for d in NEW if "condition" in d]

raw_event = st.fixed_dictionaries(
    {
        "event": st.sampled_from(["Viewed", "Added", "Bought"]),
        "properties": st.fixed_dictionaries({"cart": st.sampled_from(["a", "b"])}),
    }
)


def history_of(draws: list[tuple[int, dict[str, Any], int | None]]) -> list[Event]:
    """Events; where a draw names an earlier one, that event re-sent as it was (the same
    messageId, content and time: within 24 h, a duplicate live and in the backfill)."""
    events: list[Event] = []
    now = T0
    for index, (gap_s, raw, copy) in enumerate(draws):
        now += gap_s * S
        if copy is not None and events:
            events.append(events[copy % len(events)])
            continue
        body = {"type": "track", "userId": "u1", "messageId": f"m{index}", "timestamp": now}
        events.append(parse_event(body | raw, now))
    return events


class Profile:
    """One profile driven as the runtime drives it: a Tick at every wake before the next
    input, the codec between inputs."""

    def __init__(self) -> None:
        self.state: UserState | None = None
        self.outputs: list[tuple[int, Output]] = []  # (phase, output)
        self.phase = 0

    def send(self, item: Event | Tick, catalog: Catalog) -> None:
        until = item.timestamp_ms if isinstance(item, Event) else item.at_ms
        while self.state is not None and self.state.wake_ms < until:
            self._step(Tick(self.state.wake_ms), catalog)
        self._step(item, catalog)

    def _step(self, item: Event | Tick, catalog: Catalog) -> None:
        result = step(self.state, item, catalog, "u1")
        self.state = UserState.decode(result.state.encode())
        self.outputs += [(self.phase, output) for output in result.transitions]

    def members(self) -> dict[str, bool]:
        assert self.state is not None
        return {k: m.member for k, m in self.state.members.items() if m.member}

    def changes(self, phase: int) -> list[tuple[str, bool, int]]:
        return [
            (o.audience_key, o.entered, o.at_ms)
            for p, o in self.outputs
            if p == phase and isinstance(o, Transition)
        ]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.integers(0, 12), raw_event, st.none() | st.none() | st.integers(0, 30)),
        min_size=1,
        max_size=30,
    ),
    st.data(),
)
def test_backfill_then_switch_gives_what_the_full_history_implies(
    draws: list[tuple[int, dict[str, Any], int | None]], data: st.DataObject
) -> None:
    history = history_of(draws)
    first = data.draw(st.integers(0, len(history)), "new definitions applied before event #")
    switch = data.draw(st.integers(first, len(history)), "backfill caught up before event #")
    end = history[-1].timestamp_ms + 200 * S

    full_run = Profile()  # the full catalog from the start
    for index, event in enumerate(history):
        full_run.phase = int(index >= switch)
        full_run.send(event, FULL_CATALOG)
    full_run.phase = 1
    full_run.send(Tick(end), FULL_CATALOG)

    run = Profile()
    pending = FULL_CATALOG.with_pending(PENDING)
    for event in history[:first]:  # before the new definitions
        run.send(event, OLD_CATALOG)
    for event in history[first:switch]:  # live while the backfill runs
        run.send(event, pending)
    assert {key for key, _entered, _at in run.changes(0)} <= {"no_orders", "viewers"}
    if switch:
        assert run.state is not None
        assert not set(run.state.trackers) & PENDING  # live events never reach them
        for event in history[:switch]:  # the second cursor, over the same log
            fold_history(run.state, event, pending, PENDING)
        run.state = UserState.decode(run.state.encode())
        # The switch to the full catalog: the runtime's re-judging pass. Exactly what
        # the history implies at that time, for the thawed audiences only: no storm.
        run.phase = 1
        t = run.state.clock_ms
        assert t == max(e.timestamp_ms for e in history[:switch])
        run.send(Tick(t), FULL_CATALOG)
        seen = history[:switch]
        entered = {key for key, entered, at in run.changes(1) if entered and at == t}
        assert entered == {key for key in NEW_AUDIENCES if is_member(FULL_DOCS, key, seen, t)}
        assert len(run.changes(1)) == len(entered)  # no exits: nobody was a member before
        for key in AUDIENCES:
            assert run.members().get(key, False) == is_member(FULL_DOCS, key, seen, t), key
    run.phase = 2
    for event in history[switch:]:
        run.send(event, FULL_CATALOG)
    run.send(Tick(end), FULL_CATALOG)
    # afterwards: the very transitions of the full catalog from the start
    assert run.changes(2) == full_run.changes(1)
    for key in AUDIENCES:
        assert run.members().get(key, False) == is_member(FULL_DOCS, key, history, end), key
