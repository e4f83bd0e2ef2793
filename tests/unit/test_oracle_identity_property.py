"""Merges and deletions: random two-profile histories against the oracle.

An anonymous visitor (a1) and two users (u1, u2) send events; at a random point
an identify links a1 to u1, up to two further claims link a known user or an id
another user may hold (u1 -> u2, u2 -> a1, u2 -> u1, as an alias or as a
linking event), and u1 may be deleted at the end. Through the control-record
protocol (played in memory by `Cluster`), each profile at each time is judged on
exactly the history the oracle's own identity model (`oracle.Identities`, SPEC
§4/§11) gives it: before a link each profile on its own events, from an accepted
link on the user on both and the anonymous profile on none, a refused claim moves
nothing (and is dead-lettered with the oracle's reason), a deleted user and its
linked anonymous profile on nothing. Entered and Exited alternate per profile and
audience (no duplicate Entered).
"""

from __future__ import annotations

import itertools
from typing import Any

from factories import Cluster
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audiences.core.definitions import build_catalog, validate_definition
from audiences.core.evaluator import Transition
from audiences.core.events import parse_event
from audiences.core.oracle import Identities, is_member

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
# (who sends, which other id it links): a1 -> u1 is the genuine link; the others are
# claims on a known user (u1 -> u2, u2 -> u1) or on an id another user may hold (u2 -> a1)
CLAIMS = [("u1", "u2"), ("u2", "a1"), ("u2", "u1")]
draws_strategy = st.tuples(
    st.lists(
        st.tuples(st.integers(1, 20), body, st.sampled_from(["anon", "user", "other"])),
        min_size=1,
        max_size=20,
    ),
    st.integers(0, 20),  # where the link goes
    st.booleans(),  # delete the user at the end
    st.lists(  # further claims: where, which, as an alias or as a linking event
        st.tuples(st.integers(0, 20), st.sampled_from(CLAIMS), st.booleans()), max_size=2
    ),
)
IDS = {"anon": {"anonymousId": "a1"}, "user": {"userId": "u1"}, "other": {"userId": "u2"}}


def test_cluster_needs_no_sleep() -> None:  # the protocol is synchronous here
    cluster = Cluster(CATALOG)
    cluster.send(
        {"type": "track", "event": "Product Viewed", "anonymousId": "a1", "timestamp": 1_000_000}
    )
    assert "a1" in cluster.states


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(draws_strategy)
def test_merges_and_deletions_match_the_oracle(
    draws: tuple[
        list[tuple[int, dict[str, Any], str]], int, bool, list[tuple[int, tuple[str, str], bool]]
    ],
) -> None:
    items, link_at, delete, claims = draws
    now = 1_000_000 * S
    raws: list[dict[str, Any]] = []

    def links_at(index: int) -> None:
        if index == min(link_at, len(items)):
            raws.append(
                {
                    "type": "identify",
                    "userId": "u1",
                    "anonymousId": "a1",
                    "timestamp": now,
                    "messageId": "link",
                }
            )
        for number, (at, (user, other), alias) in enumerate(claims):
            if min(at, len(items)) == index:
                raws.append(
                    {
                        "type": "alias" if alias else "track",
                        "event": "Claimed",
                        "userId": user,
                        ("previousId" if alias else "anonymousId"): other,
                        "timestamp": now,
                        "messageId": f"claim-{number}",
                    }
                )

    for index, (gap, raw, who) in enumerate(items):
        links_at(index)
        now += gap * S
        raws.append({**raw, **IDS[who], "timestamp": now, "messageId": f"m{index}"})
    links_at(len(items))
    if delete:
        raws.append({"type": "delete", "userId": "u1", "timestamp": now + S})
    end = now + 200 * S

    cluster = Cluster(CATALOG)
    for raw in raws:
        cluster.tick_until(raw["timestamp"])
        cluster.send(raw)
    cluster.tick_until(end)

    identities = Identities([parse_event(raw, raw["timestamp"]) for raw in raws])
    assert [(r.reason, r.record["messageId"]) for r in cluster.refused] == [
        (reason, event.message_id) for event, reason in identities.refused
    ]
    changes = [(key, t) for key, t in cluster.outputs if isinstance(t, Transition)]
    probes = {e.timestamp_ms for e in identities.events} | {t.at_ms for _, t in changes} | {end}
    probes |= {p - 1 for p in probes}
    for profile, audience in itertools.product(("a1", "u1", "u2"), AUDIENCES):
        timeline = [
            (t.at_ms, t.entered)
            for key, t in changes
            if key == profile and t.audience_key == audience
        ]
        flags = [entered for _, entered in timeline]
        assert all(a != b for a, b in itertools.pairwise(flags)), (profile, audience, timeline)
        for probe in sorted(probes):
            engine = next((e for at, e in reversed(timeline) if at <= probe), False)
            expected = is_member(DOCS, audience, identities.history(profile, probe), probe)
            assert engine == expected, (profile, audience, probe, timeline)


def test_the_oracle_refuses_what_the_rules_refuse() -> None:
    """The oracle's identity model on its own (no engine): a hijack and a second claim."""
    raws: list[dict[str, Any]] = [
        {"type": "track", "event": "E", "userId": "victim", "timestamp": 1},
        {"type": "track", "event": "E", "anonymousId": "a1", "timestamp": 2},
        {"type": "alias", "userId": "attacker", "previousId": "victim", "timestamp": 3},
        {"type": "identify", "userId": "u1", "anonymousId": "a1", "timestamp": 4},
        {"type": "identify", "userId": "u2", "anonymousId": "a1", "timestamp": 5},
        {"type": "delete", "userId": "u1", "timestamp": 6},
        {"type": "track", "event": "E", "anonymousId": "a1", "timestamp": 7},
    ]
    identities = Identities([parse_event(raw, raw["timestamp"]) for raw in raws])
    assert [(e.user_id, reason) for e, reason in identities.refused] == [
        ("attacker", "merge_refused"),
        ("u2", "merge_refused"),
    ]
    assert [e.timestamp_ms for e in identities.history("victim", 5)] == [1]
    assert [e.timestamp_ms for e in identities.history("u1", 5)] == [2, 4]
    assert identities.history("a1", 5) == []
    assert identities.history("u1", 7) == identities.history("a1", 7) == []
    assert identities.deleted_at == {"u1": 6, "a1": 6}
