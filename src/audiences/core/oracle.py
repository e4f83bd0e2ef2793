"""Brute-force reference semantics: membership from a profile's full history.

No compaction, no deadlines, no incremental state: each question is answered
by scanning every event. Property tests check the streaming engine (`step`
driven by events and ticks) against this on random histories.

The per-value rules of computed traits are modelled (numbers must be finite
and within 64 bits, strings at most 128 bytes of JSON); the per-profile bounds
of `state.py` (counts of traits, timestamps, instances, distinct values, sums
near the 64-bit range) are not, nor is a funnel's reordering horizon (events arriving
later than it are ignored by the engine): the property tests' histories stay within them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import orjson

from audiences.core.definitions.conditions import compile_where, device_type
from audiences.core.durations import parse_duration_ms
from audiences.core.events import Event, compile_path
from audiences.core.operators import compile_predicate, wildcard_regex

Definitions = Mapping[str, Mapping[str, Any]]

_COMPARE = {
    "eq": lambda c, n: c == n,
    "gte": lambda c, n: c >= n,
    "gt": lambda c, n: c > n,
    "lte": lambda c, n: c <= n,
    "lt": lambda c, n: c < n,
}


DUPLICATE_WINDOW_S = 24 * 3600


def without_duplicates(history: Sequence[Event]) -> list[Event]:
    """`history` (arrival order) without the events that do not count (SPEC §11: the
    same messageId for the same profile within 24 h counts once, however many events
    came between), from the log alone.

    The profile's clock at an event is the latest event time so far, in whole seconds
    (that event's included, duplicates too); an event does not count when an earlier
    event with its messageId counted less than 24 h (86,400 s) earlier on that clock.
    Events without a messageId always count."""
    counted_at: dict[str, int] = {}  # messageId -> clock second when it last counted
    clock_s = -(1 << 62)
    out = []
    for event in history:
        clock_s = max(clock_s, event.timestamp_ms // 1000)
        message_id = event.message_id
        if message_id is not None:
            if counted_at.get(message_id, -(1 << 62)) > clock_s - DUPLICATE_WINDOW_S:
                continue
            counted_at[message_id] = clock_s
        out.append(event)
    return out


def is_member(definitions: Definitions, key: str, history: Sequence[Event], t: int) -> bool:
    """Membership of the profile with `history` (arrival order, duplicates included) in
    audience `key` at `t`. `definitions` may hold computed traits too (documents with
    `kind`)."""
    seen = [e for e in without_duplicates(history) if e.timestamp_ms <= t]
    return _is_member(definitions, key, seen, t)


def _is_member(definitions: Definitions, key: str, seen: list[Event], t: int) -> bool:
    """Membership: the audience's own condition, and — for an audience in a priority
    list (SPEC §3) — qualifying for none of the audiences listed before it."""
    if not _qualifies(definitions, key, seen, t):
        return False
    for list_key in sorted(definitions):
        listed = definitions[list_key].get("audiences")
        if definitions[list_key].get("kind") != "priority_list" or not isinstance(listed, list):
            continue
        if key in listed:
            before = listed[: listed.index(key)]
            return not any(k in definitions and _qualifies(definitions, k, seen, t) for k in before)
    return True


def _qualifies(definitions: Definitions, key: str, seen: list[Event], t: int) -> bool:
    """The audience's own condition (and its anonymous rule), priority lists aside."""
    if not seen:
        return False  # a profile exists from its first event on
    doc = definitions[key]
    anonymous = all(e.user_id is None for e in seen)
    if anonymous and not doc.get("include_anonymous", False):
        return False
    return _holds(definitions, _salted(doc, doc["condition"], seen), seen, t)


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
        return body in definitions and _is_member(definitions, body, seen, t)
    if name == "performed":
        return _performed(body, seen, t)
    if name == "trait":
        return _trait(body, seen, t)
    if name == "sequence":
        return _sequence(body, seen, t)
    if name in ("page_viewed", "screen_viewed"):
        return _viewed(name.split("_")[0], body, seen, t)
    if name == "device":
        return _device(body, seen)
    if name == "computed":
        value = _trait_value(definitions[body["name"]], seen, t)
        return compile_predicate(body["op"], body.get("value"))(value, t)
    if name == "random_bucket":  # (salted by `_salted`: the bucket itself)
        return int(body.get("gte", 0)) <= int(body["bucket"]) < int(body.get("lt", 10000))
    raise ValueError(f"oracle does not know {name!r}")


def _in_calendar_days(within: Mapping[str, Any], ts: int, t: int) -> bool:
    """A calendar window, read straight off the calendar: the event's local date is
    one of the N local dates ending with t's (SPEC §3), and it is not after t."""
    zone = ZoneInfo(within["timezone"])
    event_day = datetime.fromtimestamp(ts // 1000, zone).date()
    today = datetime.fromtimestamp(t // 1000, zone).date()
    return ts <= t and 0 <= (today - event_day).days < within["calendar_days"]


def _count_matches(times: list[int], body: Mapping[str, Any], t: int) -> bool:
    if isinstance(body.get("within"), dict):
        count = sum(1 for ts in times if _in_calendar_days(body["within"], ts, t))
    elif "within" in body:
        window = parse_duration_ms(body["within"])
        assert window is not None
        count = sum(1 for ts in times if t - window < ts <= t)
    elif "between" in body:
        near = parse_duration_ms(body["between"][0])
        far = parse_duration_ms(body["between"][1])
        assert near is not None and far is not None
        count = sum(1 for ts in times if t - far < ts <= t - near)
    else:
        count = len(times)
    ((op, n),) = (body.get("times") or {"gte": 1}).items()
    return bool(_COMPARE[op](count, n))


def _viewed(kind: str, body: Mapping[str, Any], seen: list[Event], t: int) -> bool:
    where = compile_where(body.get("where"))
    url = wildcard_regex(body["url"], anchored=True) if body.get("url") else None
    times = []
    for e in seen:
        if e.type != kind or ("name" in body and e.name != body["name"]):
            continue
        if url is not None:
            urls = [e.get(("properties", "url")), e.get(("context", "page", "url"))]
            if not any(isinstance(u, str) and url.match(u) for u in urls):
                continue
        if where is None or where(e):
            times.append(e.timestamp_ms)
    return _count_matches(times, body, t)


def _device(body: Mapping[str, Any], seen: list[Event]) -> bool:
    """Replays device facts in event-time order (ties: arrival order)."""
    devices: dict[str, list[Any]] = {}  # id -> [type, push]
    for _ts, _index, e in sorted((e.timestamp_ms, i, e) for i, e in enumerate(seen)):
        raw_device, raw_os = e.context.get("device"), e.context.get("os")
        device: dict[str, Any] = raw_device if isinstance(raw_device, dict) else {}
        os_info: dict[str, Any] = raw_os if isinstance(raw_os, dict) else {}
        kind = device_type(device, os_info, e.context)
        disables = e.type == "track" and e.name == "Push Notifications Disabled"
        if kind is not None:
            device_id = str(device.get("id") or device.get("advertisingId") or kind)
            entry = devices.setdefault(device_id, [kind, False])
            targets = [entry]
        else:
            targets = list(devices.values())
        if disables or device.get("push_enabled") is False:
            for entry in targets:
                entry[1] = False
        elif isinstance(device.get("token"), str) and device.get("token"):
            for entry in targets:
                entry[1] = True
    wanted, push = body.get("type", "any"), body.get("push_enabled")
    return any(
        (wanted == "any" or kind == wanted) and (push is None or enabled == push)
        for kind, enabled in devices.values()
    )


def trait_value(doc: Mapping[str, Any], history: Sequence[Event], t: int) -> Any:
    """A computed trait's value at `t`, from every matching event of `history` (arrival
    order, duplicates included) (SPEC §3; windows use the documented buckets of D/100:
    an event counts until its bucket start + D)."""
    return _trait_value(doc, without_duplicates(history), t)


def _trait_value(doc: Mapping[str, Any], seen: list[Event], t: int) -> Any:
    kind = doc["kind"]
    where = compile_where(doc.get("where"))
    path = compile_path(doc["property"]) if doc.get("property") else None
    within = doc.get("within")
    calendar = within if isinstance(within, dict) else None
    window = parse_duration_ms(within) if isinstance(within, str) else None
    rows: list[tuple[int, int, Any]] = []
    for index, e in enumerate(seen):
        ts = e.timestamp_ms
        if e.type != "track" or e.name != doc["event"] or ts > t:
            continue
        if where is not None and not where(e):
            continue
        if window is not None:
            bucket = max(1_000, window // 100)
            if ts - ts % bucket + window <= t:
                continue
        if calendar is not None and not _in_calendar_days(calendar, ts, t):
            continue  # (exact: calendar windows keep a bucket per local day)
        value = e.get(path) if path is not None else None
        numeric = isinstance(value, int | float) and not isinstance(value, bool)
        if isinstance(value, int | float) and not -(2**63) <= value < 2**63:
            continue  # (NaN and the infinities fail the comparison too)
        if kind in ("sum", "avg", "min", "max") and not numeric:
            continue
        if kind not in ("count", "sum", "avg", "min", "max") and not isinstance(
            value, str | int | float | bool
        ):
            continue
        if kind != "count" and isinstance(value, str) and len(orjson.dumps(value)) > 128:
            continue
        rows.append((ts, index, value))
    values = [v for _ts, _i, v in rows]
    if kind == "count":
        return len(rows)
    if kind == "sum":
        return sum(values)
    if kind == "avg":
        return sum(values) / len(values) if values else None
    if kind in ("min", "max"):
        return (min if kind == "min" else max)(values) if values else None
    if kind in ("first", "last"):
        if not rows:
            return None
        return (min if kind == "first" else max)(rows, key=lambda r: (r[0], r[1]))[2]
    distinct: list[Any] = []
    counts: list[int] = []
    for value in values:
        for i, known in enumerate(distinct):
            if type(known) is type(value) and known == value:
                counts[i] += 1
                break
        else:
            distinct.append(value)
            counts.append(1)

    def order(v: Any) -> tuple[int, Any]:
        if isinstance(v, bool):
            return (2, v)
        return (0, v) if isinstance(v, int | float) else (1, str(v))

    if kind == "unique_count":
        return len(distinct)
    if kind == "unique_list":
        return sorted(distinct, key=order)
    if not distinct:
        return None
    best = min(range(len(distinct)), key=lambda i: (-counts[i], order(distinct[i])))
    return distinct[best]


def _performed(body: Mapping[str, Any], seen: list[Event], t: int) -> bool:
    where = compile_where(body.get("where"))
    matching = [
        e.timestamp_ms
        for e in seen
        if e.type == "track" and e.name == body["event"] and (where is None or where(e))
    ]
    return _count_matches(matching, body, t)


def _trait(body: Mapping[str, Any], seen: list[Event], t: int) -> bool:
    traits: dict[str, Any] = {}
    times: dict[str, int] = {}  # per trait: the event time of its value
    for event in seen:  # (arrival order: at equal times the later arrival wins)
        sources = [event.context.get("traits")]
        if event.type == "identify":
            sources.append(event.traits)
        for source in sources:
            if isinstance(source, dict):
                for trait, value in source.items():
                    if event.timestamp_ms >= times.get(trait, -1):
                        traits[trait] = value
                        times[trait] = event.timestamp_ms
    node: Any = traits
    for part in body["name"].split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return compile_predicate(body["op"], body.get("value"))(node, t)


def _sequence(body: Mapping[str, Any], seen: list[Event], t: int) -> bool:
    """SPEC §3 funnels, by event time (§11: arrival order does not matter), from the
    events themselves — no engine tracker is used.

    The events of one `match_on` value are taken in event-time order (equal times in
    arrival order). An attempt starts with an event matching the first step; step k + 1
    is the first later event matching it at most its `within` after step k; t0 is the
    time of the last step. The follow-up is the first matching event after t0 (for
    `then`: at most its `within` after t0) while the attempt is not over (before
    t0 + `active_for`). An event matching the first step that the attempt does not take
    as a step or as its follow-up starts the next attempt: each value keeps only its
    latest. At `t` the latest attempt holds if it is complete, t < t0 + `active_for`, and
    with `then`: its follow-up happened; with `then_not`: t >= t0 + within and none did;
    with neither: always.
    """
    steps = [_filter_of(s) for s in body["steps"]]
    negative = "then_not" in body
    follow_spec = body.get("then_not") if negative else body.get("then")
    follow = _filter_of(follow_spec) if follow_spec else None
    follow_within = parse_duration_ms(follow_spec["within"]) if follow_spec else None
    withins = [parse_duration_ms(s["within"]) if s.get("within") else None for s in body["steps"]]
    active = parse_duration_ms(body["active_for"]) if body.get("active_for") else None
    path = compile_path(body["match_on"]) if body.get("match_on") else None
    by_value: dict[str, list[Event]] = {}
    order = sorted(range(len(seen)), key=lambda i: seen[i].timestamp_ms)  # (stable)
    for event in (seen[i] for i in order):
        if path is None:
            by_value.setdefault("", []).append(event)
            continue
        value = event.get(path)
        if value is not None and not isinstance(value, dict | list):
            by_value.setdefault(str(value), []).append(event)

    def is_step(k: int, e: Event) -> bool:
        return _filter_matches(steps[k], e)

    def attempt(events: list[Event], start: int) -> tuple[list[int], int | None, int]:
        """Step times of the attempt starting at `start`, its follow-up time (None) and
        the index of the event starting the next attempt (len(events) if none)."""
        times = [events[start].timestamp_ms]
        follow_ts: int | None = None
        for j in range(start + 1, len(events)):
            e, ts = events[j], events[j].timestamp_ms
            if len(times) == len(steps):
                t0 = times[-1]
                over = active is not None and ts >= t0 + active
                if (
                    follow is not None
                    and follow_ts is None
                    and not over
                    and ts > t0
                    and (negative or ts - t0 <= (follow_within or 0))
                    and _filter_matches(follow, e)
                ):
                    follow_ts = ts
                    continue
            else:
                k = len(times)
                within = withins[k]
                if is_step(k, e) and (within is None or ts - times[-1] <= within):
                    times.append(ts)
                    continue
            if is_step(0, e):
                return times, follow_ts, j
        return times, follow_ts, len(events)

    for events in by_value.values():
        starts = [i for i, e in enumerate(events) if is_step(0, e)]
        if not starts:
            continue
        begin = starts[0]
        while True:
            times, follow_ts, after = attempt(events, begin)
            if after >= len(events):
                break
            begin = after
        if len(times) < len(steps):
            continue
        t0 = times[-1]
        if active is not None and t >= t0 + active:
            continue
        if follow is None:
            return True
        assert follow_within is not None
        if negative and follow_ts is None and t >= t0 + follow_within:
            return True
        if not negative and follow_ts is not None:
            return True
    return False


def _filter_of(spec: Mapping[str, Any]) -> tuple[str, list[tuple[tuple[str, ...], Any]]]:
    """A step or follow-up: the track event's name and its `where` predicates."""
    where = [
        (compile_path(f["property"]), compile_predicate(f["op"], f.get("value")))
        for f in spec.get("where") or ()
    ]
    return spec["event"], where


def _filter_matches(spec: tuple[str, list[tuple[tuple[str, ...], Any]]], event: Event) -> bool:
    name, where = spec
    if event.type != "track" or event.name != name:
        return False
    return all(predicate(event.get(path), event.timestamp_ms) for path, predicate in where)


# -- identity (SPEC §4/§11), from the log alone ---------------------------------------------

MAX_LINKS = 100  # SPEC §11: a profile takes at most 100 merges


class Identities:
    """Whose history each event is part of over time, by the identity rules alone:

    - an event with a userId U and another id A (`previousId` of an alias, else its
      `anonymousId`) links A to U: from the event's time on, every event A's profile
      holds (and A's later events) are U's;
    - refused (`merge_refused`) when A has been a userId before (a known user) or is
      linked to another user; refused (`merge_limit`) when U already linked 100 ids;
      an id U linked before stays U's claim (linking it again does nothing);
    - an id linked before it was seen, that then sends an event as a userId, is its
      own profile again from then on (what U held of it stays U's);
    - deleting U deletes U and the ids linked to it: their events belong to nobody
      from then on, and later events of theirs are dropped (until `unsuppress`).

    Records are taken in log order, each delivered at once (as the in-memory cluster
    of the tests does); control records other than `delete`/`unsuppress` are ignored."""

    def __init__(self, log: Sequence[Event]) -> None:
        self.events: list[Event] = []
        self.owners: list[list[tuple[int, str | None]]] = []  # per event: (from, profile)
        self.refused: list[tuple[Event, str]] = []
        self.deleted_at: dict[str, int] = {}
        known: set[str] = set()  # ids seen as a userId
        linked: dict[str, str] = {}  # id -> the user it is linked to now
        claimed: dict[str, set[str]] = {}  # user -> every id it linked
        deleted: set[str] = set()
        for event in log:
            t = event.timestamp_ms
            key = event.user_id or event.anonymous_id or ""
            if event.type == "unsuppress":
                deleted.discard(key)
                continue
            if key in deleted or event.type == "merge":
                continue
            if event.type == "delete":
                gone = {key} | {other for other, user in linked.items() if user == key}
                self._move(gone, None, t)
                for other in gone:
                    linked.pop(other, None)
                    self.deleted_at[other] = t
                deleted |= gone
                claimed.pop(key, None)
                continue
            if event.user_id is not None:
                linked.pop(key, None)  # (its own profile again, if it was linked)
                known.add(key)
            self.events.append(event)
            self.owners.append([(t, linked.get(key, key))])
            if event.user_id is None:
                continue
            target = event.raw.get("previousId") if event.type == "alias" else event.anonymous_id
            if not isinstance(target, str) or not target or target == key:
                continue
            mine = claimed.setdefault(key, set())
            if target in mine:
                continue
            if len(mine) >= MAX_LINKS:
                self.refused.append((event, "merge_limit"))
            elif target in known or target in linked:
                self.refused.append((event, "merge_refused"))
            else:
                mine.add(target)
                if target not in deleted:
                    linked[target] = key
                    self._move({target}, key, t)

    def _move(self, profiles: set[str], to: str | None, t: int) -> None:
        for owners in self.owners:
            if owners[-1][1] in profiles:
                owners.append((t, to))

    def history(self, profile: str, t: int) -> list[Event]:
        """The events profile `profile` is judged on at time `t` (arrival order)."""
        out = []
        for event, owners in zip(self.events, self.owners, strict=True):
            if event.timestamp_ms > t:
                continue
            owner = owners[0][1]
            for since, who in owners:
                if since <= t:
                    owner = who
            if owner == profile:
                out.append(event)
        return out


# -- account audiences (SPEC §3 "subject": "account"), from the whole log -------------------


def account_is_member(
    definitions: Definitions, key: str, log: Sequence[Event], group_id: str, t: int
) -> bool:
    """Membership of account `group_id` in account audience `key` at `t`, from the whole
    log (arrival order) of its users, for known users (no identity merges):

    - a user is linked to the account when its last counted `group` call naming the
      account (arrival order, duplicates dropped as `without_duplicates` drops them) did
      not carry `traits.removed: true`, and no `delete` of the user came after it;
    - each linked user's value of an inner condition c is its membership, at `t`, in an
      audience whose condition is c (on its own history, `is_member`);
    - a group trait has the value of the latest (event time; the later arrival on a
      tie) counted `group` call naming the account that carries it, of any user, that
      is not a removal;
    - any: a linked user satisfies c; all: at least one user is linked and all do;
      none: no linked user does;
    - an account nobody ever linked is no member of anything."""
    doc = definitions[key]
    lives: dict[str, list[tuple[int, Event]]] = {}  # user -> (arrival, event) since its delete
    deleted: set[str] = set()
    counted: list[tuple[int, Event]] = []  # counted group calls naming the account

    def close(user: str) -> tuple[list[Event], list[Event]]:
        life = lives.pop(user, [])
        kept = {id(e) for e in without_duplicates([e for _i, e in life])}
        counted.extend(
            (i, e)
            for i, e in life
            if id(e) in kept and e.type == "group" and str(e.raw.get("groupId")) == group_id
        )
        return [e for _i, e in life], [e for _i, e in life if id(e) in kept]

    for index, event in enumerate(log):
        user = event.user_id or event.anonymous_id or ""
        if event.type == "unsuppress":
            deleted.discard(user)
            continue
        if user in deleted or event.type in ("merge", "account"):
            continue
        if event.type == "delete":
            close(user)
            deleted.add(user)
            continue
        lives.setdefault(user, []).append((index, event))
    by_user = {user: close(user) for user in sorted(lives)}
    linked: list[str] = []
    for user, (_raw, events) in by_user.items():
        last = [e for e in events if e.type == "group" and str(e.raw.get("groupId")) == group_id]
        last = [e for e in last if e.timestamp_ms <= t]
        if last and last[-1].traits.get("removed") is not True:
            linked.append(user)
    calls = [(i, e) for i, e in counted if e.timestamp_ms <= t]
    if not any(e.traits.get("removed") is not True for _i, e in calls):
        return False  # nobody ever linked it: the account has no profile
    traits: dict[str, tuple[tuple[int, int], Any]] = {}
    for i, e in calls:
        if e.traits.get("removed") is True:
            continue
        for name, value in e.traits.items():
            order = (e.timestamp_ms, i)
            if name not in traits or order >= traits[name][0]:
                traits[name] = (order, value)
    group_traits = {name: value for name, (_at, value) in traits.items()}

    def holds(condition: Mapping[str, Any]) -> bool:
        ((name, body),) = condition.items()
        if name == "all":
            return all(holds(c) for c in body)
        if name == "any":
            return any(holds(c) for c in body)
        if name == "not":
            return not holds(body)
        ((field, inner),) = body.items()
        if field == "trait":
            value: Any = group_traits
            for part in str(inner["name"]).split("."):
                value = value.get(part) if isinstance(value, dict) else None
            return bool(compile_predicate(inner["op"], inner.get("value"))(value, t))
        inner_doc = {
            "key": "?",
            "condition": inner,
            "include_anonymous": doc.get("include_anonymous", False),
        }
        scope = {**definitions, "?": inner_doc}
        values = [is_member(scope, "?", by_user[user][0], t) for user in linked]
        if field == "any":
            return any(values)
        if field == "all":
            return bool(values) and all(values)
        return not any(values)

    return holds(doc["condition"])


# -- random buckets and holdouts (SPEC §3) -----------------------------------------------------


def profile_id(seen: Sequence[Event]) -> str:
    """The id a profile's buckets hash, from its events alone (SPEC §3): its userId, or
    for a profile that never sent one, its anonymousId."""
    for event in seen:
        if event.user_id is not None:
            return event.user_id
    return next((e.anonymous_id for e in seen if e.anonymous_id is not None), "")


def bucket(salt: str, profile: str) -> int:
    """The first 64 bits of sha256("{salt}|{profile}"), big-endian, modulo 10,000."""
    hex_digits = hashlib.sha256((salt + "|" + profile).encode("utf-8", "surrogatepass")).hexdigest()
    return int(hex_digits[:16], 16) % 10000


def in_holdout(doc: Mapping[str, Any], profile: str) -> bool:
    """Whether `profile` is in audience `doc`'s holdout (False without a holdout)."""
    holdout = doc.get("holdout")
    if not holdout:
        return False
    salt = holdout.get("salt") or doc["key"] + ":holdout"
    return bucket(salt, profile) < Decimal(str(holdout["percent"])) * 100


def _salted(doc: Mapping[str, Any], condition: Any, seen: Sequence[Event]) -> Any:
    """`condition` with each `random_bucket` body given the profile's bucket under the
    definition's salt (`salt`, else its key)."""
    if isinstance(condition, list):
        return [_salted(doc, c, seen) for c in condition]
    if not isinstance(condition, dict):
        return condition
    ((name, body),) = condition.items()
    if name == "random_bucket":
        salt = doc.get("salt") or doc["key"]
        return {name: {**body, "bucket": bucket(salt, profile_id(seen))}}
    if name in ("all", "any", "not"):
        return {name: _salted(doc, body, seen)}
    return condition
