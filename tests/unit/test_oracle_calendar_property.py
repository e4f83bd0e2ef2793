"""Calendar-day windows: the state machine agrees with the oracle across DST changes.

Random histories spread over days around the autumn changes of Europe/Berlin
(25 Oct 2026) and America/New_York (1 Nov 2026) — the spring ones too, in a
second suite — are driven as the runtime drives them (a Tick at every wake, a
codec round trip between inputs) and compared with the brute-force oracle, which
reads each event's local date straight off `datetime`, at every event, every
transition, just before each, and at (and just before) every local midnight of
both zones. Events also arrive out of order (late, by up to a day), so late
events in and out of the window are judged as the oracle judges them.
"""

from __future__ import annotations

import itertools
import random
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from factories import drive
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audiences.core.definitions import build_catalog, validate_definition
from audiences.core.definitions.traits import is_empty_value
from audiences.core.evaluator import Tick, TraitChange, Transition, step
from audiences.core.events import Event, parse_event
from audiences.core.oracle import is_member, trait_value
from audiences.core.state import UserState

M = 60_000
H = 60 * M
BERLIN = {"timezone": "Europe/Berlin"}
NEW_YORK = {"timezone": "America/New_York"}

TRAITS: list[dict[str, Any]] = [
    {
        "key": "checkouts_2d",
        "kind": "count",
        "event": "Checkout Started",
        "within": {"calendar_days": 2, **BERLIN},
    },
    {
        "key": "spent_3d",
        "kind": "sum",
        "event": "Order Completed",
        "property": "revenue",
        "within": {"calendar_days": 3, **NEW_YORK},
    },
    {
        "key": "cats_today",
        "kind": "unique_list",
        "event": "Product Viewed",
        "property": "category",
        "within": {"calendar_days": 1, **BERLIN},
    },
    {
        "key": "last_cat_2d",
        "kind": "last",
        "event": "Product Viewed",
        "property": "category",
        "within": {"calendar_days": 2, **NEW_YORK},
    },
]
for doc in TRAITS:
    doc["include_anonymous"] = True


def performed(event: str, days: int, zone: dict[str, str], **more: Any) -> dict[str, Any]:
    return {"performed": {"event": event, "within": {"calendar_days": days, **zone}, **more}}


AUDIENCES: list[dict[str, Any]] = [
    {"key": "checkout_today", "condition": performed("Checkout Started", 1, BERLIN)},
    {
        "key": "two_checkouts_2d",
        "condition": performed("Checkout Started", 2, NEW_YORK, times={"gte": 2}),
    },
    {"key": "no_order_3d", "condition": {"not": performed("Order Completed", 3, BERLIN)}},
    {
        "key": "at_most_one_view_2d",
        "condition": performed("Product Viewed", 2, BERLIN, times={"lte": 1}),
    },
    {
        "key": "exactly_two_orders",
        "condition": performed("Order Completed", 2, NEW_YORK, times={"eq": 2}),
    },
    {
        "key": "big_order_today",
        "condition": performed(
            "Order Completed", 1, NEW_YORK, where=[{"property": "revenue", "op": "gt", "value": 50}]
        ),
    },
    {
        "key": "pricing_today",
        "condition": {
            "page_viewed": {"url": "*/pricing", "within": {"calendar_days": 1, **NEW_YORK}}
        },
    },
    {
        "key": "home_twice_2d",
        "condition": {
            "screen_viewed": {
                "name": "Home",
                "times": {"gte": 2},
                "within": {"calendar_days": 2, **BERLIN},
            }
        },
    },
    {
        "key": "busy",
        "condition": {"computed": {"name": "checkouts_2d", "op": "gte", "value": 2}},
    },
]
for doc in AUDIENCES:
    doc["include_anonymous"] = True
DOCS = {d["key"]: validate_definition(d) for d in [*TRAITS, *AUDIENCES]}
CATALOG = build_catalog({k: (d, 1) for k, d in DOCS.items()})

raw_event = st.one_of(
    st.fixed_dictionaries(
        {"type": st.just("track"), "event": st.just("Checkout Started"), "properties": st.just({})}
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("track"),
            "event": st.just("Order Completed"),
            "properties": st.fixed_dictionaries({"revenue": st.integers(0, 100)}),
        }
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("track"),
            "event": st.just("Product Viewed"),
            "properties": st.fixed_dictionaries(
                {"category": st.sampled_from(["shoes", "bags", "hats"])}
            ),
        }
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("page"),
            "properties": st.fixed_dictionaries(
                {"url": st.sampled_from(["https://s.example/pricing", "https://s.example/"])}
            ),
        }
    ),
    st.fixed_dictionaries({"type": st.just("screen"), "name": st.sampled_from(["Home", "Cart"])}),
)
# gaps of 0 to 30 hours, in minutes (many land near midnights and in the repeated hour)
history_strategy = st.lists(st.tuples(st.integers(0, 30 * 60), raw_event), min_size=1, max_size=20)
AUTUMN = int(datetime(2026, 10, 22, 18, 0, tzinfo=UTC).timestamp() * 1000)
SPRING = int(datetime(2026, 3, 5, 18, 0, tzinfo=UTC).timestamp() * 1000)
AFTER_MS = 5 * 24 * H


def build_history(draws: list[tuple[int, dict[str, Any]]], start_ms: int) -> list[Event]:
    events, now = [], start_ms + 7 * 1000 + 3  # not on a whole minute
    for index, (gap_minutes, raw) in enumerate(draws):
        now += gap_minutes * M
        body = dict(raw, messageId=f"m{index}", timestamp=now, userId="u1")
        events.append(parse_event(body, now))
    return events


def midnights(first_ms: int, last_ms: int) -> set[int]:
    """Every local midnight of both zones between the two times (via datetime)."""
    found = set()
    for name in ("Europe/Berlin", "America/New_York"):
        zone = ZoneInfo(name)
        day = datetime.fromtimestamp(first_ms // 1000, zone).date()
        while True:
            midnight = datetime(day.year, day.month, day.day, tzinfo=zone)
            ms = int(midnight.timestamp()) * 1000
            if ms > last_ms:
                break
            found.add(ms)
            day += timedelta(days=1)
    return found


def check_against_oracle(history: list[Event], outputs: list[Any]) -> None:
    transitions = [t for t in outputs if isinstance(t, Transition)]
    changes = [t for t in outputs if isinstance(t, TraitChange)]
    end = history[-1].timestamp_ms + AFTER_MS
    probes = {e.timestamp_ms for e in history} | {t.at_ms for t in outputs}
    probes |= midnights(history[0].timestamp_ms, end)
    probes |= {p - 1 for p in probes} | {end}
    for audience in AUDIENCES:
        key = audience["key"]
        timeline = [(t.at_ms, t.entered) for t in transitions if t.audience_key == key]
        flags = [entered for _, entered in timeline]
        assert all(a != b for a, b in itertools.pairwise(flags)), (key, timeline)
        for probe in sorted(probes):
            engine = next((e for at, e in reversed(timeline) if at <= probe), False)
            assert engine == is_member(DOCS, key, history, probe), (key, probe, timeline)
    for doc in TRAITS:
        key = doc["key"]
        values = [(c.at_ms, c.value) for c in changes if c.trait_key == key]
        for probe in sorted(probes):
            seen = [e for e in history if e.timestamp_ms <= probe]
            expected = trait_value(doc, seen, probe)
            announced = [value for at, value in values if at <= probe]
            if announced:
                assert announced[-1] == expected, (key, probe, values)
            else:
                assert is_empty_value(doc["kind"], expected), (key, probe, expected)


@settings(
    max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(history_strategy)
def test_calendar_windows_match_the_oracle_across_the_autumn_changes(
    draws: list[tuple[int, dict[str, Any]]],
) -> None:
    history = build_history(draws, AUTUMN)
    check_against_oracle(history, drive(CATALOG, history, AFTER_MS))


@settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(history_strategy)
def test_calendar_windows_match_the_oracle_across_the_spring_changes(
    draws: list[tuple[int, dict[str, Any]]],
) -> None:
    history = build_history(draws, SPRING)
    check_against_oracle(history, drive(CATALOG, history, AFTER_MS))


def test_the_suites_cross_the_changes_and_see_transitions_at_midnights() -> None:
    """(The suites above are not vacuous: a plain history crosses both changes and the
    engine exits at local midnights.)"""
    draws = [(60 * 20, {"type": "track", "event": "Checkout Started", "properties": {}})] * 6
    history = build_history(draws, AUTUMN)
    outputs = drive(CATALOG, history, AFTER_MS)
    check_against_oracle(history, outputs)
    exits = {t.at_ms for t in outputs if isinstance(t, Transition) and not t.entered}
    assert exits and exits <= midnights(AUTUMN, history[-1].timestamp_ms + AFTER_MS)


# -- late arrival ------------------------------------------------------------------------


def judged_as_received(arrivals: list[Event]) -> list[tuple[str, int, list[str]]]:
    """After each input (events in arrival order, ticks at every wake), every membership
    is the oracle's on the events received so far, at the profile's clock."""
    state: UserState | None = None
    wake = 1 << 62
    received: list[Event] = []
    mismatches: list[tuple[str, int, list[str]]] = []

    def feed(item: Event | Tick) -> int:
        nonlocal state
        result = step(state, item, CATALOG, "p1")
        state = UserState.decode(result.state.encode())
        if isinstance(item, Event):
            received.append(item)
        clock = state.clock_ms
        wrong = [
            a["key"]
            for a in AUDIENCES
            if (a["key"] in state.members and state.members[a["key"]].member)
            != is_member(DOCS, a["key"], received, clock)
        ]
        if wrong:
            mismatches.append((repr(item), clock, wrong))
        return result.next_wake_ms

    end = max(e.timestamp_ms for e in arrivals) + AFTER_MS
    for event in arrivals:
        while wake < event.timestamp_ms:
            wake = feed(Tick(wake))
        wake = feed(event)
    while wake <= end:
        wake = feed(Tick(wake))
    return mismatches


@settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(history_strategy, st.integers(0, 2**32))
def test_late_events_are_judged_as_the_oracle_judges_them(
    draws: list[tuple[int, dict[str, Any]]], seed: int
) -> None:
    history = build_history(draws, AUTUMN)
    rng = random.Random(seed)
    late = [e.timestamp_ms + rng.randint(0, 24 * 60) * M for e in history]
    order = sorted(range(len(history)), key=lambda i: (late[i], i))
    assert judged_as_received([history[i] for i in order]) == []
