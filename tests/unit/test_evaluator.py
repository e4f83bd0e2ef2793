"""`step`: membership transitions at the exact boundaries of windows and deadlines."""

from __future__ import annotations

import hashlib
import tracemalloc
from collections import defaultdict
from typing import Any

import pytest
from factories import (
    T0,
    D,
    H,
    M,
    audience,
    catalog_of,
    feed,
    identify,
    iso,
    make_event,
    run,
    summary,
)

from audiences.core import evaluator
from audiences.core.evaluator import Tick, Transition, step
from audiences.core.events import Event
from audiences.core.outputs import computation_id, render_transition
from audiences.core.state import NEVER, UserState
from audiences.errors import DefinitionError


def checkout(ts: int, cart: str = "A", **fields: Any) -> Event:
    return make_event(ts=ts, properties={"cart_id": cart}, **fields)


def order(ts: int, cart: str = "A", **fields: Any) -> Event:
    return make_event(ts=ts, event="Order Completed", properties={"cart_id": cart}, **fields)


def performed(event: str = "Checkout Started", **fields: Any) -> dict[str, Any]:
    return {"performed": {"event": event, **fields}}


def plan_is(value: str) -> dict[str, Any]:
    return {"trait": {"name": "plan", "op": "eq", "value": value}}


ABANDONED = {
    "sequence": {
        "steps": [{"event": "Checkout Started"}],
        "then_not": {"event": "Order Completed", "within": "2h"},
        "match_on": "cart_id",
        "active_for": "7d",
    }
}


def by_time(transitions: list[Transition]) -> dict[int, set[tuple[str, bool]]]:
    grouped: dict[int, set[tuple[str, bool]]] = defaultdict(set)
    for t in transitions:
        grouped[t.at_ms].add((t.audience_key, t.entered))
    return dict(grouped)


def clone(state: UserState | None) -> UserState:
    assert state is not None
    return UserState.decode(state.encode())


# -- performed ... times ... within ----------------------------------------------------


def test_times_within_enters_at_the_nth_event_and_exits_when_the_oldest_leaves() -> None:
    catalog = catalog_of(audience("frequent", performed(times={"gte": 3}, within="1h")))
    state, transitions = feed(catalog, [checkout(T0), checkout(T0 + 10 * M)])
    assert transitions == []
    result = step(state, checkout(T0 + 20 * M), catalog, "u1")
    assert summary(result.transitions) == [("frequent", "entered", T0 + 20 * M)]
    assert result.next_wake_ms == T0 + H  # oldest counted + W
    assert run(catalog, [Tick(T0 + H - 1)], state=state) == []
    assert summary(run(catalog, [Tick(T0 + H)], state=state)) == [("frequent", "exited", T0 + H)]


def test_times_within_keeps_membership_while_newer_events_refill_the_window() -> None:
    catalog = catalog_of(audience("frequent", performed(times={"gte": 2}, within="1h")))
    events = [checkout(T0), checkout(T0 + 10 * M), checkout(T0 + 50 * M)]
    state, transitions = feed(catalog, [*events, Tick(T0 + H)])
    assert summary(transitions) == [("frequent", "entered", T0 + 10 * M)]
    assert state is not None and state.wake_ms == T0 + 10 * M + H
    later = run(catalog, [Tick(T0 + 10 * M + H)], state=state)
    assert summary(later) == [("frequent", "exited", T0 + 10 * M + H)]


def test_not_performed_holds_for_a_new_profile_and_returns_after_the_window() -> None:
    catalog = catalog_of(
        audience("no_orders_30d", performed("Order Completed", times={"eq": 0}, within="30d")),
        audience("never_ordered", {"not": performed("Order Completed")}),
    )
    transitions = run(catalog, [checkout(T0), order(T0 + H), Tick(T0 + H + 30 * D)])
    assert by_time(transitions) == {
        T0: {("no_orders_30d", True), ("never_ordered", True)},
        T0 + H: {("no_orders_30d", False), ("never_ordered", False)},
        T0 + H + 30 * D: {("no_orders_30d", True)},
    }


def test_not_performed_is_not_entered_when_the_first_event_is_the_one_excluded() -> None:
    catalog = catalog_of(audience("no_orders", performed("Order Completed", times={"eq": 0})))
    assert run(catalog, [order(T0)]) == []


def test_between_enters_at_ts_plus_d1_and_exits_at_ts_plus_d2() -> None:
    catalog = catalog_of(audience("lapsed", performed("Order Completed", between=["1d", "3d"])))
    result = step(None, order(T0), catalog, "u1")
    assert result.transitions == []
    assert result.next_wake_ms == T0 + D
    state = result.state
    assert run(catalog, [Tick(T0 + D - 1)], state=state) == []
    assert summary(run(catalog, [Tick(T0 + D)], state=state)) == [("lapsed", "entered", T0 + D)]
    assert run(catalog, [Tick(T0 + 3 * D - 1)], state=state) == []
    exited = run(catalog, [Tick(T0 + 3 * D)], state=state)
    assert summary(exited) == [("lapsed", "exited", T0 + 3 * D)]
    assert state.wake_ms == NEVER


def test_where_filters_decide_what_counts() -> None:
    big = [{"property": "total", "op": "gte", "value": 100}]
    catalog = catalog_of(audience("big_spender", performed("Order Completed", where=big)))
    small, large = (
        make_event(ts=T0 + n, event="Order Completed", properties={"total": total})
        for n, total in ((0, 99), (1, 100))
    )
    assert summary(run(catalog, [small, large])) == [("big_spender", "entered", T0 + 1)]


# -- sequences -----------------------------------------------------------------------


def test_then_not_enters_exactly_at_t0_plus_within() -> None:
    catalog = catalog_of(audience("abandoned", ABANDONED))
    result = step(None, checkout(T0), catalog, "u1")
    assert (result.transitions, result.next_wake_ms) == ([], T0 + 2 * H)
    assert run(catalog, [Tick(T0 + 2 * H - 1)], state=result.state) == []
    entered = run(catalog, [Tick(T0 + 2 * H)], state=result.state)
    assert summary(entered) == [("abandoned", "entered", T0 + 2 * H)]
    assert entered[0].trigger == "deadline"


def test_then_not_never_enters_when_the_follow_up_comes_within_the_window() -> None:
    catalog = catalog_of(audience("abandoned", ABANDONED))
    state, transitions = feed(catalog, [checkout(T0), order(T0 + 2 * H - 1)])
    assert transitions == []
    assert state is not None and state.wake_ms == NEVER
    assert run(catalog, [Tick(T0 + 3 * H)], state=state) == []


def test_then_not_exits_when_the_follow_up_comes_later() -> None:
    catalog = catalog_of(audience("abandoned", ABANDONED))
    transitions = run(catalog, [checkout(T0), Tick(T0 + 2 * H), order(T0 + 5 * H)])
    assert summary(transitions) == [
        ("abandoned", "entered", T0 + 2 * H),
        ("abandoned", "exited", T0 + 5 * H),
    ]
    assert transitions[1].trigger == "event"


def test_then_not_exits_at_t0_plus_active_for() -> None:
    catalog = catalog_of(audience("abandoned", ABANDONED))
    state, _ = feed(catalog, [checkout(T0), Tick(T0 + 2 * H)])
    assert state is not None and state.wake_ms == T0 + 7 * D
    assert run(catalog, [Tick(T0 + 7 * D - 1)], state=state) == []
    exited = run(catalog, [Tick(T0 + 7 * D)], state=state)
    assert summary(exited) == [("abandoned", "exited", T0 + 7 * D)]


def test_match_on_keeps_carts_apart() -> None:
    catalog = catalog_of(audience("abandoned", ABANDONED))
    events = [checkout(T0, "A"), checkout(T0 + 10 * M, "B"), order(T0 + 30 * M, "A")]
    state, transitions = feed(catalog, events)
    assert transitions == []
    assert run(catalog, [Tick(T0 + 2 * H)], state=state) == []  # A ordered: nothing due
    entered = run(catalog, [Tick(T0 + 2 * H + 10 * M)], state=state)
    assert summary(entered) == [("abandoned", "entered", T0 + 2 * H + 10 * M)]
    # an order without the property, or for another cart, does not touch B
    assert run(catalog, [order(T0 + 3 * H, "C"), order(T0 + 3 * H, cart=None)], state=state) == []


def test_without_match_on_any_order_clears_the_checkout() -> None:
    sequence = {k: v for k, v in ABANDONED["sequence"].items() if k != "match_on"}
    catalog = catalog_of(audience("abandoned", {"sequence": sequence}))
    events = [checkout(T0, "A"), order(T0 + 30 * M, "B"), Tick(T0 + 3 * H)]
    assert run(catalog, events) == []


FUNNEL = {
    "sequence": {
        "steps": [
            {"event": "Product Viewed"},
            {"event": "Product Added", "within": "1h"},
            {"event": "Checkout Started", "within": "30m"},
        ],
        "active_for": "1d",
    }
}


def funnel_events(added: int, started: int) -> list[Event]:
    return [
        make_event(ts=T0, event="Product Viewed"),
        make_event(ts=added, event="Product Added"),
        make_event(ts=started, event="Checkout Started"),
    ]


def test_funnel_steps_within_are_inclusive_and_active_for_ends_it() -> None:
    catalog = catalog_of(audience("funnel", FUNNEL))
    done = T0 + H + 30 * M
    transitions = run(catalog, [*funnel_events(T0 + H, done), Tick(done + D)])
    assert summary(transitions) == [("funnel", "entered", done), ("funnel", "exited", done + D)]


@pytest.mark.parametrize(
    ("added", "started"),
    [(T0 + H + 1, T0 + H + 2), (T0 + H, T0 + H + 30 * M + 1)],
    ids=["step-2-late", "step-3-late"],
)
def test_funnel_step_too_late_breaks_the_funnel(added: int, started: int) -> None:
    catalog = catalog_of(audience("funnel", FUNNEL))
    assert run(catalog, funnel_events(added, started)) == []


def test_funnel_steps_out_of_order_do_not_count() -> None:
    """Steps count in event-time order (SPEC §11), not in arrival order: a step that
    happened before the previous one does not count, one that merely arrived first does."""
    catalog = catalog_of(audience("funnel", FUNNEL))
    reversed_in_time = [
        make_event(ts=T0 + 1, event="Product Added"),
        make_event(ts=T0 + 2, event="Product Viewed"),
        make_event(ts=T0 + 3, event="Checkout Started"),
    ]
    assert run(catalog, reversed_in_time) == []
    events = funnel_events(T0 + 1, T0 + 2)
    transitions = run(catalog, [events[1], events[0], events[2]])
    assert summary(transitions) == [("funnel", "entered", T0 + 2)]


def test_then_follow_up_must_come_within_w() -> None:
    then = {
        "sequence": {
            "steps": [{"event": "Checkout Started"}],
            "then": {"event": "Order Completed", "within": "1h"},
            "active_for": "1d",
        }
    }
    catalog = catalog_of(audience("converted", then))
    state, transitions = feed(catalog, [checkout(T0), order(T0 + H)])  # edge: inclusive
    assert summary(transitions) == [("converted", "entered", T0 + H)]
    assert summary(run(catalog, [Tick(T0 + D)], state=state)) == [("converted", "exited", T0 + D)]
    assert run(catalog, [checkout(T0), order(T0 + H + 1)]) == []


# -- traits --------------------------------------------------------------------------


def test_trait_conditions_follow_the_latest_traits() -> None:
    catalog = catalog_of(
        audience("pro", plan_is("pro")),
        audience("parisians", {"trait": {"name": "address.city", "op": "eq", "value": "Paris"}}),
    )
    transitions = run(
        catalog,
        [
            identify(T0, plan="free"),
            identify(T0 + 1, plan="pro", address={"city": "Paris"}),
            make_event(ts=T0 + 2, context={"traits": {"plan": "free"}}),  # any event's context
            identify(T0 - 5, plan="pro"),  # late identify: older values do not win
        ],
    )
    assert by_time(transitions) == {
        T0 + 1: {("pro", True), ("parisians", True)},
        T0 + 2: {("pro", False)},
    }


def test_relative_time_trait_exits_when_the_date_leaves_the_window() -> None:
    recent = {"trait": {"name": "last_login", "op": "within_last", "value": "1d"}}
    catalog = catalog_of(audience("recent_login", recent))
    result = step(None, identify(T0 + H, last_login=iso(T0)), catalog, "u1")
    assert summary(result.transitions) == [("recent_login", "entered", T0 + H)]
    assert result.next_wake_ms == T0 + D
    assert run(catalog, [Tick(T0 + D - 1)], state=result.state) == []
    exited = run(catalog, [Tick(T0 + D)], state=result.state)
    assert summary(exited) == [("recent_login", "exited", T0 + D)]


# -- composition, anonymous profiles -------------------------------------------------


def test_in_audience_dependents_change_in_the_same_step() -> None:
    catalog = catalog_of(
        audience("pro_buyers", {"all": [{"in_audience": "buyers"}, {"in_audience": "pro"}]}),
        audience("non_buyers", {"not": {"in_audience": "buyers"}}),
        audience("buyers", performed("Order Completed", within="1d")),
        audience("pro", plan_is("pro")),
    )
    transitions = run(catalog, [identify(T0, plan="pro"), order(T0 + H), Tick(T0 + H + D)])
    assert by_time(transitions) == {
        T0: {("pro", True), ("non_buyers", True)},
        T0 + H: {("buyers", True), ("pro_buyers", True), ("non_buyers", False)},
        T0 + H + D: {("buyers", False), ("pro_buyers", False), ("non_buyers", True)},
    }
    # a dependency's transition always comes before its dependents'
    keys = [t.audience_key for t in transitions if t.at_ms == T0 + H]
    assert keys.index("buyers") < min(keys.index("pro_buyers"), keys.index("non_buyers"))


def test_anonymous_profiles_only_count_with_include_anonymous() -> None:
    catalog = catalog_of(
        audience("known", performed()),
        audience("anyone", performed(), include_anonymous=True),
    )
    anonymous = checkout(T0, userId=None, anonymousId="anon-1")
    assert summary(run(catalog, [anonymous], user="anon-1")) == [("anyone", "entered", T0)]
    identified = checkout(T0, anonymousId="anon-1")  # carries a userId: not anonymous
    assert {t.audience_key for t in run(catalog, [identified])} == {"known", "anyone"}


# -- input hygiene: duplicates, late events ------------------------------------------


def test_duplicate_message_id_is_dropped_and_counted_once() -> None:
    catalog = catalog_of(audience("twice", performed(times={"gte": 2})))
    state, _ = feed(catalog, [checkout(T0, messageId="m-1")])
    again = step(state, checkout(T0 + M, messageId="m-1"), catalog, "u1")
    assert again.duplicate is True
    assert again.transitions == []
    fresh = step(state, checkout(T0 + 2 * M, messageId="m-2"), catalog, "u1")
    assert fresh.duplicate is False
    assert summary(fresh.transitions) == [("twice", "entered", T0 + 2 * M)]


def test_same_message_id_after_24_hours_counts_again() -> None:
    catalog = catalog_of(audience("twice", performed(times={"gte": 2})))
    events = [checkout(T0, messageId="m-1"), checkout(T0 + D + 1, messageId="m-1")]
    assert summary(run(catalog, events)) == [("twice", "entered", T0 + D + 1)]


def test_late_event_is_emitted_now_with_its_own_effective_time() -> None:
    catalog = catalog_of(audience("twice", performed(times={"gte": 2}, within="1d")))
    late = checkout(T0, messageId="late")
    state, transitions = feed(catalog, [checkout(T0 + H), late])
    (entered,) = transitions
    assert (entered.at_ms, entered.effective_at_ms) == (T0 + H, T0)
    assert entered.trigger_message_id == "late"
    assert state is not None and state.wake_ms == T0 + D  # the late one is the oldest
    rendered = render_transition(entered, {}, space_id="spa_1")
    assert rendered["timestamp"] == iso(T0 + H)
    assert rendered["properties"]["effective_at"] == iso(T0)


def test_late_event_outside_every_window_changes_nothing() -> None:
    catalog = catalog_of(audience("twice", performed(times={"gte": 2}, within="1h")))
    assert run(catalog, [checkout(T0 + 2 * H), checkout(T0)]) == []


# -- time and determinism ------------------------------------------------------------


def test_deadlines_passed_by_a_later_event_fire_at_their_own_time_first() -> None:
    catalog = catalog_of(
        audience("recent", performed(within="1h")),
        audience("abandoned", ABANDONED),
    )
    later = make_event(ts=T0 + 3 * H, event="Order Completed", properties={"cart_id": "A"})
    transitions = run(catalog, [checkout(T0), later])
    assert [(*s, t.trigger) for s, t in zip(summary(transitions), transitions, strict=True)] == [
        ("recent", "entered", T0, "event"),
        ("recent", "exited", T0 + H, "deadline"),
        ("abandoned", "entered", T0 + 2 * H, "deadline"),
        ("abandoned", "exited", T0 + 3 * H, "event"),
    ]


HISTORY_CATALOG = (
    audience("recent", performed(within="1h")),
    audience("frequent", performed(times={"gte": 2}, within="1h")),
    audience("abandoned", ABANDONED),
    audience("loyal", {"all": [{"in_audience": "frequent"}, plan_is("pro")]}),
)


HISTORY: list[Event] = [
    checkout(T0, "A"),
    checkout(T0 + 30 * M, "B"),
    identify(T0 + 40 * M, plan="pro"),
    order(T0 + H, "A"),  # exactly at frequent's exit deadline
    order(T0 + 3 * H, "B"),
    checkout(T0 + 2 * D, "C"),
    checkout(T0 + 2 * D + 1, "C"),
    make_event(ts=T0 + 10 * D, event="App Opened"),
]


def test_delivered_ticks_do_not_change_the_outcome() -> None:
    catalog = catalog_of(*HISTORY_CATALOG)
    expected = run(catalog, HISTORY)
    assert len(expected) > 6
    previous = T0
    with_ticks: list[Event | Tick] = []
    for event in HISTORY:  # ticks anywhere up to (and at) each next event's time
        with_ticks += [Tick(previous + (event.timestamp_ms - previous) // 2)]
        with_ticks += [Tick(event.timestamp_ms), event]
        previous = event.timestamp_ms
    assert run(catalog, with_ticks) == expected


def test_same_input_gives_the_same_transitions_and_message_ids() -> None:
    catalog = catalog_of(*HISTORY_CATALOG)
    first, second = run(catalog, HISTORY), run(catalog, HISTORY)
    assert [t.message_id for t in first] == [t.message_id for t in second]
    assert first == second


def test_transitions_alternate_with_increasing_seq() -> None:
    catalog = catalog_of(audience("recent", performed(within="1h")))
    events = [checkout(T0), Tick(T0 + H), checkout(T0 + 2 * H), checkout(T0 + 5 * H)]
    transitions = run(catalog, events)
    assert [(t.entered, t.seq) for t in transitions] == [
        (True, 1),
        (False, 2),
        (True, 3),
        (False, 4),
        (True, 5),
    ]
    ids = [t.message_id for t in transitions]
    assert len(set(ids)) == len(ids)
    assert ids[0] == hashlib.sha256(b"recent|1|u1|1|entered").hexdigest()
    assert ids[1] == hashlib.sha256(b"recent|1|u1|2|exited").hexdigest()


@pytest.mark.parametrize("cut", range(len(HISTORY) + 1))
def test_state_codec_round_trip_mid_history_changes_nothing(cut: int) -> None:
    catalog = catalog_of(*HISTORY_CATALOG)
    items = [*HISTORY, Tick(T0 + 30 * D)]
    expected = run(catalog, items)
    state, before = feed(catalog, items[:cut])
    restored = None if state is None else clone(state)
    if state is not None:
        assert restored is not None and restored.encode() == state.encode()
    after = run(catalog, items[cut:], state=restored)
    assert before + after == expected


def test_an_encoded_profile_takes_only_its_own_length_in_memory() -> None:
    """The checkpoint holds every encoded profile of an interval until it lands: each must
    cost its length, not the encoder's write buffer (orjson returns at least 4 KB)."""
    catalog = catalog_of(*HISTORY_CATALOG)
    state, _ = feed(catalog, HISTORY[:3])
    assert state is not None
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = [state.encode() for _ in range(200)]
        held = (tracemalloc.get_traced_memory()[0] - before) / len(kept)
    finally:
        tracemalloc.stop()
    assert held < len(kept[0]) + 120  # (a bytes object's header is 33 bytes)


# -- definitions change --------------------------------------------------------------


def test_edited_definition_emits_only_real_differences() -> None:
    v1 = catalog_of(audience("buyers", performed("Order Completed")), version=1)
    v2 = catalog_of(audience("buyers", performed("Order Completed", times={"gte": 2})), version=2)
    once, _ = feed(v1, [order(T0)])
    twice, _ = feed(v1, [order(T0), order(T0 + 1)])
    assert run(v2, [Tick(T0 + 5)], state=twice) == []
    (exited,) = run(v2, [Tick(T0 + 5)], state=once)
    assert (exited.entered, exited.audience_version, exited.trigger) == (False, 2, "definition")
    assert exited.at_ms == T0  # the profile's own clock, not the tick's time
    assert exited.seq == 2


def test_deleted_audience_with_a_pending_deadline_does_not_stall_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = 0
    real_evaluate = evaluator._evaluate

    def bounded(*args: Any, **kwargs: Any) -> None:
        nonlocal calls
        calls += 1
        if calls > 100:
            raise RuntimeError("deadline loop makes no progress")
        real_evaluate(*args, **kwargs)

    monkeypatch.setattr(evaluator, "_evaluate", bounded)
    before = catalog_of(audience("recent", performed(within="1h")), audience("other", plan_is("x")))
    after = catalog_of(audience("other", plan_is("x")))
    state, _ = feed(before, [checkout(T0)])
    assert state is not None and state.wake_ms == T0 + H
    result = step(state, checkout(T0 + 2 * H), after, "u1")
    assert result.next_wake_ms > T0 + 2 * H


def test_ordering_against_null_is_rejected_when_applied() -> None:
    with pytest.raises(DefinitionError) as caught:
        catalog_of(audience("odd", {"trait": {"name": "age", "op": "gt", "value": None}}))
    assert caught.value.path == "$.condition.trait.value"


# -- output (SPEC §5) ----------------------------------------------------------------


def test_render_transition_matches_the_spec() -> None:
    catalog = catalog_of(audience("cart_abandoners", ABANDONED, name="Cart abandoners"), version=3)
    (entered,) = run(catalog, [checkout(T0, messageId="m-42"), Tick(T0 + 2 * H)])
    traits = {"email": "ann@example.com", "phone": "", "plan": "pro"}
    message = render_transition(entered, traits, space_id="spa_1")
    digest = hashlib.sha256(b"cart_abandoners|3|u1|1|entered").hexdigest()
    assert message == {
        "type": "track",
        "event": "Audience Entered",
        "userId": "u1",
        "messageId": digest,
        "timestamp": iso(T0 + 2 * H),
        "properties": {
            "audience_key": "cart_abandoners",
            "cart_abandoners": True,
            "audience_name": "Cart abandoners",
            "audience_version": 3,
            "effective_at": iso(T0 + 2 * H),
            "reason": {"trigger": "deadline"},
        },
        "context": {
            "traits": {"email": "ann@example.com"},
            "personas": {
                "computation_class": "audience",
                "computation_key": "cart_abandoners",
                "computation_id": hashlib.sha256(b"spa_1|audience|cart_abandoners").hexdigest()[
                    :32
                ],
                "space_id": "spa_1",
                "namespace": "spa_1",
            },
        },
    }


def test_render_exit_carries_false_and_the_triggering_message() -> None:
    catalog = catalog_of(audience("cart_abandoners", ABANDONED))
    items = [checkout(T0), Tick(T0 + 2 * H), order(T0 + 3 * H, messageId="m-7")]
    exited = run(catalog, items)[-1]
    message = render_transition(exited, {"phone": "+15550100"}, space_id="spa_1")
    assert message["event"] == "Audience Exited"
    assert message["messageId"] == hashlib.sha256(b"cart_abandoners|1|u1|2|exited").hexdigest()
    assert message["properties"]["cart_abandoners"] is False
    assert message["properties"]["audience_name"] == "cart_abandoners"  # name defaults to key
    assert message["properties"]["reason"] == {"trigger": "event", "messageId": "m-7"}
    assert message["context"]["traits"] == {"phone": "+15550100"}


def test_personas_name_the_space_and_a_stable_computation_id_outside_the_message_id() -> None:
    """`computation_id` is the same for every version and user of a definition, differs
    between spaces and between an audience and a trait of the same key; neither it nor
    the space enters the messageId (replays into another space give the same ids)."""
    catalog = catalog_of(audience("cart_abandoners", ABANDONED))
    v1 = run(catalog, [checkout(T0), Tick(T0 + 2 * H)])[0]
    v2 = catalog_of(audience("cart_abandoners", ABANDONED), version=2)
    later = run(v2, [checkout(T0, userId="u2"), Tick(T0 + 2 * H)], user="u2")[0]
    assert (later.audience_version, later.profile_key) == (2, "u2")
    here = [render_transition(t, {}, space_id="spa_a") for t in (v1, later)]
    there = render_transition(v1, {}, space_id="spa_b")
    assert here[0]["context"]["personas"] == here[1]["context"]["personas"]
    assert here[0]["context"]["personas"]["space_id"] == "spa_a"
    assert here[0]["context"]["personas"]["namespace"] == "spa_a"
    assert (
        there["context"]["personas"]["computation_id"]
        != here[0]["context"]["personas"]["computation_id"]
    )
    assert {k: v for k, v in there.items() if k != "context"} == {
        k: v for k, v in here[0].items() if k != "context"
    }
    assert computation_id("spa_a", "audience", "k") != computation_id(
        "spa_a", "computed_trait", "k"
    )


def test_identify_traits_take_the_latest_event_time_whatever_the_arrival_order() -> None:
    """free@10, free@20 then a late pro@15: sorted input ends `free`, and so must this
    (a repeated value still moves the trait's time)."""
    catalog = catalog_of()
    state = None
    for event in (
        identify(T0 + 10 * M, plan="free"),
        identify(T0 + 20 * M, plan="free"),
        identify(T0 + 15 * M, plan="pro", late=True),
    ):
        state = step(state, event, catalog, "u1").state
    assert state is not None
    assert state.traits["plan"] == "free"
    assert state.traits["late"] is True  # an older identify still fills what is missing
