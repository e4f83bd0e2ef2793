"""The seeds' audiences, identity, deletion and definition lifecycle through real Kafka.

The wall clock is injected (FakeClock): exits caused only by time passing are
triggered by moving it, never by sleeping.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from harness import T0, Engine, H, M, S, track

from audiences.adapters.state.layout import Kind, changelog_key
from audiences.core.events import format_iso
from shared import SPEC_CART_ABANDONERS, wait_for

pytestmark = pytest.mark.kafka
D = 24 * H


def transitions(outputs: list[dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    """(user, audience, Entered|Exited, timestamp) of membership outputs, in topic order."""
    return [
        (
            o.get("userId") or o["anonymousId"],
            o["properties"]["audience_key"],
            o["event"].removeprefix("Audience "),
            o["timestamp"],
        )
        for o in outputs
        if o["event"] != "Trait Computed"
    ]


def of(user: str, rows: list[tuple[str, str, str, str]]) -> list[tuple[str, str, str]]:
    return [(a, e, t) for u, a, e, t in rows if u == user]


def event(kind: str, user: str, at_ms: int, **fields: Any) -> dict[str, Any]:
    return {
        "type": kind,
        "userId": user,
        "timestamp": format_iso(at_ms),
        "messageId": f"{user}-{kind}-{at_ms}",
        **fields,
    }


SEED_AUDIENCES: list[dict[str, Any]] = [
    {
        "key": "push_not_opened",
        "name": "Received a push, did not open it within 1 hour",
        "condition": {
            "sequence": {
                "steps": [{"event": "Push Notification Received"}],
                "then_not": {"event": "Push Notification Opened", "within": "1h"},
                "match_on": "properties.campaign_id",
                "active_for": "7d",
            }
        },
    },
    {
        "key": "email_not_opened",
        "name": "Email delivered, not opened within 1 day",
        "condition": {
            "sequence": {
                "steps": [{"event": "Email Delivered"}],
                "then_not": {"event": "Email Opened", "within": "1d"},
                "match_on": "properties.email_id",
                "active_for": "7d",
            }
        },
    },
    {
        "key": "pricing_not_upgraded",
        "condition": {
            "all": [
                {"page_viewed": {"url": "*/pricing*", "times": {"gte": 3}, "within": "7d"}},
                {"not": {"performed": {"event": "Plan Upgraded"}}},
            ]
        },
    },
    {"key": "ios_push", "condition": {"device": {"type": "ios", "push_enabled": True}}},
    {
        "key": "lifetime_value",
        "kind": "sum",
        "event": "Order Completed",
        "property": "properties.revenue",
    },
    {"key": "vip", "condition": {"computed": {"name": "lifetime_value", "op": "gt", "value": 300}}},
    {
        "key": "lapsed",
        "condition": {
            "all": [
                {"performed": {"event": "Order Completed"}},
                {"not": {"performed": {"event": "Order Completed", "within": "90d"}}},
            ]
        },
    },
]


def test_the_seed_audiences_enter_and_exit_at_the_right_moments(engine: Engine) -> None:
    engine.apply(*SEED_AUDIENCES)
    engine.start()
    iphone = {"os": {"name": "iOS"}, "device": {"id": "ip-1", "token": "apns-token"}}
    engine.send(
        # push: one ignores it, one opens it in time
        track("ignorer", "Push Notification Received", T0, campaign_id="c1"),
        track("opener", "Push Notification Received", T0, campaign_id="c1"),
        track("opener", "Push Notification Opened", T0 + 10 * M, campaign_id="c1"),
        # email: delivered, never opened
        track("reader", "Email Delivered", T0, email_id="e1"),
        # pricing page three times, no upgrade
        *(
            event("page", "shopper", T0 + i * H, properties={"url": "https://s.example/pricing"})
            for i in range(3)
        ),
        # an iPhone with a push token
        event("track", "mobile", T0, event="App Opened", context=iphone),
        # lifetime revenue crosses 300 on the second order; the last order is in January
        track("big", "Order Completed", T0, revenue=200),
        track("big", "Order Completed", T0 + S, revenue=150),
    )
    outputs = engine.outputs(5)
    rows = transitions(outputs)
    assert sorted(rows) == sorted(
        [
            ("shopper", "pricing_not_upgraded", "Entered", format_iso(T0 + 2 * H)),
            ("mobile", "ios_push", "Entered", format_iso(T0)),
            ("big", "vip", "Entered", format_iso(T0 + S)),
        ]
    )
    computed = [o for o in outputs if o["event"] == "Trait Computed"]
    assert [(o["userId"], o["properties"]["lifetime_value"]) for o in computed] == [
        ("big", 200),
        ("big", 350),
    ]
    # time passes, nobody sends anything
    engine.clock.advance_to(T0 + 2 * D)
    rows = transitions(engine.outputs(7))
    assert of("ignorer", rows) == [("push_not_opened", "Entered", format_iso(T0 + H))]
    assert of("reader", rows) == [("email_not_opened", "Entered", format_iso(T0 + D))]
    assert of("opener", rows) == []
    # the pricing views leave their 7-day window; lapsed buyers appear after 90 days
    engine.clock.advance_to(T0 + 91 * D)
    rows = transitions(engine.outputs(11))
    assert of("shopper", rows)[-1] == ("pricing_not_upgraded", "Exited", format_iso(T0 + 7 * D))
    assert of("big", rows)[-1] == ("lapsed", "Entered", format_iso(T0 + S + 90 * D))
    # the push campaign instance ends after active_for
    assert of("ignorer", rows)[-1] == ("push_not_opened", "Exited", format_iso(T0 + 7 * D))
    assert of("reader", rows)[-1] == ("email_not_opened", "Exited", format_iso(T0 + 7 * D))
    # a push disabled later exits the device audience
    engine.send(event("track", "mobile", T0 + 92 * D, event="Push Notifications Disabled"))
    rows = transitions(engine.outputs(12))
    assert of("mobile", rows)[-1] == ("ios_push", "Exited", format_iso(T0 + 92 * D))


VIEWERS = {
    "key": "window_shoppers",
    "condition": {"performed": {"event": "Product Viewed", "times": {"gte": 3}, "within": "1h"}},
}


def test_an_anonymous_visitor_who_identifies_ends_up_with_one_profile(engine: Engine) -> None:
    engine.apply(VIEWERS)
    engine.start()

    def anonymous_view(at_ms: int) -> dict[str, Any]:
        return {
            "type": "track",
            "anonymousId": "anon-42",
            "event": "Product Viewed",
            "timestamp": format_iso(at_ms),
            "messageId": f"anon-view-{at_ms}",
        }

    engine.send(anonymous_view(T0), anonymous_view(T0 + M))
    engine.send(
        {
            "type": "identify",
            "userId": "user-42",
            "anonymousId": "anon-42",
            "traits": {"email": "u42@example.com"},
            "timestamp": format_iso(T0 + 2 * M),
            "messageId": "identify-42",
        }
    )
    # the merge travels through Kafka; then a later anonymous event resolves to the user
    engine.send(anonymous_view(T0 + 3 * M))
    outputs = engine.outputs(1)
    assert transitions(outputs) == [
        ("user-42", "window_shoppers", "Entered", format_iso(T0 + 3 * M))
    ]
    assert outputs[0]["context"]["traits"] == {"email": "u42@example.com"}
    # more views (anonymous or not) never enter twice
    engine.send(anonymous_view(T0 + 4 * M), track("user-42", "Product Viewed", T0 + 5 * M))
    assert len(transitions(engine.outputs(1))) == 1


def test_delete_exits_members_tombstones_state_and_drops_later_events(engine: Engine) -> None:
    engine.apply(VIEWERS)
    engine.start()
    engine.send(*(track("gdpr", "Product Viewed", T0 + i * M) for i in range(3)))
    assert transitions(engine.outputs(1)) == [
        ("gdpr", "window_shoppers", "Entered", format_iso(T0 + 2 * M))
    ]
    engine.send(event("delete", "gdpr", T0 + 5 * M))
    exited, deleted = engine.outputs(3)[1:]
    assert (exited["event"], exited["properties"]["reason"]["trigger"]) == (
        "Audience Exited",
        "deleted",
    )
    assert (deleted["event"], deleted["userId"]) == ("User Deleted", "gdpr")
    # later events are dropped: three more views enter nobody
    engine.send(*(track("gdpr", "Product Viewed", T0 + 10 * M + i * S) for i in range(3)))
    engine.settle()
    assert len(engine.outputs(3)) == 3
    profile = changelog_key(Kind.PROFILE, b"gdpr")
    assert _changelog_values(engine, profile)[-1] is None  # the profile is tombstoned
    assert _changelog_values(engine, changelog_key(Kind.SUPPRESSED, b"gdpr"))[-1] == b"1"
    # unsuppressed, the user starts afresh with new messageIds
    engine.send(event("unsuppress", "gdpr", T0 + 20 * M))
    engine.send(*(track("gdpr", "Product Viewed", T0 + 30 * M + i * S) for i in range(3)))
    outputs = engine.outputs(4)
    assert outputs[3]["event"] == "Audience Entered"
    assert outputs[3]["messageId"] != outputs[0]["messageId"]


def test_deleting_an_audience_exits_its_idle_members(engine: Engine) -> None:
    from audiences.adapters.stream.definitions import delete_definition

    engine.apply(
        VIEWERS, {"key": "everyone", "condition": {"performed": {"event": "Product Viewed"}}}
    )
    engine.start()
    engine.send(*(track("idle", "Product Viewed", T0 + i * M) for i in range(3)))
    assert len(engine.outputs(2)) == 2
    assert delete_definition(engine.settings, engine.topics, "everyone")
    outputs = engine.outputs(3)  # nobody sends anything: the re-judging pass tells them
    last = outputs[2]
    assert (last["event"], last["properties"]["audience_key"]) == ("Audience Exited", "everyone")
    assert last["properties"]["reason"]["trigger"] == "deleted"


def test_editing_a_live_audience_emits_only_real_differences(engine: Engine) -> None:
    buyers = {"key": "buyers", "condition": {"performed": {"event": "Order Completed"}}}
    engine.apply(buyers)
    engine.start()
    users = [f"b{n}" for n in range(40)]
    engine.send(
        *(
            event("identify", user, T0, traits={"country": "XX" if n % 10 == 0 else "FR"})
            for n, user in enumerate(users)
        ),
        *(track(user, "Order Completed", T0 + S) for user in users),
    )
    assert len(engine.outputs(40)) == 40
    edited = {
        "key": "buyers",
        "condition": {
            "all": [
                {"performed": {"event": "Order Completed"}},
                {"not": {"trait": {"name": "country", "op": "eq", "value": "XX"}}},
            ]
        },
    }
    engine.apply(edited)
    outputs = engine.outputs(44)[40:]  # exactly 4 more: the XX members, by re-judging
    assert sorted(o["userId"] for o in outputs) == ["b0", "b10", "b20", "b30"]
    assert {(o["event"], o["properties"]["audience_version"]) for o in outputs} == {
        ("Audience Exited", 2)
    }


def _changelog_values(engine: Engine, key: bytes) -> list[bytes | None]:
    topic = engine.topics.changelog
    consumer = Consumer(
        {"bootstrap.servers": engine.settings.kafka_bootstrap, "group.id": "changelog-reader"}
    )
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        values: list[bytes | None] = []
        idle = 0
        while idle < 3:
            batch = consumer.consume(500, 0.3)
            idle = 0 if batch else idle + 1
            values += [m.value() for m in batch if m.error() is None and m.key() == key]
        return values
    finally:
        consumer.close()


def test_preview_cli_reports_what_an_edit_would_do(engine: Engine, tmp_path: Any) -> None:
    import dataclasses
    import json
    import os
    import subprocess
    import sys

    buyers = {"key": "buyers", "condition": {"performed": {"event": "Order Completed"}}}
    engine.apply(buyers)
    engine.start()
    users = [f"p{n}" for n in range(5)]
    engine.send(
        *(
            event("identify", user, T0, traits={"country": "XX" if n < 2 else "FR"})
            for n, user in enumerate(users)
        ),
        *(track(user, "Order Completed", T0 + S) for user in users[:4]),
    )
    assert len(engine.outputs(4)) == 4
    engine.settle()
    edited = {
        "key": "buyers",
        "condition": {
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
    }
    path = tmp_path / "buyers.json"
    path.write_text(json.dumps(edited))
    env = {
        **os.environ,
        **{
            f"AUDIENCES_{f.name.upper()}": str(getattr(engine.settings, f.name))
            for f in dataclasses.fields(engine.settings)
        },
    }
    done = subprocess.run(
        [sys.executable, "-m", "audiences", "preview", "-f", str(path), "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["version"], report["profiles"], report["size"]) == (2, 5, 3)
    assert sorted(report["would_exit"]) == ["p0", "p1"]
    assert report["would_enter"] == ["p4"]
    # nothing was applied: no new output, the definition is still version 1
    assert len(engine.outputs(4)) == 4


def test_new_audiences_backfill_from_retained_events_without_a_storm(
    engine: Engine, tmp_path: Any
) -> None:
    import dataclasses
    import os
    import subprocess
    import sys
    import time

    engine.apply({"key": "viewers", "condition": {"performed": {"event": "Product Viewed"}}})
    engine.start()
    engine.send(
        *(track(user, "Product Viewed", T0 + n * S) for n, user in enumerate(["v1", "v2", "v3"])),
        track("v2", "Order Completed", T0 + H, revenue=80),
        # dead-lettered live (future_timestamp): the backfill must not fold it either
        {**track("v1", "Order Completed", 0), "timestamp": "2099-01-01T00:00:00.000Z"},
    )
    assert len(engine.outputs(3)) == 3
    (future,) = engine.dead_letters(1)
    assert dict(future.headers())["error_reason"] == b"future_timestamp"
    engine.settle()
    # A new audience over an event no audience tracked yet: its history must be replayed.
    # Without it, v2 would enter at once and exit after the replay.
    never_ordered = {
        "key": "never_ordered",
        "condition": {
            "all": [
                {"performed": {"event": "Product Viewed"}},
                {"not": {"performed": {"event": "Order Completed"}}},
            ]
        },
    }
    # backfill: false counts only what comes after its creation
    fresh_buyers = {
        "key": "fresh_buyers",
        "condition": {"performed": {"event": "Order Completed"}},
        "backfill": False,
    }
    path = tmp_path / "new.json"
    path.write_text(orjson.dumps([never_ordered, fresh_buyers]).decode())
    env = {
        **os.environ,
        **{
            f"AUDIENCES_{f.name.upper()}": str(getattr(engine.settings, f.name))
            for f in dataclasses.fields(engine.settings)
        },
    }
    applied = subprocess.run(
        [sys.executable, "-m", "audiences", "apply", "-f", str(path), "--wait", "--timeout", "60"],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert applied.returncode == 0, applied.stderr
    assert "backfill done" in applied.stdout
    # the progress bar is drawn on a terminal only (tests/unit/test_progress.py): a pipe
    # gets nothing progress-like
    assert "partitions done" not in applied.stdout + applied.stderr
    assert "\r" not in applied.stdout + applied.stderr
    rows = transitions(engine.outputs(5))
    assert sorted(rows[3:]) == [
        ("v1", "never_ordered", "Entered", format_iso(T0)),
        ("v3", "never_ordered", "Entered", format_iso(T0 + 2 * S)),
    ]
    # live events flow again after the backfill; the new audience sees them
    now = int(time.time() * 1000) + H  # after fresh_buyers was created
    engine.send(track("v3", "Order Completed", now, revenue=10))
    rows = transitions(engine.outputs(7))
    assert sorted(rows[5:]) == [
        ("v3", "fresh_buyers", "Entered", format_iso(now)),
        ("v3", "never_ordered", "Exited", format_iso(now)),
    ]


def test_a_backfill_folds_a_resent_batch_in_history_once(engine: Engine, tmp_path: Any) -> None:
    """A re-sent batch in the retained log (dropped live) is counted once by a newly
    added `performed ... times` audience (its history is replayed, deduplicated too)."""
    import dataclasses
    import os
    import subprocess
    import sys

    engine.apply({"key": "viewers", "condition": {"performed": {"event": "Product Viewed"}}})
    engine.start()
    batch = [track("r1", "Order Completed", T0 + n * S, revenue=n) for n in range(17)]
    engine.send(*batch)
    engine.send(*(track("r1", "Product Viewed", T0 + M + n * S) for n in range(5)))
    engine.send(*batch)  # re-sent: duplicates
    assert [o["event"] for o in engine.outputs(1)] == ["Audience Entered"]  # viewers
    engine.settle()
    path = tmp_path / "orders.json"
    path.write_text(
        orjson.dumps(
            [
                {
                    "key": f"orders_{n}",
                    "condition": {"performed": {"event": "Order Completed", "times": {"gte": n}}},
                }
                for n in (17, 20)
            ]
        ).decode()
    )
    env = {
        **os.environ,
        **{
            f"AUDIENCES_{f.name.upper()}": str(getattr(engine.settings, f.name))
            for f in dataclasses.fields(engine.settings)
        },
    }
    applied = subprocess.run(
        [sys.executable, "-m", "audiences", "apply", "-f", str(path), "--wait", "--timeout", "60"],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert applied.returncode == 0, applied.stderr
    assert "backfill done" in applied.stdout
    assert transitions(engine.outputs(2))[1:] == [
        ("r1", "orders_17", "Entered", format_iso(T0 + M + 4 * S))  # 17 orders, not 34
    ]
    engine.send(*(track("r1", "Order Completed", T0 + H + n * S) for n in range(3)))
    assert transitions(engine.outputs(3))[2:] == [
        ("r1", "orders_20", "Entered", format_iso(T0 + H + 2 * S))  # the 20th
    ]


def test_raising_a_windowed_count_judges_the_orders_a_backfill_brings_back(
    engine: Engine,
) -> None:
    """`gte 3 within 30d` -> `gte 10 within 30d` (issue 11): the running tracker kept 4
    timestamps per user. The edit gets a new tracker, backfilled from the retained
    `events`: the user with 12 orders stays in (hears nothing), the one with 5 exits.
    Narrowing it back needs nothing new: no backfill, and the user with 5 re-enters."""
    loyal = {
        "key": "loyal",
        "condition": {
            "performed": {"event": "Order Completed", "times": {"gte": 3}, "within": "30d"}
        },
    }
    engine.apply(loyal)
    engine.start()
    assert engine.evaluator is not None
    runtime = engine.evaluator
    engine.send(
        *(track("twelve", "Order Completed", T0 - n * D) for n in range(12)),
        *(track("five", "Order Completed", T0 - n * D) for n in range(5)),
    )
    assert sorted(transitions(engine.outputs(2))) == [
        ("five", "loyal", "Entered", format_iso(T0)),
        ("twelve", "loyal", "Entered", format_iso(T0)),
    ]
    engine.settle()

    def backfilled() -> bool:
        trackers = set(runtime.definitions.catalog.trackers)
        return all(
            p.backfill is None
            and p.complete_trackers is not None
            and trackers <= p.complete_trackers
            for p in list(runtime.partitions.values())
        )

    before = set(runtime.definitions.catalog.trackers)
    condition = loyal["condition"]["performed"]
    engine.apply({**loyal, "condition": {"performed": {**condition, "times": {"gte": 10}}}})
    rows = transitions(engine.outputs(3))
    assert rows[2:] == [("five", "loyal", "Exited", format_iso(T0))]
    engine.settle(until=lambda: runtime.definitions.catalog.audiences[0].version == 2)
    engine.settle(until=backfilled)
    edited = set(runtime.definitions.catalog.trackers)
    assert edited.isdisjoint(before)  # a new tracker, filled from the log
    assert len(engine.outputs(3)) == 3  # twelve never exited

    engine.apply(loyal)  # narrowing back: the tracker kept for gte 10 answers gte 3
    rows = transitions(engine.outputs(4))
    assert rows[3:] == [("five", "loyal", "Entered", format_iso(T0))]
    engine.settle(until=lambda: runtime.definitions.catalog.audiences[0].version == 3)
    assert set(runtime.definitions.catalog.trackers) == edited
    assert all(p.backfill is None for p in runtime.partitions.values())
    assert len(engine.outputs(4)) == 4


def test_audience_sizes_and_profile_counts_are_exported(engine: Engine) -> None:
    from prometheus_client import REGISTRY

    engine.apply({"key": "sized_buyers", "condition": {"performed": {"event": "Order Completed"}}})
    engine.start()
    engine.send(*(track(f"s{n}", "Order Completed", T0 + n * S) for n in range(3)))
    engine.send(event("delete", "s0", T0 + H))
    assert len(engine.outputs(5)) == 5  # 3 entered, s0 exited and deleted
    engine.settle()
    assert REGISTRY.get_sample_value("audiences_audience_size", {"audience": "sized_buyers"}) == 2
    assert engine.evaluator is not None
    users = sum(p.counts.users for p in engine.evaluator.partitions.values())
    assert users == 2  # the deleted profile is gone
    exported = sum(
        REGISTRY.get_sample_value("audiences_state_users", {"partition": str(n)}) or 0
        for n in engine.evaluator.partitions
    )
    assert exported == 2


def test_a_late_event_is_applied_with_its_own_time_as_effective_at(engine: Engine) -> None:
    engine.apply(
        {
            "key": "two_orders",
            "condition": {
                "performed": {"event": "Order Completed", "times": {"gte": 2}, "within": "1d"}
            },
        }
    )
    engine.start()
    engine.send(track("late", "Order Completed", T0 + 2 * H))
    engine.send(track("late", "Order Completed", T0))  # arrives after, happened before
    (entered,) = engine.outputs(1)
    assert entered["event"] == "Audience Entered"
    assert entered["timestamp"] == format_iso(T0 + 2 * H)  # the profile's time
    assert entered["properties"]["effective_at"] == format_iso(T0)  # the late event's


def _stored_not_chain(key: str, levels: int) -> bytes:
    """A definition `levels` deep as a record (orjson writes at most 255 levels)."""
    text = '{"performed": {"event": "Search"}}'
    for _ in range(levels - 1):
        text = '{"not": ' + text + "}"
    return f'{{"key": "{key}", "version": 1, "condition": {text}}}'.encode()


def test_definitions_written_around_the_api_cannot_stop_or_hang_the_worker(
    engine: Engine,
) -> None:
    """SPEC §11 through the real protocol: definitions the API would refuse (600 levels
    deep, a regex RE2 cannot run, 1,005 nodes, not JSON) are written straight to the
    definitions topic next to good ones. The worker leaves them out (a log line, a
    metric), stays up, and the good audiences — among them the patterns that hang a
    backtracking engine — judge properties of nearly 32 KB (the most an event carries)
    and produce their transitions."""
    from prometheus_client import REGISTRY

    def search_where(op: str, value: str) -> dict[str, Any]:
        where = [{"property": "q", "op": op, "value": value}]
        return {"performed": {"event": "Search", "where": where}}

    engine.apply(
        {"key": "glob", "condition": search_where("contains", "*a*a*a*b")},
        {"key": "regex", "condition": search_where("matches", "^(a+)+$")},
    )
    engine.start()
    runtime = engine.evaluator
    assert runtime is not None
    start = runtime.definitions.offset

    def rejected(key: str, reason: str) -> float:
        labels = {"key": key, "reason": reason}
        return REGISTRY.get_sample_value("audiences_definitions_rejected_total", labels) or 0.0

    bad = {
        ("deep", "limits"): _stored_not_chain("deep", 600),
        ("backref", "pattern"): orjson.dumps(
            {"key": "backref", "condition": search_where("matches", r"(a+)\1")}
        ),
        ("wide", "limits"): orjson.dumps(
            {"key": "wide", "condition": {"any": [{"performed": {"event": "X"}}] * 1005}}
        ),
        ("garbage", "undecodable"): b"{not json",
    }
    before = {labels: rejected(*labels) for labels in bad}
    producer = Producer({"bootstrap.servers": engine.settings.kafka_bootstrap})
    for (key, _reason), value in bad.items():
        producer.produce(engine.topics.definitions, key=key.encode(), value=value)
    buyers = {"key": "buyers", "condition": {"performed": {"event": "Order Completed"}}}
    producer.produce(engine.topics.definitions, key=b"buyers", value=orjson.dumps(buyers))
    producer.flush(10)
    wait_for(
        lambda: runtime.definitions.offset >= start + len(bad) + 1,
        30,
        "the worker to read every record written",
    )
    assert runtime.failed is None
    assert set(runtime.definitions.definitions) == {"glob", "regex", "buyers"}
    assert [a.key for a in runtime.definitions.catalog.audiences] == ["buyers", "glob", "regex"]
    for labels, count in before.items():
        assert rejected(*labels) == count + 1, labels

    many_a = "a" * 32_000  # an event is at most 32 KB (MAX_EVENT_BYTES)
    engine.send(
        track("u", "Search", T0, q=many_a + "!"),  # neither pattern matches
        track("u", "Search", T0 + S, q=many_a + "b"),  # *a*a*a*b
        track("u", "Search", T0 + 2 * S, q=many_a),  # ^(a+)+$
        track("u", "Order Completed", T0 + 3 * S),
    )
    assert [(a, e) for _u, a, e, _t in transitions(engine.outputs(3))] == [
        ("glob", "Entered"),
        ("regex", "Entered"),
        ("buyers", "Entered"),
    ]
    assert runtime.failed is None


def test_an_order_arriving_before_its_checkout_never_makes_an_abandoner(engine: Engine) -> None:
    """SPEC §11: funnels go by event time. The buyer's order (00:20) reaches Kafka before
    their checkout (00:00) of the same cart: they never enter; another user's checkout
    with no order enters at its 2 h deadline and leaves after `active_for`."""
    engine.apply(SPEC_CART_ABANDONERS)
    engine.start()
    engine.send(
        track("buyer", "Order Completed", T0 + 20 * M, cart_id="c1"),
        track("buyer", "Checkout Started", T0, cart_id="c1"),
        track("abandoner", "Checkout Started", T0, cart_id="c2"),
    )
    engine.clock.advance_to(T0 + 3 * H)
    rows = transitions(engine.outputs(1))
    assert rows == [("abandoner", "cart_abandoners", "Entered", format_iso(T0 + 2 * H))]
    engine.clock.advance_to(T0 + 8 * D)
    rows = transitions(engine.outputs(2))
    assert rows == [
        ("abandoner", "cart_abandoners", "Entered", format_iso(T0 + 2 * H)),
        ("abandoner", "cart_abandoners", "Exited", format_iso(T0 + 7 * D)),
    ]
