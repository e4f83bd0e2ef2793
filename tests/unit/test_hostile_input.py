"""Hostile input never crashes the core (SPEC §11): far times, huge numbers, unbounded
profiles. Every state `step` returns encodes, decodes and takes a Tick."""

from __future__ import annotations

from typing import Any

import pytest
from factories import T0, D, H, audience, catalog_of, feed, identify, iso, make_event

from audiences.core.definitions import build_catalog
from audiences.core.definitions.catalog import Catalog
from audiences.core.evaluator import Tick, step
from audiences.core.state import NEVER, UserState

FOREVER = "99999999999999w"  # ~6e22 ms: any deadline computed with it is beyond 64 bits


def roundtrip(state: UserState | None, catalog: Catalog) -> UserState:
    """The state through the codec, then a Tick far ahead: nothing may raise."""
    assert state is not None
    decoded = UserState.decode(state.encode())
    for wake in [state.wake_ms, *(m.wake_ms for m in state.members.values())]:
        assert type(wake) is int and 0 <= wake <= NEVER
    for _value, _seq, trait_wake in state.computed.values():
        assert type(trait_wake) is int and 0 <= trait_wake <= NEVER
    result = step(decoded, Tick(T0 + 400 * D), catalog, "u1")
    assert type(result.next_wake_ms) is int and 0 <= result.next_wake_ms <= NEVER
    result.state.encode()
    return decoded


def traits_catalog(*docs: dict[str, Any]) -> Catalog:
    return build_catalog({doc["key"]: (doc, 1) for doc in docs})


# -- 1. deadlines are ints in [0, NEVER] ---------------------------------------------------


@pytest.mark.parametrize("op", ["within_last", "not_within_last"])
def test_relative_time_trait_with_a_huge_window_never_wakes_past_never(op: str) -> None:
    catalog = catalog_of(
        audience("recent", {"trait": {"name": "seen_at", "op": op, "value": FOREVER}})
    )
    state, _ = feed(catalog, [identify(T0, seen_at=iso(T0 - D))])
    assert state is not None
    membership = state.members.get("recent")  # (a non-member with no deadline is not kept)
    assert bool(membership and membership.member) is (op == "within_last")
    assert state.wake_ms == NEVER
    roundtrip(state, catalog)


def test_relative_time_trait_on_the_last_representable_date() -> None:
    catalog = catalog_of(
        audience("soon", {"trait": {"name": "renews", "op": "not_within_last", "value": "1d"}})
    )
    state, _ = feed(catalog, [identify(T0, renews="9999-12-31T23:59:59.999Z")])
    assert state is not None
    assert state.wake_ms == 253_402_300_799_999  # the date itself: a real, finite deadline
    roundtrip(state, catalog)


def test_computed_trait_comparison_with_a_huge_window_never_wakes_past_never() -> None:
    last_seen = {
        "key": "last_seen",
        "kind": "last",
        "event": "Seen",
        "property": "properties.at",
    }
    recent = {
        "key": "recent",
        "condition": {"computed": {"name": "last_seen", "op": "within_last", "value": FOREVER}},
    }
    catalog = traits_catalog(last_seen, recent)
    state, _ = feed(catalog, [make_event(ts=T0, event="Seen", properties={"at": iso(T0 - H)})])
    assert state is not None
    assert state.members["recent"].member
    assert state.members["recent"].wake_ms == NEVER
    roundtrip(state, catalog)


@pytest.mark.parametrize(
    "condition",
    [
        {"performed": {"event": "Seen", "within": FOREVER}},
        {"performed": {"event": "Seen", "times": {"gte": 2}, "within": FOREVER}},
        {"performed": {"event": "Seen", "between": ["1d", FOREVER]}},
        {"sequence": {"steps": [{"event": "Seen"}], "active_for": FOREVER}},
        {
            "sequence": {
                "steps": [{"event": "Seen"}],
                "then_not": {"event": "Gone", "within": FOREVER},
            }
        },
        {"in_audience": "windowed"},
    ],
    ids=["within", "times-within", "between", "active_for", "then_not", "in_audience"],
)
def test_huge_windows_give_never_not_a_bigger_number(condition: dict[str, Any]) -> None:
    windowed = audience("windowed", {"performed": {"event": "Seen", "within": FOREVER}})
    catalog = catalog_of(windowed, audience("huge", condition))
    events = [make_event(ts=T0, event="Seen"), make_event(ts=T0 + H, event="Seen")]
    state, _ = feed(catalog, events)
    roundtrip(state, catalog)


def test_windowed_trait_with_a_huge_window_never_wakes_past_never() -> None:
    doc = {"key": "seen", "kind": "count", "event": "Seen", "within": FOREVER}
    catalog = traits_catalog(doc)
    state, outputs = feed(catalog, [make_event(ts=T0, event="Seen")])
    assert [o.value for o in outputs] == [1]
    roundtrip(state, catalog)
