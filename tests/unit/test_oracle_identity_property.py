"""Merges and deletions: random two-profile histories against the oracle.

An anonymous visitor (a1) and a user (u1) send events; at a random point an
identify links them, and the user may be deleted at the end. Through the
control-record protocol (played in memory by `Cluster`):
- before the link, each profile is judged on its own events;
- from the link on, the user is judged on the union of both histories, and
  the anonymous profile is in no audience;
- after a deletion, the user is in no audience and its events are dropped;
- Entered and Exited alternate per profile and audience (no duplicate Entered).
"""

from __future__ import annotations

import itertools
from typing import Any

from factories import Cluster
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audiences.core.definitions import build_catalog, validate_definition
from audiences.core.evaluator import Transition
from audiences.core.events import Event, parse_event
from audiences.core.oracle import is_member

S = 1_000
DEFINITIONS: list[dict[str, Any]] = [
    {"key": "orders_30s", "kind": "count", "event": "Order Completed", "within": "30s"},
    {"key": "spend", "kind": "sum", "event": "Order Completed", "property": "revenue"},
    {
        "key": "viewers",
        "condition": {
            "performed": {"event": "Product Viewed", "times": {"gte": 2}, "within": "40s"}
        },
    },
    {"key": "buyers", "condition": {"performed": {"event": "Order Completed"}}},
    {
        "key": "no_recent_order",
        "condition": {
            "all": [
                {"performed": {"event": "Product Viewed"}},
                {"not": {"computed": {"name": "orders_30s", "op": "gte", "value": 1}}},
            ]
        },
    },
    {"key": "big", "condition": {"computed": {"name": "spend", "op": "gt", "value": 80}}},
    {"key": "pricing", "condition": {"page_viewed": {"url": "*/pricing", "within": "25s"}}},
    {"key": "pro", "condition": {"trait": {"name": "plan", "op": "eq", "value": "pro"}}},
    {
        "key": "anon_viewers",
        "condition": {"performed": {"event": "Product Viewed"}},
        "include_anonymous": True,
    },
]
DOCS = {d["key"]: validate_definition(d) for d in DEFINITIONS}
CATALOG = build_catalog({k: (d, 1) for k, d in DOCS.items()})
AUDIENCES = [d["key"] for d in DEFINITIONS if "condition" in d]

body = st.one_of(
    st.fixed_dictionaries({"type": st.just("track"), "event": st.just("Product Viewed")}),
    st.fixed_dictionaries(
        {
            "type": st.just("track"),
            "event": st.just("Order Completed"),
            "properties": st.fixed_dictionaries({"revenue": st.integers(0, 60)}),
        }
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("page"),
            "properties": st.just({"url": "https://s.example/pricing"}),
        }
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("identify"),
            "traits": st.fixed_dictionaries({"plan": st.sampled_from(["free", "pro"])}),
        }
    ),
)
draws_strategy = st.tuples(
    st.lists(
        st.tuples(st.integers(1, 20), body, st.sampled_from(["anon", "user"])),
        min_size=1,
        max_size=20,
    ),
    st.integers(0, 20),  # where the link goes
    st.booleans(),  # delete the user at the end
)


def test_cluster_needs_no_sleep() -> None:  # the protocol is synchronous here
    cluster = Cluster(CATALOG)
    cluster.send(
        {"type": "track", "event": "Product Viewed", "anonymousId": "a1", "timestamp": 1_000_000}
    )
    assert "a1" in cluster.states


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(draws_strategy)
def test_merges_and_deletions_match_the_oracle(
    draws: tuple[list[tuple[int, dict[str, Any], str]], int, bool],
) -> None:
    items, link_at, delete = draws
    now = 1_000_000 * S
    raws: list[dict[str, Any]] = []
    link_index = min(link_at, len(items))
    for index, (gap, raw, who) in enumerate(items):
        if index == link_index:
            raws.append(
                {
                    "type": "identify",
                    "userId": "u1",
                    "anonymousId": "a1",
                    "timestamp": now,
                    "messageId": "link",
                }
            )
        now += gap * S
        ids = {"anonymousId": "a1"} if who == "anon" else {"userId": "u1"}
        raws.append({**raw, **ids, "timestamp": now, "messageId": f"m{index}"})
    if link_index == len(items):
        raws.append(
            {
                "type": "identify",
                "userId": "u1",
                "anonymousId": "a1",
                "timestamp": now,
                "messageId": "link",
            }
        )
    if delete:
        raws.append({"type": "delete", "userId": "u1", "timestamp": now + S})
    end = now + 200 * S

    cluster = Cluster(CATALOG)
    for raw in raws:
        cluster.tick_until(raw["timestamp"])
        cluster.send(raw)
    cluster.tick_until(end)

    events = [parse_event(raw, raw["timestamp"]) for raw in raws if raw["type"] != "delete"]
    link_time = next(e.timestamp_ms for e in events if e.message_id == "link")
    delete_time = now + S if delete else None
    own: dict[str, list[Event]] = {
        "a1": [e for e in events if e.user_id is None],
        "u1": [e for e in events if e.user_id is not None],
    }
    union = events
    changes = [(key, t) for key, t in cluster.outputs if isinstance(t, Transition)]
    probes = {e.timestamp_ms for e in events} | {t.at_ms for _, t in changes} | {end}
    probes |= {p - 1 for p in probes}
    for profile, audience in itertools.product(("a1", "u1"), AUDIENCES):
        timeline = [
            (t.at_ms, t.entered)
            for key, t in changes
            if key == profile and t.audience_key == audience
        ]
        flags = [entered for _, entered in timeline]
        assert all(a != b for a, b in itertools.pairwise(flags)), (profile, audience, timeline)
        for probe in sorted(probes):
            engine = next((e for at, e in reversed(timeline) if at <= probe), False)
            if delete_time is not None and probe >= delete_time and profile == "u1":
                expected = False
            elif probe < link_time:
                expected = is_member(DOCS, audience, own[profile], probe)
            elif profile == "a1":
                expected = False
            else:
                expected = is_member(DOCS, audience, union, probe)
            assert engine == expected, (profile, audience, probe, timeline)
