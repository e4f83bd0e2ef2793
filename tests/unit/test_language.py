"""page_viewed / screen_viewed, device, computed traits and `computed`, backfill: false."""

from __future__ import annotations

from typing import Any

import pytest
from factories import (
    T0,
    D,
    H,
    M,
    S,
    audience,
    catalog_of,
    event_dict,
    feed,
    identify,
    iso,
    make_event,
    run,
    summary,
    trait_values,
)

from audiences.core.definitions import validate_definition
from audiences.core.definitions.language import KINDS
from audiences.core.evaluator import Tick
from audiences.core.outputs import computation_id, render_output
from audiences.errors import DefinitionError


def page(ts: int, url: str | None = None, *, where: str = "properties", **fields: Any) -> Any:
    raw = event_dict(ts=ts, type="page", event=None, **fields)
    if url is not None:
        if where == "properties":
            raw["properties"] = {**raw.get("properties", {}), "url": url}
        else:
            raw["context"] = {"page": {"url": url}}
    return make_event(ts=ts, **{k: v for k, v in raw.items() if k not in ("timestamp",)})


def screen(ts: int, name: str) -> Any:
    return make_event(ts=ts, type="screen", event=None, name=name)


def track(ts: int, name: str, **properties: Any) -> Any:
    return make_event(ts=ts, event=name, properties=properties)


def with_context(ts: int, context: dict[str, Any], name: str = "App Opened") -> Any:
    return make_event(ts=ts, event=name, context=context)


# -- page_viewed / screen_viewed ----------------------------------------------------------

PRICING = audience(
    "pricing_not_upgraded",
    {
        "all": [
            {"page_viewed": {"url": "*/pricing*", "times": {"gte": 3}, "within": "7d"}},
            {"not": {"performed": {"event": "Plan Upgraded"}}},
        ]
    },
)


def test_pricing_page_three_times_in_seven_days_enters_and_leaves_by_time() -> None:
    catalog = catalog_of(PRICING)
    views = [
        page(T0, "https://shop.example/pricing"),
        page(T0 + H, "https://shop.example/pricing?plan=pro", where="context"),
        page(T0 + 2 * H, "https://shop.example/pricing#faq"),
    ]
    outputs = run(catalog, [*views, Tick(T0 + 7 * D - S), Tick(T0 + 7 * D)])
    # entered at the third view; leaves exactly when the first view is 7 days old
    assert summary(outputs) == [
        ("pricing_not_upgraded", "entered", T0 + 2 * H),
        ("pricing_not_upgraded", "exited", T0 + 7 * D),
    ]


def test_page_views_of_other_urls_and_an_upgrade_keep_users_out() -> None:
    catalog = catalog_of(PRICING)
    other = [page(T0 + i * M, "https://shop.example/blog") for i in range(5)]
    assert summary(run(catalog, other)) == []
    upgraded = [
        track(T0, "Plan Upgraded"),
        *[page(T0 + i * M, "https://shop.example/pricing") for i in range(1, 4)],
    ]
    assert summary(run(catalog, upgraded)) == []


def test_upgrading_after_entering_exits() -> None:
    catalog = catalog_of(PRICING)
    views = [page(T0 + i * M, "https://x.example/pricing") for i in range(3)]
    outputs = run(catalog, [*views, track(T0 + H, "Plan Upgraded")])
    assert summary(outputs)[-1] == ("pricing_not_upgraded", "exited", T0 + H)


@pytest.mark.parametrize(
    ("pattern", "url", "expected"),
    [
        ("https://a.example/pricing", "https://a.example/pricing", True),
        ("https://a.example/pricing", "https://a.example/pricing/team", False),  # anchored
        ("*/pricing|*/plans", "https://a.example/plans", True),
        ("*/docs/+", "https://a.example/docs/", False),  # + needs one or more
        ("*/docs/+", "https://a.example/docs/x", True),
    ],
)
def test_url_patterns_use_the_wildcard_syntax(pattern: str, url: str, expected: bool) -> None:
    catalog = catalog_of(audience("a", {"page_viewed": {"url": pattern}}))
    assert bool(summary(run(catalog, [page(T0, url)]))) is expected


def test_page_name_and_where_filters() -> None:
    catalog = catalog_of(
        audience(
            "a",
            {
                "page_viewed": {
                    "name": "Checkout",
                    "where": [{"property": "properties.step", "op": "gte", "value": 2}],
                }
            },
        )
    )
    assert summary(run(catalog, [page(T0, name="Checkout", properties={"step": 1})])) == []
    assert summary(run(catalog, [page(T0, name="Cart", properties={"step": 3})])) == []
    assert summary(run(catalog, [page(T0, name="Checkout", properties={"step": 2})])) == [
        ("a", "entered", T0)
    ]


def test_screen_viewed_counts_screen_events_only() -> None:
    catalog = catalog_of(
        audience("a", {"screen_viewed": {"name": "Paywall", "times": {"gte": 2}, "within": "1h"}})
    )
    # a page called Paywall and a track called Paywall do not count
    noise = [page(T0, name="Paywall"), track(T0 + S, "Paywall")]
    outputs = run(catalog, [*noise, screen(T0 + 2 * S, "Paywall"), screen(T0 + M, "Paywall")])
    assert summary(outputs) == [("a", "entered", T0 + M)]
    # exactly at the edge of the window: 1 h after the first counted screen, one is left
    outputs = run(
        catalog,
        [screen(T0, "Paywall"), screen(T0 + M, "Paywall"), Tick(T0 + H - S), Tick(T0 + H)],
    )
    assert summary(outputs) == [("a", "entered", T0 + M), ("a", "exited", T0 + H)]


# -- device ------------------------------------------------------------------------------

IOS_PUSH = audience("ios_push", {"device": {"type": "ios", "push_enabled": True}})
IPHONE = {"os": {"name": "iOS", "version": "17.1"}, "device": {"id": "d1", "token": "apns-1"}}


def test_an_ios_device_with_a_push_token_is_push_enabled() -> None:
    catalog = catalog_of(IOS_PUSH)
    assert summary(run(catalog, [with_context(T0, IPHONE)])) == [("ios_push", "entered", T0)]


@pytest.mark.parametrize(
    "disable",
    [
        with_context(
            T0 + H, {"os": {"name": "iOS"}, "device": {"id": "d1", "push_enabled": False}}
        ),
        track(T0 + H, "Push Notifications Disabled"),
    ],
)
def test_push_disabled_later_exits(disable: Any) -> None:
    catalog = catalog_of(IOS_PUSH)
    outputs = run(catalog, [with_context(T0, IPHONE), disable])
    assert summary(outputs) == [("ios_push", "entered", T0), ("ios_push", "exited", T0 + H)]


def test_a_late_disable_older_than_the_token_changes_nothing() -> None:
    catalog = catalog_of(IOS_PUSH)
    late = with_context(
        T0 - H, {"os": {"name": "iOS"}, "device": {"id": "d1", "push_enabled": False}}
    )
    assert summary(run(catalog, [with_context(T0, IPHONE), late])) == [("ios_push", "entered", T0)]


@pytest.mark.parametrize(
    ("condition", "context", "expected"),
    [
        ({"type": "android"}, {"os": {"name": "Android"}, "device": {"id": "a"}}, True),
        ({"type": "android"}, IPHONE, False),
        ({"type": "ios", "push_enabled": True}, {"os": {"name": "iOS"}}, False),  # no token
        ({"type": "ios", "push_enabled": False}, {"os": {"name": "iOS"}}, True),
        ({"type": "web"}, {"userAgent": "Mozilla/5.0"}, True),
        ({"type": "any"}, {"device": {"type": "android", "id": "x"}}, True),
        ({"type": "any"}, {"library": {"name": "analytics-python"}}, False),
    ],
)
def test_device_types(condition: dict[str, Any], context: dict[str, Any], expected: bool) -> None:
    catalog = catalog_of(audience("a", {"device": condition}))
    assert bool(summary(run(catalog, [with_context(T0, context)]))) is expected


# -- computed traits ---------------------------------------------------------------------


def trait(key: str, kind: str, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"key": key, "kind": kind, "event": "Order Completed"}
    if kind != "count":
        base["property"] = "properties.revenue"
    return {**base, **fields}


def orders(*items: tuple[int, Any]) -> list[Any]:
    return [track(ts, "Order Completed", revenue=value) for ts, value in items]


REVENUES = orders((T0, 100), (T0 + H, 250), (T0 + 2 * H, 100), (T0 + 3 * H, 40))


@pytest.mark.parametrize(
    ("kind", "values"),
    [
        ("count", [1, 2, 3, 4]),
        ("sum", [100, 350, 450, 490]),
        ("avg", [100.0, 175.0, 150.0, 122.5]),
        ("min", [100, 40]),
        ("max", [100, 250]),
        ("first", [100]),
        ("last", [100, 250, 100, 40]),
        ("most_frequent", [100]),
        ("unique_list", [[100], [100, 250], [40, 100, 250]]),
        ("unique_count", [1, 2, 3]),
    ],
)
def test_every_kind_announces_each_new_value(kind: str, values: list[Any]) -> None:
    catalog = catalog_of(trait("t", kind))
    assert [value for _k, value, _at in trait_values(run(catalog, REVENUES))] == values


def test_every_kind_is_covered() -> None:
    assert set(KINDS) == {
        "count",
        "sum",
        "avg",
        "min",
        "max",
        "first",
        "last",
        "most_frequent",
        "unique_list",
        "unique_count",
    }


def test_late_events_set_first_and_last_by_event_time() -> None:
    catalog = catalog_of(trait("first_rev", "first"), trait("last_rev", "last"))
    outputs = run(catalog, orders((T0, 10), (T0 - H, 20), (T0 - 2 * H, 30)))
    assert trait_values(outputs) == [
        ("first_rev", 10, T0),
        ("last_rev", 10, T0),
        ("first_rev", 20, T0),  # a late event is applied at the profile's time...
        ("first_rev", 30, T0),
    ]
    assert outputs[2].effective_at_ms == T0 - H  # ...with its own time as effective_at


def test_wrong_types_and_where_filters_are_not_counted() -> None:
    catalog = catalog_of(
        trait("big_sum", "sum", where=[{"property": "currency", "op": "eq", "value": "EUR"}])
    )
    events = [
        track(T0, "Order Completed", revenue="100", currency="EUR"),  # a string: not summed
        track(T0 + S, "Order Completed", revenue=True, currency="EUR"),  # a bool: not summed
        track(T0 + 2 * S, "Order Completed", revenue=5, currency="USD"),  # filtered out
        track(T0 + 3 * S, "Order Completed", revenue=7, currency="EUR"),
    ]
    assert trait_values(run(catalog, events)) == [("big_sum", 7, T0 + 3 * S)]


def test_most_frequent_breaks_ties_deterministically() -> None:
    catalog = catalog_of(
        {"key": "fav", "kind": "most_frequent", "event": "Viewed", "property": "category"}
    )
    events = [track(T0, "Viewed", category="shoes"), track(T0 + S, "Viewed", category="bags")]
    assert [v for _, v, _ in trait_values(run(catalog, events))] == ["shoes", "bags"]


def test_a_windowed_count_changes_by_time_alone_at_the_exact_second() -> None:
    catalog = catalog_of(trait("orders_100s", "count", within="100s"))
    outputs = run(
        catalog,
        [
            *orders((T0, 1), (T0 + 10 * S, 1)),
            Tick(T0 + 100 * S - 1),
            Tick(T0 + 100 * S),
            Tick(T0 + 110 * S),
        ],
    )
    assert trait_values(outputs) == [
        ("orders_100s", 1, T0),
        ("orders_100s", 2, T0 + 10 * S),
        ("orders_100s", 1, T0 + 100 * S),
        ("orders_100s", 0, T0 + 110 * S),
    ]


def test_windowed_buckets_are_at_most_a_hundredth_of_the_window_early() -> None:
    catalog = catalog_of(trait("orders_90d", "count", within="90d"))
    bucket = 90 * D // 100
    ts = T0 - T0 % bucket + bucket // 2  # mid-bucket
    state, outputs = feed(catalog, [*orders((ts, 1)), Tick(ts + 90 * D - bucket)])
    assert trait_values(outputs) == [("orders_90d", 1, ts)]  # still counted D/100 before
    assert state is not None and state.wake_ms == ts - bucket // 2 + 90 * D


def test_a_windowed_trait_ignores_events_already_outside_the_window() -> None:
    catalog = catalog_of(trait("recent", "sum", within="1h"))
    outputs = run(catalog, [*orders((T0, 5)), *orders((T0 - 2 * H, 50))])
    assert trait_values(outputs) == [("recent", 5, T0)]


def test_vip_audience_compares_a_computed_trait() -> None:
    catalog = catalog_of(
        trait("lifetime_value", "sum"),
        audience("vip", {"computed": {"name": "lifetime_value", "op": "gt", "value": 300}}),
    )
    outputs = run(catalog, orders((T0, 200), (T0 + H, 150)))
    assert summary(outputs) == [("vip", "entered", T0 + H)]
    assert trait_values(outputs)[-1] == ("lifetime_value", 350, T0 + H)


def test_audiences_on_windowed_traits_exit_by_time() -> None:
    catalog = catalog_of(
        trait("spend_7d", "sum", within="7d"),
        audience("spenders", {"computed": {"name": "spend_7d", "op": "gte", "value": 100}}),
    )
    start = T0 - T0 % (7 * D // 100)  # at the start of a bucket: exact
    outputs = run(catalog, [*orders((start, 120)), Tick(start + 8 * D)])
    assert summary(outputs) == [
        ("spenders", "entered", start),
        ("spenders", "exited", start + 7 * D),
    ]


def test_trait_computed_output_format() -> None:
    catalog = catalog_of(trait("lifetime_value", "sum"))
    state, outputs = feed(catalog, [identify(T0, email="a@example.com"), *orders((T0 + S, 42))])
    assert state is not None
    message = render_output(outputs[0], state.traits, space_id="spa_1")
    assert message["event"] == "Trait Computed"
    assert message["userId"] == "u1"
    assert message["timestamp"] == iso(T0 + S)
    assert message["properties"]["trait_key"] == "lifetime_value"
    assert message["properties"]["lifetime_value"] == 42
    assert message["context"]["traits"] == {"email": "a@example.com"}
    assert message["context"]["personas"] == {
        "computation_class": "computed_trait",
        "computation_key": "lifetime_value",
        "computation_id": computation_id("spa_1", "computed_trait", "lifetime_value"),
        "space_id": "spa_1",
        "namespace": "spa_1",
    }
    assert len(message["messageId"]) == 64
    # deterministic: the same history gives the same id
    again = run(catalog, [identify(T0, email="a@example.com"), *orders((T0 + S, 42))])
    assert again[0].message_id == outputs[0].message_id


# -- backfill: false -----------------------------------------------------------------------


def test_backfill_false_counts_only_events_after_creation() -> None:
    created = T0 + D
    definition = audience(
        "repeat",
        {"performed": {"event": "Order Completed", "times": {"gte": 2}}},
        backfill=False,
        created_at=iso(created),
    )
    backfilled = audience(
        "repeat_all", {"performed": {"event": "Order Completed", "times": {"gte": 2}}}
    )
    catalog = catalog_of(definition, backfilled)
    history = orders((T0, 1), (T0 + H, 1), (created + H, 1), (created + 2 * H, 1))
    assert summary(run(catalog, history)) == [
        ("repeat_all", "entered", T0 + H),
        ("repeat", "entered", created + 2 * H),
    ]


# -- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("doc", "path"),
    [
        (audience("a", {"page_viewed": {"urls": "x"}}), "$.condition.page_viewed.urls"),
        (audience("a", {"page_viewed": {"url": ""}}), "$.condition.page_viewed.url"),
        (audience("a", {"screen_viewed": {"within": "soon"}}), "$.condition.screen_viewed.within"),
        (audience("a", {"device": {"type": "iphone"}}), "$.condition.device.type"),
        (
            audience("a", {"device": {"type": "ios", "push_enabled": "yes"}}),
            "$.condition.device.push_enabled",
        ),
        (
            audience("a", {"computed": {"name": "X", "op": "eq", "value": 1}}),
            "$.condition.computed.name",
        ),
        (
            audience("a", {"computed": {"name": "x", "op": "bigger", "value": 1}}),
            "$.condition.computed.op",
        ),
        ({"key": "t", "kind": "total", "event": "E"}, "$.kind"),
        ({"key": "t", "kind": "sum", "event": "E"}, "$.property"),
        ({"key": "t", "kind": "count"}, "$.event"),
        ({"key": "t", "kind": "count", "event": "E", "within": "3 days"}, "$.within"),
        ({"key": "t", "kind": "count", "event": "E", "condition": {}}, "$.condition"),
    ],
)
def test_new_conditions_and_traits_are_validated_with_paths(doc: Any, path: str) -> None:
    with pytest.raises(DefinitionError) as info:
        validate_definition(doc)
    assert info.value.path == path


def test_misspelled_kind_gets_a_suggestion() -> None:
    with pytest.raises(DefinitionError) as info:
        validate_definition({"key": "t", "kind": "unique_cnt", "event": "E", "property": "p"})
    assert info.value.suggestion == "unique_count"


def test_audiences_need_existing_computed_traits() -> None:
    from audiences.core.definitions import check_references

    doc = validate_definition(audience("a", {"computed": {"name": "ltv", "op": "gt", "value": 1}}))
    with pytest.raises(DefinitionError) as info:
        check_references(doc, {"ltvv": {"key": "ltvv", "kind": "count", "event": "E"}})
    assert "unknown computed trait 'ltv'" in info.value.message
    assert info.value.suggestion == "ltvv"
    check_references(doc, {"ltv": {"key": "ltv", "kind": "count", "event": "E"}})


def test_a_catalog_skips_audiences_on_missing_traits() -> None:
    catalog = catalog_of(audience("a", {"computed": {"name": "ltv", "op": "gt", "value": 1}}))
    assert "missing computed trait" in catalog.skipped["a"]


@pytest.mark.parametrize(
    ("times", "expected"),
    [({"lt": 0}, False), ({"lte": 0}, True), ({"eq": 0}, True), ({"gte": 0}, True)],
)
def test_count_comparisons_on_a_profile_without_matching_events(
    times: dict[str, int], expected: bool
) -> None:
    condition = {"performed": {"event": "Never Sent", "times": times, "within": "1h"}}
    catalog = catalog_of(audience("a", condition))
    assert bool(summary(run(catalog, [track(T0, "Other")]))) is expected
