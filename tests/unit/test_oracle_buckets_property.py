"""Random buckets and holdouts: the state machine agrees with the oracle.

Random histories of random profiles (known users, keyed by their userId, and anonymous
visitors, keyed by their anonymousId) drive `step` as the runtime does (ticks at every
wake, a codec round trip between inputs, the profile's own key); memberships are compared
at every moment that matters with the oracle's, and every transition's holdout flag with
the oracle's own bucket of the profile (`oracle.bucket`, written independently of
`definitions/buckets.py`).
"""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audiences.core.definitions import build_catalog, validate_definition
from audiences.core.evaluator import Output, Tick, Transition, step
from audiences.core.events import Event, parse_event
from audiences.core.oracle import in_holdout, is_member, profile_id
from audiences.core.state import UserState

S = 1_000

AUDIENCES: list[dict[str, Any]] = [
    {"key": "split", "condition": {"random_bucket": {"lt": 5000}}},
    {
        "key": "recent_control",
        "salt": "exp-7",
        "condition": {
            "all": [
                {"performed": {"event": "Order Completed", "within": "30s"}},
                {"not": {"random_bucket": {"lt": 3000}}},
            ]
        },
        "holdout": {"percent": 40},
    },
    {
        "key": "anon_mix",
        "include_anonymous": True,
        "condition": {
            "any": [
                {"random_bucket": {"gte": 7000, "lt": 9000}},
                {"performed": {"event": "Product Viewed", "times": {"gte": 2}}},
            ]
        },
        "holdout": {"percent": 25.5, "salt": "h"},
    },
    {
        "key": "nested",
        "condition": {"all": [{"in_audience": "split"}, {"random_bucket": {"gte": 2000}}]},
        "holdout": {"percent": 50},
    },
]
DOCS = {a["key"]: validate_definition(a) for a in AUDIENCES}
CATALOG = build_catalog({key: (doc, 1) for key, doc in DOCS.items()})

raw_event = st.fixed_dictionaries(
    {"event": st.sampled_from(["Order Completed", "Product Viewed", "App Opened"])}
)
history_strategy = st.lists(st.tuples(st.integers(0, 40), raw_event), min_size=1, max_size=12)


def build_history(
    draws: list[tuple[int, dict[str, Any]]], profile: str, known: bool
) -> list[Event]:
    events, now = [], 1_000_000 * S + 500
    for index, (gap_s, raw) in enumerate(draws):
        now += gap_s * S
        body: dict[str, Any] = dict(raw, type="track", messageId=f"m{index}", timestamp=now)
        body["userId" if known else "anonymousId"] = profile
        events.append(parse_event(body, now))
    return events


def drive(history: list[Event], profile: str, after_ms: int) -> list[Output]:
    state: UserState | None = None
    outputs: list[Output] = []
    wake = 1 << 62

    def feed_one(item: Event | Tick) -> int:
        nonlocal state
        result = step(state, item, CATALOG, profile)
        state = UserState.decode(result.state.encode())  # (the profile key is not stored)
        outputs.extend(result.transitions)
        return result.next_wake_ms

    for event in history:
        while wake < event.timestamp_ms:
            wake = feed_one(Tick(wake))
        wake = feed_one(event)
    horizon = history[-1].timestamp_ms + after_ms
    while wake <= horizon:
        wake = feed_one(Tick(wake))
    return outputs


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history_strategy, st.integers(0, 99_999), st.booleans())
def test_buckets_and_holdouts_match_the_oracle(
    draws: list[tuple[int, dict[str, Any]]], number: int, known: bool
) -> None:
    profile = f"{'user' if known else 'anon'}-{number}"
    history = build_history(draws, profile, known)
    assert profile_id(history) == profile
    transitions = [t for t in drive(history, profile, 100 * S) if isinstance(t, Transition)]
    probes = {e.timestamp_ms for e in history} | {t.at_ms for t in transitions}
    probes |= {p - 1 for p in probes} | {history[-1].timestamp_ms + 100 * S}
    for key, doc in DOCS.items():
        timeline = [(t.at_ms, t.entered) for t in transitions if t.audience_key == key]
        flags = [entered for _, entered in timeline]
        assert all(a != b for a, b in itertools.pairwise(flags)), (key, timeline)
        for probe in sorted(probes):
            engine = next((e for at, e in reversed(timeline) if at <= probe), False)
            assert engine == is_member(DOCS, key, history, probe), (key, probe, timeline)
        expected = in_holdout(doc, profile)
        assert all(t.holdout is expected for t in transitions if t.audience_key == key), key
