"""Account audiences in the pure core (SPEC §3 "subject": "account", §5).

`Cluster` plays Kafka: the account records a user's step returns are delivered to the
account's profile (`group:{groupId}`) through the wire format, as the events topic
would deliver them to the account's own partition.
"""

from __future__ import annotations

from typing import Any

import factories
import orjson
import pytest
from factories import T0, D, H, M, event_dict

from audiences.core.definitions import build_catalog, validate_definition
from audiences.core.definitions.catalog import Catalog
from audiences.core.evaluator import Transition, step
from audiences.core.events import parse_event
from audiences.core.explain import explain
from audiences.core.outputs import render_output
from audiences.errors import DefinitionError

ORDERED = {"performed": {"event": "Order Completed", "within": "30d"}}


def account(key: str, condition: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"key": key, "subject": "account", "condition": condition, **fields}


ACTIVE_SHOPS = account("active_shops", {"account": {"any": ORDERED}})
ALL_ORDERED = account("all_ordered", {"account": {"all": ORDERED}})
NONE_ORDERED = account("none_ordered", {"account": {"none": ORDERED}})
PRO_SHOPS = account(
    "pro_shops", {"account": {"trait": {"name": "plan", "op": "eq", "value": "pro"}}}
)


def catalog_of(*docs: dict[str, Any], version: int = 1) -> Catalog:
    return build_catalog({d["key"]: (validate_definition(d), version) for d in docs})


class Cluster(factories.Cluster):
    def tick_until(self, until_ms: int, late_ms: int = 0) -> None:
        """As the sweeper does (`late_ms` after each deadline: a sweep notices it later);
        the records a deadline's step returns are delivered too."""
        while True:
            due = [(s.wake_ms, k) for k, s in self.states.items() if s.wake_ms < until_ms]
            if not due:
                return
            wake, key = min(due)
            result = step(self.states[key], factories.Tick(wake + late_ms), self.catalog, key)
            self.states[key] = result.state
            self._record(key, result.transitions)
            for _target, record in result.controls:
                self.send(record)

    def account_log(self) -> list[tuple[str, str, str, int]]:
        return [
            (key, t.audience_key, "entered" if t.entered else "exited", t.at_ms)
            for key, t in self.outputs
            if isinstance(t, Transition)
        ]


def order(ts: int, user: str = "u1") -> dict[str, Any]:
    return event_dict(ts=ts, event="Order Completed", userId=user)


def group(ts: int, user: str, group_id: str, **traits: Any) -> dict[str, Any]:
    return event_dict(ts=ts, type="group", event=None, userId=user, groupId=group_id, traits=traits)


# -- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("doc", "path", "suggestion"),
    [
        ({"key": "a", "condition": {"account": {"any": ORDERED}}}, "$.condition.account", None),
        ({**ACTIVE_SHOPS, "subject": "acount"}, "$.subject", "account"),
        (account("a", ORDERED), "$.condition.performed", None),
        (account("a", {"account": {"anyy": ORDERED}}), "$.condition.account.anyy", "any"),
        (
            account("a", {"all": [{"account": {"any": {"account": {"any": ORDERED}}}}]}),
            "$.condition.all[0].account.any.account",
            None,
        ),
        (
            account("a", {"account": {"any": {"performed": {"event": 3}}}}),
            "$.condition.account.any.performed.event",
            None,
        ),
        (
            account(
                "a", {"account": {"trait": {"name": "since", "op": "within_last", "value": "1d"}}}
            ),
            "$.condition.account.trait.op",
            None,
        ),
        (
            account("a", {"account": {"trait": {"nme": "plan", "op": "exists"}}}),
            "$.condition.account.trait.nme",
            "name",
        ),
        (account("a", {"not": {"account": {}}}), "$.condition.not.account", None),
    ],
)
def test_invalid_account_definitions_name_the_json_path(
    doc: dict[str, Any], path: str, suggestion: str | None
) -> None:
    with pytest.raises(DefinitionError) as raised:
        validate_definition(doc)
    assert raised.value.path == path
    assert raised.value.suggestion == suggestion


def test_a_valid_account_definition_compiles_a_hidden_predicate_per_quantifier() -> None:
    doc = account(
        "shops",
        {
            "any": [
                {"account": {"any": ORDERED}},
                {"not": {"account": {"all": ORDERED}}},
                PRO_SHOPS["condition"],
            ]
        },
    )
    catalog = catalog_of(doc)
    assert catalog.account_hidden == {"shops.0": "shops", "shops.1": "shops"}
    hidden = [a.key for a in catalog.audiences if a.hidden]
    assert hidden == ["shops.0", "shops.1"]
    assert catalog.audience("shops") is not None and catalog.audience("shops").subject == "account"
    assert not catalog_of({"key": "u", "condition": ORDERED}).account_hidden


# -- any / all / none -------------------------------------------------------------------


def test_any_enters_with_the_first_user_and_exits_with_the_last() -> None:
    cluster = Cluster(catalog_of(ACTIVE_SHOPS))
    cluster.send(group(T0, "u1", "shop1", name="Shop 1"))
    cluster.send(group(T0, "u2", "shop1"))
    assert cluster.account_log() == []
    cluster.send(order(T0 + H, "u1"))
    cluster.send(order(T0 + 2 * H, "u2"))
    cluster.tick_until(T0 + H + 30 * D + M)  # u1's order leaves the window: u2 still holds
    assert cluster.account_log() == [("group:shop1", "active_shops", "entered", T0 + H)]
    cluster.tick_until(T0 + 2 * H + 30 * D + M)
    assert cluster.account_log() == [
        ("group:shop1", "active_shops", "entered", T0 + H),
        ("group:shop1", "active_shops", "exited", T0 + 2 * H + 30 * D),
    ]
    # nothing about the hidden per-user predicate ever leaves a user
    assert all(key == "group:shop1" for key, _ in cluster.outputs)


def test_an_account_changes_at_its_users_deadline_however_late_the_sweep() -> None:
    cluster = Cluster(catalog_of(ACTIVE_SHOPS))
    cluster.send(group(T0, "u1", "shop1"))
    cluster.send(order(T0 + H, "u1"))
    cluster.tick_until(T0 + H + 31 * D, late_ms=5 * M)  # the sweep runs 5 minutes late
    assert cluster.account_log() == [
        ("group:shop1", "active_shops", "entered", T0 + H),
        ("group:shop1", "active_shops", "exited", T0 + H + 30 * D),  # the deadline's own time
    ]


def test_all_needs_every_linked_user_and_is_false_with_none() -> None:
    cluster = Cluster(catalog_of(ALL_ORDERED))
    cluster.send(order(T0, "u1"))
    cluster.send(group(T0 + M, "u1", "shop1"))
    assert cluster.account_log() == [("group:shop1", "all_ordered", "entered", T0 + M)]
    cluster.send(group(T0 + 2 * M, "u2", "shop1"))  # u2 never ordered
    cluster.send(order(T0 + 3 * M, "u2"))
    cluster.send(group(T0 + 4 * M, "u1", "shop1", removed=True))
    cluster.send(group(T0 + 5 * M, "u2", "shop1", removed=True))  # zero users: false
    assert cluster.account_log() == [
        ("group:shop1", "all_ordered", "entered", T0 + M),
        ("group:shop1", "all_ordered", "exited", T0 + 2 * M),
        ("group:shop1", "all_ordered", "entered", T0 + 3 * M),
        ("group:shop1", "all_ordered", "exited", T0 + 5 * M),
    ]


def test_none_holds_while_no_linked_user_satisfies() -> None:
    cluster = Cluster(catalog_of(NONE_ORDERED))
    cluster.send(group(T0, "u1", "shop1"))
    cluster.send(order(T0 + M, "u1"))
    cluster.tick_until(T0 + M + 31 * D)
    assert cluster.account_log() == [
        ("group:shop1", "none_ordered", "entered", T0),
        ("group:shop1", "none_ordered", "exited", T0 + M),
        ("group:shop1", "none_ordered", "entered", T0 + M + 30 * D),
    ]


def test_group_traits_decide_trait_conditions_latest_by_event_time() -> None:
    cluster = Cluster(catalog_of(PRO_SHOPS))
    cluster.send(group(T0 + H, "u1", "shop1", plan="pro"))
    cluster.send(group(T0, "u2", "shop1", plan="free"))  # older: the later value stays
    cluster.send(group(T0 + 2 * H, "u2", "shop1", plan="free"))
    assert cluster.account_log() == [
        ("group:shop1", "pro_shops", "entered", T0 + H),
        ("group:shop1", "pro_shops", "exited", T0 + 2 * H),
    ]
    assert cluster.states["group:shop1"].traits == {"plan": "free"}


# -- links -------------------------------------------------------------------------------


def test_removed_unlinks_and_a_user_may_belong_to_two_accounts() -> None:
    cluster = Cluster(catalog_of(ACTIVE_SHOPS))
    cluster.send(group(T0, "u1", "shop1"))
    cluster.send(group(T0, "u1", "shop2"))
    cluster.send(order(T0 + M, "u1"))
    cluster.send(group(T0 + 2 * M, "u1", "shop1", removed=True))
    assert cluster.account_log() == [
        ("group:shop1", "active_shops", "entered", T0 + M),
        ("group:shop2", "active_shops", "entered", T0 + M),
        ("group:shop1", "active_shops", "exited", T0 + 2 * M),
    ]
    assert cluster.states["u1"].trackers["@groups"]["g"] == {"shop2": 1}


def test_deleting_a_user_unlinks_it_from_its_accounts() -> None:
    cluster = Cluster(catalog_of(ACTIVE_SHOPS))
    cluster.send(group(T0, "u1", "shop1"))
    cluster.send(order(T0 + M, "u1"))
    cluster.send(
        {"type": "delete", "userId": "u1", "messageId": "del-1", "timestamp": factories.iso(T0 + H)}
    )
    assert cluster.account_log()[-1] == ("group:shop1", "active_shops", "exited", T0 + H)
    users = cluster.states["group:shop1"].trackers["@account"]["u"]
    assert users["u1"][2] is None  # unlinked (kept, so that a re-sent old record is ignored)


def test_an_anonymous_users_links_follow_it_into_the_user() -> None:
    cluster = Cluster(catalog_of(ACTIVE_SHOPS))
    cluster.send(
        event_dict(ts=T0, type="group", event=None, userId=None, anonymousId="a1", groupId="shop1")
    )
    cluster.send(event_dict(ts=T0 + M, event="Order Completed", userId="u1", anonymousId="a1"))
    assert cluster.account_log() == [("group:shop1", "active_shops", "entered", T0 + M)]
    users = cluster.states["group:shop1"].trackers["@account"]["u"]
    assert users["a1"][2] is None and users["u1"][2] == {"active_shops.0": True}


# -- outputs, replay, explain ---------------------------------------------------------------


def test_account_transitions_render_with_group_id_and_the_account_class() -> None:
    cluster = Cluster(catalog_of(ACTIVE_SHOPS))
    cluster.send(group(T0, "u1", "shop1"))
    cluster.send(order(T0 + M, "u1"))
    ((key, transition),) = cluster.outputs
    message = render_output(transition, cluster.states[key].traits, space_id="space")
    assert "userId" not in message and "anonymousId" not in message
    assert message["groupId"] == "shop1"
    assert message["event"] == "Audience Entered"
    assert message["properties"]["active_shops"] is True
    assert message["properties"]["audience_key"] == "active_shops"
    assert message["context"]["personas"]["computation_class"] == "account_audience"


def _log() -> list[dict[str, Any]]:
    return [
        group(T0, "u1", "shop1"),
        group(T0, "u2", "shop1"),
        group(T0, "u2", "shop2"),
        order(T0 + M, "u1"),
        order(T0 + 2 * M, "u2"),
        group(T0 + 3 * M, "u1", "shop1", removed=True),
        group(T0 + 4 * M, "u2", "shop1", removed=True),
        group(T0 + 5 * M, "u1", "shop1"),
    ]


def test_replaying_the_log_gives_the_same_records_and_message_ids() -> None:
    first, second = (
        Cluster(catalog_of(ACTIVE_SHOPS, ALL_ORDERED)),
        Cluster(catalog_of(ACTIVE_SHOPS, ALL_ORDERED)),
    )
    for record in _log():
        first.send(record)
    for record in _log():
        second.send(record)
    ids = [t.message_id for _, t in first.outputs]
    assert ids == [t.message_id for _, t in second.outputs]
    assert len(ids) == len(set(ids)) >= 4


def test_re_sent_account_records_change_nothing() -> None:
    """A worker that crashed before its checkpoint sends its records again: the account
    keeps each user's latest record (by its sequence), so the copies are ignored."""
    catalog = catalog_of(ACTIVE_SHOPS)
    records: list[dict[str, Any]] = []
    states: dict[str, Any] = {}
    for raw in _log():
        event = parse_event(orjson.dumps(raw), T0)
        result = step(states.get(event.key), event, catalog, event.key)
        states[event.key] = result.state
        records += [record for _target, record in result.controls]
    assert {r["type"] for r in records} == {"account"}
    assert records == [r for r in records if r["userId"].startswith("group:")]

    def deliver(order_of: list[dict[str, Any]]) -> list[str]:
        accounts: dict[str, Any] = {}
        ids: list[str] = []
        for raw in order_of:
            event = parse_event(orjson.dumps(raw), T0)
            result = step(accounts.get(event.key), event, catalog, event.key)
            accounts[event.key] = result.state
            ids += [t.message_id for t in result.transitions]
        return ids

    once = deliver(records)
    assert once
    assert deliver(records + records) == once  # the replayed copies arrive again
    assert deliver([r for pair in zip(records, records, strict=True) for r in pair]) == once


def test_explain_an_account_shows_the_users_that_decided_it_and_group_traits() -> None:
    catalog = catalog_of(ACTIVE_SHOPS)
    cluster = Cluster(catalog)
    cluster.send(group(T0, "u1", "shop1", plan="pro"))
    cluster.send(group(T0, "u2", "shop1"))
    cluster.send(order(T0 + M, "u2"))
    answer = explain(cluster.states["group:shop1"], catalog, "active_shops", T0 + M)
    assert answer["member"] is True and answer["value"] is True
    tree = answer["condition"]
    assert tree["users"] == {"u1": False, "u2": True}
    assert tree["quantifier"] == "any"
    assert tree["account"]["group_traits"] == {"plan": "pro"}
    assert tree["account"]["users"] == {"u1": [], "u2": ["active_shops.0"]}
    user = explain(cluster.states["u2"], catalog, "active_shops", T0 + M)
    assert user["value"] is False and user["condition"]["account"] is None
    # the user's own value of the inner condition: the hidden predicate `{key}.{n}`
    inner = explain(cluster.states["u2"], catalog, "active_shops.0", T0 + M)
    assert inner["value"] is True and inner["condition"]["condition"] == "performed"
    assert explain(cluster.states["u1"], catalog, "active_shops.0", T0 + M)["value"] is False


def test_deleting_the_account_definition_exits_its_members() -> None:
    cluster = Cluster(catalog_of(ACTIVE_SHOPS))
    cluster.send(group(T0, "u1", "shop1"))
    cluster.send(order(T0 + M, "u1"))
    cluster.catalog = build_catalog({}, retired={"active_shops": (1, "active_shops")})
    result = step(
        cluster.states["group:shop1"], factories.Tick(T0 + H), cluster.catalog, "group:shop1"
    )
    ((exited,),) = [result.transitions]
    assert isinstance(exited, Transition) and not exited.entered
    assert exited.group_id == "shop1" and exited.trigger == "deleted"
    # a user audience is never judged on an account's profile
    cluster.catalog = catalog_of({"key": "quiet", "condition": {"not": ORDERED}})
    result = step(
        cluster.states["group:shop1"], factories.Tick(T0 + 2 * H), cluster.catalog, "group:shop1"
    )
    assert result.transitions == []


def test_no_account_audience_no_group_tracking() -> None:
    catalog = catalog_of({"key": "buyers", "condition": ORDERED})
    cluster = Cluster(catalog)
    cluster.send(group(T0, "u1", "shop1"))
    assert "@groups" not in cluster.states["u1"].trackers
    assert cluster.states.keys() == {"u1"}


@pytest.mark.parametrize(
    "properties",
    [
        {},
        {"user": 3, "seq": [0, 1], "linked": True, "values": {}},
        {"user": "u1", "seq": "1", "linked": True, "values": {}},
        {"user": "u1", "seq": [0, 1.5], "linked": True, "values": {}},
        {"user": "u1", "seq": [0, 1], "linked": True, "values": ["active_shops.0"]},
        {"user": "u1", "traits": "pro"},
        {"user": "u1", "traits": {"plan": float("inf")}},
    ],
)
def test_malformed_account_records_change_nothing_and_never_raise(
    properties: dict[str, Any],
) -> None:
    catalog = catalog_of(ACTIVE_SHOPS, PRO_SHOPS)
    for stage in ("member", "traits", "other", None):
        raw = {
            "type": "account",
            "stage": stage,
            "userId": "group:shop1",
            "timestamp": factories.iso(T0),
            "properties": properties,
        }
        event = parse_event(raw, T0)  # (a dict: the non-finite number reaches the core)
        result = step(None, event, catalog, "group:shop1")
        assert result.transitions == []


def test_an_account_remembers_a_bounded_number_of_users() -> None:
    from audiences.core import evaluator

    catalog = catalog_of(ACTIVE_SHOPS)
    state = None
    for n in range(evaluator.MAX_ACCOUNT_USERS + 2):
        raw = {
            "type": "account",
            "stage": "member",
            "userId": "group:shop1",
            "timestamp": factories.iso(T0),
            "properties": {"user": f"u{n}", "seq": [0, 1], "linked": True, "values": {}},
        }
        result = step(state, parse_event(raw, T0), catalog, "group:shop1")
        state = result.state
    assert state is not None
    assert len(state.trackers["@account"]["u"]) == evaluator.MAX_ACCOUNT_USERS
    assert state.dropped == {"account_users": 2}


def test_a_user_whose_id_begins_with_group_is_not_taken_for_an_account() -> None:
    cluster = Cluster(catalog_of(ACTIVE_SHOPS))
    cluster.send(order(T0, "group:shop1"))  # a user: its profile is not an account's
    cluster.send(group(T0 + M, "u1", "shop1"))
    cluster.send(order(T0 + 2 * M, "u1"))
    assert cluster.account_log() == []  # the account's records reach a user's profile: ignored
    assert "@account" not in cluster.states["group:shop1"].trackers


def test_preview_of_an_edited_account_audience_judges_the_accounts() -> None:
    """Preview judges the accounts' profiles on the values their users sent; a brand-new
    account audience has none yet (its users report once it is applied)."""
    from audiences.core.preview import preview

    catalog = catalog_of(ACTIVE_SHOPS)
    cluster = Cluster(catalog)
    cluster.send(group(T0, "u1", "shop1"))
    cluster.send(group(T0, "u2", "shop1"))
    cluster.send(group(T0, "u2", "shop2"))
    cluster.send(order(T0 + M, "u1"))
    definitions = {"active_shops": (validate_definition(ACTIVE_SHOPS), 1)}
    edited = {**ACTIVE_SHOPS, "condition": {"account": {"all": ORDERED}}}
    result = preview(edited, definitions, sorted(cluster.states.items()))
    assert (result.entering, result.exiting) == (0, 1)
    assert result.would_exit == ["group:shop1"]
    assert result.size == 0


def test_account_definitions_and_outputs_match_the_json_schemas() -> None:
    from test_schemas import errors

    for doc in (ACTIVE_SHOPS, ALL_ORDERED, NONE_ORDERED, PRO_SHOPS):
        assert errors("definition.json", doc) == []
    assert errors("definition.json", account("a", ORDERED))  # a user condition at the top
    cluster = Cluster(catalog_of(ACTIVE_SHOPS))
    cluster.send(group(T0, "u1", "shop1"))
    cluster.send(order(T0 + M, "u1"))
    ((key, transition),) = cluster.outputs
    message = orjson.loads(
        orjson.dumps(render_output(transition, cluster.states[key].traits, space_id="space"))
    )
    assert errors("output/account-audience-event.json", message) == []
    assert errors("output/account-audience-event.json", {**message, "userId": "u1"})


def test_the_demo_shops_enter_the_demo_account_audience() -> None:
    from audiences.tools.demo.runner import demo_definitions
    from audiences.tools.simulation import ShopConfig, shop_traffic

    docs = demo_definitions(1000)
    catalog = build_catalog({d["key"]: (validate_definition(d), 1) for d in docs})
    cluster = Cluster(catalog)
    for at_ms, record in shop_traffic(ShopConfig(users=40, hour_ms=1000, seed=3), T0, 6000):
        cluster.tick_until(at_ms)
        cluster.send(record)
    shops = {t.group_id for _key, t in cluster.outputs if isinstance(t, Transition) and t.group_id}
    assert shops and all(s.startswith("shop-") for s in shops)


def test_links_found_by_a_backfill_are_told_to_the_account_with_false_values_too() -> None:
    """A new account audience: its trackers (links included) are backfilled from the log
    while live events flow; when the full catalog is adopted, every user tells each
    account it is linked to — also the users for whom c is false (`all` needs them)."""
    from audiences.core.evaluator import fold_history

    full = catalog_of(ALL_ORDERED)
    pending = full.with_pending(frozenset(full.trackers))
    assert pending.pending
    cluster = Cluster(pending)
    history = [group(T0, "u1", "shop1"), group(T0, "u2", "shop1"), order(T0 + M, "u1")]
    cluster.send(event_dict(ts=T0 + 2 * M, event="Signed In", userId="u1"))  # live
    cluster.send(event_dict(ts=T0 + 2 * M, event="Signed In", userId="u2"))
    assert cluster.account_log() == []
    for raw in history:
        event = parse_event(raw, T0)
        fold_history(cluster.states[event.key], event, pending, pending.pending)
    cluster.catalog = full
    for user in ("u1", "u2"):  # the re-judging pass
        result = step(cluster.states[user], factories.Tick(T0 + 3 * M), full, user)
        cluster.states[user] = result.state
        for _target, record in result.controls:
            cluster.send(record)
    users = cluster.states["group:shop1"].trackers["@account"]["u"]
    assert {u: entry[2] for u, entry in users.items()} == {
        "u1": {"all_ordered.0": True},
        "u2": {},
    }
    # u2 never ordered: not all of them did (the account heard of u1 first: the users'
    # records arrive one by one, so it entered until u2's arrived)
    assert not cluster.states["group:shop1"].members["all_ordered"].member
    cluster.send(order(T0 + 4 * M, "u2"))
    assert cluster.account_log()[-1] == ("group:shop1", "all_ordered", "entered", T0 + 4 * M)


def test_deleting_an_account_exits_its_audiences_and_drops_its_later_records() -> None:
    cluster = Cluster(catalog_of(ACTIVE_SHOPS))
    cluster.send(group(T0, "u1", "shop1"))
    cluster.send(order(T0 + M, "u1"))
    cluster.send(
        {
            "type": "delete",
            "userId": "group:shop1",
            "messageId": "d",
            "timestamp": factories.iso(T0 + H),
        }
    )
    assert cluster.account_log()[-1] == ("group:shop1", "active_shops", "exited", T0 + H)
    assert cluster.outputs[-1][1].group_id == "shop1"  # no User Deleted for an account
    assert "group:shop1" in cluster.erased and "group:shop1" not in cluster.states
    cluster.send(group(T0 + 2 * H, "u2", "shop1"))  # u2's record for the account: dropped
    assert "group:shop1" not in cluster.states


def test_a_holdout_on_an_account_audience_holds_out_a_stable_share_of_accounts() -> None:
    held = {**ACTIVE_SHOPS, "holdout": {"percent": 50}}
    cluster = Cluster(catalog_of(held))
    for n in range(40):
        cluster.send(group(T0, f"u{n}", f"shop{n}"))
        cluster.send(order(T0 + M, f"u{n}"))
    flags = {t.group_id: t.holdout for _key, t in cluster.outputs if isinstance(t, Transition)}
    assert len(flags) == 40 and 0 < sum(flags.values()) < 40
    again = Cluster(catalog_of(held))
    for n in range(40):
        again.send(group(T0, f"u{n}", f"shop{n}"))
        again.send(order(T0 + M, f"u{n}"))
    assert {t.group_id: t.holdout for _k, t in again.outputs} == flags
    ((_key, first),) = cluster.outputs[:1]
    message = render_output(first, {}, space_id="space")
    assert message["properties"].get("holdout", False) is first.holdout
    # deleting a held-out account: its Exited is flagged too (destinations never saw it enter)
    held_out = next(group_id for group_id, flag in flags.items() if flag)
    cluster.send(
        {
            "type": "delete",
            "userId": f"group:{held_out}",
            "messageId": "d",
            "timestamp": factories.iso(T0 + H),
        }
    )
    ((_key, last),) = cluster.outputs[-1:]
    assert (last.group_id, last.entered, last.trigger, last.holdout) == (
        held_out,
        False,
        "deleted",
        True,
    )
