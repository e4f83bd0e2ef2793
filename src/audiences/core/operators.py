"""Comparison operators of the definition language, compiled once per filter.

Every predicate takes `(actual, now_ms)` and returns a bool; type mismatches
(a number against a string, a bool against a number) are false, never errors.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from audiences.core.durations import parse_duration_ms
from audiences.core.events import parse_iso_ms
from audiences.core.state import NEVER

Predicate = Callable[[Any, int], bool]

OPERATORS = (
    "eq",
    "neq",
    "gt",
    "gte",
    "lt",
    "lte",
    "in",
    "not_in",
    "contains",
    "not_contains",
    "starts_with",
    "ends_with",
    "matches",
    "exists",
    "not_exists",
    "before",
    "after",
    "within_last",
    "not_within_last",
)
UNARY_OPERATORS = frozenset({"exists", "not_exists"})
DURATION_OPERATORS = frozenset({"within_last", "not_within_last"})


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return type(value).__name__


def _equal(actual: Any, expected: Any) -> bool:
    return _kind(actual) == _kind(expected) and actual == expected


def wildcard_regex(pattern: str, *, anchored: bool) -> re.Pattern[str]:
    """`*` = any run of characters, `+` = one or more, `|` separates alternatives."""
    alternatives = []
    for alternative in pattern.split("|"):
        parts = []
        for char in alternative:
            if char == "*":
                parts.append(".*")
            elif char == "+":
                parts.append(".+")
            else:
                parts.append(re.escape(char))
        alternatives.append("".join(parts))
    body = "(?:" + "|".join(alternatives) + ")"
    return re.compile(("^" + body + "$") if anchored else body, re.DOTALL)


def compile_predicate(op: str, expected: Any) -> Predicate:
    """A predicate for `op` against `expected` (validated by the definition compiler)."""
    if op == "eq":
        return lambda a, _now: _equal(a, expected)
    if op == "neq":
        return lambda a, _now: a is None or (_kind(a) == _kind(expected) and a != expected)
    if op in ("gt", "gte", "lt", "lte"):
        kind = _kind(expected)
        if kind not in ("number", "string"):
            return lambda _a, _now: False
        compare: Callable[[Any, Any], bool] = {
            "gt": lambda a, e: a > e,
            "gte": lambda a, e: a >= e,
            "lt": lambda a, e: a < e,
            "lte": lambda a, e: a <= e,
        }[op]
        return lambda a, _now: _kind(a) == kind and compare(a, expected)
    if op in ("in", "not_in"):
        options = list(expected)
        if all(isinstance(o, str) for o in options):
            strings = frozenset(options)  # the common case: one hash lookup

            def member(a: Any, _now: int) -> bool:
                return isinstance(a, str) and a in strings

        else:

            def member(a: Any, _now: int) -> bool:
                return any(_equal(a, o) for o in options)

        if op == "in":
            return member
        return lambda a, now: not member(a, now)
    if op in ("contains", "not_contains"):
        regex = wildcard_regex(str(expected), anchored=False)

        def contains(a: Any, _now: int) -> bool:
            if isinstance(a, str):
                return regex.search(a) is not None
            if isinstance(a, list):
                return any(_equal(item, expected) for item in a)
            return False

        if op == "contains":
            return contains
        return lambda a, now: a is None or (isinstance(a, str | list) and not contains(a, now))
    if op == "starts_with":
        return lambda a, _now: isinstance(a, str) and a.startswith(expected)
    if op == "ends_with":
        return lambda a, _now: isinstance(a, str) and a.endswith(expected)
    if op == "matches":
        regex = re.compile(expected)
        return lambda a, _now: isinstance(a, str) and regex.search(a) is not None
    if op == "exists":
        return lambda a, _now: a is not None
    if op == "not_exists":
        return lambda a, _now: a is None
    if op in ("before", "after"):
        bound = parse_iso_ms(expected)
        assert bound is not None  # validated at compile time

        def dated(a: Any, _now: int) -> bool:
            ms = parse_iso_ms(a) if isinstance(a, str) else None
            if ms is None:
                return False
            return ms < bound if op == "before" else ms > bound

        return dated
    if op in DURATION_OPERATORS:
        window = parse_duration_ms(expected)
        assert window is not None  # validated at compile time

        def recent(a: Any, now: int) -> bool:
            ms = parse_iso_ms(a) if isinstance(a, str) else None
            if ms is None:
                return False
            inside = now - window < ms <= now
            return inside if op == "within_last" else not inside

        return recent
    raise ValueError(f"unknown operator {op!r}")


def predicate_change_ms(op: str, expected: Any, actual: Any, now_ms: int) -> int | None:
    """When a relative-time predicate on `actual` next changes value with no new input
    (None: never, including a time at or beyond NEVER)."""
    if op not in DURATION_OPERATORS:
        return None
    window = parse_duration_ms(expected)
    ms = parse_iso_ms(actual) if isinstance(actual, str) else None
    if window is None or ms is None:
        return None
    for edge in (ms, ms + window):
        if edge > now_ms:
            return edge if edge < NEVER else None
    return None
