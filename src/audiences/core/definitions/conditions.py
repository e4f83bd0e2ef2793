"""Compiled conditions: trackers (what a profile remembers) and nodes (how it is judged).

A tracker turns events into compact state (`update`), a node reads that state
at a time `now` and answers `(value, change_ms)`: whether the condition holds
and the earliest later time its value may change with no new input (NEVER if
it cannot). Composite nodes combine their children's answers, so one call on
the root gives both membership and the audience's next deadline.

Trackers keep their data bounded (SPEC §11, table in `state.py`): at most
MAX_KEPT_TIMESTAMPS timestamps per `performed` tracker, MAX_SEQUENCE_INSTANCES
funnel instances of MAX_SEQUENCE_HISTORY events each, MAX_DEVICES devices; what they drop is counted in
`UserState.dropped`.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable, Mapping
from typing import Any, Final, final

import orjson

from audiences.core.calendar import CalendarWindow, calendar_window
from audiences.core.durations import parse_duration_ms
from audiences.core.events import Event, compile_path
from audiences.core.operators import (
    DURATION_OPERATORS,
    Predicate,
    Wildcard,
    compile_predicate,
    predicate_change_ms,
)
from audiences.core.state import MAX_KEY_CHARS, NEVER, UserState, bounded_key

EventFilter = Callable[[Event], bool]
MAX_SEQUENCE_INSTANCES: Final = 64
# Timestamps one `performed` tracker keeps: for `between`, the most recent ones, so a
# count above it is capped at it; for `times N within`, N + 1 suffice (see
# PerformedTracker), so only a definition asking for N >= MAX_KEPT_TIMESTAMPS is capped.
MAX_KEPT_TIMESTAMPS: Final = 1000

_ANY_COUNT: Final = (1 << 62) - 1  # more than any count (and an unboxed int compiled)
_COUNT_RANGE: dict[str, Callable[[int], tuple[int, int]]] = {
    "eq": lambda n: (n, n),
    "gte": lambda n: (n, _ANY_COUNT),
    "gt": lambda n: (n + 1, _ANY_COUNT),
    "lte": lambda n: (0, n),
    "lt": lambda n: (0, n - 1),  # lt 0: an empty range, never true
}


def tracker_id(kind: str, spec: Any) -> str:
    """Stable id of a tracker: same spec, same id, across processes and versions."""
    digest = hashlib.sha1(orjson.dumps(spec, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return f"{kind}{digest[:11]}"


Filter = tuple[tuple[str, ...], Predicate]  # (path, predicate) of one `where` filter


def compile_filters(filters: list[Mapping[str, Any]] | None) -> tuple[Filter, ...]:
    """Each `where` filter as (compiled path, predicate)."""
    return tuple(
        (compile_path(f["property"]), compile_predicate(f["op"], f.get("value")))
        for f in filters or ()
    )


def filters_hold(filters: tuple[Filter, ...], event: Event) -> bool:
    """All filters hold; relative-time operators are judged at the event's time."""
    at = event.timestamp_ms
    for path, predicate in filters:  # noqa: SIM110 (no generator per event)
        if not predicate(event.get(path), at):
            return False
    return True


def compile_where(filters: list[Mapping[str, Any]] | None) -> EventFilter | None:
    """All filters must hold; relative-time operators are judged at the event's time."""
    compiled = compile_filters(filters)
    if not compiled:
        return None

    def where(event: Event) -> bool:
        return filters_hold(compiled, event)

    return where


PAGE_URL_PATHS = (("properties", "url"), ("context", "page", "url"))


def route_of(event_type: str, name: str | None) -> str | None:
    """The key trackers are indexed by: a track's event name; "\0page"/"\0screen"."""
    if event_type == "track":
        return name
    if event_type in ("page", "screen"):
        return "\0" + event_type
    return None


@final
class EventMatcher:
    """An event filter of the language: `{"event": E, "where": F?, "within": D?}` for
    track events, or `{"url": P?, "name": S?, "where": F?}` for page/screen views."""

    __slots__ = ("event", "event_type", "filters", "url", "within_ms")

    def __init__(self, spec: Mapping[str, Any], event_type: str = "track") -> None:
        self.event_type = event_type
        self.event: str | None = spec.get("event") if event_type == "track" else spec.get("name")
        url = spec.get("url")
        self.url = Wildcard(url, anchored=True) if url else None
        self.filters = compile_filters(spec.get("where"))
        within = spec.get("within")
        self.within_ms = parse_duration_ms(within) if within else None

    @property
    def route(self) -> str | None:
        """Page/screen trackers see every view (the name is only a filter)."""
        return route_of(self.event_type, self.event if self.event_type == "track" else None)

    def matches(self, event: Event) -> bool:
        if event.type != self.event_type or (self.event is not None and event.name != self.event):
            return False
        if self.url is not None and not self._url_matches(event):
            return False
        return not self.filters or filters_hold(self.filters, event)

    def _url_matches(self, event: Event) -> bool:
        assert self.url is not None
        for path in PAGE_URL_PATHS:
            value = event.get(path)
            if isinstance(value, str) and self.url.test(value):
                return True
        return False


class Tracker:
    """Remembers, per profile, what one event leaf needs."""

    id: str
    events: frozenset[str]
    from_ms = 0  # backfill: false counts events from this time on (0 = all history)

    def update(self, state: UserState, event: Event, now: int) -> bool:
        """Fold an event in; True when the stored state changed."""
        raise NotImplementedError

    def merge(self, mine: Any, other: Any, now: int, state: UserState) -> Any:
        """This tracker's data of two profiles as one (identity merges), within the
        tracker's bounds (drops are counted on `state`)."""
        return mine


@final
class PerformedTracker(Tracker):
    """Matching events of one name and filter: a count, or the timestamps windows need.

    One tracker serves every `performed` leaf with the same event and filter:
    - no window: a count;
    - "within D" compared with N: only the N+1 most recent timestamps matter (if
      all are inside the window the count exceeds N whatever came before), so it
      keeps the largest N+1 of its leaves, younger than the largest D;
    - "between [D1, D2]": every timestamp younger than the largest D2.
    Either way at most MAX_KEPT_TIMESTAMPS, the most recent: a count above it is
    capped at it (drops counted as `between_timestamps` / `window_timestamps`).

    Identity: `base_id` names what it matches (event, filter, mode); `id`, the key of
    its data, also names what it keeps — the horizon, and for a window the kept count
    — so data kept for a narrower need is never read as if it held more (SPEC §3,
    edits). The compiler sets `id` with `settle` once every leaf was served; an edit
    whose need the previous tracker of the same base covers keeps that tracker's
    parameters and so its id and data, one that needs more gets a new id, which the
    runtime backfills like a new audience's tracker.
    """

    def __init__(
        self, spec: Mapping[str, Any], mode: str, event_type: str = "track", from_ms: int = 0
    ) -> None:
        selector = {k: spec[k] for k in ("event", "url", "name", "where") if k in spec}
        self.matcher = EventMatcher(selector, event_type)
        route = self.matcher.route
        self.events = frozenset({route} if route else ())
        self.mode = mode
        self.horizon_ms = 0
        self.keep = 0
        self.capped = False  # a leaf asks for more timestamps than are kept
        self.from_ms = from_ms  # backfill: false ignores events before the audience existed
        if event_type == "track" and not from_ms:  # the original ids: stored history stays valid
            self.base_id = tracker_id("p", {"e": spec["event"], "w": spec.get("where"), "m": mode})
        else:
            self.base_id = tracker_id(event_type[0], {"s": selector, "m": mode, "f": from_ms})
        self.id = self.base_id  # until `settle`: leaves share it by what it matches

    def serve(self, horizon_ms: int, keep: int) -> None:
        """Widen what is kept so one more leaf can be answered."""
        self.horizon_ms = max(self.horizon_ms, horizon_ms)
        self.capped = self.capped or keep > MAX_KEPT_TIMESTAMPS
        self.keep = min(max(self.keep, keep), MAX_KEPT_TIMESTAMPS)

    def covers(self, other: PerformedTracker) -> bool:
        """Whether this tracker's data answers every leaf `other` serves: the same events,
        kept at least as far back and, for a window, at least as many timestamps."""
        if self.base_id != other.base_id:
            return False
        if self.mode == "count":
            return True
        if self.horizon_ms < other.horizon_ms:
            return False
        return self.mode == "between" or self.keep >= other.keep

    def settle(self, previous: PerformedTracker | None) -> None:
        """Fix `id` once every leaf was served. When `previous` (the tracker of the same
        base in the catalog being replaced) covers this one, take over what it keeps,
        and so its id and its data: no history is needed. Otherwise the id names this
        tracker's own horizon and kept count: new data, which a backfill fills."""
        if self.mode == "count":  # a count keeps nothing that depends on the leaves
            self.id = self.base_id
            return
        if previous is not None and previous.covers(self):
            self.horizon_ms = previous.horizon_ms
            self.keep = previous.keep
        kept: dict[str, Any] = {"b": self.base_id, "h": str(self.horizon_ms)}  # (any size)
        if self.mode == "window":  # (between keeps up to MAX_KEPT_TIMESTAMPS whatever N is)
            kept["k"] = self.keep
        self.id = tracker_id(self.base_id[0], kept)

    def update(self, state: UserState, event: Event, now: int) -> bool:
        if not self.matcher.matches(event) or event.timestamp_ms < self.from_ms:
            return False
        trackers = state.trackers
        if self.mode == "count":
            trackers[self.id] = trackers.get(self.id, 0) + 1
            return True
        cutoff = now - self.horizon_ms
        ts = event.timestamp_ms
        if ts <= cutoff:
            return False  # late and already outside every window it could count in
        times: list[int] = trackers.get(self.id) or []
        insort(times, ts)
        start = self._start(times, now, state)
        trackers[self.id] = times[start:] if start else times
        return True

    def _start(self, times: list[int], now: int, state: UserState) -> int:
        """Index of the oldest timestamp to keep of sorted `times`; counts what the
        bounds drop (not what has left every window: that is no loss)."""
        start = bisect_right(times, now - self.horizon_ms)
        bound = self.keep if self.mode == "window" else MAX_KEPT_TIMESTAMPS
        if len(times) - start > bound:
            if self.mode == "between":
                state.drop("between_timestamps", len(times) - start - bound)
            elif self.capped:
                state.drop("window_timestamps", len(times) - start - bound)
            start = len(times) - bound
        return start

    def merge(self, mine: Any, other: Any, now: int, state: UserState) -> Any:
        if self.mode == "count":
            return int(mine) + int(other)
        times = sorted([*mine, *other])
        return times[self._start(times, now, state) :]


# Per match value, a funnel entry is one flat list of ints (compact in the codec):
#   [0:4]  the funnel as of every event kept: steps_done, last_ms, t0_ms, follow_ms
#          (steps_done 0: no attempt; t0 the time the last step completed, -1 before;
#          follow the `then`/`then_not` event after t0, -1 if none yet) — what nodes read;
#   [4:8]  the same, as of the events folded away (the base the kept events replay on);
#   [8]    the time of the newest folded event (NO_FLOOR if none): a later-arriving
#          event older than it is ignored;
#   [9:]   the events kept, (time, mask) pairs in event-time order (ties: arrival order);
#          bit i of a mask: the event matches step i; bit len(steps): the follow-up.
# State written before funnels went by event time has entries of [0:4] only (same tracker
# id): nodes read them as they are, the tracker upgrades them when it next touches them.
_BASE: Final = 4
_FLOOR: Final = 8
_KEPT: Final = 9
NO_FLOOR: Final = -(1 << 62)
# Events kept per match value for reordering (SPEC §11): beyond it the oldest are folded
# into the base early (counted as `sequence_history`): an event arriving later that is
# older than them is then ignored.
MAX_SEQUENCE_HISTORY: Final = 16


@final
class SequenceTracker(Tracker):
    """Funnels by event time, one entry per `match_on` value (layout above).

    The funnel state is derived from the events in event-time order: an attempt starts
    with an event matching the first step; each next step is the first later event
    matching it within its step's `within` of the previous step; an event matching the
    first step that the running attempt does not take (as its next step, or as its
    follow-up) starts a new attempt, one instance per value. The follow-up is the first
    matching event after t0 (for `then`, within its `within`) before the attempt is over
    (`active_for`). Events arriving out of order are put in their place and the state is
    derived again, so any arrival order within the funnel's horizon gives the state of
    sorted input. The horizon is the sum of the steps' and the follow-up's `within`s (or
    `active_for`, if longer); unbounded if a later step has no `within` and there is no
    `active_for`. Events older than it relative to the profile's clock are folded into
    the base, at most MAX_SEQUENCE_HISTORY are kept per value, at most
    MAX_SEQUENCE_INSTANCES values (the most recently active).
    """

    def __init__(self, spec: Mapping[str, Any], from_ms: int = 0) -> None:
        self.from_ms = from_ms
        self.steps = [EventMatcher(step) for step in spec["steps"]]
        self.total = len(self.steps)
        self.step_within = [-1 if s.within_ms is None else s.within_ms for s in self.steps]
        follow = spec.get("then_not") or spec.get("then")
        self.follow = EventMatcher(follow) if follow else None
        self.follow_bit = 1 << self.total
        self.follow_within = -1
        if self.follow is not None and self.follow.within_ms is not None:
            self.follow_within = self.follow.within_ms
        self.negative = "then_not" in spec
        self.match_path = compile_path(spec["match_on"]) if spec.get("match_on") else None
        self.active_ms = parse_duration_ms(spec["active_for"]) if spec.get("active_for") else None
        self.active = -1 if self.active_ms is None else self.active_ms
        chain: int | None = 0
        for within in self.step_within[1:]:
            chain = None if within < 0 or chain is None else chain + within
        if chain is not None and self.follow_within >= 0:
            chain += self.follow_within
        horizon = chain
        if self.active >= 0:
            horizon = self.active if chain is None else max(chain, self.active)
        self.horizon_ms = -1 if horizon is None else horizon  # -1: unbounded
        matchers = [*self.steps, *([self.follow] if self.follow else [])]
        self.events = frozenset(m.route for m in matchers if m.route is not None)
        # (the id of the former arrival-order tracker: its entries are migrated, `_upgraded`)
        self.id = tracker_id("s", {**spec, "from_ms": from_ms} if from_ms else dict(spec))

    def update(self, state: UserState, event: Event, now: int) -> bool:
        ts = event.timestamp_ms
        if ts < self.from_ms:
            return False
        mask = 0
        bit = 1
        for step in self.steps:
            if step.matches(event):
                mask |= bit
            bit <<= 1
        if self.follow is not None and self.follow.matches(event):
            mask |= bit
        if not mask:
            return False
        if self.match_path is not None:
            value = event.get(self.match_path)
            if value is None or isinstance(value, dict | list):
                return False
            match_key = value if type(value) is str else str(value)
            if len(match_key) > MAX_KEY_CHARS:
                match_key = bounded_key(match_key)
        else:
            match_key = ""
        instances: dict[str, list[int]] = state.trackers.get(self.id) or {}
        entry = instances.get(match_key)
        if entry is not None and len(entry) == _OLD_LAYOUT:
            entry = instances[match_key] = _upgraded(entry)
        if entry is None:
            entry = [0, -1, -1, -1, 0, -1, -1, -1, NO_FLOOR]
            instances[match_key] = entry
        elif ts < entry[_FLOOR]:
            return False  # older than what this funnel already folded away
        # its place: after every kept event of the same time or earlier
        index = len(entry)
        while index > _KEPT and entry[index - 2] > ts:
            index -= 2
        entry[index:index] = [ts, mask]
        if len(entry) - _KEPT > 2 * MAX_SEQUENCE_HISTORY:
            extra = (len(entry) - _KEPT) // 2 - MAX_SEQUENCE_HISTORY
            state.drop("sequence_history", extra)
            self._fold(entry, entry[_KEPT + 2 * extra - 2] + 1, extra)
        self._derive(entry)
        self._collect(instances, now, state)
        if instances:
            state.trackers[self.id] = instances
        else:  # (a late event of a value with nothing kept, already over)
            state.trackers.pop(self.id, None)
        return True

    def merge(self, mine: Any, other: Any, now: int, state: UserState) -> Any:
        """Funnels of both profiles. For a match value both have, the events kept by
        both, in event-time order (ties: this profile's first), replayed on the base of
        the one that folded more recent events (exact when neither folded any)."""
        instances: dict[str, list[int]] = {key: _upgraded(entry) for key, entry in other.items()}
        for key, old in mine.items():
            entry = _upgraded(old)
            theirs = instances.get(key)
            if theirs is None:
                instances[key] = entry
                continue
            first = entry if entry[_FLOOR] >= theirs[_FLOOR] else theirs
            merged = first[:_KEPT]  # (the other's base is lost unless it folded nothing)
            floor = merged[_FLOOR]
            kept = [
                (entry[i], n, entry[i + 1])
                for n, i in enumerate(range(_KEPT, len(entry), 2))
                if entry[i] >= floor
            ]
            offset = len(kept)
            kept += [
                (theirs[i], offset + n, theirs[i + 1])
                for n, i in enumerate(range(_KEPT, len(theirs), 2))
                if theirs[i] >= floor
            ]
            kept.sort()
            for ts, _order, mask in kept:
                merged.append(ts)
                merged.append(mask)
            if len(merged) - _KEPT > 2 * MAX_SEQUENCE_HISTORY:
                extra = (len(merged) - _KEPT) // 2 - MAX_SEQUENCE_HISTORY
                state.drop("sequence_history", extra)
                self._fold(merged, merged[_KEPT + 2 * extra - 2] + 1, extra)
            self._derive(merged)
            instances[key] = merged
        self._collect(instances, now, state)
        return instances

    def _apply(self, inst: list[int], at: int, ts: int, mask: int) -> None:
        """One event, in event-time order, on the funnel `inst[at:at + 4]`."""
        total = self.total
        done = inst[at]
        if done == total and inst[at + 3] < 0 and mask & self.follow_bit:
            t0 = inst[at + 2]
            if (
                ts > t0
                and (self.active < 0 or ts < t0 + self.active)  # not over yet
                and (self.negative or ts - t0 <= self.follow_within)
            ):
                inst[at + 3] = ts
                return
        if 0 < done < total and mask & (1 << done):
            within = self.step_within[done]
            last = inst[at + 1]
            if ts >= last and (within < 0 or ts - last <= within):
                inst[at] = done + 1
                inst[at + 1] = ts
                if done + 1 == total:
                    inst[at + 2] = ts
                    inst[at + 3] = -1
                return
        if mask & 1:
            inst[at] = 1
            inst[at + 1] = ts
            inst[at + 2] = ts if total == 1 else -1
            inst[at + 3] = -1

    def _derive(self, entry: list[int]) -> None:
        """The funnel as of every kept event: the base, then the kept events in order."""
        entry[0:_BASE] = entry[_BASE:_FLOOR]
        for i in range(_KEPT, len(entry), 2):
            self._apply(entry, 0, entry[i], entry[i + 1])

    def _fold(self, entry: list[int], before: int, limit: int) -> bool:
        """Fold kept events older than `before` (at most `limit`) into the base."""
        end = _KEPT
        stop = _KEPT + 2 * limit
        while end < len(entry) and end < stop and entry[end] < before:
            self._apply(entry, _BASE, entry[end], entry[end + 1])
            entry[_FLOOR] = entry[end]
            end += 2
        if end == _KEPT:
            return False
        del entry[_KEPT:end]
        return True

    def _collect(self, instances: dict[str, list[int]], now: int, state: UserState) -> None:
        """Fold what left the horizon; drop funnels that can never change or hold again;
        keep the most recently active ones."""
        for key in [k for k, e in instances.items() if len(e) == _OLD_LAYOUT]:
            instances[key] = _upgraded(instances[key])
        if self.horizon_ms >= 0:
            cutoff = now - self.horizon_ms
            dead: list[str] = []
            for key, entry in instances.items():
                if len(entry) > _KEPT and entry[_KEPT] < cutoff:
                    self._fold(entry, cutoff, len(entry))
                if len(entry) == _KEPT and self._is_over(entry, cutoff):
                    dead.append(key)
            for key in dead:
                del instances[key]
        else:
            for key in [k for k, e in instances.items() if len(e) == _KEPT and e[4] == 0]:
                del instances[key]
        if len(instances) > MAX_SEQUENCE_INSTANCES:
            state.drop("sequence_instances", len(instances) - MAX_SEQUENCE_INSTANCES)
            by_recency = sorted((_newest(entry), key) for key, entry in instances.items())
            for _newest_ms, key in by_recency[: len(instances) - MAX_SEQUENCE_INSTANCES]:
                del instances[key]

    def _is_over(self, entry: list[int], at: int) -> bool:
        """The base (all there is) can never change nor hold for events from `at` on:
        the same as no funnel."""
        steps_done, last, t0, follow_ms = entry[4], entry[5], entry[6], entry[7]
        if steps_done == 0:
            return True
        if steps_done < self.total:
            within = self.step_within[steps_done]
            return within >= 0 and at - last > within
        if self.active >= 0 and at >= t0 + self.active:
            return True
        if self.follow is None:
            return False
        if self.negative:
            return follow_ms >= 0
        return follow_ms < 0 and at - t0 > self.follow_within


_OLD_LAYOUT: Final = 4  # entries written before funnels went by event time


def _upgraded(entry: list[int]) -> list[int]:
    """A copy of a funnel entry in the current layout. An entry of the former layout,
    `[steps_done, last_ms, t0_ms, follow_ms]` (state written before funnels went by event
    time), becomes the base, with nothing kept: events arriving later that are older
    than its newest event are ignored."""
    if len(entry) != _OLD_LAYOUT:
        return list(entry)
    return [*entry, *entry, max(entry[1], entry[3])]


def _newest(entry: list[int]) -> int:
    """The time of the newest event a funnel entry rests on."""
    return entry[-2] if len(entry) > _KEPT else max(entry[1], entry[_FLOOR])


class Node:
    """A compiled condition."""

    condition: Mapping[str, Any] = {}  # the source, set by the compiler (for explain)

    def evaluate(self, state: UserState, now: int) -> tuple[bool, int]:
        raise NotImplementedError

    def explain(self, state: UserState, now: int) -> dict[str, Any]:
        """The node's answer (from `evaluate` itself) and what decided it."""
        value, change = self.evaluate(state, now)
        ((name, _body),) = self.condition.items() if self.condition else (("?", None),)
        return {
            "condition": name,
            "definition": self.condition,
            "value": value,
            "changes_at_ms": change if change < NEVER else None,
            **self.evidence(state, now),
        }

    def evidence(self, state: UserState, now: int) -> dict[str, Any]:
        """The inputs the answer rests on (events' times, trait values, children)."""
        return {}


class AllNode(Node):
    def __init__(self, children: list[Node]) -> None:
        self.children = children

    def evaluate(self, state: UserState, now: int) -> tuple[bool, int]:
        value, change = True, NEVER
        for child in self.children:
            child_value, child_change = child.evaluate(state, now)
            value = value and child_value
            if child_change < change:
                change = child_change
        return value, change

    def evidence(self, state: UserState, now: int) -> dict[str, Any]:
        return {"children": [child.explain(state, now) for child in self.children]}


@final
class AnyNode(AllNode):
    def evaluate(self, state: UserState, now: int) -> tuple[bool, int]:
        value, change = False, NEVER
        for child in self.children:
            child_value, child_change = child.evaluate(state, now)
            value = value or child_value
            if child_change < change:
                change = child_change
        return value, change


@final
class NotNode(Node):
    def __init__(self, child: Node) -> None:
        self.child = child

    def evaluate(self, state: UserState, now: int) -> tuple[bool, int]:
        value, change = self.child.evaluate(state, now)
        return not value, change

    def evidence(self, state: UserState, now: int) -> dict[str, Any]:
        return {"children": [self.child.explain(state, now)]}


@final
class PerformedNode(Node):
    def __init__(
        self, tracker: PerformedTracker, spec: Mapping[str, Any], op: str, count: int
    ) -> None:
        self.tracker = tracker
        self.tracker_id = tracker.id  # the compiler sets it again once the tracker settled
        # The comparison as the range of counts that satisfy it: lo <= count <= hi.
        self.lo, self.hi = _COUNT_RANGE[op](count)
        within = spec.get("within")
        self.window_ms = parse_duration_ms(within) if isinstance(within, str) else None
        # `{"calendar_days": N, "timezone": TZ}`: judged after the fixed windows (no cost)
        self.calendar = calendar_window(within)
        between = spec.get("between")
        self.near_ms = parse_duration_ms(between[0]) if between else None
        self.far_ms = parse_duration_ms(between[1]) if between else None

    def evaluate(self, state: UserState, now: int) -> tuple[bool, int]:
        data = state.trackers.get(self.tracker_id)
        window = self.window_ms
        lo, hi = self.lo, self.hi
        if window is not None:
            if not data:
                return lo <= 0 <= hi, NEVER
            times: list[int] = data
            start = bisect_right(times, now - window)
            inside = len(times) - start
            # Times leave the window oldest first, so the count only falls, one by one.
            # In range: it leaves the range once the count drops below lo, i.e. when
            # the (inside - lo)-th oldest time leaves. Above the range: it enters when
            # the count reaches hi. Older timestamps the tracker no longer keeps would
            # leave even earlier, so the indexes are the same.
            if lo <= inside <= hi:
                if lo <= 0:
                    return True, NEVER
                return True, times[start + inside - lo] + window
            if inside > hi >= lo:
                return False, times[start + inside - hi - 1] + window
            return False, NEVER
        calendar = self.calendar
        if calendar is not None:
            return self._calendar_evaluate(data, calendar, now)
        near, far = self.near_ms, self.far_ms
        if near is None or far is None:
            count = data or 0
            return lo <= count <= hi, NEVER
        # window (now - far, now - near]: a time enters at ts + near, leaves at ts + far
        inside, change = 0, NEVER
        for ts in data or ():
            enter, leave = ts + near, ts + far
            if enter <= now < leave:
                inside += 1
            if now < enter < change:
                change = enter
            if now < leave < change:
                change = leave
        return lo <= inside <= hi, change

    def _calendar_evaluate(
        self, data: list[int] | None, calendar: CalendarWindow, now: int
    ) -> tuple[bool, int]:
        """As a fixed window, but times count from the window's start (a local midnight)
        and a time at `ts` leaves at the midnight that starts local date(ts) + N."""
        lo, hi = self.lo, self.hi
        if not data:
            return lo <= 0 <= hi, NEVER
        times = data
        start = bisect_left(times, calendar.start(now))
        inside = len(times) - start
        if lo <= inside <= hi:
            if lo <= 0:
                return True, NEVER
            return True, max(now + 1, calendar.leave(times[start + inside - lo]))
        if inside > hi >= lo:
            return False, max(now + 1, calendar.leave(times[start + inside - hi - 1]))
        return False, NEVER

    def evidence(self, state: UserState, now: int) -> dict[str, Any]:
        data = state.trackers.get(self.tracker.id)
        if self.tracker.mode == "count":
            return {"count": data or 0}
        times: list[int] = data or []
        if self.calendar is not None:
            window = self.calendar.describe(now)
            counted = [ts for ts in times if window["window_start_ms"] <= ts <= now]
            return {"count": len(counted), "event_times_ms": counted, "window": window}
        if self.window_ms is not None:
            counted = [ts for ts in times if now - self.window_ms < ts <= now]
        elif self.near_ms is not None and self.far_ms is not None:
            counted = [ts for ts in times if now - self.far_ms < ts <= now - self.near_ms]
        else:
            counted = times
        return {"count": len(counted), "event_times_ms": counted}


@final
class TraitNode(Node):
    def __init__(self, spec: Mapping[str, Any]) -> None:
        self.path = tuple(spec["name"].split("."))
        self.op = spec["op"]
        self.expected = spec.get("value")
        self.predicate = compile_predicate(self.op, self.expected)
        self.relative = self.op in DURATION_OPERATORS  # value changes as time passes

    def evaluate(self, state: UserState, now: int) -> tuple[bool, int]:
        node: Any = state.traits
        for part in self.path:
            node = node.get(part) if isinstance(node, dict) else None
        if not self.relative:
            return self.predicate(node, now), NEVER
        change = predicate_change_ms(self.op, self.expected, node, now)
        return self.predicate(node, now), NEVER if change is None else change

    def evidence(self, state: UserState, now: int) -> dict[str, Any]:
        node: Any = state.traits
        for part in self.path:
            node = node.get(part) if isinstance(node, dict) else None
        return {"actual": node, "set_at_ms": state.trait_times.get(self.path[0])}


@final
class InAudienceNode(Node):
    """Current membership of another audience (evaluated earlier: catalogs are topo-sorted)."""

    def __init__(self, key: str) -> None:
        self.key = key

    def evaluate(self, state: UserState, now: int) -> tuple[bool, int]:
        membership = state.members.get(self.key)
        if membership is None:
            return False, NEVER
        return membership.member, membership.wake_ms

    def evidence(self, state: UserState, now: int) -> dict[str, Any]:
        membership = state.members.get(self.key)
        return {"since_ms": membership.since_ms if membership else None}


@final
class SequenceNode(Node):
    def __init__(self, tracker: SequenceTracker) -> None:
        self.tracker = tracker

    def evaluate(self, state: UserState, now: int) -> tuple[bool, int]:
        tracker = self.tracker
        instances: dict[str, list[int]] = state.trackers.get(tracker.id) or {}
        total = len(tracker.steps)
        active = tracker.active_ms
        value, change = False, NEVER
        for inst in instances.values():
            if inst[0] < total:
                continue
            t0, follow_ms = inst[2], inst[3]
            end = t0 + active if active is not None else NEVER
            if now >= end:
                continue
            if tracker.follow is None:
                holds, next_change = True, end
            elif tracker.negative:
                assert tracker.follow.within_ms is not None
                due = t0 + tracker.follow.within_ms
                if follow_ms >= 0:
                    holds, next_change = False, NEVER
                elif now < due:
                    holds, next_change = False, due
                else:
                    holds, next_change = True, end
            else:
                holds, next_change = follow_ms >= 0, end if follow_ms >= 0 else NEVER
            value = value or holds
            change = min(change, next_change)
        return value, change

    def evidence(self, state: UserState, now: int) -> dict[str, Any]:
        instances: dict[str, list[int]] = state.trackers.get(self.tracker.id) or {}
        total = len(self.tracker.steps)
        return {
            "instances": [
                {
                    "match": key,
                    "steps_done": f"{done}/{total}",
                    "last_step_ms": last,
                    "completed_ms": t0 if t0 >= 0 else None,
                    "follow_up_ms": follow if follow >= 0 else None,
                }
                for key, (done, last, t0, follow) in sorted(
                    (key, inst[:4]) for key, inst in instances.items() if inst[0] > 0
                )
            ]
        }


ALL_EVENTS: Final = "\0*"  # route of trackers that look at every event
DEVICE_TRACKER_ID: Final = "dev"
MAX_DEVICES: Final = 16
DISABLE_PUSH_EVENT: Final = "Push Notifications Disabled"


def device_type(device: Mapping[str, Any], os_info: Mapping[str, Any], context: Any) -> str | None:
    """ios | android | web from Segment's `context.os.name` / `context.device.type`."""
    name = os_info.get("name")
    if isinstance(name, str):
        kind = _named_device_type(name)
        if kind is not None:
            return kind
    name = device.get("type")
    if isinstance(name, str):
        kind = _named_device_type(name)
        if kind is not None:
            return kind
    if isinstance(context, dict) and isinstance(context.get("userAgent"), str):
        return "web"
    return None


_DEVICE_TYPES: dict[str, str | None] = {}  # names seen -> their device type (bounded)


def _named_device_type(value: str) -> str | None:
    """The device type an os name or device type names, if any (memoised: a handful of
    names recur on every event)."""
    if value in _DEVICE_TYPES:
        return _DEVICE_TYPES[value]
    lowered = value.lower()
    kind: str | None = None
    if "android" in lowered:
        kind = "android"
    elif "ios" in lowered or "iphone" in lowered or "ipad" in lowered:
        kind = "ios"
    elif lowered in ("web", "browser"):
        kind = "web"
    if len(_DEVICE_TYPES) >= 1024:  # (names are input: keep the memo small)
        _DEVICE_TYPES.clear()
    _DEVICE_TYPES[value] = kind
    return kind


_NO_FIELDS: dict[str, Any] = {}  # (read only)


@final
class DeviceTracker(Tracker):
    """Devices a profile was seen on: `{device_id: [type, push 0|1, push_at_ms, seen_ms]}`.

    A device is push-enabled once it reported a token (`context.device.token`)
    and until a later event says otherwise (`context.device.push_enabled: false`
    or a `Push Notifications Disabled` track event, which without device context
    disables every device). Later-stamped facts win, so late events are safe.
    The MAX_DEVICES most recently seen devices are kept.
    """

    id = DEVICE_TRACKER_ID
    events = frozenset({ALL_EVENTS})

    def update(self, state: UserState, event: Event, now: int) -> bool:
        context = event.context
        raw_device = context.get("device")
        raw_os = context.get("os")
        device: dict[str, Any] = raw_device if isinstance(raw_device, dict) else _NO_FIELDS
        os_info: dict[str, Any] = raw_os if isinstance(raw_os, dict) else _NO_FIELDS
        kind = device_type(device, os_info, context)
        disables = event.type == "track" and event.name == DISABLE_PUSH_EVENT
        if kind is None and not disables:
            return False
        trackers = state.trackers
        devices: dict[str, list[Any]] = trackers.get(DEVICE_TRACKER_ID) or {}
        ts = event.timestamp_ms
        token = device.get("token")
        push = -1  # no push fact
        if disables or device.get("push_enabled") is False:
            push = 0
        elif isinstance(token, str) and token:
            push = 1
        changed = False
        if kind is None:
            if push >= 0:
                for each in devices.values():
                    if ts >= each[2]:
                        changed = changed or each[1] != push
                        each[1], each[2] = push, ts
        else:
            device_id = device.get("id") or device.get("advertisingId") or kind
            device_key = bounded_key(device_id if isinstance(device_id, str) else str(device_id))
            entry = devices.get(device_key)
            if entry is None:
                entry = devices[device_key] = [kind, 0, 0, ts]
                changed = True
            elif ts > entry[3]:
                entry[3] = ts
            if push >= 0 and ts >= entry[2]:
                changed = changed or entry[1] != push
                entry[1], entry[2] = push, ts
        if len(devices) > MAX_DEVICES:
            _keep_recent_devices(devices, state)
        trackers[DEVICE_TRACKER_ID] = devices
        return changed

    def merge(self, mine: Any, other: Any, now: int, state: UserState) -> Any:
        devices = {key: list(entry) for key, entry in other.items()}
        for key, entry in mine.items():
            theirs = devices.get(key)
            if theirs is None:
                devices[key] = list(entry)
                continue
            merged = list(entry if entry[3] >= theirs[3] else theirs)
            if theirs[2] > entry[2]:  # the later push fact wins
                merged[1], merged[2] = theirs[1], theirs[2]
            elif entry[2] > theirs[2]:
                merged[1], merged[2] = entry[1], entry[2]
            devices[key] = merged
        _keep_recent_devices(devices, state)
        return devices


def _keep_recent_devices(devices: dict[str, list[Any]], state: UserState) -> None:
    if len(devices) > MAX_DEVICES:
        state.drop("devices", len(devices) - MAX_DEVICES)
        for stale in sorted(devices, key=lambda k: devices[k][3])[: len(devices) - MAX_DEVICES]:
            del devices[stale]


@final
class DeviceNode(Node):
    def __init__(self, spec: Mapping[str, Any]) -> None:
        self.type: str = spec.get("type", "any")
        self.push_enabled: bool | None = spec.get("push_enabled")

    def evaluate(self, state: UserState, now: int) -> tuple[bool, int]:
        devices: dict[str, list[Any]] = state.trackers.get(DEVICE_TRACKER_ID) or {}
        for kind, push, _push_at, _seen in devices.values():
            if (self.type == "any" or kind == self.type) and (
                self.push_enabled is None or bool(push) == self.push_enabled
            ):
                return True, NEVER
        return False, NEVER

    def evidence(self, state: UserState, now: int) -> dict[str, Any]:
        devices: dict[str, list[Any]] = state.trackers.get(DEVICE_TRACKER_ID) or {}
        return {
            "devices": [
                {"id": key, "type": kind, "push_enabled": bool(push), "last_seen_ms": seen}
                for key, (kind, push, _at, seen) in sorted(devices.items())
            ]
        }


@final
class ComputedNode(Node):
    """Compares the current value of a computed trait (evaluated before audiences)."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self.name: str = spec["name"]
        self.op = spec["op"]
        self.expected = spec.get("value")
        self.predicate = compile_predicate(self.op, self.expected)
        self.relative = self.op in DURATION_OPERATORS

    def evaluate(self, state: UserState, now: int) -> tuple[bool, int]:
        entry = state.computed.get(self.name)
        value = entry[0] if entry is not None else None
        if not self.relative:
            return self.predicate(value, now), NEVER
        change = predicate_change_ms(self.op, self.expected, value, now)
        return self.predicate(value, now), NEVER if change is None else change

    def evidence(self, state: UserState, now: int) -> dict[str, Any]:
        entry = state.computed.get(self.name)
        return {"actual": entry[0] if entry is not None else None}
