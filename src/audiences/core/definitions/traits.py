"""Computed traits: per-profile aggregates of matching events (SPEC §3).

```json
{"key": "orders_90d", "kind": "count", "event": "Order Completed", "within": "90d"}
{"key": "lifetime_value", "kind": "sum", "event": "Order Completed",
 "property": "properties.revenue"}
```

State per profile and trait (in `UserState.trackers[trait.id]`) is a list of
time buckets `[start_ms, aggregate]`:

- without `within`, one bucket that never expires: the aggregate itself, so the
  state is O(1) (count, sum, avg, min, max, first, last) or bounded by
  MAX_DISTINCT values (most_frequent, unique_list, unique_count);
- with `within D`, buckets of BUCKET_FRACTION of D (at least 1 s, at most 101
  of them). A bucket expires at `start + D`: an event leaves the window at
  most D/100 (1 s for D <= 100 s) before its exact time, never after, and the
  value changes at that moment with no new event (a deadline, like windows of
  audiences).

Values: count and unique_count are integers (0 when empty); sum is a number
(0 when empty); avg, min, max, first, last, most_frequent are None when no
event counts; unique_list is sorted (numbers, then strings). sum/avg/min/max
read numbers only; other kinds read any scalar. Events whose property is
missing or of the wrong type are not counted (count counts every matching
event).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from audiences.core.definitions.conditions import EventMatcher, Tracker, tracker_id
from audiences.core.definitions.language import NUMERIC_KINDS
from audiences.core.durations import parse_duration_ms
from audiences.core.events import Event, compile_path, parse_iso_ms
from audiences.core.state import NEVER, UserState

MAX_DISTINCT = 100  # values kept per bucket by most_frequent and unique_*
BUCKET_FRACTION = 100
FOREVER = -1  # start of the single bucket of a trait without a window


def _empty(kind: str) -> Any:
    if kind in ("count", "sum"):
        return 0
    if kind == "avg":
        return [0, 0]
    if kind in ("most_frequent", "unique_list", "unique_count"):
        return []
    return None


def _usable(kind: str, value: Any) -> bool:
    if kind in NUMERIC_KINDS:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, str | int | float | bool)


def _fold(kind: str, agg: Any, ts: int, value: Any) -> Any:
    """`agg` with one more event (at `ts`, with property `value`)."""
    if kind == "count":
        return agg + 1
    if kind == "sum":
        return agg + value
    if kind == "avg":
        return [agg[0] + value, agg[1] + 1]
    if kind == "min":
        return value if agg is None or value < agg else agg
    if kind == "max":
        return value if agg is None or value > agg else agg
    if kind == "first":
        return [ts, value] if agg is None or ts < agg[0] else agg
    if kind == "last":
        return [ts, value] if agg is None or ts >= agg[0] else agg
    if kind == "most_frequent":
        for pair in agg:
            if _same(pair[0], value):
                pair[1] += 1
                return agg
        if len(agg) < MAX_DISTINCT:
            agg.append([value, 1])
        return agg
    # unique_list, unique_count
    if len(agg) < MAX_DISTINCT and not any(_same(v, value) for v in agg):
        agg.append(value)
    return agg


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def _merge(kind: str, a: Any, b: Any) -> Any:
    """Two aggregates of the same kind as one (used across buckets and profile merges)."""
    if kind in ("count", "sum"):
        return a + b
    if kind == "avg":
        return [a[0] + b[0], a[1] + b[1]]
    if kind in ("min", "max", "first", "last"):
        if a is None or b is None:
            return b if a is None else a
        if kind == "min":
            return min(a, b)
        if kind == "max":
            return max(a, b)
        if kind == "first":
            return a if a[0] <= b[0] else b
        return b if b[0] >= a[0] else a
    if kind == "most_frequent":
        merged = [list(pair) for pair in a]
        for value, count in b:
            for pair in merged:
                if _same(pair[0], value):
                    pair[1] += count
                    break
            else:
                if len(merged) < MAX_DISTINCT:
                    merged.append([value, count])
        return merged
    merged_values = list(a)
    for value in b:
        if len(merged_values) < MAX_DISTINCT and not any(_same(v, value) for v in merged_values):
            merged_values.append(value)
    return merged_values


def _sort_key(value: Any) -> tuple[int, Any]:
    if isinstance(value, bool):
        return (2, value)
    if isinstance(value, int | float):
        return (0, value)
    return (1, str(value))


def _finish(kind: str, agg: Any) -> Any:
    """The trait value of an aggregate."""
    if kind in ("count", "sum", "min", "max"):
        return agg
    if kind == "avg":
        return agg[0] / agg[1] if agg[1] else None
    if kind in ("first", "last"):
        return None if agg is None else agg[1]
    if kind == "most_frequent":
        if not agg:
            return None
        best = min(agg, key=lambda pair: (-pair[1], _sort_key(pair[0])))
        return best[0]
    if kind == "unique_list":
        return sorted(agg, key=_sort_key)
    return len(agg)  # unique_count


class ComputedTrait(Tracker):
    """One computed-trait definition, compiled: its tracker and its value."""

    def __init__(self, doc: Mapping[str, Any], version: int) -> None:
        self.key: str = doc["key"]
        self.version = version
        self.name = str(doc.get("name") or self.key)
        self.include_anonymous = bool(doc.get("include_anonymous", False))
        self.kind: str = doc["kind"]
        self.definition = doc
        self.matcher = EventMatcher({"event": doc["event"], "where": doc.get("where")})
        self.events = frozenset({doc["event"]})
        prop = doc.get("property")
        self.path = compile_path(prop) if prop else None
        within = doc.get("within")
        self.window_ms = parse_duration_ms(within) if within else None
        self.bucket_ms = (
            max(1_000, self.window_ms // BUCKET_FRACTION) if self.window_ms is not None else 0
        )
        self.id = tracker_id(
            "c",
            {
                "k": self.kind,
                "e": doc["event"],
                "p": prop,
                "w": doc.get("where"),
                "d": within,
                "f": counts_from_ms(doc),
            },
        )
        self.from_ms = counts_from_ms(doc)

    def update(self, state: UserState, event: Event, now: int) -> bool:
        if not self.matcher.matches(event):
            return False
        ts = event.timestamp_ms
        if ts < self.from_ms:
            return False
        value: Any = None
        if self.kind != "count":
            value = event.get(self.path) if self.path is not None else None
            if not _usable(self.kind, value):
                return False
        buckets: list[list[Any]] = state.trackers.get(self.id) or []
        if self.window_ms is None:
            start = FOREVER
        else:
            start = ts - ts % self.bucket_ms
            if start + self.window_ms <= now:
                return False  # late, and already outside the window
            buckets = [b for b in buckets if b[0] + self.window_ms > now]
        for bucket in buckets:
            if bucket[0] == start:
                bucket[1] = _fold(self.kind, bucket[1], ts, value)
                break
        else:
            buckets.append([start, _fold(self.kind, _empty(self.kind), ts, value)])
            buckets.sort(key=lambda b: b[0])
        state.trackers[self.id] = buckets
        return True

    def value(self, state: UserState, now: int) -> tuple[Any, int]:
        """(value at `now`, next time it may change with no new event)."""
        buckets: list[list[Any]] = state.trackers.get(self.id) or []
        window = self.window_ms
        if window is not None:
            buckets = [b for b in buckets if b[0] + window > now]
        agg = _empty(self.kind)
        for _start, bucket_agg in buckets:
            agg = _merge(self.kind, agg, bucket_agg)
        change = buckets[0][0] + window if window is not None and buckets else NEVER
        return _finish(self.kind, agg), change

    def merge(self, mine: Any, other: Any, now: int) -> Any:
        """Buckets of two profiles as one (identity merges)."""
        merged: dict[int, Any] = {}
        for start, agg in [*(mine or []), *(other or [])]:
            merged[start] = _merge(self.kind, merged[start], agg) if start in merged else agg
        window = self.window_ms
        return [
            [start, merged[start]]
            for start in sorted(merged)
            if window is None or start + window > now
        ]


def is_empty_value(kind: str, value: Any) -> bool:
    """The value of a trait with no counted events (not announced for new profiles)."""
    return bool(value == _finish(kind, _empty(kind)))


def counts_from_ms(doc: Mapping[str, Any]) -> int:
    """With `backfill: false`, only events from the definition's creation count."""
    if doc.get("backfill", True):
        return 0
    return parse_iso_ms(doc.get("created_at")) or 0
