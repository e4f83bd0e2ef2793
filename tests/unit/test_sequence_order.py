"""Funnels by event time (SPEC §11): events arriving out of order within a funnel's
horizon give the memberships of sorted input; late events take their place, a late
follow-up cancels a pending enter or makes a member exit (at processing time, with
the event's time in `effective_at`); merged profiles' funnels combine by event time."""

from __future__ import annotations

from typing import Any

from factories import T0, Cluster, D, H, M, S, audience, catalog_of, event_dict, feed, run, summary

from audiences.core.definitions.conditions import (
    MAX_SEQUENCE_HISTORY,
    SequenceTracker,
)
from audiences.core.evaluator import Tick, Transition
from audiences.core.events import Event, parse_event
from audiences.core.state import NEVER, UserState

ABANDONERS = audience(
    "cart_abandoners",
    {
        "sequence": {
            "steps": [{"event": "Checkout Started"}],
            "then_not": {"event": "Order Completed", "within": "2h"},
            "match_on": "properties.cart_id",
            "active_for": "7d",
        }
    },
)
FUNNEL = audience(
    "funnel",
    {
        "sequence": {
            "steps": [
                {"event": "Product Viewed"},
                {"event": "Product Added", "within": "1h"},
                {"event": "Checkout Started", "within": "30m"},
            ],
            "active_for": "1d",
        }
    },
)


def track(ts: int, name: str, cart: str = "A", user: str | None = "u1", **fields: Any) -> Event:
    raw = event_dict(ts=ts, event=name, properties={"cart_id": cart}, userId=user, **fields)
    return parse_event(raw, T0)


def checkout(ts: int, cart: str = "A") -> Event:
    return track(ts, "Checkout Started", cart)


def order(ts: int, cart: str = "A") -> Event:
    return track(ts, "Order Completed", cart)


def transitions(outputs: list[Any]) -> list[Transition]:
    return [t for t in outputs if isinstance(t, Transition)]


def test_an_order_arriving_before_its_checkout_keeps_the_buyer_out() -> None:
    """The issue's cart: the checkout (10:00) arrives after the order (10:20) of the same
    cart. No enter — as for sorted input — while a cart without an order enters at 2 h."""
    catalog = catalog_of(ABANDONERS)
    late = run(catalog, [order(T0 + 20 * M), checkout(T0), Tick(T0 + 3 * H)])
    in_order = run(catalog, [checkout(T0), order(T0 + 20 * M), Tick(T0 + 3 * H)])
    assert summary(late) == summary(in_order) == []
    other_cart = run(catalog, [order(T0 + 20 * M), checkout(T0, "B"), Tick(T0 + 3 * H)])
    assert summary(other_cart) == [("cart_abandoners", "entered", T0 + 2 * H)]


def test_an_order_arriving_late_cancels_the_pending_enter() -> None:
    catalog = catalog_of(ABANDONERS)
    state, outputs = feed(catalog, [checkout(T0), track(T0 + 30 * M, "Other")])
    assert state is not None and state.wake_ms == T0 + 2 * H  # the enter is pending
    # an order of 10:10 arriving at (the profile's clock) 10:50, before the deadline
    state, outputs = feed(catalog, [track(T0 + 50 * M, "Other"), order(T0 + 10 * M)], state=state)
    assert state is not None and state.wake_ms == NEVER  # nothing pending any more
    _, outputs = feed(catalog, [Tick(T0 + 3 * H)], state=state)
    assert summary(outputs) == []


def test_a_late_follow_up_makes_a_member_exit_at_processing_time() -> None:
    """The deadline fired at the then-current clock (entered at 2 h); the order of 1 h
    arrives at 2 h 30: the member exits then, with the order's time as `effective_at`."""
    catalog = catalog_of(ABANDONERS)
    items = [checkout(T0), Tick(T0 + 2 * H), track(T0 + 150 * M, "Other"), order(T0 + H)]
    outputs = transitions(run(catalog, items))
    assert summary(outputs) == [
        ("cart_abandoners", "entered", T0 + 2 * H),
        ("cart_abandoners", "exited", T0 + 150 * M),
    ]
    assert outputs[1].effective_at_ms == T0 + H
    assert outputs[1].trigger == "event"


VIEWED_NOT_BOUGHT = audience(
    "viewed_not_bought",
    {
        "sequence": {
            "steps": [{"event": "Product Viewed"}, {"event": "Checkout Started", "within": "1h"}],
            "then_not": {"event": "Order Completed", "within": "30m"},
            "active_for": "1d",
        }
    },
)


def test_a_late_follow_up_makes_a_member_exit_after_a_late_first_step() -> None:
    """Viewed 0, checkout 10 m: a member at 40 m. A view of 5 m arriving late does not
    change that (in event time it only restarts the funnel before the checkout; by
    arrival it broke the funnel); the order of 20 m arriving after it does: exit then."""
    catalog = catalog_of(VIEWED_NOT_BOUGHT)
    items = [
        track(T0, "Product Viewed"),
        track(T0 + 10 * M, "Checkout Started"),
        Tick(T0 + 40 * M),
        track(T0 + 50 * M, "Other"),
        track(T0 + 5 * M, "Product Viewed"),
        track(T0 + 20 * M, "Order Completed"),
    ]
    outputs = transitions(run(catalog, items))
    assert summary(outputs) == [
        ("viewed_not_bought", "entered", T0 + 40 * M),
        ("viewed_not_bought", "exited", T0 + 50 * M),
    ]
    assert outputs[1].effective_at_ms == T0 + 20 * M  # (the order's doing, not the view's)
    assert outputs[1].trigger_message_id == items[-1].message_id


def test_a_late_step_completes_the_funnel() -> None:
    """Viewed at 0, Checkout Started at 40 m, then Product Added of 20 m arrives: in event
    time the three steps are in order and within their windows: the funnel completes
    when the late step arrives (and ends a day after its last step)."""
    catalog = catalog_of(FUNNEL)
    items = [
        track(T0, "Product Viewed"),
        track(T0 + 40 * M, "Checkout Started"),
        track(T0 + 20 * M, "Product Added"),
        Tick(T0 + 2 * D),
    ]
    outputs = transitions(run(catalog, items))
    assert summary(outputs) == [
        ("funnel", "entered", T0 + 40 * M),
        ("funnel", "exited", T0 + 40 * M + D),
    ]
    assert outputs[0].effective_at_ms == T0 + 20 * M
    # a late step outside its window does not complete it (added at 5 m: 35 m > 30 m)
    too_early = [track(T0, "Product Viewed"), track(T0 + 40 * M, "Checkout Started")]
    assert run(catalog, [*too_early, track(T0 + 5 * M, "Product Added")]) == []


def test_arrival_order_gives_the_same_transitions_and_message_ids() -> None:
    """Determinism: the same log twice gives the same transitions (and messageIds)."""
    catalog = catalog_of(ABANDONERS, FUNNEL)
    log = [
        order(T0 + 20 * M),
        checkout(T0 + 5 * M, "B"),
        checkout(T0),
        track(T0 + 3 * M, "Product Viewed"),
        Tick(T0 + 3 * H),
        order(T0 + 2 * H, "B"),
    ]
    first, second = transitions(run(catalog, log)), transitions(run(catalog, log))
    assert [t.message_id for t in first] == [t.message_id for t in second]
    # (the tick delivers B's deadline at 2 h 05, which is the clock the late order meets)
    assert summary(first) == [
        ("cart_abandoners", "entered", T0 + 125 * M),
        ("cart_abandoners", "exited", T0 + 125 * M),
    ]
    assert first[1].effective_at_ms == T0 + 2 * H


def test_merged_funnels_combine_by_event_time() -> None:
    """An anonymous visitor starts checkout of carts A and B; the user (before they are
    linked) orders cart A. After the link the user's funnels are the events of both
    profiles in event-time order: cart A was ordered (nobody enters for it), cart B was
    not (the user enters at its 2 h deadline)."""
    cluster = Cluster(catalog_of(ABANDONERS))
    anonymous = {"userId": None, "anonymousId": "a1"}
    cluster.send(
        event_dict(ts=T0, event="Checkout Started", properties={"cart_id": "A"}, **anonymous)
    )
    cluster.send(event_dict(ts=T0 + 30 * M, event="Order Completed", properties={"cart_id": "A"}))
    cluster.send(
        event_dict(
            ts=T0 + 40 * M, event="Checkout Started", properties={"cart_id": "B"}, **anonymous
        )
    )
    cluster.send(
        event_dict(ts=T0 + 50 * M, type="identify", event=None, anonymousId="a1", traits={})
    )
    cluster.tick_until(T0 + 4 * H)
    changes = [
        (key, t.audience_key, t.entered, t.at_ms)
        for key, t in cluster.outputs
        if isinstance(t, Transition)
    ]
    assert changes == [("u1", "cart_abandoners", True, T0 + 160 * M)]


def test_merge_of_funnel_entries_replays_both_histories() -> None:
    """The tracker's merge: events kept by both profiles for the same match value, in
    event-time order, on the base of the one that folded more recent events."""
    tracker = SequenceTracker(ABANDONERS["condition"]["sequence"])
    mine, theirs = UserState(), UserState()
    tracker.update(mine, order(T0 + 20 * M), T0 + 20 * M)
    tracker.update(theirs, checkout(T0), T0)
    merged = tracker.merge(mine.trackers[tracker.id], theirs.trackers[tracker.id], T0 + H, mine)
    assert merged["A"][:4] == [1, T0, T0, T0 + 20 * M]  # the checkout, then its order
    both = tracker.merge(theirs.trackers[tracker.id], mine.trackers[tracker.id], T0 + H, mine)
    assert both["A"][:4] == merged["A"][:4]


def test_a_funnel_keeps_a_bounded_history_and_counts_what_it_folds_early() -> None:
    """At most MAX_SEQUENCE_HISTORY events per match value are kept to reorder late
    arrivals; older ones are folded in (counted as `sequence_history`); an event
    arriving later that is older than them is ignored."""
    catalog = catalog_of(ABANDONERS)
    extra = 4
    checkouts = [checkout(T0 + i * M) for i in range(MAX_SEQUENCE_HISTORY + extra)]
    state, _ = feed(catalog, checkouts)
    assert state is not None
    assert state.dropped is not None and state.dropped["sequence_history"] == extra
    ((entry,),) = [list(data.values()) for data in state.trackers.values()]
    assert len(entry) == 9 + 2 * MAX_SEQUENCE_HISTORY
    # an order older than the folded checkouts is ignored (no longer reorderable) ...
    state, _ = feed(catalog, [order(T0 + M + 30 * 1000)], state=state)
    assert (
        state is not None and state.wake_ms == T0 + (MAX_SEQUENCE_HISTORY + extra - 1) * M + 2 * H
    )
    # ... one after them still cancels the pending enter of the latest checkout
    state, outputs = feed(catalog, [order(T0 + 30 * M), Tick(T0 + 7 * D)], state=state)
    assert summary(outputs) == []


def test_funnel_state_of_the_former_layout_is_migrated() -> None:
    """State written before funnels went by event time (`[steps_done, last, t0, follow]`
    per match value, same tracker id): a member stays a member, and the funnel goes on
    from there (events older than its newest one are ignored)."""
    catalog = catalog_of(ABANDONERS)
    state, outputs = feed(catalog, [checkout(T0), Tick(T0 + 2 * H)])
    assert state is not None and summary(outputs) == [("cart_abandoners", "entered", T0 + 2 * H)]
    (tracker_id,) = state.trackers
    state.trackers[tracker_id] = {"A": [1, T0, T0, -1]}  # as the former tracker wrote it
    state = UserState.decode(state.encode())
    _, outputs = feed(catalog, [order(T0 - M), track(T0 + 3 * H, "Other", "B")], state=state)
    assert summary(outputs) == []  # (the old order is ignored: still a member)
    state = UserState.decode(state.encode())
    state.trackers[tracker_id] = {"A": [1, T0, T0, -1]}
    _, outputs = feed(catalog, [order(T0 + 3 * H)], state=state)
    assert summary(outputs) == [("cart_abandoners", "exited", T0 + 3 * H)]


def test_an_attempt_past_active_for_takes_no_follow_up() -> None:
    """Once `active_for` has passed, the attempt is over: an event that matches both the
    first step and the follow-up starts a new attempt instead of being taken as the old
    one's follow-up (before funnels went by event time this depended on whether some
    other event had reached the tracker in between)."""
    catalog = catalog_of(
        audience(
            "quiet",
            {
                "sequence": {
                    "steps": [{"event": "Ping"}],
                    "then_not": {"event": "Ping", "within": "10s"},
                    "active_for": "30s",
                }
            },
        )
    )
    items = [track(T0, "Ping"), track(T0 + 42 * S, "Ping"), Tick(T0 + 2 * M)]
    assert summary(run(catalog, items)) == [
        ("quiet", "entered", T0 + 10 * S),
        ("quiet", "exited", T0 + 30 * S),
        ("quiet", "entered", T0 + 52 * S),
        ("quiet", "exited", T0 + 72 * S),
    ]
