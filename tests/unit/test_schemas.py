"""The JSON Schemas in `schemas/` are valid and accept/reject what SPEC §2-§5 say."""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from shared import SPEC_CART_ABANDONERS

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
BASE_URI = "https://audiences.dev/schemas/"
SCHEMA_FILES = sorted(p.relative_to(SCHEMAS).as_posix() for p in SCHEMAS.rglob("*.json"))
EVENT_TYPES = ["track", "identify", "page", "screen", "group", "alias", "delete"]


@cache
def registry() -> Registry:
    resources = []
    for name in SCHEMA_FILES:
        contents = json.loads((SCHEMAS / name).read_text())
        resources.append((contents["$id"], Resource.from_contents(contents, DRAFT202012)))
    return Registry().with_resources(resources)


def validator(name: str) -> Draft202012Validator:
    schema = registry().contents(BASE_URI + name)
    return Draft202012Validator(schema, registry=registry())


def errors(name: str, instance: Any) -> list[str]:
    return [e.message for e in validator(name).iter_errors(instance)]


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for value in node.values() for r in refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in refs(value)]
    return []


# --------------------------------------------------------------------------- schemas themselves


def test_expected_schema_files_exist() -> None:
    expected = {f"events/{t}.json" for t in EVENT_TYPES} | {
        "events/common.json",
        "definition.json",
        "output/audience-event.json",
    }
    assert expected <= set(SCHEMA_FILES)


@pytest.mark.parametrize("name", SCHEMA_FILES)
def test_schema_is_valid_and_refs_resolve(name: str) -> None:
    schema = json.loads((SCHEMAS / name).read_text())
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == BASE_URI + name
    resolver = registry().resolver(base_uri=schema["$id"])
    for ref in refs(schema):
        resolver.lookup(ref)  # raises if unresolvable


# --------------------------------------------------------------------------- input events

CONTEXT = {
    "ip": "203.0.113.7",
    "library": {"name": "analytics-python", "version": "2.3.2"},
    "device": {"id": "d-1", "type": "ios", "token": "apns-token", "push_enabled": True},
    "os": {"name": "iOS", "version": "17.4"},
    "page": {"url": "https://shop.example/cart", "path": "/cart", "title": "Cart"},
    "traits": {"email": "ada@example.com"},
}
COMMON = {
    "messageId": "ajs-6f8d3b1e",
    "timestamp": "2024-05-01T12:00:00.000Z",
    "originalTimestamp": "2024-05-01T12:00:00.000Z",
    "sentAt": "2024-05-01T12:00:01.000Z",
    "receivedAt": "2024-05-01T12:00:01.250Z",
    "context": CONTEXT,
    "integrations": {"All": True, "Braze": {"appId": "x"}},
}
VALID_EVENTS: dict[str, dict[str, Any]] = {
    "track": {
        "type": "track",
        "userId": "u1",
        "event": "Checkout Started",
        "properties": {"cart_id": "c-42", "revenue": 59.9},
        **COMMON,
    },
    "identify": {
        "type": "identify",
        "userId": "u1",
        "anonymousId": "a-9",
        "traits": {"email": "ada@example.com", "plan": "pro"},
        **COMMON,
    },
    "page": {
        "type": "page",
        "userId": None,  # analytics.js sends null for anonymous visitors
        "anonymousId": "a-9",
        "name": "Cart",
        "properties": {"url": "https://shop.example/cart", "path": "/cart"},
        **COMMON,
    },
    "screen": {"type": "screen", "userId": 12345, "name": "Home", "properties": {}, **COMMON},
    "group": {"type": "group", "userId": "u1", "groupId": "acme", "traits": {"seats": 20}},
    "alias": {"type": "alias", "userId": "u1", "previousId": "a-9"},
    "delete": {"type": "delete", "userId": "u1"},
}


@pytest.mark.parametrize("kind", EVENT_TYPES)
def test_valid_event(kind: str) -> None:
    event = VALID_EVENTS[kind]
    assert errors(f"events/{kind}.json", event) == []
    assert errors("events/event.json", event) == []


@pytest.mark.parametrize("user_id", [None, ""])
def test_anonymous_track(user_id: str | None) -> None:
    event = {"type": "track", "userId": user_id, "anonymousId": "a", "event": "X"}
    assert errors("events/event.json", event) == []


@pytest.mark.parametrize(
    ("event", "why"),
    [
        ({"type": "track", "userId": "u1"}, "track without event"),
        ({"type": "track", "userId": "u1", "event": ""}, "empty event name"),
        ({"type": "track", "event": "X"}, "neither userId nor anonymousId"),
        ({"type": "track", "userId": None, "anonymousId": None, "event": "X"}, "both ids null"),
        ({"type": "identify", "userId": ""}, "empty userId"),
        ({"type": "group", "userId": "u1"}, "group without groupId"),
        ({"type": "alias", "anonymousId": "a", "previousId": "p"}, "alias without userId"),
        ({"type": "alias", "userId": "u1"}, "alias without previousId"),
        ({"type": "delete"}, "delete without id"),
        ({"type": "launch", "userId": "u1"}, "unknown type"),
        ({"userId": "u1", "event": "X"}, "no type"),
        (
            {"type": "track", "userId": "u1", "event": "X", "properties": []},
            "properties not object",
        ),
        (
            {
                "type": "track",
                "userId": "u1",
                "event": "X",
                "context": {"device": {"push_enabled": "no"}},
            },
            "push_enabled not boolean",
        ),
    ],
)
def test_invalid_event(event: dict[str, Any], why: str) -> None:
    assert errors("events/event.json", event), why


def test_event_type_schemas_pin_their_type() -> None:
    assert errors("events/identify.json", {**VALID_EVENTS["track"]})


# --------------------------------------------------------------------------- definitions

CART_ABANDONERS = SPEC_CART_ABANDONERS
PUSH_REENGAGE = {
    "key": "push_reengage",
    "name": "Dormant shoppers reachable by push",
    "version": 3,
    "condition": {
        "all": [
            {
                "performed": {
                    "event": "Order Completed",
                    "times": {"gte": 2},
                    "between": ["30d", "90d"],
                }
            },
            {"not": {"performed": {"event": "Order Completed", "within": "30d"}}},
            {"device": {"type": "ios", "push_enabled": True}},
            {"trait": {"name": "email", "op": "contains", "value": "gmail|hotmail"}},
            {"trait": {"name": "address.country", "op": "exists"}},
            {"computed": {"name": "lifetime_value", "op": "gte", "value": 100}},
            {"not": {"in_audience": "cart_abandoners"}},
            {
                "any": [
                    {"page_viewed": {"url": "https://shop.example/sale/*", "within": "14d"}},
                    {"screen_viewed": {"name": "Sale", "times": {"eq": 0}}},
                    {
                        "performed": {
                            "event": "Product Viewed",
                            "where": [
                                {"property": "properties.price", "op": "gt", "value": 20},
                                {
                                    "property": "properties.category",
                                    "op": "in",
                                    "value": ["a", "b"],
                                },
                                {
                                    "property": "properties.seen_at",
                                    "op": "within_last",
                                    "value": "7d",
                                },
                                {"property": "properties.sku", "op": "matches", "value": "^SKU-"},
                                {
                                    "property": "timestamp",
                                    "op": "after",
                                    "value": "2024-01-01T00:00:00Z",
                                },
                            ],
                        }
                    },
                ]
            },
            {
                "sequence": {
                    "steps": [
                        {"event": "Product Viewed"},
                        {"event": "Product Added", "within": "1h"},
                    ],
                    "then": {"event": "Checkout Started", "within": "30m"},
                }
            },
        ]
    },
}
COMPUTED_TRAITS = [
    {"key": "orders_90d", "kind": "count", "event": "Order Completed", "within": "90d"},
    {
        "key": "lifetime_value",
        "kind": "sum",
        "event": "Order Completed",
        "property": "properties.revenue",
    },
    {
        "key": "favorite_category",
        "name": "Favorite category",
        "kind": "most_frequent",
        "event": "Product Viewed",
        "property": "properties.category",
        "where": [{"property": "properties.category", "op": "not_exists"}],
        "within": "4w",
    },
    {
        "key": "orders_this_week",
        "kind": "count",
        "event": "Order Completed",
        "within": {"calendar_days": 7, "timezone": "Europe/Berlin"},
    },
]
CALENDAR = {"calendar_days": 7, "timezone": "Europe/Berlin"}


@pytest.mark.parametrize(
    "definition",
    [
        CART_ABANDONERS,
        PUSH_REENGAGE,
        *COMPUTED_TRAITS,
        {"key": "today", "condition": {"performed": {"event": "X", "within": CALENDAR}}},
        {"key": "views_2d", "condition": {"page_viewed": {"url": "*", "within": CALENDAR}}},
        {"key": "home_2d", "condition": {"screen_viewed": {"name": "H", "within": CALENDAR}}},
    ],
    ids=lambda d: d["key"],
)
def test_valid_definition(definition: dict[str, Any]) -> None:
    assert errors("definition.json", definition) == []


def audience(condition: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    return {"key": "a", "condition": condition, **overrides}


DID_X = {"performed": {"event": "X"}}


def performed(**fields: Any) -> dict[str, Any]:
    return audience({"performed": {"event": "X", **fields}})


@pytest.mark.parametrize(
    ("definition", "why"),
    [
        (audience(DID_X, key="Cart"), "uppercase key"),
        (audience(DID_X, key="1cart"), "key starts with a digit"),
        (audience(DID_X, key="cart-abandoners"), "dash in key"),
        (audience(DID_X, key="a" * 65), "key longer than 64"),
        (performed(within="2 hours"), "bad duration"),
        (performed(within="2y"), "unknown duration unit"),
        (performed(within="1h30m"), "compound duration"),
        (performed(within=7200), "numeric duration"),
        (audience({"performed": {"event": "X"}, "not": DID_X}), "two keys in one condition"),
        (audience({}), "empty condition"),
        (audience({"did": {"event": "X"}}), "unknown condition"),
        (audience({"all": []}), "empty all"),
        (performed(times={"gte": 1, "lte": 3}), "two keys in times"),
        (performed(times={"ge": 1}), "unknown times op"),
        (performed(times=2), "bare times"),
        (performed(within="1d", between=["1d", "2d"]), "within+between"),
        (performed(between=["1d"]), "between of one"),
        (performed(where=[{"property": "p", "op": "like", "value": 1}]), "bad op"),
        (performed(where={"property": "p", "op": "eq", "value": 1}), "filter not list"),
        (audience({"trait": {"name": "plan", "op": "eq"}}), "eq without value"),
        (audience({"trait": {"name": "tags", "op": "in", "value": "a"}}), "in without list"),
        (
            audience({"trait": {"name": "seen", "op": "within_last", "value": "a week"}}),
            "within_last non-duration",
        ),
        (audience({"device": {"type": "windows"}}), "unknown device type"),
        (audience({"in_audience": "Not A Key"}), "bad audience reference"),
        (
            audience(
                {
                    "sequence": {
                        "steps": [{"event": "A"}],
                        "then": {"event": "B", "within": "1h"},
                        "then_not": {"event": "C", "within": "1h"},
                    }
                }
            ),
            "then and then_not",
        ),
        (audience({"sequence": {"steps": []}}), "sequence without steps"),
        (
            audience({"sequence": {"steps": [{"event": "A"}], "then_not": {"event": "B"}}}),
            "follow-up without within",
        ),
        (performed(within="0h"), "zero duration"),
        (performed(within={"calendar_days": 0, "timezone": "UTC"}), "zero calendar days"),
        (performed(within={"calendar_days": 3651, "timezone": "UTC"}), "too many days"),
        (performed(within={"calendar_days": 7}), "calendar days without a timezone"),
        (performed(within={"calendar_days": 7, "timezone": "UTC", "x": 1}), "calendar extra"),
        (
            audience({"trait": {"name": "email", "op": "contains", "value": 1}}),
            "contains non-string",
        ),
        (audience({"trait": {"name": "signup", "op": "before", "value": True}}), "before boolean"),
        ({"key": "a", "condtion": DID_X}, "misspelled condition"),
        (audience(DID_X, include_anonymous="yes"), "include_anonymous not boolean"),
        (audience(DID_X, version=0), "version 0"),
        ({"key": "t", "kind": "sum", "event": "Order Completed"}, "sum without property"),
        ({"key": "t", "kind": "median", "event": "E", "property": "p"}, "unknown kind"),
        ({"key": "t", "kind": "count"}, "computed trait without event"),
        ({"key": "t", "kind": "count", "event": "E", "condition": DID_X}, "kind and condition"),
    ],
)
def test_invalid_definition(definition: dict[str, Any], why: str) -> None:
    assert errors("definition.json", definition), why


# --------------------------------------------------------------------------- output events

ENTERED = {
    "type": "track",
    "event": "Audience Entered",
    "userId": "u1",
    "messageId": "9f2c" * 16,
    "timestamp": "2024-05-01T14:00:00.000Z",
    "properties": {
        "audience_key": "cart_abandoners",
        "cart_abandoners": True,
        "audience_name": "Cart abandoners",
        "audience_version": 3,
        "effective_at": "2024-05-01T14:00:00.000Z",
        "reason": {"sequence": {"value": True, "events": ["ajs-6f8d3b1e"]}},
    },
    "context": {
        "traits": {"email": "ada@example.com"},
        "personas": {
            "computation_class": "audience",
            "computation_key": "cart_abandoners",
            "computation_id": "4d1c" * 8,
            "space_id": "spa_w5s6z9mhj6",
            "namespace": "spa_w5s6z9mhj6",
        },
    },
}


def exited() -> dict[str, Any]:
    event = copy.deepcopy(ENTERED)
    event["event"] = "Audience Exited"
    event["properties"]["cart_abandoners"] = False
    return event


TRAIT_COMPUTED = {
    "type": "track",
    "event": "Trait Computed",
    "userId": "u1",
    "messageId": "0" * 64,
    "timestamp": "2024-05-01T14:00:00Z",
    "properties": {"trait_key": "lifetime_value", "lifetime_value": 159.7},
    "context": {
        "personas": {
            "computation_class": "computed_trait",
            "computation_key": "lifetime_value",
            "computation_id": "0a" * 16,
            "space_id": "audiences",
            "namespace": "audiences",
        }
    },
}


USER_DELETED = {
    "type": "track",
    "event": "User Deleted",
    "anonymousId": "a1",
    "messageId": "7" * 64,
    "timestamp": "2024-05-01T14:00:00.000Z",
    "properties": {
        "reason": {"trigger": "deleted", "messageId": "delete-linked:a1:u1"},
        "linkedTo": "u1",
        "effective_at": "2024-05-01T14:00:00.000Z",
    },
    "context": {"traits": {}},
}


@pytest.mark.parametrize(
    "event",
    [ENTERED, exited(), TRAIT_COMPUTED, USER_DELETED],
    ids=["entered", "exited", "trait", "deleted"],
)
def test_valid_output(event: dict[str, Any]) -> None:
    assert errors("output/audience-event.json", event) == []
    assert errors("events/event.json", event) == []  # output events are Segment-Spec tracks


def entered_with(**changes: Any) -> dict[str, Any]:
    event = copy.deepcopy(ENTERED)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        target = event
        for part in parents:
            target = target[part]
        if value is None:
            del target[leaf]
        else:
            target[leaf] = value
    return event


@pytest.mark.parametrize(
    ("event", "why"),
    [
        (entered_with(properties__cart_abandoners=False), "Entered with false"),
        (entered_with(properties__audience_key=None), "no audience_key"),
        (entered_with(properties__audience_version=None), "no audience_version"),
        (entered_with(messageId="not-a-hash"), "messageId not sha256 hex"),
        (entered_with(event="Audience Joined"), "unknown output event"),
        (entered_with(context__personas=None), "no context.personas"),
        (entered_with(context__personas__computation_class="computed_trait"), "class mismatch"),
        (entered_with(context__personas__computation_id=None), "no computation_id"),
        (entered_with(context__personas__computation_id="aud_1"), "computation_id not an id"),
        (entered_with(context__personas__space_id=None), "no space_id"),
        (entered_with(context__personas__space_id=""), "empty space_id"),
        (entered_with(context__personas__namespace=None), "no namespace"),
        (entered_with(context__personas__version=3), "a field Segment does not write"),
        (entered_with(userId=None), "no user"),
        (entered_with(timestamp=None), "no timestamp"),
        ({**ENTERED, "event": "Audience Exited"}, "Exited carrying true"),
        (
            {**TRAIT_COMPUTED, "properties": {"lifetime_value": 1}},
            "Trait Computed without trait_key",
        ),
        ({**USER_DELETED, "properties": {}}, "User Deleted without reason"),
        (
            {**USER_DELETED, "context": {"traits": {"email": "a@example.com"}}},
            "User Deleted carrying PII",
        ),
        ({**USER_DELETED, "context": ENTERED["context"]}, "User Deleted with a computation"),
        (
            {
                **USER_DELETED,
                "properties": {**ENTERED["properties"], "reason": {"trigger": "deleted"}},
            },
            "User Deleted with audience properties",
        ),
    ],
)
def test_invalid_output(event: dict[str, Any], why: str) -> None:
    assert errors("output/audience-event.json", event), why


def test_rendered_outputs_match_the_output_schema() -> None:
    from factories import T0, audience, catalog_of, feed, identify, make_event

    from audiences.core.outputs import render_output

    catalog = catalog_of(
        {"key": "ltv", "kind": "sum", "event": "Order Completed", "property": "revenue"},
        audience("vip", {"computed": {"name": "ltv", "op": "gt", "value": 300}}),
    )
    order = make_event(ts=T0 + 1, event="Order Completed", properties={"revenue": 500})
    state, outputs = feed(catalog, [identify(T0, email="a@example.com"), order])
    assert state is not None and len(outputs) == 2
    for output in outputs:
        message = render_output(output, state.traits, space_id="spa_1")
        assert errors("output/audience-event.json", message) == []
        assert errors("events/event.json", message) == []


def test_rendered_user_deleted_matches_the_output_schema() -> None:
    from factories import T0, Cluster, catalog_of, iso

    from audiences.core.evaluator import Deletion
    from audiences.core.outputs import render_output

    cluster = Cluster(catalog_of())
    cluster.send({"type": "identify", "userId": "u1", "anonymousId": "a1", "timestamp": iso(T0)})
    cluster.send({"type": "delete", "userId": "u1", "timestamp": iso(T0 + 1), "messageId": "d1"})
    deletions = [t for _k, t in cluster.outputs if isinstance(t, Deletion)]
    assert len(deletions) == 2  # u1, and a1 by cascade
    for deletion in deletions:
        message = render_output(deletion, {}, space_id="spa_1")
        assert errors("output/audience-event.json", message) == []
        assert errors("events/event.json", message) == []


def test_identity_control_records_match_their_schemas() -> None:
    import orjson
    from factories import T0

    from audiences.core.definitions import build_catalog
    from audiences.core.evaluator import step
    from audiences.core.events import parse_event

    catalog = build_catalog({})
    anonymous = step(
        None,
        parse_event({"type": "track", "event": "E", "anonymousId": "a1", "timestamp": T0}, T0),
        catalog,
        "a1",
    ).state
    linked = step(
        None,
        parse_event(
            {"type": "identify", "userId": "u1", "anonymousId": "a1", "timestamp": T0 + 1}, T0
        ),
        catalog,
        "u1",
    )
    ((target, request),) = linked.controls
    assert target == "a1"
    assert errors("events/merge.json", request) == []
    assert errors("events/event.json", request) == []
    handed = step(anonymous, parse_event(orjson.dumps(request), T0), catalog, "a1")
    ((target, state_record),) = handed.controls
    assert target == "u1"
    assert errors("events/merge.json", state_record) == []
    assert errors("events/event.json", {"type": "unsuppress", "userId": "u1"}) == []
    assert errors("events/merge.json", {**request, "properties": {}})  # `into` is required
