"""explain(): the condition tree with values from the engine's own nodes."""

from __future__ import annotations

import pytest
from factories import T0, H, M, S, audience, catalog_of, feed, identify, iso, make_event

from audiences.core.explain import explain

CART = audience(
    "cart_abandoners",
    {
        "sequence": {
            "steps": [{"event": "Checkout Started"}],
            "then_not": {"event": "Order Completed", "within": "2h"},
            "match_on": "properties.cart_id",
        }
    },
)
VIP = audience(
    "vip",
    {
        "all": [
            {"trait": {"name": "plan", "op": "eq", "value": "pro"}},
            {"performed": {"event": "Order Completed", "times": {"gte": 2}, "within": "7d"}},
            {"not": {"in_audience": "cart_abandoners"}},
        ]
    },
)


def test_explains_a_member_with_the_events_and_traits_that_decided() -> None:
    catalog = catalog_of(CART, VIP)
    orders = [
        make_event(ts=T0 + n * H, event="Order Completed", properties={"cart_id": f"c{n}"})
        for n in (1, 2)
    ]
    state, _ = feed(catalog, [identify(T0, plan="pro"), *orders])
    assert state is not None
    why = explain(state, catalog, "vip", T0 + 3 * H)
    assert (why["member"], why["value"], why["version"]) == (True, True, 1)
    assert why["member_since"] == iso(T0 + 2 * H)
    trait, performed, negated = why["condition"]["children"]
    assert (trait["condition"], trait["value"], trait["actual"]) == ("trait", True, "pro")
    assert trait["set_at"] == iso(T0)
    assert performed["count"] == 2
    assert performed["event_times"] == [iso(T0 + H), iso(T0 + 2 * H)]
    # the 7-day window: true until the first order is 7 days old
    assert performed["changes_at"] == iso(T0 + H + 7 * 24 * H)
    assert (negated["condition"], negated["value"]) == ("not", True)
    assert negated["children"][0]["value"] is False


def test_explains_a_pending_funnel_and_its_deadline() -> None:
    catalog = catalog_of(CART)
    checkout = make_event(ts=T0, event="Checkout Started", properties={"cart_id": "c9"})
    state, _ = feed(catalog, [checkout])
    assert state is not None
    why = explain(state, catalog, "cart_abandoners", T0 + 10 * M)
    assert (why["member"], why["value"]) == (False, False)
    assert why["next_check"] == iso(T0 + 2 * H)
    (instance,) = why["condition"]["instances"]
    assert instance["match"] == "c9" and instance["steps_done"] == "1/1"
    assert instance["completed"] == iso(T0) and instance["follow_up_ms"] is None
    assert why["condition"]["changes_at"] == iso(T0 + 2 * H)


def test_explaining_changes_nothing_and_unknown_audiences_raise() -> None:
    catalog = catalog_of(CART)
    state, _ = feed(catalog, [make_event(ts=T0 + S, event="Checkout Started")])
    assert state is not None
    before = state.encode()
    explain(state, catalog, "cart_abandoners", T0 + 5 * H)
    assert state.encode() == before
    with pytest.raises(KeyError):
        explain(state, catalog, "nope", T0)
