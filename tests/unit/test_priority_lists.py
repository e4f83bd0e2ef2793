"""Priority lists (SPEC §3): validation, exclusive evaluation, ordered moves, edits
without storms, deletion, explain, preview, replay."""

from __future__ import annotations

from typing import Any

import pytest
from factories import T0, S, audience, catalog_of, feed, identify, make_event, summary

from audiences.adapters.http.api import _size, _summary
from audiences.core.definitions import (
    build_catalog,
    check_references,
    compile_definition,
    validate_definition,
)
from audiences.core.evaluator import Tick, Transition, step
from audiences.core.explain import explain
from audiences.core.preview import preview
from audiences.core.state import UserState
from audiences.errors import DefinitionError

VIP = audience("vip", {"trait": {"name": "plan", "op": "eq", "value": "pro"}})
ACTIVE = audience("active", {"performed": {"event": "Login"}})
RECENT = audience("recent", {"performed": {"event": "Order Completed", "within": "10s"}})
SHOPPER = audience("shopper", {"performed": {"event": "Product Viewed"}})


def plist(*keys: str, key: str = "winback_priority", **fields: Any) -> dict[str, Any]:
    return {"key": key, "kind": "priority_list", "audiences": list(keys), **fields}


def login(ts: int, user: str = "u1") -> Any:
    return make_event(ts=ts, event="Login", userId=user)


def error_of(doc: Any, existing: dict[str, Any] | None = None) -> DefinitionError:
    with pytest.raises(DefinitionError) as info:
        checked = validate_definition(doc)
        check_references(checked, existing or {})
    return info.value


# -- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("doc", "path", "says"),
    [
        (plist(), "$.audiences", "non-empty list"),
        ({"key": "p", "kind": "priority_list"}, "$.audiences", "non-empty list"),
        (plist("vip", "vip"), "$.audiences[1]", "listed twice"),
        (plist("vip", "Not-A-Key"), "$.audiences[1]", "audience key"),
        (plist("vip", 3), "$.audiences[1]", "audience key"),
        (plist("vip", key="vip"), "$.audiences[0]", "cannot list itself"),
        (plist(*[f"a{n}" for n in range(65)]), "$.audiences", "at most 64"),
        ({**plist("vip"), "condition": {"in_audience": "vip"}}, "$.condition", "unknown field"),
    ],
)
def test_shape_errors_name_the_json_path(doc: Any, path: str, says: str) -> None:
    error = error_of(doc)
    assert error.path == path
    assert says in str(error)


def test_misspelled_field_is_suggested() -> None:
    error = error_of({**plist("vip"), "audiencs": ["vip"]})
    assert (error.path, error.suggestion) == ("$.audiencs", "audiences")


def test_unknown_audience_is_rejected_with_a_suggestion() -> None:
    error = error_of(plist("vip", "actve"), {"vip": VIP, "active": ACTIVE})
    assert (error.path, error.suggestion) == ("$.audiences[1]", "active")
    assert "unknown audience 'actve'" in str(error)


def test_a_computed_trait_cannot_be_listed() -> None:
    trait = {"key": "orders", "kind": "count", "event": "Order Completed"}
    error = error_of(plist("vip", "orders"), {"vip": VIP, "orders": trait})
    assert error.path == "$.audiences[1]"
    assert "not an audience" in str(error)


def test_an_audience_is_in_at_most_one_list() -> None:
    existing = {"vip": VIP, "active": ACTIVE, "first": plist("active", key="first")}
    error = error_of(plist("vip", "active"), existing)
    assert error.path == "$.audiences[1]"
    assert "already in priority list 'first'" in str(error)
    # the same list edited is no conflict with itself
    check_references(validate_definition(plist("vip", "active", key="first")), existing)


def test_a_cycle_with_in_audience_is_rejected_both_ways() -> None:
    upper = audience("upper", {"in_audience": "lower"})
    lower = audience("lower", {"performed": {"event": "Login"}})
    # the list makes `lower` depend on `upper`, which refers to `lower`
    error = error_of(plist("upper", "lower"), {"upper": upper, "lower": lower})
    assert error.path == "$.audiences"
    assert "cycle" in str(error)
    # and an audience edit closing the same cycle through an existing list
    existing = {"lower": lower, "upper": VIP | {"key": "upper"}, "p": plist("upper", "lower")}
    error = error_of(upper, existing)
    assert error.path == "$.condition"
    assert "cycle" in str(error)
    # the other way round is fine: the lower audience may refer to the higher one
    fine = audience("lower", {"not": {"in_audience": "upper"}})
    check_references(validate_definition(fine), existing)


def test_in_audience_of_a_list_key_is_rejected() -> None:
    existing = {"vip": VIP, "p": plist("vip", key="p")}
    error = error_of(audience("x", {"in_audience": "p"}), existing)
    assert error.path == "$.condition"
    assert "priority list 'p'" in str(error)


def test_keys_are_not_shared_between_lists_and_audiences() -> None:
    error = error_of(plist("active", key="vip"), {"vip": VIP, "active": ACTIVE})
    assert error.path == "$.key"
    assert "already an audience" in str(error)
    error = error_of(VIP, {"vip": plist("active", key="vip"), "active": ACTIVE})
    assert "already a priority list" in str(error)


def test_compile_definition_accepts_a_list() -> None:
    definitions = {"vip": (VIP, 1), "active": (ACTIVE, 1)}
    catalog = compile_definition(validate_definition(plist("vip", "active")), definitions)
    assert catalog.priority_lists == {"winback_priority": ("vip", "active")}
    assert catalog.priority_of == {"vip": "winback_priority", "active": "winback_priority"}


# -- evaluation ---------------------------------------------------------------------------


def test_a_profile_qualifying_for_both_is_only_in_the_first() -> None:
    catalog = catalog_of(VIP, ACTIVE, plist("vip", "active"))
    _, out = feed(catalog, [login(T0), identify(T0 + S, plan="pro")])
    assert summary(out) == [
        ("active", "entered", T0),
        ("active", "exited", T0 + S),
        ("vip", "entered", T0 + S),
    ]


def test_when_the_first_lets_go_exit_comes_before_enter() -> None:
    catalog = catalog_of(VIP, ACTIVE, plist("vip", "active"))
    state, out = feed(catalog, [identify(T0, plan="pro"), login(T0 + S)])
    assert summary(out) == [("vip", "entered", T0)]  # never in `active` meanwhile
    _, out = feed(catalog, [identify(T0 + 2 * S, plan="free")], state=state)
    assert summary(out) == [("vip", "exited", T0 + 2 * S), ("active", "entered", T0 + 2 * S)]
    exited, entered = out
    assert isinstance(exited, Transition) and isinstance(entered, Transition)
    assert exited.trigger == entered.trigger == "event"


def test_a_move_at_a_deadline_is_in_order() -> None:
    catalog = catalog_of(RECENT, SHOPPER, plist("recent", "shopper"))
    view = make_event(ts=T0, event="Product Viewed")
    order = make_event(ts=T0 + S, event="Order Completed")
    state, out = feed(catalog, [view, order])
    assert summary(out) == [
        ("shopper", "entered", T0),
        ("shopper", "exited", T0 + S),
        ("recent", "entered", T0 + S),
    ]
    assert state is not None and state.wake_ms == T0 + 11 * S
    _, out = feed(catalog, [Tick(T0 + 11 * S)], state=state)
    assert summary(out) == [("recent", "exited", T0 + 11 * S), ("shopper", "entered", T0 + 11 * S)]
    assert all(isinstance(t, Transition) and t.trigger == "deadline" for t in out)


def test_three_levels_skip_to_the_next_one_qualified_for() -> None:
    catalog = catalog_of(VIP, ACTIVE, SHOPPER, plist("vip", "active", "shopper"))
    view = make_event(ts=T0 + S, event="Product Viewed")
    state, out = feed(catalog, [identify(T0, plan="pro"), view])
    assert summary(out) == [("vip", "entered", T0)]
    _, out = feed(catalog, [identify(T0 + 2 * S, plan="free")], state=state)
    assert summary(out) == [("vip", "exited", T0 + 2 * S), ("shopper", "entered", T0 + 2 * S)]


def test_in_audience_of_a_listed_audience_is_the_exclusive_membership() -> None:
    watch = audience("watch", {"in_audience": "active"})
    catalog = catalog_of(VIP, ACTIVE, watch, plist("vip", "active"))
    state, out = feed(catalog, [login(T0)])
    assert ("watch", "entered", T0) in summary(out)
    _, out = feed(catalog, [identify(T0 + S, plan="pro")], state=state)
    assert ("watch", "exited", T0 + S) in summary(out)


def test_audiences_outside_lists_are_untouched() -> None:
    catalog = catalog_of(VIP, ACTIVE)
    assert catalog.exclusive_mask == 0 and catalog.priority_lists == {}
    _, out = feed(catalog, [login(T0), identify(T0 + S, plan="pro")])
    assert summary(out) == [("active", "entered", T0), ("vip", "entered", T0 + S)]


def test_replay_gives_the_same_message_ids() -> None:
    catalog = catalog_of(VIP, ACTIVE, plist("vip", "active"))
    log = [login(T0), identify(T0 + S, plan="pro"), identify(T0 + 2 * S, plan="free")]
    first = [t.message_id for t in feed(catalog, log)[1] if isinstance(t, Transition)]
    again = catalog_of(VIP, ACTIVE, plist("vip", "active"))
    second = [t.message_id for t in feed(again, log)[1] if isinstance(t, Transition)]
    assert first == second and len(first) == 5
    assert len(set(first)) == 5


# -- edits and deletion --------------------------------------------------------------------


def profiles(catalog: Any) -> dict[str, UserState]:
    """u_both qualifies for vip and active, u_vip for vip only, u_active for active only."""
    states: dict[str, UserState] = {}
    for user, items in {
        "u_both": [login(T0, "u_both"), identify(T0, "u_both", plan="pro")],
        "u_vip": [identify(T0, "u_vip", plan="pro")],
        "u_active": [login(T0, "u_active")],
    }.items():
        state, _ = feed(catalog, items, user=user)
        assert state is not None
        states[user] = state
    return states


def adopt(states: dict[str, UserState], catalog: Any) -> list[tuple[str, str, str]]:
    moves = []
    for user, state in states.items():
        result = step(state, Tick(state.clock_ms), catalog, user)
        states[user] = result.state
        moves += [(user, key, how) for key, how, _ in summary(result.transitions)]
    return moves


def members(states: dict[str, UserState]) -> dict[str, list[str]]:
    return {u: sorted(k for k, m in s.members.items() if m.member) for u, s in states.items()}


def test_reordering_moves_only_profiles_whose_audience_changes() -> None:
    states = profiles(catalog_of(VIP, ACTIVE, plist("vip", "active")))
    assert members(states) == {"u_both": ["vip"], "u_vip": ["vip"], "u_active": ["active"]}
    moves = adopt(states, catalog_of(VIP, ACTIVE, plist("active", "vip"), version=2))
    assert moves == [("u_both", "vip", "exited"), ("u_both", "active", "entered")]
    # adopting the same catalog again changes nothing
    assert adopt(states, catalog_of(VIP, ACTIVE, plist("active", "vip"), version=2)) == []


def test_adding_and_removing_a_listed_audience() -> None:
    states = profiles(catalog_of(VIP, ACTIVE, plist("vip")))
    assert members(states)["u_both"] == ["active", "vip"]  # `active` not listed yet
    moves = adopt(states, catalog_of(VIP, ACTIVE, plist("vip", "active"), version=2))
    assert moves == [("u_both", "active", "exited")]
    moves = adopt(states, catalog_of(VIP, ACTIVE, plist("active"), version=3))
    # `vip` left the list: both are non-exclusive again, u_both keeps vip, enters active
    assert moves == [("u_both", "active", "entered")]
    assert members(states)["u_both"] == ["active", "vip"]


def test_deleting_the_list_makes_its_audiences_non_exclusive() -> None:
    states = profiles(catalog_of(VIP, ACTIVE, plist("vip", "active")))
    moves = adopt(states, catalog_of(VIP, ACTIVE, version=2))
    assert moves == [("u_both", "active", "entered")]
    assert members(states)["u_both"] == ["active", "vip"]


def test_a_listed_audience_deleted_leaves_the_rest_of_the_list() -> None:
    definitions = {
        "active": (validate_definition(ACTIVE), 1),
        "shopper": (validate_definition(SHOPPER), 1),
        "p": (validate_definition(plist("vip", "active", "shopper", key="p")), 1),
    }
    catalog = build_catalog(definitions, retired={"vip": (1, "vip")})
    assert catalog.priority_lists == {"p": ("active", "shopper")}
    assert "p" not in catalog.skipped


# -- explain, preview, API summary ---------------------------------------------------------


def test_explain_shows_the_own_value_and_who_took_the_profile() -> None:
    catalog = catalog_of(VIP, ACTIVE, plist("vip", "active"))
    state, _ = feed(catalog, [login(T0), identify(T0 + S, plan="pro")])
    assert state is not None
    why = explain(state, catalog, "active", T0 + 2 * S)
    assert (why["member"], why["value"]) == (False, False)
    node = why["condition"]
    assert node["condition"] == "priority_list"
    assert node["taken_by"] == "vip"
    assert node["definition"] == {"priority_list": "winback_priority", "higher": ["vip"]}
    assert (node["own"]["condition"], node["own"]["value"]) == ("performed", True)
    top = explain(state, catalog, "vip", T0 + 2 * S)
    assert (top["value"], top["condition"]["taken_by"]) == (True, None)


def test_preview_of_a_list_and_of_a_listed_audience() -> None:
    docs = {"vip": validate_definition(VIP), "active": validate_definition(ACTIVE)}
    definitions = {k: (d, 1) for k, d in docs.items()}
    states = profiles(build_catalog(definitions))  # no list yet: u_both in both
    report = preview(validate_definition(plist("vip", "active")), definitions, states.items())
    assert (report.size, report.entering, report.exiting) == (3, 0, 1)
    assert report.would_exit == ["u_both"]
    # with the list applied, a listed audience previews exclusively
    definitions["winback_priority"] = (validate_definition(plist("vip", "active")), 1)
    states = profiles(build_catalog(definitions))
    edited = audience("active", {"any": [{"performed": {"event": "Login"}}, VIP["condition"]]})
    report = preview(validate_definition(edited), definitions, states.items())
    assert (report.size, report.entering, report.exiting) == (1, 0, 0)  # u_vip stays in vip
    assert report.sample == ["u_active"]


def test_api_lists_a_priority_list_with_its_audiences_and_union_size() -> None:
    doc = plist("vip", "active")
    sizes = {"vip": 2, "active": 1, "other": 5}
    summary_ = _summary(doc, 3, sizes)
    assert summary_["kind"] == "priority_list"
    assert summary_["audiences"] == ["vip", "active"]
    assert summary_["size"] == 3
    assert _size(VIP, sizes) == 2
    assert _size(doc, None) is None


# -- backfill ------------------------------------------------------------------------------


def test_a_pending_backfill_freezes_the_whole_list() -> None:
    old = catalog_of(VIP, ACTIVE, SHOPPER)
    full = catalog_of(VIP, ACTIVE, SHOPPER, RECENT, plist("vip", "recent", "active"))
    pending = frozenset(full.trackers) - frozenset(old.trackers)  # `recent`'s window
    frozen = full.with_pending(pending)
    # `vip` has nothing pending, but judged alone it could hold a profile `recent` holds
    assert frozen.frozen_audiences == {"vip", "recent", "active"}
    assert "shopper" not in frozen.frozen_audiences
    assert catalog_of(VIP, ACTIVE, SHOPPER, RECENT).with_pending(pending).frozen_audiences == {
        "recent"
    }


# -- the definition schema -----------------------------------------------------------------


def test_the_definition_schema_knows_priority_lists() -> None:
    from test_schemas import errors

    assert errors("definition.json", plist("vip", "active")) == []
    assert errors("definition.json", plist("vip", "active", name="Win-back", version=2)) == []
    for bad in (
        plist(),
        plist("vip", "vip"),
        plist("Vip"),
        {**plist("vip"), "condition": {"in_audience": "vip"}},
        {"key": "p", "kind": "priority_list"},
    ):
        assert errors("definition.json", bad), bad
