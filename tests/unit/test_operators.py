"""Operators of the definition language (SPEC §3): values, type mismatches, edges."""

from __future__ import annotations

from typing import Any

import pytest
from factories import T0, H, iso

from audiences.core.operators import (
    OPERATORS,
    compile_predicate,
    predicate_change_ms,
    wildcard_regex,
)

MISSING = None


def holds(op: str, expected: Any, actual: Any, now: int = T0) -> bool:
    return compile_predicate(op, expected)(actual, now)


@pytest.mark.parametrize(
    ("op", "expected", "actual", "result"),
    [
        ("eq", "pro", "pro", True),
        ("eq", "pro", "free", False),
        ("eq", 1, 1.0, True),
        ("eq", [1, 2], [1, 2], True),
        ("neq", "pro", "free", True),
        ("neq", "pro", "pro", False),
        ("gt", 10, 11, True),
        ("gt", 10, 10, False),
        ("gte", 10, 10, True),
        ("gte", 10, 9.5, False),
        ("lt", 10, 9, True),
        ("lt", 10, 10, False),
        ("lte", 10, 10, True),
        ("lte", 10, 10.01, False),
        ("gt", "b", "c", True),  # strings compare lexicographically
        ("in", ["a", "b"], "b", True),
        ("in", ["a", "b"], "c", False),
        ("not_in", ["a", "b"], "c", True),
        ("not_in", ["a", "b"], "a", False),
        ("contains", "gmail", "bob@gmail.com", True),
        ("contains", "gmail", "bob@yahoo.com", False),
        ("contains", "vip", ["new", "vip"], True),  # list membership
        ("contains", "vi*", ["vip"], False),  # no wildcards on list items
        ("not_contains", "gmail", "bob@yahoo.com", True),
        ("not_contains", "gmail", "bob@gmail.com", False),
        ("not_contains", "vip", ["new"], True),
        ("starts_with", "/checkout", "/checkout/step-1", True),
        ("starts_with", "/checkout", "/cart", False),
        ("starts_with", "/check*", "/checkout", False),  # literal, no wildcard
        ("ends_with", ".com", "bob@gmail.com", True),
        ("ends_with", ".com", "bob@gmail.de", False),
        ("matches", r"^\d{3}-\d{4}$", "555-1234", True),
        ("matches", r"^\d{3}-\d{4}$", "5551234", False),
        ("matches", r"\d", "order 7", True),  # search, not fullmatch
        ("exists", None, "", True),
        ("exists", None, 0, True),
        ("exists", None, False, True),
        ("not_exists", None, 0, False),
        ("before", "2024-01-01T00:00:00Z", "2023-12-31T23:59:59.999Z", True),
        ("before", "2024-01-01T00:00:00Z", "2024-01-01T00:00:00.000Z", False),
        ("after", "2024-01-01T00:00:00Z", "2024-01-01T00:00:00.001Z", True),
        ("after", "2024-01-01T00:00:00Z", "2024-01-01T00:00:00.000Z", False),
        ("after", "2024-01-01", "2024-01-01T00:00:00.001Z", True),
        ("before", "2024-01-01T00:00:00Z", "not a date", False),
    ],
)
def test_operator(op: str, expected: Any, actual: Any, result: bool) -> None:
    assert holds(op, expected, actual) is result


@pytest.mark.parametrize(
    ("pattern", "text", "result"),
    [
        ("gmail|hotmail", "x@hotmail.com", True),
        ("gmail|hotmail", "x@yahoo.com", False),
        ("*@gmail.com", "x@gmail.com", True),
        ("a*c", "ac", True),  # * may be empty
        ("a+c", "ac", False),  # + needs one or more
        ("a+c", "abbc", True),
        ("/products/*/reviews", "https://shop/products/42/reviews?x=1", True),
        ("/products/+/reviews", "https://shop/products//reviews", False),
        ("a.b", "axb", False),  # other characters are literal
        ("(1)", "call (1)", True),
        ("A", "a", False),  # case-sensitive
    ],
)
def test_wildcard_contains(pattern: str, text: str, result: bool) -> None:
    assert holds("contains", pattern, text) is result
    assert holds("not_contains", pattern, text) is (not result)


def test_wildcard_regex_anchored_for_url_patterns() -> None:
    regex = wildcard_regex("https://shop/*|https://m.shop/+", anchored=True)
    assert regex.match("https://shop/")
    assert regex.match("https://m.shop/cart")
    assert not regex.match("https://m.shop/")
    assert not regex.match("see https://shop/")
    assert regex.match("https://shop/a\nb")  # * spans newlines


@pytest.mark.parametrize(
    ("op", "expected", "actual"),
    [
        ("eq", 1, "1"),
        ("eq", "1", 1),
        ("eq", True, 1),
        ("eq", 1, True),
        ("eq", 0, False),
        ("neq", 1, "2"),  # a mismatch is false for neq too, not "different"
        ("gt", 1, "2"),
        ("gte", "1", 2),
        ("lt", True, 0),
        ("lte", 1, False),
        ("in", [1, 2], "1"),
        ("in", [1], True),
        ("contains", "1", 12),
        ("contains", "1", [1]),
        ("not_contains", "1", 12),
        ("starts_with", "1", 12),
        ("ends_with", "2", 12),
        ("matches", r"\d", 12),
        ("before", "2024-01-01T00:00:00Z", 1),
        ("after", "2024-01-01T00:00:00Z", 1_800_000_000_000),
        ("within_last", "1h", T0),
    ],
)
def test_type_mismatch_is_false(op: str, expected: Any, actual: Any) -> None:
    assert holds(op, expected, actual) is False


@pytest.mark.parametrize(
    ("op", "expected", "result"),
    [
        ("eq", "x", False),
        ("neq", "x", True),
        ("gt", 1, False),
        ("gte", 1, False),
        ("lt", 1, False),
        ("lte", 1, False),
        ("in", ["x"], False),
        ("not_in", ["x"], True),
        ("contains", "x", False),
        ("not_contains", "x", True),
        ("starts_with", "x", False),
        ("ends_with", "x", False),
        ("matches", "x", False),
        ("exists", None, False),
        ("not_exists", None, True),
        ("before", "2024-01-01T00:00:00Z", False),
        ("after", "2024-01-01T00:00:00Z", False),
        ("within_last", "1h", False),
        ("not_within_last", "1h", False),  # a missing date is not a date (like before/after)
    ],
)
def test_missing_value(op: str, expected: Any, result: bool) -> None:
    assert holds(op, expected, MISSING) is result


def test_every_operator_is_covered_above() -> None:
    covered = {
        "eq", "neq", "gt", "gte", "lt", "lte", "in", "not_in", "contains", "not_contains",
        "starts_with", "ends_with", "matches", "exists", "not_exists", "before", "after",
        "within_last", "not_within_last",
    }  # fmt: skip
    assert covered == set(OPERATORS)


def test_unknown_operator_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown operator"):
        compile_predicate("equals", 1)


# -- relative time: (now - D, now] ---------------------------------------------------


@pytest.mark.parametrize(
    ("now", "inside"),
    [
        (T0 - 1, False),  # not yet happened
        (T0, True),
        (T0 + H - 1, True),
        (T0 + H, False),  # exactly D later: out of the window
    ],
)
def test_within_last_edges(now: int, inside: bool) -> None:
    assert holds("within_last", "1h", iso(T0), now) is inside
    assert holds("not_within_last", "1h", iso(T0), now) is (not inside)


def test_relative_time_change_points() -> None:
    stamp = iso(T0)
    assert predicate_change_ms("within_last", "1h", stamp, T0 - 5) == T0
    assert predicate_change_ms("within_last", "1h", stamp, T0) == T0 + H
    assert predicate_change_ms("not_within_last", "1h", stamp, T0 + 5) == T0 + H
    assert predicate_change_ms("not_within_last", "1h", stamp, T0 + H) is None
    assert predicate_change_ms("within_last", "1h", None, T0) is None
    assert predicate_change_ms("eq", "x", stamp, T0) is None


@pytest.mark.parametrize(("expected", "actual"), [(None, None), ([1], ["a"]), ({"a": 1}, {"a": 2})])
def test_ordering_of_non_scalars_never_raises(expected: Any, actual: Any) -> None:
    assert holds("gt", expected, actual) is False
