"""Definition validation (SPEC §3): JSON-path errors, suggestions, references, cycles."""

from __future__ import annotations

from typing import Any

import pytest
from factories import audience, catalog_of

from audiences.core.definitions import build_catalog, check_references, validate_definition
from audiences.errors import AudiencesError, DefinitionError
from shared import SPEC_CART_ABANDONERS

CART_ABANDONERS: dict[str, Any] = SPEC_CART_ABANDONERS


def error_of(doc: Any) -> DefinitionError:
    with pytest.raises(DefinitionError) as info:
        validate_definition(doc)
    assert isinstance(info.value, AudiencesError)
    return info.value


def with_condition(condition: Any) -> dict[str, Any]:
    return audience("a", condition)


def performed(**fields: Any) -> dict[str, Any]:
    return {"performed": {"event": "Order Completed", **fields}}


def test_spec_example_is_valid() -> None:
    assert validate_definition(CART_ABANDONERS) == CART_ABANDONERS


@pytest.mark.parametrize(
    "condition",
    [
        {"all": [performed(), {"not": performed(within="30d")}]},
        {"any": [performed(times={"eq": 0}), {"in_audience": "b"}]},
        performed(times={"gte": 3}, within="1h", where=[{"property": "total", "op": "gt", "value": 10}]),
        performed(between=["7d", "30d"]),
        {"trait": {"name": "address.city", "op": "exists"}},
        {"trait": {"name": "seen", "op": "within_last", "value": "2w"}},
        {"sequence": {"steps": [{"event": "A"}, {"event": "B", "within": "1h"}], "then": {"event": "C", "within": "1d"}}},
    ],
)  # fmt: skip
def test_valid_conditions(condition: dict[str, Any]) -> None:
    validate_definition(with_condition(condition))


# -- paths and suggestions -------------------------------------------------------------


def test_misspelled_condition_name_is_suggested() -> None:
    error = error_of(with_condition({"perfomed": {"event": "Order Completed"}}))
    assert error.path == "$.condition.perfomed"
    assert error.suggestion == "performed"
    assert "unknown condition" in error.message
    assert str(error).startswith("$.condition.perfomed: ")
    assert str(error).endswith("(did you mean 'performed'?)")


def test_misspelled_field_is_suggested() -> None:
    error = error_of(with_condition(performed(wihtin="2h")))
    assert error.path == "$.condition.performed.wihtin"
    assert error.suggestion == "within"


def test_misspelled_top_level_field_is_suggested() -> None:
    error = error_of({**CART_ABANDONERS, "include_anonymus": True})
    assert (error.path, error.suggestion) == ("$.include_anonymus", "include_anonymous")


def test_misspelled_operator_is_suggested() -> None:
    doc = with_condition(performed(where=[{"property": "x", "op": "contain", "value": "y"}]))
    error = error_of(doc)
    assert (error.path, error.suggestion) == ("$.condition.performed.where[0].op", "contains")


def test_then_not_needs_a_within() -> None:
    sequence = {"steps": [{"event": "A"}], "then_not": {"event": "B"}}
    error = error_of(with_condition({"sequence": sequence}))
    assert error.path == "$.condition.sequence.then_not.within"
    assert "within" in error.message


def test_bad_follow_up_duration_names_the_path() -> None:
    sequence = {"steps": [{"event": "A"}], "then_not": {"event": "B", "within": "2hrs"}}
    error = error_of(with_condition({"sequence": sequence}))
    assert error.path == "$.condition.sequence.then_not.within"
    assert "expected a duration like '2h'" in error.message


@pytest.mark.parametrize(
    ("condition", "path", "says"),
    [
        ({"performed": {"event": "A"}, "trait": {"name": "x", "op": "exists"}}, "$.condition", "exactly one key"),
        ({}, "$.condition", "exactly one key"),
        ("performed", "$.condition", "a JSON object"),
        (performed(within="2 hours"), "$.condition.performed.within", "duration"),
        (performed(within="0h"), "$.condition.performed.within", "duration"),
        (performed(within="2y"), "$.condition.performed.within", "duration"),
        (performed(within=7200), "$.condition.performed.within", "duration"),
        (performed(times={"gte": 1, "lte": 3}), "$.condition.performed.times", "exactly one"),
        (performed(times={"atleast": 1}), "$.condition.performed.times.atleast", "one of"),
        (performed(times={"gte": -1}), "$.condition.performed.times.gte", "non-negative"),
        (performed(times={"gte": True}), "$.condition.performed.times.gte", "non-negative"),
        (performed(times=3), "$.condition.performed.times", "a JSON object"),
        (performed(within="1d", between=["1d", "2d"]), "$.condition.performed.between", "not both"),
        (performed(between=["2d", "1d"]), "$.condition.performed.between", "D1 < D2"),
        (performed(between=["2d"]), "$.condition.performed.between", "[D1, D2]"),
        (performed(between=["1d", "1x"]), "$.condition.performed.between[1]", "duration"),
        ({"performed": {"where": []}}, "$.condition.performed.event", "non-empty string"),
        (performed(where={"property": "x"}), "$.condition.performed.where", "list of filters"),
        (performed(where=[{"op": "eq", "value": 1}]), "$.condition.performed.where[0].property", "non-empty string"),
        (performed(where=[{"property": "x", "op": "eq"}]), "$.condition.performed.where[0].value", "needs a value"),
        (performed(where=[{"property": "x", "op": "in", "value": "a"}]), "$.condition.performed.where[0].value", "array"),
        (performed(where=[{"property": "x", "op": "matches", "value": "("}]), "$.condition.performed.where[0].value", "regular expression"),
        (performed(where=[{"property": "x", "op": "before", "value": "soon"}]), "$.condition.performed.where[0].value", "ISO-8601"),
        (performed(where=[{"property": "x", "op": "within_last", "value": "a week"}]), "$.condition.performed.where[0].value", "duration"),
        ({"all": []}, "$.condition.all", "non-empty list"),
        ({"any": [performed(), {"nto": performed()}]}, "$.condition.any[1].nto", "unknown condition"),
        ({"not": {"all": [{"trait": {"name": "x"}}]}}, "$.condition.not.all[0].trait.op", "operator"),
        ({"in_audience": "Bad Key"}, "$.condition.in_audience", "audience key"),
        ({"sequence": {"steps": []}}, "$.condition.sequence.steps", "non-empty list"),
        ({"sequence": {"steps": [{"event": "A", "within": "1h", "times": 1}]}}, "$.condition.sequence.steps[0].times", "unknown field"),
        ({"sequence": {"steps": [{"event": "A"}], "then": {"event": "B", "within": "1h"}, "then_not": {"event": "C", "within": "1h"}}}, "$.condition.sequence.then_not", "not both"),
        ({"sequence": {"steps": [{"event": "A"}], "active_for": "forever"}}, "$.condition.sequence.active_for", "duration"),
        ({"sequence": {"steps": [{"event": "A"}], "match_on": ""}}, "$.condition.sequence.match_on", "non-empty string"),
    ],
)  # fmt: skip
def test_condition_errors_name_the_path(condition: Any, path: str, says: str) -> None:
    error = error_of(with_condition(condition))
    assert error.path == path
    assert says in error.message


@pytest.mark.parametrize(
    ("doc", "path"),
    [
        ([], "$"),
        ({"condition": performed()}, "$.key"),
        (audience("Cart", performed()), "$.key"),
        (audience("1cart", performed()), "$.key"),
        (audience("a" * 65, performed()), "$.key"),
        ({"key": "a"}, "$.condition"),
        (audience("a", performed(), name=3), "$.name"),
        (audience("a", performed(), include_anonymous="yes"), "$.include_anonymous"),
        (audience("a", performed(), backfill=1), "$.backfill"),
        (audience("a", performed(), version="2"), "$.version"),
    ],
)
def test_document_errors_name_the_path(doc: Any, path: str) -> None:
    assert error_of(doc).path == path


# -- references and cycles -----------------------------------------------------------


def test_unknown_in_audience_is_rejected_with_a_suggestion() -> None:
    existing = {"cart_abandoners": CART_ABANDONERS}
    doc = validate_definition(audience("vip", {"in_audience": "cart_abandoner"}))
    with pytest.raises(DefinitionError) as info:
        check_references(doc, existing)
    assert info.value.path == "$.condition"
    assert "unknown audience 'cart_abandoner'" in info.value.message
    assert info.value.suggestion == "cart_abandoners"


def test_known_reference_is_accepted() -> None:
    doc = validate_definition(audience("vip", {"not": {"in_audience": "cart_abandoners"}}))
    check_references(doc, {"cart_abandoners": CART_ABANDONERS})


def test_reference_cycle_is_rejected() -> None:
    a = audience("a", performed())
    b = audience("b", {"in_audience": "a"})
    check_references(b, {"a": a})  # a <- b is fine
    a_edited = audience("a", {"all": [performed(), {"in_audience": "b"}]})
    with pytest.raises(DefinitionError) as info:
        check_references(a_edited, {"a": a, "b": b})
    assert info.value.path == "$.condition"
    assert "cycle: a -> b -> a" in info.value.message


def test_self_reference_is_a_cycle() -> None:
    with pytest.raises(DefinitionError, match="cycle: a -> a"):
        check_references(audience("a", {"not": {"in_audience": "a"}}), {})


def test_build_catalog_skips_cyclic_audiences_instead_of_raising() -> None:
    docs = {
        "a": (audience("a", {"in_audience": "b"}), 1),
        "b": (audience("b", {"in_audience": "a"}), 1),
        "c": (audience("c", {"in_audience": "a"}), 1),
        "d": (audience("d", {"in_audience": "missing"}), 1),
        "e": (audience("e", performed()), 1),
    }
    catalog = build_catalog(docs)
    assert [a.key for a in catalog.audiences] == ["e"]
    assert catalog.skipped["a"] == "reference cycle: a -> b -> a"
    assert catalog.skipped["b"] == "reference cycle: a -> b -> a"
    assert catalog.skipped["c"] == "refers to missing audience 'a'"
    assert catalog.skipped["d"] == "refers to missing audience 'missing'"


def test_catalog_orders_dependencies_first_and_shares_trackers() -> None:
    pro = {"trait": {"name": "plan", "op": "eq", "value": "pro"}}
    catalog = catalog_of(
        audience("vip", {"all": [{"in_audience": "buyers"}, pro]}),
        audience("buyers", performed()),
        audience("big_buyers", {"all": [performed(), {"in_audience": "buyers"}]}),
    )
    order = [a.key for a in catalog.audiences]
    assert order.index("buyers") < order.index("vip")
    assert order.index("buyers") < order.index("big_buyers")
    assert len(catalog.trackers) == 1  # both `performed Order Completed` leaves share one
    assert catalog.dependents["buyers"] == frozenset({"vip", "big_buyers"})
    assert catalog.trait_audiences == frozenset({"vip"})
    assert catalog.audience("vip").name == "vip"  # type: ignore[union-attr]
