"""Identity merges, deletion/suppression and definition lifecycle in the pure core.

`Cluster` plays the part of Kafka: control records a step returns are delivered
to the profile they are keyed by, in order, as the events topic would.
"""

from __future__ import annotations

from typing import Any

import factories
import orjson
from factories import T0, H, M, S, audience, catalog_of, event_dict, feed, iso, run, summary

from audiences.core.definitions import build_catalog, validate_definition
from audiences.core.evaluator import Deletion, Output, Tick, Transition, step
from audiences.core.events import Event, parse_event
from audiences.core.state import UserState

WINDOW_SHOPPERS = audience(
    "window_shoppers",
    {"performed": {"event": "Product Viewed", "times": {"gte": 3}, "within": "1h"}},
)
VISITORS = audience("visitors", {"performed": {"event": "Product Viewed"}}, include_anonymous=True)


class Cluster(factories.Cluster):
    def summary(self) -> list[tuple[str, str, str, int]]:
        return [
            (key, t.audience_key, "entered" if t.entered else "exited", t.at_ms)
            for key, t in self.outputs
            if isinstance(t, Transition)
        ]


def view(ts: int, **ids: Any) -> dict[str, Any]:
    return event_dict(ts=ts, event="Product Viewed", **{"userId": None, **ids})


def test_anonymous_browsing_then_identify_gives_one_profile_in_the_implied_audiences() -> None:
    cluster = Cluster(catalog_of(WINDOW_SHOPPERS, VISITORS))
    cluster.send(view(T0, anonymousId="a1"))
    cluster.send(view(T0 + M, anonymousId="a1"))
    cluster.send(
        event_dict(
            ts=T0 + 2 * M,
            type="identify",
            event=None,
            userId="u1",
            anonymousId="a1",
            traits={"email": "u1@example.com"},
        )
    )
    cluster.send(view(T0 + 3 * M, userId="u1"))  # the third view: only with the history
    assert cluster.summary() == [
        ("a1", "visitors", "entered", T0),  # include_anonymous
        ("a1", "visitors", "exited", T0 + 2 * M),  # the anonymous profile is merged away
        ("u1", "visitors", "entered", T0 + 2 * M),
        ("u1", "window_shoppers", "entered", T0 + 3 * M),
    ]
    user = cluster.states["u1"]
    assert user.aliases == {"a1": 1}
    assert user.traits["email"] == "u1@example.com"
    assert cluster.states["a1"].merged_into == "u1"


def test_later_anonymous_events_resolve_to_the_user() -> None:
    cluster = Cluster(catalog_of(WINDOW_SHOPPERS))
    cluster.send(view(T0, anonymousId="a1"))
    cluster.send(view(T0 + M, userId="u1", anonymousId="a1"))
    cluster.send(view(T0 + 2 * M, anonymousId="a1"))  # forwarded to u1
    assert cluster.summary() == [("u1", "window_shoppers", "entered", T0 + 2 * M)]
    assert cluster.states["a1"].trackers == {}
    # one Entered only, whatever arrives later
    cluster.send(view(T0 + 3 * M, anonymousId="a1"))
    cluster.send(view(T0 + 4 * M, userId="u1", anonymousId="a1"))
    assert len(cluster.summary()) == 1


def test_alias_merges_a_previous_anonymous_id() -> None:
    cluster = Cluster(catalog_of(WINDOW_SHOPPERS))
    for minute in range(2):
        cluster.send(view(T0 + minute * M, anonymousId="old-id"))
    cluster.send(
        event_dict(ts=T0 + 2 * M, type="alias", event=None, userId="u1", previousId="old-id")
    )
    cluster.send(view(T0 + 3 * M, userId="u1"))
    assert cluster.summary() == [("u1", "window_shoppers", "entered", T0 + 3 * M)]


def test_replayed_merge_records_change_nothing() -> None:
    catalog = catalog_of(WINDOW_SHOPPERS)
    cluster = Cluster(catalog)
    cluster.send(view(T0, anonymousId="a1"))
    cluster.send(view(T0 + M, userId="u1", anonymousId="a1"))
    before = cluster.states["u1"].encode()
    state_record = {
        "type": "merge",
        "stage": "state",
        "userId": "u1",
        "timestamp": "2023-11-14T22:20:00.000Z",
        "properties": {"from": "a1", "state": orjson.loads(UserState().encode())},
    }
    request = {
        "type": "merge",
        "stage": "request",
        "anonymousId": "a1",
        "timestamp": "2023-11-14T22:20:00.000Z",
        "properties": {"into": "u2"},
    }
    cluster.send(state_record)  # a duplicate of an applied merge
    cluster.send(request)  # a1 is merged already: first wins, the second is refused
    assert cluster.states["u1"].encode() == before
    assert cluster.states["a1"].merged_into == "u1"
    assert [(r.reason, r.key) for r in cluster.refused] == [("merge_refused", "u2")]
    u2 = cluster.states.get("u2", UserState())  # (told of the refusal: it gains nothing)
    assert (u2.aliases, u2.traits, u2.trackers, u2.members) == ({}, {}, {}, {})
    cluster.send(request)  # a replay refuses the same way
    assert len(cluster.refused) == 2
    cluster.send({**request, "properties": {"into": "u1"}})  # a repeated request: nothing
    assert len(cluster.refused) == 2
    assert cluster.states["u1"].encode() == before


def test_merged_counts_windows_and_traits_combine() -> None:
    catalog = catalog_of(
        audience("two_orders", {"performed": {"event": "Order Completed", "times": {"gte": 2}}}),
        audience("pro", {"trait": {"name": "plan", "op": "eq", "value": "pro"}}),
    )
    cluster = Cluster(catalog)
    cluster.send(event_dict(ts=T0, userId=None, anonymousId="a1", event="Order Completed"))
    cluster.send(
        event_dict(
            ts=T0 + S,
            type="identify",
            event=None,
            userId=None,
            anonymousId="a1",
            traits={"plan": "pro", "email": "anon@example.com"},
        )
    )
    cluster.send(event_dict(ts=T0 + 2 * S, userId="u1", event="Order Completed"))
    cluster.send(
        event_dict(
            ts=T0 + 3 * S,
            type="identify",
            event=None,
            userId="u1",
            anonymousId="a1",
            traits={"email": "u1@example.com"},
        )
    )
    assert sorted(cluster.summary()) == [
        ("u1", "pro", "entered", T0 + 3 * S),
        ("u1", "two_orders", "entered", T0 + 3 * S),
    ]
    assert cluster.states["u1"].traits["email"] == "u1@example.com"  # the later value wins


# -- identity rules (SPEC §4/§11): anonymous -> user only, at most 100 merges ------------


VIP = audience("vip", {"trait": {"name": "plan", "op": "eq", "value": "pro"}})


def _victim_and_attacker(cluster: Cluster) -> bytes:
    """A known user (victim) in two audiences, with an email; an attacker with a view."""
    cluster.send(
        event_dict(
            ts=T0,
            type="identify",
            event=None,
            userId="victim",
            traits={"email": "victim@example.com", "plan": "pro"},
        )
    )
    for minute in range(3):
        cluster.send(view(T0 + minute * M, userId="victim"))
    cluster.send(view(T0 + 3 * M, userId="attacker"))
    return cluster.states["victim"].encode()


def test_an_alias_to_a_known_user_is_refused_and_dead_lettered() -> None:
    cluster = Cluster(catalog_of(WINDOW_SHOPPERS, VISITORS, VIP))
    victim_before = _victim_and_attacker(cluster)
    attacker_before = cluster.states["attacker"]
    before = cluster.summary()
    outputs_before = len(cluster.outputs)
    hijack = event_dict(
        ts=T0 + 4 * M,
        type="alias",
        event=None,
        userId="attacker",
        previousId="victim",
        messageId="hijack",
    )
    cluster.send(hijack)
    # nothing moved, nobody exited or entered
    assert cluster.summary() == before
    assert cluster.states["victim"].encode() == victim_before
    assert cluster.states["victim"].merged_into is None
    attacker = cluster.states["attacker"]
    assert "email" not in attacker.traits and "plan" not in attacker.traits
    assert attacker.aliases == {}  # the refused request is forgotten: it takes no place
    assert attacker.trackers.keys() == attacker_before.trackers.keys()
    # the alias is dead-lettered with its reason, keyed as it was sent
    ((refusal,),) = [cluster.refused]
    assert (refusal.reason, refusal.key, refusal.record) == ("merge_refused", "attacker", hijack)
    assert "known user" in refusal.detail
    # the victim's later events stay the victim's: no forwarding
    cluster.send(view(T0 + 5 * M, userId="victim"))
    assert cluster.states["victim"].merged_into is None
    assert [key for key, _t in cluster.outputs[outputs_before:]] == []  # (the view: no change)
    # a replay of the same log refuses the same way (same outputs, same dead letters)
    replay = Cluster(catalog_of(WINDOW_SHOPPERS, VISITORS, VIP))
    _victim_and_attacker(replay)
    replay.send(hijack)
    replay.send(view(T0 + 5 * M, userId="victim"))
    assert [(k, t.message_id) for k, t in replay.outputs] == [
        (k, t.message_id) for k, t in cluster.outputs
    ]
    assert replay.refused == cluster.refused


def test_an_event_linking_a_known_user_as_its_anonymous_id_is_refused() -> None:
    cluster = Cluster(catalog_of(WINDOW_SHOPPERS, VISITORS, VIP))
    victim_before = _victim_and_attacker(cluster)
    linking = view(T0 + 4 * M, userId="attacker", anonymousId="victim")
    cluster.send(linking)
    assert cluster.states["victim"].encode() == victim_before
    assert [(r.reason, r.key, r.record) for r in cluster.refused] == [
        ("merge_refused", "attacker", linking)
    ]


def test_an_anonymous_id_claimed_by_a_second_user_is_refused() -> None:
    cluster = Cluster(catalog_of(WINDOW_SHOPPERS))
    cluster.send(view(T0, anonymousId="a1"))
    cluster.send(view(T0 + M, userId="u1", anonymousId="a1"))
    cluster.send(view(T0 + 2 * M, userId="u2", anonymousId="a1"))
    assert cluster.states["a1"].merged_into == "u1"
    assert cluster.states["u1"].aliases == {"a1": 1}
    assert cluster.states["u2"].aliases == {}
    assert [(r.reason, r.key) for r in cluster.refused] == [("merge_refused", "u2")]
    assert "another user" in cluster.refused[0].detail


def test_a_user_id_linked_before_it_was_seen_keeps_its_own_events() -> None:
    """An alias naming an id nobody has used yet leaves a forwarding stub; once that id
    shows up as a userId it is a known user: its events are its own, never forwarded."""
    cluster = Cluster(catalog_of(WINDOW_SHOPPERS))
    cluster.send(
        event_dict(ts=T0, type="alias", event=None, userId="attacker", previousId="future")
    )
    assert cluster.states["future"].merged_into == "attacker"
    for minute in range(1, 4):
        cluster.send(view(T0 + minute * M, userId="future"))
    assert cluster.states["future"].merged_into is None
    assert cluster.summary() == [("future", "window_shoppers", "entered", T0 + 3 * M)]
    assert cluster.states["attacker"].trackers == {}


def test_anonymous_to_user_still_merges() -> None:
    cluster = Cluster(catalog_of(WINDOW_SHOPPERS, VISITORS))
    for minute in range(2):
        cluster.send(view(T0 + minute * M, anonymousId="a1"))
    cluster.send(event_dict(ts=T0 + 2 * M, type="alias", event=None, userId="u1", previousId="a1"))
    cluster.send(view(T0 + 3 * M, userId="u1"))
    assert cluster.refused == []
    assert cluster.states["u1"].aliases == {"a1": 1}
    assert ("u1", "window_shoppers", "entered", T0 + 3 * M) in cluster.summary()


def test_the_101st_merge_of_a_profile_is_refused_and_dead_lettered() -> None:
    cluster = Cluster(catalog_of(VISITORS))
    for n in range(101):
        cluster.send(view(T0 + n * S, anonymousId=f"anon-{n}"))
        cluster.send(
            view(T0 + n * S + 1, userId="u1", anonymousId=f"anon-{n}", messageId=f"link-{n}")
        )
    user = cluster.states["u1"]
    assert len(user.aliases) == 100 and set(user.aliases.values()) == {1}
    assert "anon-100" not in user.aliases
    assert cluster.states["anon-99"].merged_into == "u1"
    assert cluster.states["anon-100"].merged_into is None  # kept: its own profile
    ((refusal,),) = [cluster.refused]
    assert (refusal.reason, refusal.key) == ("merge_limit", "u1")
    assert refusal.record["messageId"] == "link-100"


# -- deletion and suppression ----------------------------------------------------------


def test_deleting_a_user_deletes_its_linked_anonymous_profiles() -> None:
    cluster = Cluster(catalog_of(WINDOW_SHOPPERS, VISITORS))
    cluster.send(view(T0, anonymousId="a1"))
    cluster.send(view(T0 + M, anonymousId="a2"))
    cluster.send(view(T0 + 2 * M, userId="u1", anonymousId="a1"))
    cluster.send(view(T0 + 3 * M, userId="u1", anonymousId="a2"))
    cluster.send(view(T0 + 4 * M, anonymousId="other"))
    assert cluster.states["u1"].aliases == {"a1": 1, "a2": 1}
    cluster.send({"type": "delete", "userId": "u1", "timestamp": iso(T0 + 5 * M)})
    assert cluster.erased == ["u1", "a1", "a2"]
    assert {"u1", "a1", "a2"}.isdisjoint(cluster.states)
    assert "other" in cluster.states  # nobody else's
    outputs = len(cluster.outputs)
    for minute in range(6, 9):  # later anonymous events do not recreate the user
        cluster.send(view(T0 + minute * M, anonymousId="a1"))
    assert {"u1", "a1"}.isdisjoint(cluster.states)
    assert len(cluster.outputs) == outputs


def test_a_cascading_delete_erases_only_a_stub_of_that_user() -> None:
    cluster = Cluster(catalog_of(VISITORS))
    cluster.send(view(T0, userId="someone"))
    before = cluster.states["someone"].encode()
    cluster.send(
        {
            "type": "delete",
            "anonymousId": "someone",
            "timestamp": iso(T0 + M),
            "properties": {"linkedTo": "u1"},
        }
    )
    assert cluster.erased == []
    assert cluster.states["someone"].encode() == before


def test_delete_exits_current_memberships_and_erases_the_profile() -> None:
    cluster = Cluster(catalog_of(WINDOW_SHOPPERS, VISITORS))
    for minute in range(3):
        cluster.send(view(T0 + minute * M, userId="u1"))
    cluster.send({"type": "delete", "userId": "u1", "timestamp": "2023-11-14T23:00:00.000Z"})
    exits = [t for _k, t in cluster.outputs if isinstance(t, Transition) and not t.entered]
    assert {(t.audience_key, t.trigger) for t in exits} == {
        ("visitors", "deleted"),
        ("window_shoppers", "deleted"),
    }
    assert cluster.erased == ["u1"]
    assert "u1" not in cluster.states


def _deleted_u1(delete_id: str = "del-1") -> Cluster:
    cluster = Cluster(catalog_of(WINDOW_SHOPPERS, VISITORS))
    cluster.send(view(T0, anonymousId="a1"))
    for minute in range(1, 4):
        cluster.send(view(T0 + minute * M, userId="u1", anonymousId="a1"))
    cluster.send(
        {"type": "delete", "userId": "u1", "timestamp": iso(T0 + H), "messageId": delete_id}
    )
    return cluster


def test_delete_emits_the_exits_then_user_deleted_with_a_deterministic_message_id() -> None:
    from audiences.core.outputs import render_output

    cluster = _deleted_u1()
    mine = [t for key, t in cluster.outputs if key == "u1"]
    deletion = mine[-1]
    assert isinstance(deletion, Deletion)
    exits = mine[-3:-1]  # the deletion's exits come first, then `User Deleted`
    assert {(t.audience_key, t.entered, t.trigger) for t in exits if isinstance(t, Transition)} == {
        ("visitors", False, "deleted"),
        ("window_shoppers", False, "deleted"),
    }
    assert (deletion.profile_key, deletion.anonymous, deletion.at_ms) == ("u1", False, T0 + H)
    message = render_output(deletion, {"email": "kept@example.com"}, space_id="spa_1")
    assert message == {
        "type": "track",
        "event": "User Deleted",
        "userId": "u1",
        "messageId": deletion.message_id,
        "timestamp": iso(T0 + H),
        "properties": {
            "reason": {"trigger": "deleted", "messageId": "del-1"},
            "effective_at": iso(T0 + H),
        },
        "context": {"traits": {}},  # no PII of a deleted user
    }
    # the same log gives the same ids; another delete request gives another
    again = [t for _k, t in _deleted_u1().outputs]
    assert [o.message_id for _k, o in cluster.outputs] == [o.message_id for o in again]
    other = [t for key, t in _deleted_u1("del-2").outputs if isinstance(t, Deletion)]
    assert other[0].message_id != deletion.message_id
    assert len({deletion.message_id, *(t.message_id for t in exits)}) == 3


def test_a_linked_anonymous_id_deleted_by_cascade_gets_its_own_user_deleted() -> None:
    from audiences.core.outputs import render_output

    cluster = _deleted_u1()
    deletions = [(k, t) for k, t in cluster.outputs if isinstance(t, Deletion)]
    assert [(k, t.anonymous, t.linked_to) for k, t in deletions] == [
        ("u1", False, None),
        ("a1", True, "u1"),
    ]
    message = render_output(deletions[1][1], {}, space_id="spa_1")
    assert message["anonymousId"] == "a1" and "userId" not in message
    assert message["properties"]["linkedTo"] == "u1"
    assert message["properties"]["reason"]["messageId"] == "delete-linked:a1:u1"


def test_deleting_an_id_the_engine_has_no_state_for_still_tells_destinations() -> None:
    cluster = Cluster(catalog_of(VISITORS))
    cluster.send({"type": "delete", "userId": "ghost", "timestamp": iso(T0), "messageId": "d"})
    assert [(k, type(t).__name__) for k, t in cluster.outputs] == [("ghost", "Deletion")]
    assert cluster.erased == ["ghost"]


def test_a_cascading_delete_of_somebody_else_tells_nobody() -> None:
    cluster = Cluster(catalog_of(VISITORS))
    cluster.send(view(T0, userId="someone"))
    cluster.send(
        {
            "type": "delete",
            "anonymousId": "someone",
            "timestamp": iso(T0 + M),
            "properties": {"linkedTo": "u1"},
        }
    )
    assert not any(isinstance(t, Deletion) for _k, t in cluster.outputs)


def test_unsuppressed_profiles_start_a_new_life_with_new_message_ids() -> None:
    catalog = catalog_of(VISITORS)
    first = run(catalog, [parse_event(view(T0, userId="u1"), T0)])
    cluster = Cluster(catalog)
    cluster.send(view(T0, userId="u1"))
    cluster.send({"type": "delete", "userId": "u1", "timestamp": "2023-11-14T23:00:00.000Z"})
    cluster.send({"type": "unsuppress", "userId": "u1", "timestamp": "2023-11-14T23:30:00.000Z"})
    cluster.send(view(T0 + 2 * H, userId="u1"))
    entered = [t for _k, t in cluster.outputs if isinstance(t, Transition) and t.entered]
    assert [t.seq for t in entered] == [1, 1]
    assert entered[0].message_id == first[0].message_id
    assert entered[1].message_id != entered[0].message_id


# -- definition lifecycle ----------------------------------------------------------------


def test_deleting_an_audience_tells_its_members_they_exited() -> None:
    v1 = catalog_of(VISITORS, WINDOW_SHOPPERS)
    state, _ = feed(v1, [parse_event(view(T0, userId="u1"), T0)])
    docs = {"window_shoppers": (validate_definition(WINDOW_SHOPPERS), 1)}
    without = build_catalog(docs, retired={"visitors": (4, "Visitors")})
    outputs = run(without, [Tick(T0 + S)], state=state)
    assert summary(outputs) == [("visitors", "exited", T0)]
    exited = outputs[0]
    assert isinstance(exited, Transition)
    assert (exited.trigger, exited.audience_version) == ("deleted", 4)
    assert state is not None and "visitors" not in state.members


def test_editing_a_live_audience_with_10000_members_causes_no_storm() -> None:
    buyers = {"performed": {"event": "Order Completed"}}
    v1 = catalog_of(audience("buyers", buyers), VISITORS, version=1)
    states: dict[str, UserState] = {}
    for n in range(10_000):
        user = f"u{n}"
        country = "XX" if n % 100 == 0 else "FR"
        items = _events(
            event_dict(
                ts=T0 + n, type="identify", event=None, userId=user, traits={"country": country}
            ),
            event_dict(ts=T0 + n, userId=user, event="Order Completed"),
        )
        state, outputs = feed(v1, items, user=user)
        assert summary(outputs) == [("buyers", "entered", T0 + n)]
        assert state is not None
        states[user] = state
    edited = audience(
        "buyers",
        {"all": [buyers, {"not": {"trait": {"name": "country", "op": "eq", "value": "XX"}}}]},
        name="Buyers outside XX",
    )
    v2 = build_catalog(
        {
            "buyers": (validate_definition(edited), 2),
            "visitors": (validate_definition(VISITORS), 1),
        }
    )
    changed: list[Output] = []
    for user, state in states.items():
        changed += step(state, Tick(T0 + H), v2, user).transitions
    # exactly the 100 members the edit excludes exit; 9,900 hear nothing
    assert sorted(t.profile_key for t in changed) == sorted(f"u{n}" for n in range(0, 10_000, 100))
    assert all(isinstance(t, Transition) and not t.entered for t in changed)
    assert {t.trigger for t in changed} == {"definition"}
    assert {t.audience_version for t in changed if isinstance(t, Transition)} == {2}


def _events(*raws: dict[str, Any]) -> list[Event]:
    return [parse_event(raw, T0) for raw in raws]


# -- preview -------------------------------------------------------------------------------


def test_preview_reports_size_sample_and_differences_without_changing_anything() -> None:
    from audiences.core.preview import Preview, preview

    buyers = audience("buyers", {"performed": {"event": "Order Completed"}})
    orders = {"key": "orders", "kind": "count", "event": "Order Completed"}
    v1 = catalog_of(buyers, orders)
    profiles: dict[str, UserState] = {}
    for n in range(6):
        user = f"u{n}"
        items = _events(
            event_dict(
                ts=T0,
                type="identify",
                event=None,
                userId=user,
                traits={"country": "XX" if n < 2 else "FR"},
            ),
            *([event_dict(ts=T0 + S, userId=user, event="Order Completed")] if n < 4 else []),
        )
        state, _ = feed(v1, items, user=user)
        assert state is not None
        profiles[user] = state
    stored = {user: state.encode() for user, state in profiles.items()}
    edited = validate_definition(
        audience(
            "buyers",
            {
                "any": [
                    {
                        "all": [
                            buyers["condition"],
                            {"not": {"trait": {"name": "country", "op": "eq", "value": "XX"}}},
                        ]
                    },
                    {"trait": {"name": "country", "op": "eq", "value": "FR"}},
                ]
            },
        )
    )
    definitions = {
        "buyers": (validate_definition(buyers), 1),
        "orders": (validate_definition(orders), 1),
    }
    decoded = [(user, UserState.decode(data)) for user, data in stored.items()]
    report = preview(edited, definitions, decoded, sample_size=3)
    assert (report.key, report.version, report.profiles) == ("buyers", 2, 6)
    assert (report.size, report.entering, report.exiting) == (4, 2, 2)
    assert sorted(report.would_exit) == ["u0", "u1"]
    assert sorted(report.would_enter) == ["u4", "u5"]
    assert len(report.sample) == 3
    # a partial report travels between workers as JSON (the compiled core has no __dict__)
    wire = orjson.loads(orjson.dumps(report.as_json()))
    assert wire["would_exit"] == report.would_exit and wire["size"] == 4
    assert Preview.from_json(wire) == report
    # an edited computed trait: which profiles have a value, and which
    trait = validate_definition({**orders, "name": "Orders (lifetime)"})
    decoded = [(user, UserState.decode(data)) for user, data in stored.items()]
    report = preview(trait, definitions, decoded)
    assert (report.version, report.size) == (2, 4)
    assert sorted(report.sample) == [["u0", 1], ["u1", 1], ["u2", 1], ["u3", 1]]
