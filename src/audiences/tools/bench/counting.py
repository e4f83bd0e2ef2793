"""Per-user counting of `performed … times … within` rules: the work of the simple contenders.

The Quix Streams application and the plain confluent-kafka loop of `audiences
bench` do this per event instead of the engine's full condition language: for
each rule (from `workload.counting_rules`: an event name, a `where` filter, a
threshold N and a window W) a user keeps the N most recent matching event
times (as Apache Unomi and the engine do: the N-th most recent + W is the
exit deadline). A user is in a rule's audience at time t when it has N times
and the N-th most recent is > t - W. Each event first lets the rules the user
is in expire (the engine fires deadlines <= t before an event at t), then
counts the rules it matches; every change of membership is a transition,
emitted as an "Audience Entered"/"Audience Exited" record.

Stdlib only: the Quix contender runs it in its own virtual environment, where
nothing but quixstreams (and its dependencies) is installed.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

State = dict[str, Any]  # {"t": {rule index: [times, oldest first]}, "m": membership bit mask}
Transition = tuple[str, bool]  # (rule id, entered)

_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "eq": lambda a, e: a == e,
    "neq": lambda a, e: a != e,
    "gt": lambda a, e: isinstance(a, int | float) and a > e,
    "gte": lambda a, e: isinstance(a, int | float) and a >= e,
    "lt": lambda a, e: isinstance(a, int | float) and a < e,
    "lte": lambda a, e: isinstance(a, int | float) and a <= e,
    "in": lambda a, e: a in e,
    "exists": lambda a, _e: a is not None,
}


def parse_time_ms(text: str) -> int:
    """Epoch milliseconds of an ISO-8601 timestamp ("2026-01-01T00:00:00.000Z")."""
    return int(datetime.fromisoformat(text).timestamp() * 1000)


class Counter:
    """The rules, indexed by event name; `apply` is pure (returns a new state)."""

    def __init__(self, rules: list[dict[str, Any]]) -> None:
        self.rules = rules
        self.by_event: dict[str, list[int]] = {}
        self.filters: list[list[tuple[str, Callable[[Any, Any], bool], Any]]] = []
        for index, rule in enumerate(rules):
            self.by_event.setdefault(rule["event"], []).append(index)
            self.filters.append([(p, _COMPARE[op], value) for p, op, value in rule["where"]])

    def apply(
        self, state: State | None, name: str | None, properties: dict[str, Any], at_ms: int
    ) -> tuple[State | None, list[Transition]]:
        """(new state or None when unchanged, transitions) of an event `name` at `at_ms`."""
        rules = self.rules
        times: dict[str, list[int]] = state["t"] if state is not None else {}
        members: int = state["m"] if state is not None else 0
        before = members
        changed = False
        out: list[Transition] = []
        # 1. deadlines <= at_ms first: the rules the user is in may have expired
        if members:
            for index, rule in enumerate(rules):
                bit = 1 << index
                if members & bit:
                    held = times.get(str(index)) or []
                    n = rule["times"]
                    if len(held) < n or held[-n] <= at_ms - rule["window_ms"]:
                        members &= ~bit
                        out.append((rule["id"], False))
        # 2. the rules this event counts for
        for index in self.by_event.get(name or "", ()):
            if any(not test(properties.get(p), value) for p, test, value in self.filters[index]):
                continue
            rule = rules[index]
            n = rule["times"]
            key = str(index)
            previous = times.get(key)
            kept = [] if previous is None else list(previous)
            kept.append(at_ms)
            if len(kept) > 1 and kept[-2] > at_ms:
                kept.sort()  # a late event
            if len(kept) > n:
                del kept[: len(kept) - n]
            if not changed:
                times = dict(times)
                changed = True
            times[key] = kept
            bit = 1 << index
            inside = len(kept) >= n and kept[-n] > at_ms - rule["window_ms"]
            if inside and not members & bit:
                members |= bit
                out.append((rule["id"], True))
        if not changed and members == before:
            return None, out
        return {"t": times, "m": members}, out


def output(user_id: str, transition: Transition, message_id: str | None, at: str) -> dict[str, Any]:
    """The record a simple contender produces for a transition (Segment-shaped, like the
    engine's, without traits)."""
    rule, entered = transition
    return {
        "type": "track",
        "event": "Audience Entered" if entered else "Audience Exited",
        "userId": user_id,
        "timestamp": at,
        "properties": {"audience_key": rule, "reason": {"messageId": message_id}},
    }
