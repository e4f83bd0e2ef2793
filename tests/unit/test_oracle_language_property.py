"""Views, devices and computed traits: the state machine agrees with the oracle.

Random histories mix page/screen views, device facts, orders and views with
properties; the engine is driven as the runtime drives it (ticks at every
wake, a codec round trip between inputs) and compared at every moment that
matters with the brute-force oracle — memberships and computed-trait values.
"""

from __future__ import annotations

import itertools
from typing import Any

from factories import drive
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audiences.core.definitions import build_catalog, validate_definition
from audiences.core.definitions.traits import is_empty_value
from audiences.core.evaluator import TraitChange, Transition
from audiences.core.events import Event, parse_event
from audiences.core.oracle import is_member, trait_value

S = 1_000

TRAITS: list[dict[str, Any]] = [
    {"key": "views_60s", "kind": "count", "event": "Product Viewed", "within": "60s"},
    {"key": "revenue", "kind": "sum", "event": "Order Completed", "property": "revenue"},
    {
        "key": "max_30s",
        "kind": "max",
        "event": "Order Completed",
        "property": "revenue",
        "within": "30s",
    },
    {
        "key": "avg_40s",
        "kind": "avg",
        "event": "Order Completed",
        "property": "revenue",
        "within": "40s",
    },
    {"key": "min_rev", "kind": "min", "event": "Order Completed", "property": "revenue"},
    {"key": "first_cat", "kind": "first", "event": "Product Viewed", "property": "category"},
    {
        "key": "last_cat_50s",
        "kind": "last",
        "event": "Product Viewed",
        "property": "category",
        "within": "50s",
    },
    {"key": "fav", "kind": "most_frequent", "event": "Product Viewed", "property": "category"},
    {
        "key": "cats_100s",
        "kind": "unique_list",
        "event": "Product Viewed",
        "property": "category",
        "within": "100s",
    },
    {
        "key": "ncats",
        "kind": "unique_count",
        "event": "Product Viewed",
        "property": "category",
        "where": [{"property": "category", "op": "neq", "value": "sale"}],
    },
]
for doc in TRAITS:
    doc["include_anonymous"] = True

AUDIENCES: list[dict[str, Any]] = [
    {
        "key": "pricing",
        "condition": {"page_viewed": {"url": "*/pricing*", "times": {"gte": 2}, "within": "30s"}},
    },
    {"key": "paywall", "condition": {"screen_viewed": {"name": "Paywall", "within": "20s"}}},
    {"key": "ios_push", "condition": {"device": {"type": "ios", "push_enabled": True}}},
    {"key": "android", "condition": {"device": {"type": "android"}}},
    {"key": "no_push", "condition": {"device": {"type": "any", "push_enabled": False}}},
    {"key": "browsers", "condition": {"computed": {"name": "views_60s", "op": "gte", "value": 2}}},
    {"key": "spenders", "condition": {"computed": {"name": "revenue", "op": "gt", "value": 100}}},
    {
        "key": "high_avg",
        "condition": {
            "all": [
                {"computed": {"name": "avg_40s", "op": "gte", "value": 50}},
                {"not": {"computed": {"name": "max_30s", "op": "gt", "value": 90}}},
            ]
        },
    },
    {"key": "shoe_fans", "condition": {"computed": {"name": "fav", "op": "eq", "value": "shoes"}}},
    {
        "key": "diverse",
        "condition": {
            "any": [
                {"computed": {"name": "ncats", "op": "gte", "value": 3}},
                {"computed": {"name": "cats_100s", "op": "contains", "value": "bags"}},
            ]
        },
        "include_anonymous": True,
    },
]
DOCS = {d["key"]: validate_definition(d) for d in [*TRAITS, *AUDIENCES]}
CATALOG = build_catalog({k: (d, 1) for k, d in DOCS.items()})

CONTEXTS = [
    {"os": {"name": "iOS"}, "device": {"id": "i1", "token": "t"}},
    {"os": {"name": "iOS"}, "device": {"id": "i1", "push_enabled": False}},
    {"os": {"name": "Android"}, "device": {"id": "a1", "token": "t"}},
    {"userAgent": "Mozilla/5.0"},
    {},
]
raw_event = st.one_of(
    st.fixed_dictionaries(
        {
            "type": st.just("track"),
            "event": st.just("Product Viewed"),
            "properties": st.fixed_dictionaries(
                {"category": st.sampled_from(["shoes", "bags", "sale", "hats", 7])}
            ),
        }
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("track"),
            "event": st.just("Order Completed"),
            "properties": st.fixed_dictionaries(
                {"revenue": st.one_of(st.integers(0, 120), st.just("12"))}
            ),
        }
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("track"),
            "event": st.sampled_from(["App Opened", "Push Notifications Disabled"]),
            "context": st.sampled_from(CONTEXTS),
        }
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("page"),
            "properties": st.fixed_dictionaries(
                {
                    "url": st.sampled_from(
                        [
                            "https://s.example/pricing",
                            "https://s.example/pricing?x=1",
                            "https://s.example/",
                        ]
                    )
                }
            ),
        }
    ),
    st.fixed_dictionaries(
        {"type": st.just("screen"), "name": st.sampled_from(["Paywall", "Home"])}
    ),
)
history_strategy = st.lists(
    st.tuples(st.integers(0, 30), raw_event, st.booleans()), min_size=1, max_size=25
)


def build_history(draws: list[tuple[int, dict[str, Any], bool]]) -> list[Event]:
    events, now = [], 1_000_000 * S + 500  # not on a bucket boundary
    for index, (gap_s, raw, known) in enumerate(draws):
        now += gap_s * S
        body = dict(raw, messageId=f"m{index}", timestamp=now, anonymousId="anon1")
        if known:
            body["userId"] = "u1"
        events.append(parse_event(body, now))
    return events


def run_engine(history: list[Event]) -> tuple[list[Transition], list[TraitChange]]:
    outputs = drive(CATALOG, history, 200 * S)
    return (
        [t for t in outputs if isinstance(t, Transition)],
        [t for t in outputs if isinstance(t, TraitChange)],
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history_strategy)
def test_views_devices_and_computed_traits_match_the_oracle(
    draws: list[tuple[int, dict[str, Any], bool]],
) -> None:
    history = build_history(draws)
    transitions, changes = run_engine(history)
    probes = {e.timestamp_ms for e in history} | {t.at_ms for t in [*transitions, *changes]}
    probes |= {p - 1 for p in probes} | {history[-1].timestamp_ms + 200 * S}
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
