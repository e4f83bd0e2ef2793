"""Brute-force reference semantics: membership from a profile's full history.

No compaction, no deadlines, no incremental state: each question is answered
by scanning every event. Property tests check the streaming engine (`step`
driven by events and ticks) against this on random histories.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from audiences.core.definitions.conditions import EventMatcher, compile_where
from audiences.core.durations import parse_duration_ms
from audiences.core.events import Event, compile_path
from audiences.core.operators import compile_predicate

Definitions = Mapping[str, Mapping[str, Any]]

_COMPARE = {
    "eq": lambda c, n: c == n,
    "gte": lambda c, n: c >= n,
    "gt": lambda c, n: c > n,
    "lte": lambda c, n: c <= n,
    "lt": lambda c, n: c < n,
}


def is_member(definitions: Definitions, key: str, history: Sequence[Event], t: int) -> bool:
    """Membership of the profile with `history` (arrival order) in audience `key` at `t`."""
    seen = [e for e in history if e.timestamp_ms <= t]
    if not seen:
        return False  # a profile exists from its first event on
    doc = definitions[key]
    anonymous = all(e.user_id is None for e in seen)
    if anonymous and not doc.get("include_anonymous", False):
        return False
    return _holds(definitions, doc["condition"], seen, t)


def _holds(
    definitions: Definitions, condition: Mapping[str, Any], seen: list[Event], t: int
) -> bool:
    ((name, body),) = condition.items()
    if name == "all":
        return all(_holds(definitions, c, seen, t) for c in body)
    if name == "any":
        return any(_holds(definitions, c, seen, t) for c in body)
    if name == "not":
        return not _holds(definitions, body, seen, t)
    if name == "in_audience":
        return body in definitions and is_member(definitions, body, seen, t)
    if name == "performed":
        return _performed(body, seen, t)
    if name == "trait":
        return _trait(body, seen, t)
    if name == "sequence":
        return _sequence(body, seen, t)
    raise ValueError(f"oracle does not know {name!r}")


def _performed(body: Mapping[str, Any], seen: list[Event], t: int) -> bool:
    where = compile_where(body.get("where"))
    matching = [
        e.timestamp_ms
        for e in seen
        if e.type == "track" and e.name == body["event"] and (where is None or where(e))
    ]
    if "within" in body:
        window = parse_duration_ms(body["within"])
        assert window is not None
        count = sum(1 for ts in matching if t - window < ts <= t)
    elif "between" in body:
        near = parse_duration_ms(body["between"][0])
        far = parse_duration_ms(body["between"][1])
        assert near is not None and far is not None
        count = sum(1 for ts in matching if t - far < ts <= t - near)
    else:
        count = len(matching)
    ((op, n),) = (body.get("times") or {"gte": 1}).items()
    return bool(_COMPARE[op](count, n))


def _trait(body: Mapping[str, Any], seen: list[Event], t: int) -> bool:
    traits: dict[str, Any] = {}
    latest = 0
    for event in seen:
        newer = event.timestamp_ms >= latest
        sources = [event.context.get("traits")]
        if event.type == "identify":
            sources.append(event.traits)
        changed = False
        for source in sources:
            if isinstance(source, dict):
                for trait, value in source.items():
                    if (newer or trait not in traits) and traits.get(trait, ...) != value:
                        traits[trait] = value
                        changed = True
        if changed and newer:
            latest = event.timestamp_ms
    node: Any = traits
    for part in body["name"].split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return compile_predicate(body["op"], body.get("value"))(node, t)


def _sequence(body: Mapping[str, Any], seen: list[Event], t: int) -> bool:
    steps = [EventMatcher(s) for s in body["steps"]]
    follow_spec = body.get("then_not") or body.get("then")
    follow = EventMatcher(follow_spec) if follow_spec else None
    negative = "then_not" in body
    active = parse_duration_ms(body["active_for"]) if body.get("active_for") else None
    path = compile_path(body["match_on"]) if body.get("match_on") else None
    instances: dict[str, list[int]] = {}
    for event in seen:
        if path is not None:
            value = event.get(path)
            if value is None or isinstance(value, dict | list):
                continue
            match_key = str(value)
        else:
            match_key = ""
        ts = event.timestamp_ms
        inst = instances.get(match_key)
        if inst is not None and inst[0] == len(steps) and inst[3] < 0 and follow is not None:
            assert follow.within_ms is not None
            if (
                ts > inst[2]
                and follow.matches(event)
                and (negative or ts - inst[2] <= follow.within_ms)
            ):
                inst[3] = ts
                continue
        if inst is not None and inst[0] < len(steps):
            nxt = steps[inst[0]]
            if (
                ts >= inst[1]
                and nxt.matches(event)
                and (nxt.within_ms is None or ts - inst[1] <= nxt.within_ms)
            ):
                inst[0] += 1
                inst[1] = ts
                if inst[0] == len(steps):
                    inst[2], inst[3] = ts, -1
                continue
        if steps[0].matches(event):
            instances[match_key] = [1, ts, ts if len(steps) == 1 else -1, -1]
    for done, _last, t0, follow_ts in instances.values():
        if done < len(steps) or (active is not None and t >= t0 + active):
            continue
        if follow is None:
            return True
        assert follow.within_ms is not None
        if negative and follow_ts < 0 and t >= t0 + follow.within_ms:
            return True
        if not negative and follow_ts >= 0:
            return True
    return False
