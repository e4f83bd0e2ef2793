"""The streaming state machine agrees with the brute-force oracle on random histories."""

from __future__ import annotations

import itertools
import random
from typing import Any

from factories import drive
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audiences.core.definitions import build_catalog, validate_definition
from audiences.core.evaluator import Tick, Transition, step
from audiences.core.events import Event, parse_event
from audiences.core.oracle import is_member, without_duplicates
from audiences.core.state import UserState

S = 1_000
EVENTS = ["Checkout Started", "Order Completed", "Product Viewed"]

DEFINITIONS: list[dict[str, Any]] = [
    {
        "key": "abandoners",
        "condition": {
            "sequence": {
                "steps": [{"event": "Checkout Started"}],
                "then_not": {"event": "Order Completed", "within": "20s"},
                "match_on": "properties.cart_id",
                "active_for": "90s",
            }
        },
    },
    {
        "key": "funnel",
        "condition": {
            "sequence": {
                "steps": [
                    {"event": "Product Viewed"},
                    {"event": "Checkout Started", "within": "30s"},
                ],
                "then": {"event": "Order Completed", "within": "15s"},
                "active_for": "60s",
            }
        },
    },
    {
        "key": "frequent",
        "condition": {
            "performed": {"event": "Product Viewed", "times": {"gte": 3}, "within": "40s"}
        },
    },
    {
        "key": "exactly_two",
        "condition": {
            "performed": {"event": "Order Completed", "times": {"eq": 2}, "within": "50s"}
        },
    },
    {
        "key": "no_orders",
        "condition": {"not": {"performed": {"event": "Order Completed", "within": "30s"}}},
    },
    {
        "key": "earlier_buyer",
        "condition": {"performed": {"event": "Order Completed", "between": ["10s", "35s"]}},
    },
    {
        "key": "big_spender",
        "condition": {
            "performed": {
                "event": "Order Completed",
                "where": [{"property": "revenue", "op": "gte", "value": 50}],
                "times": {"gte": 2},
            }
        },
    },
    {
        "key": "few_views",
        "condition": {
            "performed": {"event": "Product Viewed", "times": {"lte": 1}, "within": "25s"}
        },
    },
    {
        "key": "not_many_views",
        "condition": {
            "performed": {"event": "Product Viewed", "times": {"lt": 3}, "within": "35s"}
        },
    },
    {
        "key": "more_than_one_order",
        "condition": {
            "performed": {"event": "Order Completed", "times": {"gt": 1}, "within": "45s"}
        },
    },
    {
        "key": "vip",
        "condition": {
            "all": [
                {"trait": {"name": "plan", "op": "eq", "value": "pro"}},
                {"any": [{"in_audience": "frequent"}, {"in_audience": "big_spender"}]},
            ]
        },
    },
    {
        "key": "lapsed",
        "condition": {
            "all": [{"not": {"in_audience": "no_orders"}}, {"not": {"in_audience": "exactly_two"}}]
        },
        "include_anonymous": True,
    },
]
DOCS = {d["key"]: validate_definition(d) for d in DEFINITIONS}
CATALOG = build_catalog({k: (d, 1) for k, d in DOCS.items()})

raw_event = st.one_of(
    st.fixed_dictionaries(
        {
            "type": st.just("track"),
            "event": st.sampled_from(EVENTS),
            "properties": st.fixed_dictionaries(
                {"cart_id": st.sampled_from(["a", "b"]), "revenue": st.integers(0, 100)}
            ),
        }
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("identify"),
            "traits": st.fixed_dictionaries({"plan": st.sampled_from(["free", "pro"])}),
        }
    ),
)
history_strategy = st.lists(
    st.tuples(st.integers(0, 25), raw_event, st.booleans()), min_size=1, max_size=25
)


def build_history(draws: list[tuple[int, dict[str, Any], bool]]) -> list[Event]:
    events, now = [], 1_000_000 * S
    for index, (gap_s, raw, known) in enumerate(draws):
        now += gap_s * S
        body = dict(raw, messageId=f"m{index}", timestamp=now, anonymousId="anon1")
        if known:
            body["userId"] = "u1"
        events.append(parse_event(body, now))
    return events


def run_engine(history: list[Event]) -> list[tuple[int, str, bool]]:
    return [
        (t.at_ms, t.audience_key, t.entered)
        for t in drive(CATALOG, history, 200 * S)
        if isinstance(t, Transition)
    ]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history_strategy)
def test_engine_matches_oracle(draws: list[tuple[int, dict[str, Any], bool]]) -> None:
    history = build_history(draws)
    changes = run_engine(history)
    probes = {e.timestamp_ms for e in history} | {at for at, _, _ in changes}
    probes |= {p - 1 for p in probes} | {history[-1].timestamp_ms + 200 * S}
    for key in DOCS:
        timeline = [(at, entered) for at, k, entered in changes if k == key]
        flags = [entered for _, entered in timeline]
        assert all(a != b for a, b in itertools.pairwise(flags)), (key, timeline)
        for probe in sorted(probes):
            engine = next((e for at, e in reversed(timeline) if at <= probe), False)
            expected = is_member(DOCS, key, history, probe)
            assert engine == expected, (key, probe, timeline)


# -- re-sent duplicates (SPEC §11): the oracle drops them from the log alone -------------

BIG_GAPS = [23 * 3600, 86_399, 86_400, 86_401, 25 * 3600]  # seconds: around the 24 h
gap_strategy = st.one_of(
    st.integers(0, 25), st.integers(0, 25), st.integers(0, 25), st.sampled_from(BIG_GAPS)
)
resent_strategy = st.lists(
    st.tuples(gap_strategy, raw_event, st.booleans(), st.none() | st.integers(0, 1000)),
    min_size=1,
    max_size=30,
)


def build_history_with_copies(
    draws: list[tuple[int, dict[str, Any], bool, int | None]],
) -> list[Event]:
    """Events, some of them copies of earlier ones (the same messageId and content)
    re-sent later, stamped when re-sent: 23 h to 25 h later too."""
    events, sent, now = [], [], 1_000_000 * S
    for index, (gap_s, raw, known, copy) in enumerate(draws):
        now += gap_s * S
        if copy is not None and sent:
            body = dict(sent[copy % len(sent)], timestamp=now)
        else:
            body = dict(raw, messageId=f"m{index}", timestamp=now, anonymousId="anon1")
            if known:
                body["userId"] = "u1"
            sent.append(body)
        events.append(parse_event(body, now))
    return events


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(resent_strategy)
def test_engine_matches_oracle_with_resent_duplicates(
    draws: list[tuple[int, dict[str, Any], bool, int | None]],
) -> None:
    history = build_history_with_copies(draws)
    changes = run_engine(history)
    probes = {e.timestamp_ms for e in history} | {at for at, _, _ in changes}
    probes |= {p - 1 for p in probes} | {history[-1].timestamp_ms + 200 * S}
    for key in DOCS:
        timeline = [(at, entered) for at, k, entered in changes if k == key]
        for probe in sorted(probes):
            engine = next((e for at, e in reversed(timeline) if at <= probe), False)
            expected = is_member(DOCS, key, history, probe)
            assert engine == expected, (key, probe, timeline)


def test_the_oracle_drops_copies_within_24_hours_of_the_profile_clock() -> None:
    """The rule the property above holds the engine to, on a known log."""
    body = {"type": "track", "event": "Order Completed", "userId": "u1"}

    def event(message_id: str, at_s: int) -> Event:
        return parse_event(dict(body, messageId=message_id, timestamp=at_s * S), at_s * S)

    t = 1_000_000
    log = [
        event("a", t),
        event("b", t + 10),
        *[event(f"x{i}", t + 20 + i) for i in range(40)],  # many events between
        event("a", t + 100),  # dropped
        event("c", t + 86_399),
        event("a", t),  # (its own old time) dropped: the clock says 86,399 s later
        event("a", t + 86_400),  # 24 h after "a" counted: counts again
        event("a", t + 86_401),  # dropped: "a" counted again 1 s ago
        event("b", t + 86_409),  # dropped: "b" counted at t + 10, 86,399 s ago
        event("b", t + 86_410),  # counts: 86,400 s
    ]
    kept = without_duplicates(log)
    assert [
        (e.message_id, e.timestamp_ms // S - t) for e in kept if not e.message_id.startswith("x")
    ] == [
        ("a", 0),
        ("b", 10),
        ("c", 86_399),
        ("a", 86_400),
        ("b", 86_410),
    ]
    assert len(kept) == 45


# -- shuffled arrival (SPEC §11): the same memberships as sorted input ----------------------

DISORDER_S = 40  # an event arrives up to 40 s late: inside both funnels' horizons (60 s, 90 s)


def shuffled(history: list[Event], seed: int) -> list[Event]:
    """`history` (time order) in an arrival order where the events of each distinct time
    arrive 0 to DISORDER_S seconds late (drawn with `seed`); events of the same time keep
    their order (ties are taken in arrival order, so they are part of what "sorted" means)."""
    rng = random.Random(seed)
    late = {ts: rng.randint(0, DISORDER_S) * S for ts in sorted({e.timestamp_ms for e in history})}
    order = sorted(
        range(len(history)),
        key=lambda i: (history[i].timestamp_ms + late[history[i].timestamp_ms], i),
    )
    return [history[i] for i in order]


def judged_as_received(
    arrivals: list[Event], after_ms: int
) -> tuple[list[tuple[str, int, list[str]]], set[str]]:
    """Drive `step` as the runtime does (a Tick at every wake before the next event's
    time, a codec round trip between inputs) and after each input compare every
    membership with the oracle on the events received so far, at the profile's clock."""
    state: UserState | None = None
    wake = 1 << 62
    received: list[Event] = []
    mismatches: list[tuple[str, int, list[str]]] = []
    flags: dict[str, list[bool]] = {}

    def feed(item: Event | Tick) -> int:
        nonlocal state
        result = step(state, item, CATALOG, "p1")
        state = UserState.decode(result.state.encode())
        for t in result.transitions:
            if isinstance(t, Transition):
                flags.setdefault(t.audience_key, []).append(t.entered)
        if isinstance(item, Event):
            received.append(item)
        clock = state.clock_ms
        wrong = [
            key
            for key in DOCS
            if (key in state.members and state.members[key].member)
            != is_member(DOCS, key, received, clock)
        ]
        if wrong:
            mismatches.append((repr(item), clock, wrong))
        return result.next_wake_ms

    end = max(e.timestamp_ms for e in arrivals) + after_ms
    for event in arrivals:
        while wake < event.timestamp_ms:
            wake = feed(Tick(wake))
        wake = feed(event)
    while wake <= end:
        wake = feed(Tick(wake))
    for key, entered in flags.items():  # transitions alternate: enter, exit, enter, ...
        assert all(a != b for a, b in itertools.pairwise(entered)), (key, entered)
    assert state is not None
    return mismatches, {key for key, m in state.members.items() if m.member}


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    st.lists(st.tuples(st.integers(0, 25), raw_event, st.booleans()), min_size=1, max_size=16),
    st.integers(0, 2**32),
)
def test_shuffled_arrival_matches_the_oracle(
    draws: list[tuple[int, dict[str, Any], bool]], seed: int
) -> None:
    """Events arriving up to DISORDER_S late (each funnel keeps at most 16 events per
    value: 16 events never reach that bound): after every input, every membership is the
    oracle's on the events received so far, by event time, at the profile's clock — so
    a late follow-up cancels a pending enter or makes a member exit, a late step
    completes a funnel — and the end state is that of sorted input."""
    history = build_history(draws)
    mismatches, members = judged_as_received(shuffled(history, seed), 200 * S)
    assert mismatches == []
    sorted_members = judged_as_received(history, 200 * S)[1]
    assert members == sorted_members  # (`vip`: identify traits, latest by event time)


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    st.lists(st.tuples(st.integers(0, 25), raw_event, st.booleans()), min_size=1, max_size=16),
    st.integers(0, 2**32),
    st.lists(st.tuples(st.integers(0, 100), st.integers(0, 100)), max_size=8),
)
def test_shuffled_arrival_with_resent_duplicates_matches_the_oracle(
    draws: list[tuple[int, dict[str, Any], bool]],
    seed: int,
    copies: list[tuple[int, int]],
) -> None:
    """Shuffled arrival, and events re-sent as they were (their own old time) after
    others arrived: after every input every membership is the oracle's (which drops
    the copies from the log alone), and the end state is that of sorted input without
    copies."""
    history = build_history(draws)
    arrivals = shuffled(history, seed)
    for which, where in copies:  # a copy of an event that arrived before `where`
        at = 1 + where % len(arrivals)
        arrivals.insert(at, arrivals[which % at])
    assert len(without_duplicates(arrivals)) == len(history)
    mismatches, members = judged_as_received(arrivals, 200 * S)
    assert mismatches == []
    assert members == judged_as_received(history, 200 * S)[1]
