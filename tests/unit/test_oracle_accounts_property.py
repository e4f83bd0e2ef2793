"""Account audiences: random histories of three users and two accounts against the oracle.

Users order (a 30 s window: deadlines), set a user trait, join and leave accounts
(`group` calls, some with group traits, `traits.removed: true`), re-send events
(duplicates) and may be deleted. Through the account-record protocol (played in memory
by `Cluster`, deadlines swept as the runtime sweeps them), every account's membership
of every account audience after every input equals `oracle.account_is_member` on the
log so far — computed from the users' whole histories, not from the records — and
Entered/Exited alternate per account and audience.
"""

from __future__ import annotations

from typing import Any

import factories
from factories import T0, event_dict, iso
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audiences.core.definitions import build_catalog, validate_definition
from audiences.core.evaluator import Transition, step
from audiences.core.events import Event, parse_event
from audiences.core.oracle import account_is_member

S = 1_000
RECENT = {"performed": {"event": "Order Completed", "within": "30s"}}
PRO = {"trait": {"name": "plan", "op": "eq", "value": "pro"}}
DEFINITIONS: list[dict[str, Any]] = [
    {"key": "any_recent", "subject": "account", "condition": {"account": {"any": RECENT}}},
    {"key": "all_recent", "subject": "account", "condition": {"account": {"all": RECENT}}},
    {"key": "none_pro", "subject": "account", "condition": {"account": {"none": PRO}}},
    {
        "key": "mixed",
        "subject": "account",
        "condition": {
            "all": [
                {"account": {"any": {"all": [RECENT, PRO]}}},
                {"not": {"account": {"trait": {"name": "tier", "op": "eq", "value": "gold"}}}},
            ]
        },
    },
    {"key": "buyers", "condition": {"performed": {"event": "Order Completed"}}},
]
DOCS = {d["key"]: validate_definition(d) for d in DEFINITIONS}
CATALOG = build_catalog({k: (d, 1) for k, d in DOCS.items()})
ACCOUNT_KEYS = [d["key"] for d in DEFINITIONS if d.get("subject") == "account"]
USERS = ("u1", "u2", "u3")
GROUPS = ("g1", "g2")


class Cluster(factories.Cluster):
    def tick_until(self, until_ms: int) -> None:
        while True:
            due = [(s.wake_ms, k) for k, s in self.states.items() if s.wake_ms < until_ms]
            if not due:
                return
            wake, key = min(due)
            result = step(self.states[key], factories.Tick(wake), self.catalog, key)
            self.states[key] = result.state
            self._record(key, result.transitions)
            for _target, record in result.controls:
                self.send(record)


action = st.one_of(
    st.tuples(st.just("order"), st.sampled_from(USERS)),
    st.tuples(st.just("plan"), st.sampled_from(USERS), st.sampled_from(["pro", "free"])),
    st.tuples(
        st.just("group"),
        st.sampled_from(USERS),
        st.sampled_from(GROUPS),
        st.sampled_from([None, "gold", "silver"]),
    ),
    st.tuples(st.just("leave"), st.sampled_from(USERS), st.sampled_from(GROUPS)),
    st.tuples(st.just("again"), st.integers(min_value=0, max_value=50)),
    st.tuples(st.just("delete"), st.sampled_from(USERS)),
)
draws_strategy = st.lists(
    st.tuples(st.integers(min_value=0, max_value=20), action), min_size=1, max_size=25
)


def _record(kind: tuple[Any, ...], at: int, n: int) -> dict[str, Any]:
    name = kind[0]
    if name == "order":
        return event_dict(ts=at, event="Order Completed", userId=kind[1], messageId=f"m{n}")
    if name == "plan":
        return event_dict(
            ts=at, type="identify", event=None, userId=kind[1], traits={"plan": kind[2]}
        )
    if name in ("group", "leave"):
        traits: dict[str, Any] = {"removed": True} if name == "leave" else {}
        if name == "group" and kind[3] is not None:
            traits["tier"] = kind[3]
        return event_dict(
            ts=at, type="group", event=None, userId=kind[1], groupId=kind[2], traits=traits
        )
    return {"type": "delete", "userId": kind[1], "messageId": f"del{n}", "timestamp": iso(at)}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(draws_strategy)
def test_accounts_match_the_oracle(draws: list[tuple[int, tuple[Any, ...]]]) -> None:
    cluster = Cluster(CATALOG)
    log: list[Event] = []
    sent: list[dict[str, Any]] = []
    at = T0
    for n, (gap, kind) in enumerate(draws):
        at += gap * S
        if kind[0] == "again":
            if not sent:
                continue
            record = {**sent[kind[1] % len(sent)], "timestamp": iso(at)}  # same messageId
        else:
            record = _record(kind, at, n)
        cluster.tick_until(at)
        cluster.send(record)
        cluster.tick_until(at + 1)
        sent.append(record)
        log.append(parse_event(record, T0))
        for group_id in GROUPS:
            account = cluster.states.get(f"group:{group_id}")
            for key in ACCOUNT_KEYS:
                membership = account.members.get(key) if account is not None else None
                engine = bool(membership and membership.member)
                expected = account_is_member(DOCS, key, log, group_id, at)
                assert engine == expected, (key, group_id, at - T0)
    # Entered and Exited alternate per account and audience, starting with Entered
    last: dict[tuple[str, str], bool] = {}
    for profile, output in cluster.outputs:
        if isinstance(output, Transition) and output.group_id is not None:
            pair = (profile, output.audience_key)
            assert last.get(pair, False) != output.entered
            last[pair] = output.entered
        if isinstance(output, Transition):
            assert output.audience_key in DOCS  # hidden predicates never leave a user
