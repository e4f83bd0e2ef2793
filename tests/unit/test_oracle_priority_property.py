"""Priority lists (SPEC §3): the state machine agrees with the oracle on random histories.

The audiences of `test_oracle_property` with two priority lists over them (windows,
funnels with deadlines, "did not", an `in_audience` of listed audiences). The oracle
models exclusivity on its own — a listed audience holds when its condition holds and
no audience listed before it qualifies — while the engine reads the memberships of
the higher audiences; they must agree at every moment, the emitted sequence must
never show a profile in two audiences of one list (exits before entries), and an
edit of a list must emit exactly the differences the oracle sees between versions.
"""

from __future__ import annotations

import itertools
from typing import Any

from factories import drive
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_oracle_property import DEFINITIONS, build_history, history_strategy

from audiences.core.definitions import build_catalog, validate_definition
from audiences.core.evaluator import Tick, Transition, step
from audiences.core.events import Event
from audiences.core.oracle import is_member
from audiences.core.state import UserState

S = 1_000

LISTS: list[dict[str, Any]] = [
    {
        "key": "buyers",
        "kind": "priority_list",
        "audiences": ["frequent", "big_spender", "no_orders"],
    },
    {"key": "funnels", "kind": "priority_list", "audiences": ["funnel", "abandoners"]},
]
# `vip` refers to `frequent` and `big_spender` (listed: their exclusive membership),
# `lapsed` to `no_orders` (the lowest of its list).


def docs_of(lists: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["key"]: validate_definition(d) for d in [*DEFINITIONS, *lists]}


DOCS = docs_of(LISTS)
CATALOG = build_catalog({k: (d, 1) for k, d in DOCS.items()})
AUDIENCES = [d["key"] for d in DEFINITIONS]
LISTED = {key: lst["key"] for lst in LISTS for key in lst["audiences"]}


def transitions(history: list[Event]) -> list[Transition]:
    return [t for t in drive(CATALOG, history, 200 * S) if isinstance(t, Transition)]


def check_against_oracle(
    docs: dict[str, dict[str, Any]], changes: list[Transition], history: list[Event]
) -> None:
    probes = {e.timestamp_ms for e in history} | {t.at_ms for t in changes}
    probes |= {p - 1 for p in probes} | {history[-1].timestamp_ms + 200 * S}
    for key in AUDIENCES:
        timeline = [(t.at_ms, t.entered) for t in changes if t.audience_key == key]
        flags = [entered for _, entered in timeline]
        assert all(a != b for a, b in itertools.pairwise(flags)), (key, timeline)
        for probe in sorted(probes):
            engine = next((e for at, e in reversed(timeline) if at <= probe), False)
            assert engine == is_member(docs, key, history, probe), (key, probe, timeline)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history_strategy)
def test_engine_matches_oracle_with_priority_lists(
    draws: list[tuple[int, dict[str, Any], bool]],
) -> None:
    history = build_history(draws)
    changes = transitions(history)
    check_against_oracle(DOCS, changes, history)
    # Read in order, the outputs never hold a profile in two audiences of one list.
    held: dict[str, set[str]] = {}
    for t in changes:
        list_key = LISTED.get(t.audience_key)
        if list_key is None:
            continue
        members = held.setdefault(list_key, set())
        if t.entered:
            members.add(t.audience_key)
        else:
            members.discard(t.audience_key)
        assert len(members) <= 1, (list_key, members, t)
    # Replay: the same log gives the same transitions with the same messageIds.
    again = [t.message_id for t in transitions(history)]
    assert again == [t.message_id for t in changes]


EDITS: list[list[dict[str, Any]]] = [
    [  # reordered
        {"key": "buyers", "kind": "priority_list", "audiences": ["no_orders", "frequent"]},
        {"key": "funnels", "kind": "priority_list", "audiences": ["abandoners", "funnel"]},
    ],
    [  # one list gone, the other grown
        {
            "key": "funnels",
            "kind": "priority_list",
            "audiences": ["exactly_two", "funnel", "abandoners", "earlier_buyer"],
        }
    ],
    [],  # every list deleted
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history_strategy, st.sampled_from(range(len(EDITS))))
def test_an_edit_of_the_lists_emits_exactly_the_real_differences(
    draws: list[tuple[int, dict[str, Any], bool]], edit: int
) -> None:
    history = build_history(draws)
    state: UserState | None = None
    for event in history:  # (every deadline before the next event fires first, in step)
        state = step(state, event, CATALOG, "p1").state
    assert state is not None
    at = state.clock_ms
    edited_docs = docs_of(EDITS[edit])
    edited = build_catalog({k: (d, 2 if k in LISTED else 1) for k, d in edited_docs.items()})
    outputs = step(state, Tick(at), edited, "p1").transitions
    moves = sorted((t.audience_key, t.entered) for t in outputs if isinstance(t, Transition))
    expected = sorted(
        (key, after)
        for key in AUDIENCES
        if (after := is_member(edited_docs, key, history, at)) != is_member(DOCS, key, history, at)
    )
    assert moves == expected
