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
  audiences);
- with `within {"calendar_days": N, "timezone": TZ}` (`calendar.py`), one bucket
  per local day, started at its local midnight (UTC ms): exact, it expires at
  the midnight that starts local day + N, and at most N + 1 days with events are
  kept (a sum stays within 1/4096 of the range per bucket, for up to 3651 of them).

Values: count and unique_count are integers (0 when empty); sum is a number
(0 when empty); avg, min, max, first, last, most_frequent are None when no
event counts; unique_list is sorted (numbers, then strings). sum/avg/min/max
read numbers only; other kinds read any scalar. Events whose property is
missing or of the wrong type are not counted (count counts every matching
event).

Bounds (SPEC §11; each drop is counted in `UserState.dropped`, see `state.py`):

- numbers: only finite floats and ints in the signed 64-bit range are read
  (`non_finite_number` otherwise), and a value that would take the aggregate
  of a sum or avg beyond that range is not counted (`non_finite_number`): the
  aggregate of a bucket stays within the range (within 1/128 of it for a
  windowed trait, so that no sum of up to 101 buckets can leave it). A sum is
  therefore always a number the state codec writes exactly, never inf or null;
- strings longer than MAX_COMPUTED_VALUE_BYTES (as JSON) are not counted
  (`computed_value_size`): they would be stored in first/last/distinct values;
- most_frequent, unique_list, unique_count keep at most MAX_DISTINCT values per
  bucket (an event with a new value for a full bucket is not counted), and a
  windowed one at most MAX_DISTINCT_ENTRIES over all its buckets: past that,
  values of the oldest buckets are dropped to make room (their events leave the
  window early), and a late event older than every other bucket is not
  counted. Either way `distinct_values`.
"""

from __future__ import annotations

import math
import operator
import sys
from collections.abc import Mapping
from typing import Any, Final, final

from audiences.core.calendar import calendar_window
from audiences.core.definitions.conditions import EventMatcher, Tracker, tracker_id
from audiences.core.definitions.language import NUMERIC_KINDS
from audiences.core.durations import parse_duration_ms
from audiences.core.events import Event, compile_path, parse_iso_ms
from audiences.core.state import INT64_MAX, INT64_MIN, NEVER, UserState, string_fits

MAX_DISTINCT: Final = 100  # values kept per bucket by most_frequent and unique_*
MAX_DISTINCT_ENTRIES: Final = 500  # values kept over all buckets of a windowed one
MAX_COMPUTED_VALUE_BYTES: Final = 128  # longer strings are not counted
BUCKET_FRACTION: Final = 100
FOREVER: Final = -1  # start of the single bucket of a trait without a window
_FLOAT_MAX = sys.float_info.max
_WINDOW_SHARE: Final = (
    128  # a windowed bucket's sum stays within 1/128 of the range (<= 101 buckets)
)
_CALENDAR_SHARE: Final = 4096  # ... of a calendar window's (<= MAX_CALENDAR_DAYS + 1 buckets)
_DISTINCT_KINDS = frozenset({"most_frequent", "unique_list", "unique_count"})
_AGGREGATE = operator.itemgetter(1)  # of a bucket [start, aggregate]


def _empty(kind: str) -> Any:
    if kind in ("count", "sum"):
        return 0
    if kind == "avg":
        return [0, 0]
    if kind in ("most_frequent", "unique_list", "unique_count"):
        return []
    return None


def _refusal(kind: str, value: Any) -> str | None:
    """Why a trait of `kind` does not count an event with property `value`: None when it
    does, "" when the value does not apply (missing, wrong type), else a drop reason."""
    value_type = type(value)
    if value_type is int:
        return None if INT64_MIN <= value <= INT64_MAX else "non_finite_number"
    if value_type is float:
        return None if math.isfinite(value) else "non_finite_number"
    if kind in NUMERIC_KINDS:
        return ""
    if value_type is str:
        if len(value) <= 21 or string_fits(value, MAX_COMPUTED_VALUE_BYTES):  # (6 * 21 + 2)
            return None
        return "computed_value_size"
    return None if value_type is bool else ""


def _bounded_sum(total: Any, share: int) -> bool:
    """Whether a bucket's sum is a number the codec writes exactly, with room for the
    sum of every bucket of a window: within 1/`share` of the range (0: no window) (NaN
    compares false)."""
    if type(total) is int:
        bound = INT64_MAX // share if share else INT64_MAX
        return -bound <= total <= bound
    limit = _FLOAT_MAX / share if share else _FLOAT_MAX
    return bool(-limit <= total <= limit)


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


@final
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
        self.window_ms = parse_duration_ms(within) if isinstance(within, str) else None
        self.calendar = calendar_window(within)  # or None
        self.sum_share = (
            _CALENDAR_SHARE
            if self.calendar is not None
            else _WINDOW_SHARE
            if self.window_ms is not None
            else 0
        )
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
        kind = self.kind
        value: Any = None
        if kind != "count":
            value = event.get(self.path) if self.path is not None else None
            refusal = _refusal(kind, value)
            if refusal is not None:
                if refusal:
                    state.drop(refusal)
                return False
        buckets: list[list[Any]] = state.trackers.get(self.id) or []
        window = self.window_ms
        calendar = self.calendar
        if window is not None:
            start = ts - ts % self.bucket_ms
            if start + window <= now:
                return False  # late, and already outside the window
            buckets = [b for b in buckets if b[0] + window > now]
        elif calendar is not None:
            start = calendar.day_start(ts)  # the bucket of the event's local day
            cutoff = calendar.start(now)  # (buckets start at local midnights)
            if start < cutoff:
                return False  # late, and already outside the window
            buckets = [b for b in buckets if b[0] >= cutoff]
        else:
            start = FOREVER
        for bucket in buckets:
            if bucket[0] == start:
                created = False
                break
        else:
            bucket, created = [start, _empty(kind)], True
        if kind in _DISTINCT_KINDS:
            if not self._add_distinct(state, buckets, bucket, value):
                return False
        elif kind == "sum" or kind == "avg":
            if not self._add_to_sum(state, bucket, value):
                return False
        else:
            bucket[1] = _fold(kind, bucket[1], ts, value)
        if created:
            buckets.append(bucket)
            buckets.sort(key=lambda b: b[0])
        state.trackers[self.id] = buckets
        return True

    def _add_to_sum(self, state: UserState, bucket: list[Any], value: Any) -> bool:
        """Fold `value` into the sum or avg of `bucket` if the sum stays within the
        bounds; else count the refusal."""
        kind = self.kind
        agg = bucket[1]
        if type(agg if kind == "sum" else agg[0]) not in (int, float):
            agg = _empty(kind)  # a sum stored as null before the bounds: not counted
        total = (agg if kind == "sum" else agg[0]) + value
        if not _bounded_sum(total, self.sum_share):
            state.drop("non_finite_number")
            return False
        bucket[1] = total if kind == "sum" else [total, agg[1] + 1]
        return True

    def _add_distinct(
        self, state: UserState, buckets: list[list[Any]], bucket: list[Any], value: Any
    ) -> bool:
        """Count `value` in the distinct values of `bucket`, within MAX_DISTINCT per
        bucket and, with a window, MAX_DISTINCT_ENTRIES over `buckets` (the oldest
        make room); else count the refusal."""
        agg: list[Any] = bucket[1]
        if self.kind == "most_frequent":
            for pair in agg:
                if _same(pair[0], value):
                    pair[1] += 1
                    return True
            entry: Any = [value, 1]
        else:
            for known in agg:
                if _same(known, value):
                    return True
            entry = value
        if len(agg) >= MAX_DISTINCT:
            state.drop("distinct_values")
            return False
        if self.sum_share:  # windowed (fixed or calendar)
            excess = sum(map(len, map(_AGGREGATE, buckets))) + 1 - MAX_DISTINCT_ENTRIES
            while excess > 0:  # the oldest buckets go first: they are the next to expire
                oldest = buckets[0]
                if oldest is bucket or oldest[0] > bucket[0]:
                    state.drop("distinct_values")  # a late event: newer data stays
                    return False
                cut = min(excess, len(oldest[1]))
                state.drop("distinct_values", cut)
                excess -= cut
                if cut == len(oldest[1]):
                    del buckets[0]
                else:
                    oldest[1] = oldest[1][cut:]
        agg.append(entry)
        return True

    def value(self, state: UserState, now: int) -> tuple[Any, int]:
        """(value at `now`, next time it may change with no new event)."""
        buckets: list[list[Any]] = state.trackers.get(self.id) or []
        window = self.window_ms
        calendar = self.calendar
        if window is not None:
            buckets = [b for b in buckets if b[0] + window > now]
        elif calendar is not None:
            cutoff = calendar.start(now)
            buckets = [b for b in buckets if b[0] >= cutoff]
            if buckets:  # the oldest day's bucket leaves first, at a local midnight
                change = max(now + 1, calendar.leave(buckets[0][0]))
                return _finish(self.kind, self._total(buckets)), change
            return _finish(self.kind, _empty(self.kind)), NEVER
        agg = _empty(self.kind)
        for _start, bucket_agg in buckets:
            try:
                agg = _merge(self.kind, agg, bucket_agg)
            except TypeError:  # a sum stored as null before the bounds: not counted
                continue
        change = buckets[0][0] + window if window is not None and buckets else NEVER
        return _finish(self.kind, agg), change

    def _total(self, buckets: list[list[Any]]) -> Any:
        agg = _empty(self.kind)
        for _start, bucket_agg in buckets:
            try:
                agg = _merge(self.kind, agg, bucket_agg)
            except TypeError:  # (null sums stored before the bounds)
                continue
        return agg

    def merge(self, mine: Any, other: Any, now: int, state: UserState) -> Any:
        """Buckets of two profiles as one (identity merges), within the bounds: a sum
        that would leave the range keeps this profile's bucket; distinct values that
        find no room are dropped, the oldest buckets' first (both counted)."""
        kind = self.kind
        window = self.window_ms
        merged: dict[int, Any] = {}
        for start, agg in [*(mine or []), *(other or [])]:
            if start not in merged:
                merged[start] = agg
                continue
            try:
                combined = _merge(kind, merged[start], agg)
            except TypeError:  # (null sums stored before the bounds)
                continue
            if kind in ("sum", "avg") and not _bounded_sum(
                combined if kind == "sum" else combined[0], self.sum_share
            ):
                state.drop("non_finite_number")
                continue
            if kind in _DISTINCT_KINDS:
                kept = {_distinct_key(kind, item) for item in combined}
                lost = [item for item in agg if _distinct_key(kind, item) not in kept]
                if lost:
                    state.drop("distinct_values", len(lost))
            merged[start] = combined
        if self.calendar is not None:
            cutoff = self.calendar.start(now)
            starts = [s for s in sorted(merged) if s >= cutoff]
        else:
            starts = [s for s in sorted(merged) if window is None or s + window > now]
        if kind in _DISTINCT_KINDS and self.sum_share:
            excess = sum(len(merged[s]) for s in starts) - MAX_DISTINCT_ENTRIES
            for start in starts:
                if excess <= 0:
                    break
                cut = min(excess, len(merged[start]))
                merged[start] = merged[start][cut:]
                state.drop("distinct_values", cut)
                excess -= cut
        return [[start, merged[start]] for start in starts if merged[start] != []]


def _distinct_key(kind: str, item: Any) -> tuple[str, Any]:
    """A hashable identity of a distinct value (of a most_frequent pair: its value)."""
    value = item[0] if kind == "most_frequent" else item
    return (type(value).__name__, value)


def is_empty_value(kind: str, value: Any) -> bool:
    """The value of a trait with no counted events (not announced for new profiles)."""
    return bool(value == _finish(kind, _empty(kind)))


def counts_from_ms(doc: Mapping[str, Any]) -> int:
    """With `backfill: false`, only events from the definition's creation count."""
    if doc.get("backfill", True):
        return 0
    return parse_iso_ms(doc.get("created_at")) or 0
