"""Destination sinks through the real Kafka protocol against local fake APIs (SPEC §6).

Each test publishes output messages to its own `audience-events` topic, runs
`SinkWorker`s (each in its own consumer group) on the test's event loop next
to aiohttp servers that validate requests as the vendors document them, and
asserts what arrived, field by field. Waits poll for a condition with a
deadline; nothing sleeps on the happy path.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from fake_destinations import (
    BRAZE_KEY,
    CIO_KEY,
    CIO_SITE,
    SEGMENT_WRITE_KEY,
    WEBHOOK_SECRET,
    FakeDestination,
    audience_destination_problems,
)

from audiences.adapters.kafka.clients import KafkaClients
from audiences.adapters.kafka.fence import FENCE_KEY
from audiences.adapters.kafka.topics import Topics, ensure_topics
from audiences.adapters.settings import Settings
from audiences.adapters.sinks.config import Destination, parse_destinations
from audiences.adapters.sinks.pii import hash_pii
from audiences.adapters.sinks.render import event_ulid
from audiences.adapters.sinks.worker import SinkWorker
from audiences.adapters.stream.sinks import prepare_sink_topics
from shared import TEST_SPACE_ID, deleted_message, isolated_settings, output_message

pytestmark = pytest.mark.kafka
EMAIL_HASH = "542d240129883c019e106e3b1b2d3f3cb3537c43c425364de8e951d5a3083345"


class Bench:
    """Topics of one test, a producer into `audience-events`, and sink workers to run."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.clients = KafkaClients(settings)
        self.topics = Topics.from_settings(settings)
        ensure_topics(settings, self.topics)
        self.producer = Producer({**settings.producer_config(), "linger.ms": 0})
        self.sent: list[dict[str, Any]] = []
        self.sent_at: dict[str, float] = {}

    def publish(self, *messages: dict[str, Any]) -> None:
        for message in messages:
            user = message.get("userId") or message.get("anonymousId")
            self.producer.produce(
                self.topics.audience_events, key=str(user).encode(), value=orjson.dumps(message)
            )
            self.sent.append(message)
        self.producer.flush(10)
        now = time.monotonic()
        for message in messages:
            self.sent_at[message["messageId"]] = now

    def publish_raw(self, key: bytes, value: bytes) -> None:
        self.producer.produce(self.topics.audience_events, key=key, value=value)
        self.producer.flush(10)

    @asynccontextmanager
    async def running(
        self, *destinations: Destination, queue_limit: int | None = None
    ) -> AsyncIterator[list[SinkWorker]]:
        await asyncio.to_thread(
            prepare_sink_topics, self.settings, list(destinations), self.clients
        )
        workers = [
            SinkWorker(self.settings, d, clients=self.clients, queue_limit=queue_limit)
            for d in destinations
        ]
        tasks = [asyncio.ensure_future(w.run()) for w in workers]
        try:
            yield workers
        finally:
            for w in workers:
                w.stop()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            failures = [r for r in results if isinstance(r, BaseException)]
            assert not failures, failures


@pytest.fixture
def bench(kafka_bootstrap: str, unique_name: Callable[..., str], tmp_path: Path) -> Bench:
    return Bench(isolated_settings(kafka_bootstrap, unique_name("s"), str(tmp_path), partitions=2))


def destination(**raw: Any) -> Destination:
    return parse_destinations([{"retry_initial_s": 0.05, "retry_max_s": 0.5, **raw}], {})[0]


async def until(condition: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        await asyncio.sleep(0.01)


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


def read_topic(bootstrap: str, topic: str, count: int, timeout: float = 20.0) -> list[Any]:
    """The first `count` non-fence records of `topic` (then checks nothing more arrives)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"r-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
        }
    )
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    found: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and len(found) < count:
            found += [
                m for m in consumer.consume(100, 0.1) if m.error() is None and m.key() != FENCE_KEY
            ]
        found += [
            m for m in consumer.consume(100, 0.5) if m.error() is None and m.key() != FENCE_KEY
        ]
    finally:
        consumer.close()
    return found


def by_user(messages: list[dict[str, Any]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for m in messages:
        out.setdefault(m.get("userId") or m.get("anonymousId"), []).append(m["messageId"])
    return out


def shop_messages(users: int, per_user: int, email: bool = False) -> list[dict[str, Any]]:
    """Alternating Entered/Exited per user, interleaved across users (topic order)."""
    return [
        output_message(
            f"user-{u}",
            entered=seq % 2 == 1,
            seq=seq,
            at_ms=1_767_225_600_000 + seq * 1000,
            email=f" User{u}@Example.com " if email else None,
        )
        for seq in range(1, per_user + 1)
        for u in range(users)
    ]


# -- each sink against its documented API -------------------------------------------------------


def test_webhook_sink_posts_signed_messages_in_order_per_user(bench: Bench) -> None:
    async def scenario() -> None:
        server = await FakeDestination("webhook").start()
        hook = destination(
            name="hook", type="webhook", url=server.url, secret=WEBHOOK_SECRET, hash_pii=True
        )
        messages = shop_messages(users=3, per_user=4, email=True)
        bench.publish(*messages)
        async with bench.running(hook):
            await until(lambda: len(server.accepted) >= len(messages), what="12 webhooks")
        await server.stop()
        assert server.violations == []  # signature, id, timestamp, content type all valid
        received = [c.body for c in server.accepted]
        assert len(received) == len(messages)
        assert by_user(received) == by_user(messages)  # every message once, in order per user
        sent = {m["messageId"]: m for m in messages}
        for body in received:
            original = sent[body["messageId"]]
            email = original["context"]["traits"]["email"]
            assert body["context"]["traits"]["email"] == hash_pii(email)
            assert {**body, "context": original["context"]} == original  # all else verbatim
        assert received[0]["context"]["traits"]["email"] != EMAIL_HASH
        assert hash_pii(" Person@Example.com ") == EMAIL_HASH

    run(scenario())


def test_braze_sink_tracks_attributes_and_events_in_batches_of_at_most_75(bench: Bench) -> None:
    async def scenario() -> None:
        server = await FakeDestination("braze").start()
        braze = destination(
            name="braze", type="braze", url=server.url, api_key=BRAZE_KEY, mode="both"
        )
        messages = shop_messages(users=60, per_user=3)  # 180 messages: several full batches
        bench.publish(*messages)
        async with bench.running(braze):
            await until(
                lambda: sum(len(c.body.get("events", [])) for c in server.accepted) >= 180,
                what="180 Braze events",
            )
        await server.stop()
        assert server.violations == []
        events = [e for c in server.accepted for e in c.body["events"]]
        attributes = [a for c in server.accepted for a in c.body["attributes"]]
        assert max(len(c.body["events"]) for c in server.accepted) <= 75
        expected = {m["messageId"]: m for m in messages}
        assert len(events) == 180
        per_user: dict[str, list[str]] = {}
        for event in events:
            per_user.setdefault(event["external_id"], []).append(event["name"])
        assert per_user == {
            f"user-{u}": ["Audience Entered", "Audience Exited", "Audience Entered"]
            for u in range(60)
        }
        first = next(m for m in messages if m["userId"] == "user-0")
        event0 = next(e for e in events if e["external_id"] == "user-0")
        assert event0 == {
            "external_id": "user-0",
            "name": "Audience Entered",
            "time": first["timestamp"],
            "properties": expected[first["messageId"]]["properties"],
        }
        final: dict[str, bool] = {}
        for attribute in attributes:  # in request order, so the last value is the state
            assert set(attribute) == {"external_id", "cart_abandoners"}
            final[attribute["external_id"]] = attribute["cart_abandoners"]
        assert final == {f"user-{u}": True for u in range(60)}

    run(scenario())


def test_customerio_sink_puts_attributes_and_posts_events(bench: Bench) -> None:
    async def scenario() -> None:
        server = await FakeDestination("customerio").start()
        cio = destination(
            name="cio", type="customerio", url=server.url, site_id=CIO_SITE, api_key=CIO_KEY
        )
        messages = [
            output_message("u 1", email="a@example.com", seq=1),
            output_message("u 1", entered=False, email="a@example.com", seq=2),
            output_message("anon-1", anonymous=True),  # Customer.io needs an id: skipped
        ]
        bench.publish(*messages)
        async with bench.running(cio):
            await until(lambda: len(server.accepted) >= 4, what="4 Customer.io calls")
        await server.stop()
        assert server.violations == []
        calls = [(c.method, c.path, c.body) for c in server.accepted]
        assert calls == [
            ("PUT", "/api/v1/customers/u 1", {"email": "a@example.com", "cart_abandoners": True}),
            (
                "POST",
                "/api/v1/customers/u 1/events",
                {
                    "name": "Audience Entered",
                    "id": event_ulid(messages[0]),
                    "data": messages[0]["properties"],
                    "timestamp": 1_767_225_600,
                },
            ),
            ("PUT", "/api/v1/customers/u 1", {"email": "a@example.com", "cart_abandoners": False}),
            (
                "POST",
                "/api/v1/customers/u 1/events",
                {
                    "name": "Audience Exited",
                    "id": event_ulid(messages[1]),
                    "data": messages[1]["properties"],
                    "timestamp": 1_767_225_600,
                },
            ),
        ]

    run(scenario())


def test_segment_sink_batches_track_and_identify_with_the_write_key(bench: Bench) -> None:
    async def scenario() -> None:
        server = await FakeDestination("segment").start()
        segment = destination(
            name="seg", type="segment", url=server.url, write_key=SEGMENT_WRITE_KEY, mode="both"
        )
        messages = shop_messages(users=5, per_user=2, email=True)
        bench.publish(*messages)
        async with bench.running(segment):
            await until(
                lambda: sum(len(c.body["batch"]) for c in server.accepted) >= 20,
                what="20 Segment messages",
            )
        await server.stop()
        assert server.violations == []
        batch = [m for c in server.accepted for m in c.body["batch"]]
        tracks = [m for m in batch if m["type"] == "track"]
        identifies = [m for m in batch if m["type"] == "identify"]
        assert sorted(m["messageId"] for m in tracks) == sorted(m["messageId"] for m in messages)
        assert by_user(tracks) == by_user(messages)
        for track in tracks:
            assert track == next(m for m in messages if m["messageId"] == track["messageId"])
        u0 = [m for m in identifies if m["userId"] == "user-0"]
        assert [m["traits"] for m in u0] == [
            {"email": " User0@Example.com ", "cart_abandoners": True},
            {"email": " User0@Example.com ", "cart_abandoners": False},
        ]

    run(scenario())


def test_segment_sink_forwards_what_segment_actions_audience_destinations_require(
    bench: Bench,
) -> None:
    """LaunchDarkly Audiences (and other Segment Actions audience destinations) read
    `context.personas` of what the Segment sink forwards: every track and identify
    message carries it, the same for an audience across versions and users."""

    async def scenario() -> None:
        server = await FakeDestination("segment").start()
        segment = destination(
            name="seg", type="segment", url=server.url, write_key=SEGMENT_WRITE_KEY, mode="both"
        )
        messages = [*shop_messages(users=2, per_user=2), output_message("anon-1", anonymous=True)]
        bench.publish(*messages)
        async with bench.running(segment):
            await until(
                lambda: sum(len(c.body["batch"]) for c in server.accepted) >= 10,
                what="10 Segment messages",
            )
        await server.stop()
        assert server.violations == []
        batch = [m for c in server.accepted for m in c.body["batch"]]
        assert {m["type"] for m in batch} == {"track", "identify"}
        for message in batch:
            assert audience_destination_problems(message) == [], message
        assert {orjson.dumps(m["context"]["personas"]) for m in batch} == {
            orjson.dumps(messages[0]["context"]["personas"])
        }
        assert messages[0]["context"]["personas"]["space_id"] == TEST_SPACE_ID

    run(scenario())


def test_kafka_sink_produces_the_same_messages_keyed_by_user(
    bench: Bench, kafka_bootstrap: str
) -> None:
    target = f"{bench.settings.app_id}-copy"

    async def scenario() -> None:
        messages = shop_messages(users=4, per_user=3)
        bench.publish(*messages)
        copy = destination(name="copy", type="kafka", topic=target, batch_size=5)
        async with bench.running(copy) as [worker]:
            await until(lambda: worker.delivered >= len(messages), what="12 produced")

    run(scenario())
    records = read_topic(kafka_bootstrap, target, 12)
    assert len(records) == 12
    copied = [orjson.loads(r.value()) for r in records]
    assert all(r.key().decode() == m["userId"] for r, m in zip(records, copied, strict=True))
    assert by_user(copied) == by_user(bench.sent)
    assert sorted(orjson.dumps(m) for m in copied) == sorted(orjson.dumps(m) for m in bench.sent)


# -- deletions (SPEC §4/§6) ----------------------------------------------------------------------


def _events_of(server: FakeDestination, user: str) -> list[str]:
    """What a fake Braze / Customer.io was asked about `user`, in order: audience events
    (by name) and deletions ("deleted")."""
    found = []
    for call in server.accepted:
        braze = call.path == "/users/delete" and user in call.body["external_ids"]
        customerio = call.method == "DELETE" and call.path == f"/api/v1/customers/{user}"
        if braze or customerio:
            found.append("deleted")
        elif call.path == "/users/track":
            found += [e["name"] for e in call.body.get("events", []) if e["external_id"] == user]
        elif call.path == f"/api/v1/customers/{user}/events":
            found.append(call.body["name"])
    return found


def test_deletions_reach_every_destination_whatever_its_audiences_unless_opted_out(
    bench: Bench, kafka_bootstrap: str
) -> None:
    """u1 was in `vip` (the destinations' selection) and is deleted; u2 was only ever in
    another audience and is deleted too; a1, an anonymous id linked to u1, is deleted by
    cascade. A destination that opted out hears nothing of deletions."""
    target = f"{bench.settings.app_id}-deletions"
    messages = [
        output_message("u1", "vip", seq=1),
        output_message("u1", "vip", entered=False, seq=2),
        deleted_message("u1"),
        output_message("u2", "other_audience"),
        deleted_message("u2"),
        deleted_message("a1", anonymous=True, linked_to="u1"),
    ]

    async def scenario() -> tuple[FakeDestination, ...]:
        servers = [await FakeDestination(kind).start() for kind in KINDS_USED]
        braze, quiet, cio, hook, segment = servers
        vip = {"audiences": ["vip"]}
        destinations = [
            destination(name="braze", type="braze", url=braze.url, api_key=BRAZE_KEY, **vip),
            destination(
                name="quiet",
                type="braze",
                url=quiet.url,
                api_key=BRAZE_KEY,
                forward_deletions=False,
                **vip,
            ),
            destination(
                name="cio",
                type="customerio",
                url=cio.url,
                site_id=CIO_SITE,
                api_key=CIO_KEY,
                mode="track",
                **vip,
            ),
            destination(name="hook", type="webhook", url=hook.url, secret=WEBHOOK_SECRET, **vip),
            destination(
                name="seg", type="segment", url=segment.url, write_key=SEGMENT_WRITE_KEY, **vip
            ),
            destination(name="copy", type="kafka", topic=target, **vip),
        ]
        bench.publish(*messages)
        async with bench.running(*destinations) as workers:
            # each worker has handled all six: delivered, or skipped (not selected; anonymous
            # for Braze / Customer.io; deletions for the opted-out one)
            await until(
                lambda: all(w.delivered + w.skipped + w.dead_lettered >= 6 for w in workers),
                what="every message handled",
            )
            assert [w.dead_lettered for w in workers] == [0] * 6
        for server in servers:
            await server.stop()
        return tuple(servers)

    braze, quiet, cio, hook, segment = run(scenario())
    for server in (braze, quiet, cio, hook, segment):
        assert server.violations == []
    # Braze: u1's exit, then its deletion; u2 deleted though never in `vip`; a1 has no
    # external id there (skipped)
    assert _events_of(braze, "u1") == ["Audience Entered", "Audience Exited", "deleted"]
    assert _events_of(braze, "u2") == ["deleted"]
    assert braze.deleted == ["u1", "u2"] and braze.users == set()
    assert _events_of(quiet, "u1") == ["Audience Entered", "Audience Exited"]
    assert quiet.deleted == [] and quiet.users == {"u1"}
    assert _events_of(cio, "u1") == ["Audience Entered", "Audience Exited", "deleted"]
    assert cio.deleted == ["u1", "u2"]
    # webhook and Segment: the `User Deleted` messages themselves (webhooks signed: no
    # violation), a1's with its anonymousId and the user it was linked to
    deletions = [m for m in messages if m["event"] == "User Deleted"]

    def deleted(received: list[dict[str, Any]]) -> list[dict[str, Any]]:
        found = [m for m in received if m["event"] == "User Deleted"]
        return sorted(found, key=lambda m: deletions.index(m) if m in deletions else -1)

    assert deleted([c.body for c in hook.accepted]) == deletions
    assert deleted([m for c in segment.accepted for m in c.body["batch"]]) == deletions
    # Kafka: a `delete` record per deleted id, keyed by it
    records = read_topic(kafka_bootstrap, target, 5)
    copied = [(r.key().decode(), orjson.loads(r.value())) for r in records]
    assert len(copied) == 5  # u1's two transitions and three deletions
    expected = []
    for m in deletions:
        who = "userId" if "userId" in m else "anonymousId"
        record = {"type": "delete", who: m[who], "messageId": m["messageId"]}
        expected.append((m[who], {**record, "timestamp": m["timestamp"]}))
    deletes = [(key, value) for key, value in copied if value["type"] == "delete"]
    assert sorted(deletes, key=repr) == sorted(expected, key=repr)
    u1 = [value.get("event", value["type"]) for key, value in copied if key == "u1"]
    assert u1 == ["Audience Entered", "Audience Exited", "delete"]  # in order


KINDS_USED = ("braze", "braze", "customerio", "webhook", "segment")


def test_a_deletion_is_retried_after_5xx_and_a_404_counts_as_delivered(bench: Bench) -> None:
    async def scenario() -> None:
        braze = await FakeDestination("braze").start()
        cio = await FakeDestination("customerio").start()
        braze.script([500, (503, {"Retry-After": "0"})])
        cio.script([502, 404])  # then gone: Customer.io has no such customer
        sinks = [
            destination(name="braze", type="braze", url=braze.url, api_key=BRAZE_KEY),
            destination(
                name="cio", type="customerio", url=cio.url, site_id=CIO_SITE, api_key=CIO_KEY
            ),
        ]
        bench.publish(deleted_message("u1"))
        async with bench.running(*sinks) as workers:
            await until(lambda: all(w.delivered >= 1 for w in workers), what="both delivered")
            assert [w.dead_lettered for w in workers] == [0, 0]
        await braze.stop()
        await cio.stop()
        assert braze.violations == [] and cio.violations == []
        assert [(c.path, c.status) for c in braze.calls] == [
            ("/users/delete", 500),
            ("/users/delete", 503),
            ("/users/delete", 201),
        ]
        assert braze.deleted == ["u1"]
        assert [(c.method, c.path, c.status) for c in cio.calls] == [
            ("DELETE", "/api/v1/customers/u1", 502),
            ("DELETE", "/api/v1/customers/u1", 404),
        ]

    run(scenario())


def _dead_letters(
    bootstrap: str, topic: str, count: int
) -> list[tuple[dict[str, Any], dict[str, str]]]:
    return [
        (orjson.loads(m.value()), {k: v.decode() for k, v in m.headers()})
        for m in read_topic(bootstrap, topic, count)
    ]


def test_braze_non_fatal_errors_dead_letter_exactly_the_objects_they_index(
    bench: Bench, kafka_bootstrap: str
) -> None:
    blocked = "provided external_id is blacklisted and disallowed"

    async def scenario() -> None:
        server = await FakeDestination("braze").start()
        server.refuse_object = lambda array, obj: (
            blocked if obj.get("external_id") == "u2" else None
        )
        braze = destination(
            name="braze",
            type="braze",
            url=server.url,
            api_key=BRAZE_KEY,
            batch_size=200,
            anonymous_alias_label="audiences_anonymous_id",
        )
        users = ["u1", "u2", "u3"]
        messages = [output_message(u, seq=s) for s in (1, 2) for u in users]
        messages.append(output_message("anon-1", anonymous=True))
        bench.publish(*messages)
        async with bench.running(braze) as [worker]:
            await until(lambda: worker.delivered + worker.dead_lettered >= 7, what="7 outcomes")
            assert (worker.delivered, worker.dead_lettered) == (5, 2)
            assert server.aliases == {("anon-1", "audiences_anonymous_id")}
            bench.publish(deleted_message("anon-1", anonymous=True))
            await until(lambda: worker.delivered >= 6, what="the alias deletion")
        await server.stop()
        assert server.violations == []
        # answered 201 with errors: never resent, never split into single requests
        assert all(c.status == 201 for c in server.calls)
        tracked = [c for c in server.calls if c.path == "/users/track"]
        assert sum(len(c.body["events"]) for c in tracked) == 7  # each message once
        assert server.users == {"u1", "u3"}
        assert server.aliases == set() and server.deleted == ["alias:anon-1"]

    run(scenario())
    letters = _dead_letters(kafka_bootstrap, bench.settings.audience_events_dlq_topic, 2)
    assert sorted(m["messageId"] for m, _ in letters) == sorted(
        output_message("u2", seq=s)["messageId"] for s in (1, 2)
    )
    for _, headers in letters:
        assert headers["error_reason"] == "rejected" and headers["status"] == "201"
        assert blocked in headers["error"] and headers["destination"] == "braze"


def test_braze_429_waits_for_x_ratelimit_reset(bench: Bench) -> None:
    limited_at: list[float] = []

    def rate_limited() -> dict[str, str]:  # Braze's headers, as of the request's arrival
        limited_at.append(time.time())
        reset = int(limited_at[0]) + 2  # unix seconds: 1 to 2 s from now
        return {
            "X-RateLimit-Limit": "50000",
            "X-RateLimit-Remaining": "0",
            "X-RateLimit-Reset": str(reset),
        }

    async def scenario() -> None:
        server = await FakeDestination("braze").start()
        server.script([(429, rate_limited)])
        braze = destination(name="braze", type="braze", url=server.url, api_key=BRAZE_KEY)
        bench.publish(output_message("u1"))
        async with bench.running(braze):
            await until(lambda: len(server.accepted) >= 1, what="the retried request")
        await server.stop()
        first, second = server.calls
        assert (first.status, second.status) == (429, 201)
        reset = int(limited_at[0]) + 2
        # not before the window reset (the generic backoff here would be 0.05 s)
        assert second.at - first.at >= reset - limited_at[0] - 0.05
        assert second.at - first.at < reset - limited_at[0] + 1.5

    run(scenario())


def test_customerio_batches_through_track_v2_and_dead_letters_refused_items(
    bench: Bench, kafka_bootstrap: str
) -> None:
    async def scenario() -> None:
        server = await FakeDestination("customerio").start()
        server.refuse_item = lambda item: (
            "person is suppressed" if item["identifiers"]["id"] == "u2" else None
        )
        cio = destination(
            name="cio",
            type="customerio",
            url=server.url,
            site_id=CIO_SITE,
            api_key=CIO_KEY,
            batch_size=50,
        )
        messages = [output_message(u) for u in ("u1", "u2", "u3")] + [deleted_message("u3")]
        bench.publish(*messages)
        async with bench.running(cio) as [worker]:
            await until(lambda: worker.delivered + worker.dead_lettered >= 4, what="4 outcomes")
            assert (worker.delivered, worker.dead_lettered) == (3, 1)
        await server.stop()
        assert server.violations == []
        assert {c.path for c in server.calls} == {"/api/v2/batch"}
        assert 207 in {c.status for c in server.calls}
        assert server.users == {"u1"} and server.deleted == ["u3"]
        assert sorted(server.event_ids) == sorted(event_ulid(m) for m in (messages[0], messages[2]))

    run(scenario())
    [(message, headers)] = _dead_letters(
        kafka_bootstrap, bench.settings.audience_events_dlq_topic, 1
    )
    assert message["userId"] == "u2" and headers["error_reason"] == "rejected"
    assert "person is suppressed" in headers["error"]


# -- the shared delivery machinery ----------------------------------------------------------------


def test_500_twice_then_200_delivers_every_message_once(bench: Bench) -> None:
    async def scenario() -> None:
        server = await FakeDestination("webhook").start()
        server.script([500, 500])
        hook = destination(name="hook", type="webhook", url=server.url, secret=WEBHOOK_SECRET)
        messages = shop_messages(users=4, per_user=2)
        bench.publish(*messages)
        async with bench.running(hook):
            await until(lambda: len(server.accepted) >= len(messages), what="8 deliveries")
        await server.stop()
        assert [c.status for c in server.calls].count(500) == 2
        accepted = [c.body["messageId"] for c in server.accepted]
        assert sorted(accepted) == sorted(m["messageId"] for m in messages)  # once each
        assert by_user([c.body for c in server.accepted]) == by_user(messages)

    run(scenario())


def test_429_retry_after_2_is_not_called_again_before_2_seconds(bench: Bench) -> None:
    async def scenario() -> None:
        server = await FakeDestination("webhook").start()
        server.script([(429, {"Retry-After": "2"})])
        hook = destination(name="hook", type="webhook", url=server.url, secret=WEBHOOK_SECRET)
        message = output_message("u1")
        bench.publish(message)
        async with bench.running(hook):
            await until(lambda: len(server.accepted) >= 1, what="the retried delivery")
        await server.stop()
        first, second = server.calls
        assert first.status == 429 and second.status == 200
        assert second.at - first.at >= 2.0
        assert second.at - first.at < 3.5  # and not much later either
        assert second.body == message

    run(scenario())


def test_400_goes_to_the_dlq_and_dlq_replay_delivers_once_fixed(
    bench: Bench,
    kafka_bootstrap: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from audiences import cli

    settings = bench.settings
    file = tmp_path / "destinations.yaml"

    async def scenario() -> None:
        server = await FakeDestination("webhook").start()
        server.reject = lambda body: body["userId"] == "bad"
        file.write_text(
            f"- name: hook\n  type: webhook\n  url: {server.url}\n  secret: ${{HOOK_SECRET}}\n"
        )
        monkeypatch.setenv("HOOK_SECRET", WEBHOOK_SECRET)
        hook = destination(name="hook", type="webhook", url=server.url, secret=WEBHOOK_SECRET)
        bad, good = output_message("bad"), output_message("good")
        bench.publish(bad, good)
        bench.publish_raw(b"junk", b"not json")
        async with bench.running(hook) as [worker]:
            await until(lambda: worker.dead_lettered >= 2 and len(server.accepted) >= 1)
        assert [c.body["userId"] for c in server.accepted] == ["good"]

        dead = await asyncio.to_thread(
            read_topic, kafka_bootstrap, settings.audience_events_dlq_topic, 2
        )
        assert len(dead) == 2
        rejected = next(d for d in dead if d.key() == b"bad")
        headers = {k: v.decode() for k, v in rejected.headers()}
        assert orjson.loads(rejected.value()) == bad  # the original record
        assert headers["destination"] == "hook"
        assert headers["error_reason"] == "rejected"
        assert headers["status"] == "400"
        assert orjson.loads(headers["response"]) == {"error": "user rejected by test"}
        assert headers["source_topic"] == settings.audience_events_topic
        assert int(headers["source_offset"]) >= 0
        junk = next(d for d in dead if d.key() == b"junk")
        assert {k: v.decode() for k, v in junk.headers()}["error_reason"] == "invalid_message"

        for name, value in {
            "AUDIENCES_KAFKA_BOOTSTRAP": kafka_bootstrap,
            "AUDIENCES_APP_ID": settings.app_id,
            "AUDIENCES_AUDIENCE_EVENTS_TOPIC": settings.audience_events_topic,
            "AUDIENCES_AUDIENCE_EVENTS_DLQ_TOPIC": settings.audience_events_dlq_topic,
            "AUDIENCES_EVENTS_TOPIC": settings.events_topic,
            "AUDIENCES_EVENTS_DLQ_TOPIC": settings.events_dlq_topic,
            "AUDIENCES_DEFINITIONS_TOPIC": settings.definitions_topic,
            "AUDIENCES_DESTINATIONS": str(file),
        }.items():
            monkeypatch.setenv(name, value)
        server.reject = None  # the destination is fixed
        code = await asyncio.to_thread(cli.main, ["dlq", "replay", "--destination", "hook"])
        assert code == 0
        assert (
            "hook: 2 dead letters replayed: 1 delivered, 0 skipped, 0 dead-lettered again, 1 not JSON"
            in capsys.readouterr().out
        )
        assert [c.body["userId"] for c in server.accepted] == ["good", "bad"]
        assert server.accepted[1].body == bad
        # replayed letters are not sent again by the next replay
        code = await asyncio.to_thread(cli.main, ["dlq", "replay", "--destination", "hook"])
        assert code == 0
        assert "hook: 0 dead letters replayed" in capsys.readouterr().out
        assert len(server.accepted) == 2
        assert server.violations == []
        await server.stop()

    run(scenario())


def test_a_down_destination_does_not_delay_another(bench: Bench) -> None:
    async def scenario() -> None:
        down_server = await FakeDestination("webhook").start()
        up_server = await FakeDestination("webhook").start()
        down = destination(
            name="down", type="webhook", url=down_server.url, secret=WEBHOOK_SECRET, timeout_s=1
        )
        up = destination(name="up", type="webhook", url=up_server.url, secret=WEBHOOK_SECRET)

        async def round_trip(rounds: int) -> list[float]:
            """Publish 5 messages per round; the up destination's produce->receive latencies."""
            latencies: list[float] = []
            for _ in range(rounds):
                start = len(up_server.accepted)
                bench.publish(*(output_message(f"u{uuid.uuid4().hex[:6]}") for _ in range(5)))
                await until(lambda n=start + 5: len(up_server.accepted) >= n, timeout=10)
                for call in up_server.accepted[start:]:
                    latencies.append(call.at - bench.sent_at[call.body["messageId"]])
            return latencies

        async with bench.running(down, up) as workers:
            await until(lambda: all(w.assigned.is_set() for w in workers), what="assignment")
            healthy = await round_trip(5)
            down_server.down = True  # accepts connections, never answers
            tried_before = len(down_server.calls)
            outage = await round_trip(10)
            # it is being tried (and timing out) meanwhile, and nothing gets through
            await until(lambda: len(down_server.calls) > tried_before, what="a retried call")
            assert all(c.status != 200 for c in down_server.calls[tried_before:])
            assert workers[0].queue_depth > 0
            print(
                f"up destination latency: healthy median {statistics.median(healthy):.3f} s, "
                f"other one down median {statistics.median(outage):.3f} s max {max(outage):.3f} s"
            )
            assert statistics.median(outage) < statistics.median(healthy) + 0.05
            assert max(outage) < 0.5
            down_server.down = False  # back up: the backlog drains, in order per user
            await until(
                lambda: len({c.body["messageId"] for c in down_server.accepted}) >= 75,
                what="the backlog",
            )
        assert by_user([c.body for c in down_server.accepted]) == by_user(bench.sent)
        assert up_server.violations == down_server.violations == []
        await up_server.stop()
        await down_server.stop()

    run(scenario())


def test_a_restarted_sink_resumes_from_committed_offsets(bench: Bench) -> None:
    """A sink stopped mid-stream and started again sends what it had not committed, not more."""

    async def scenario() -> None:
        server = await FakeDestination("webhook").start()
        hook = destination(name="hook", type="webhook", url=server.url, secret=WEBHOOK_SECRET)
        first = shop_messages(users=3, per_user=2)
        bench.publish(*first)
        async with bench.running(hook):
            await until(lambda: len(server.accepted) >= 6)
        second = [output_message(f"late-{i}") for i in range(3)]
        bench.publish(*second)
        async with bench.running(hook):
            await until(lambda: len(server.accepted) >= 9)
        await server.stop()
        ids = [c.body["messageId"] for c in server.accepted]
        assert sorted(ids) == sorted(m["messageId"] for m in first + second)

    run(scenario())


def test_a_full_lane_pauses_its_partition_and_loses_nothing(bench: Bench) -> None:
    """Flow control: with room for 5 queued messages per partition, a throttled
    destination (rate limit) pauses consumption and resumes as it drains."""

    async def scenario() -> None:
        server = await FakeDestination("webhook").start()
        hook = destination(
            name="hook",
            type="webhook",
            url=server.url,
            secret=WEBHOOK_SECRET,
            batch_size=2,
            rate_limit_per_s=100,
        )
        messages = shop_messages(users=6, per_user=10)
        bench.publish(*messages)
        async with bench.running(hook, queue_limit=5) as [worker]:
            depths: list[int] = []

            def sample() -> bool:
                depths.append(worker.queue_depth)
                return sum(len(c.body) for c in server.accepted) >= 60

            await until(sample, what="60 messages")
        await server.stop()
        # per partition: < 5 queued + one poll (<= 6) + a batch in flight (2); without
        # flow control all 60 are queued at once
        assert max(depths) <= 2 * (4 + 6 + 2)
        received = [m for c in server.accepted for m in c.body]
        assert by_user(received) == by_user(messages)

    run(scenario())


# -- responses read as the APIs mean them (SPEC §6) ----------------------------------------------


def gauge(name: str, destination_name: str) -> float | None:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, {"destination": destination_name})


def dlq_headers(kafka_bootstrap: str, bench: Bench, count: int) -> list[dict[str, str]]:
    letters = read_topic(kafka_bootstrap, bench.settings.audience_events_dlq_topic, count)
    return [{k: v.decode() for k, v in letter.headers()} for letter in letters]


def test_redirects_are_never_followed_and_dead_letter_with_the_location(
    bench: Bench, kafka_bootstrap: str
) -> None:
    """Each code answered by a route whose Location answers 200 to anything: following it
    (aiohttp's default) would count the messages delivered."""
    codes = (301, 302, 307, 308)

    async def scenario() -> FakeDestination:
        server = await FakeDestination("webhook").start()
        hooks = [
            destination(
                name=f"moved-{code}",
                type="webhook",
                url=f"{server.base}/redirect/{code}",
                secret=WEBHOOK_SECRET,
                batch_size=10,
            )
            for code in codes
        ]
        bench.publish(*(output_message(f"u{i}") for i in range(3)))
        async with bench.running(*hooks) as workers:
            await until(lambda: all(w.dead_lettered >= 3 for w in workers), what="dead letters")
            assert [w.delivered for w in workers] == [0] * len(codes)
        await server.stop()
        return server

    server = run(scenario())
    assert [c.path for c in server.calls if c.path == "/landing"] == []  # never followed
    assert sorted(c.status for c in server.calls) == sorted(codes)  # one request each: no split
    headers = dlq_headers(kafka_bootstrap, bench, 3 * len(codes))
    assert len(headers) == 3 * len(codes)
    for code in codes:
        mine = [h for h in headers if h["destination"] == f"moved-{code}"]
        assert len(mine) == 3
        for h in mine:
            assert (h["error_reason"], h["status"]) == ("rejected", str(code))
            assert f"redirected ({code}) to {server.base}/landing" in h["error"]


def test_401_pauses_the_destination_until_a_probe_is_accepted(
    bench: Bench, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        revoked = await FakeDestination("braze").start()
        other = await FakeDestination("webhook").start()
        revoked.refuse_auth = 401
        braze = destination(
            name="braze-paused",
            type="braze",
            url=revoked.url,
            api_key=BRAZE_KEY,
            auth_probe_interval_s=0.2,
        )
        hook = destination(name="hook-ok", type="webhook", url=other.url, secret=WEBHOOK_SECRET)
        messages = shop_messages(users=6, per_user=2)
        bench.publish(*messages)
        with caplog.at_level("WARNING"):
            async with bench.running(braze, hook) as [paused, _]:
                # probes go on (the held batch, every 0.2 s) and nothing is dead-lettered
                await until(lambda: len(revoked.calls) >= 5, what="probes")
                assert gauge("audiences_destination_paused", "braze-paused") == 1.0
                assert paused.dead_lettered == 0 and paused.delivered == 0
                assert all(c.status == 401 for c in revoked.calls)
                probes = revoked.calls[2:]  # after the first request of each lane (two partitions)
                gaps = [b.at - a.at for a, b in itertools.pairwise(probes)]
                assert min(gaps) >= 0.19  # the probe interval, not a retry storm
                # the other destination is not held up
                await until(lambda: len(other.accepted) >= len(messages), what="the webhooks")
                assert gauge("audiences_destination_paused", "hook-ok") == 0.0
                revoked.refuse_auth = None  # the key is valid again
                await until(lambda: paused.delivered >= len(messages), what="resumed delivery")
                assert gauge("audiences_destination_paused", "braze-paused") == 0.0
                assert paused.dead_lettered == 0
        await revoked.stop()
        await other.stop()
        assert revoked.violations == other.violations == []
        events = [e for c in revoked.accepted for e in c.body["events"]]
        assert sorted(e["external_id"] for e in events) == sorted(m["userId"] for m in messages)
        warnings = [r for r in caplog.records if "PAUSED" in r.getMessage()]
        assert len(warnings) == 1 and warnings[0].levelname == "WARNING"
        assert "braze-paused" in warnings[0].getMessage() and "401" in warnings[0].getMessage()

    run(scenario())


def test_a_deletion_refused_with_401_is_held_not_dead_lettered(bench: Bench) -> None:
    """A revoked key pauses the destination (the deletion waits in Kafka, uncommitted);
    a worker restarted with the right key deletes the user."""

    async def scenario() -> None:
        braze = await FakeDestination("braze").start()
        wrong = destination(
            name="braze",
            type="braze",
            url=braze.url,
            api_key="revoked-key",
            auth_probe_interval_s=0.1,
        )
        bench.publish(deleted_message("u1"))
        async with bench.running(wrong) as [worker]:
            await until(lambda: len(braze.calls) >= 2, what="a probe")
            assert worker.dead_lettered == 0
            assert gauge("audiences_destination_paused", "braze") == 1.0
        assert {(c.path, c.status) for c in braze.calls} == {("/users/delete", 401)}
        assert braze.deleted == []
        fixed = destination(name="braze", type="braze", url=braze.url, api_key=BRAZE_KEY)
        async with bench.running(fixed) as [worker]:
            await until(lambda: worker.delivered >= 1, what="the deletion")
            assert worker.dead_lettered == 0
        await braze.stop()
        assert braze.deleted == ["u1"]

    run(scenario())


def test_410_stops_the_destination_and_keeps_its_messages_in_kafka(
    bench: Bench, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        server = await FakeDestination("webhook").start()
        server.gone = True
        hook = destination(
            name="hook-gone", type="webhook", url=server.url, secret=WEBHOOK_SECRET, batch_size=10
        )
        messages = [output_message(f"u{i}") for i in range(2)]  # one partition each or not
        bench.publish(*messages)
        with caplog.at_level("ERROR"):
            async with bench.running(hook) as [worker]:
                await until(lambda: worker.gone, what="the stop")
                assert gauge("audiences_destination_stopped", "hook-gone") == 1.0
                late = output_message("late")
                bench.publish(late)  # consumed by nobody while stopped
                sent = len(server.calls)
                assert 1 <= sent <= 2  # at most one request per lane, then nothing
                await until(lambda: worker.queue_depth == 0, what="queues dropped")
                assert worker.dead_lettered == 0 and worker.delivered == 0
        assert len(server.calls) == sent
        errors = [r for r in caplog.records if "STOPPED" in r.getMessage()]
        assert errors and errors[0].levelname == "ERROR" and "hook-gone" in errors[0].getMessage()
        # fixed configuration, worker restarted: everything held is delivered, once
        server.gone = False
        async with bench.running(hook) as [worker]:
            await until(
                lambda: sum(len(c.body) for c in server.accepted) >= 3, what="the held messages"
            )
            assert gauge("audiences_destination_stopped", "hook-gone") == 0.0
        await server.stop()
        assert server.violations == []
        got = sorted(m["messageId"] for c in server.accepted for m in c.body)
        assert got == sorted(m["messageId"] for m in [*messages, late])

    run(scenario())


def test_webhook_batches_verify_with_the_official_library_and_an_unpadded_secret(
    bench: Bench,
) -> None:
    """A secret without `whsec_` and without padding; every request verified by
    `standardwebhooks` in the fake; each batch identified by all its messages."""
    secret = base64.b64encode(bytes(range(40, 72))).decode().rstrip("=")  # 32 bytes

    async def scenario() -> None:
        server = await FakeDestination("webhook", secret=secret).start()
        hook = destination(
            name="hook", type="webhook", url=server.url, secret=secret, batch_size=3, mode="both"
        )
        messages = shop_messages(users=4, per_user=2)
        bench.publish(*messages)
        async with bench.running(hook):
            await until(
                lambda: sum(len(c.body) for c in server.accepted) >= 2 * len(messages),
                what="16 units",
            )
        await server.stop()
        assert server.violations == []  # signatures and webhook-ids all verified
        assert all(c.status == 200 for c in server.calls)
        ids = [c.headers["webhook-id"] for c in server.accepted]
        assert len(set(ids)) == len(ids)
        assert all(i.startswith("msg_") for i in ids)  # 2 units (track, identify) at least

    run(scenario())


def test_segment_batches_stay_under_500000_bytes_and_oversized_events_are_dead_lettered(
    bench: Bench, kafka_bootstrap: str
) -> None:
    async def scenario() -> None:
        server = await FakeDestination("segment").start()
        segment = destination(
            name="seg", type="segment", url=server.url, write_key=SEGMENT_WRITE_KEY, batch_size=100
        )
        one = len(orjson.dumps(output_message("u00")))
        messages = []
        for i in range(36):
            message = output_message(f"u{i:02}")
            padding = "x" * (29_500 - one - len(',"padding":""'))
            message["properties"] = {**message["properties"], "padding": padding}
            messages.append(message)
        huge = output_message("huge")
        huge["properties"] = {**huge["properties"], "padding": "x" * 40_000}
        bench.publish(*messages, huge)
        async with bench.running(segment) as [worker]:
            await until(
                lambda: worker.delivered >= 36 and worker.dead_lettered >= 1, what="all handled"
            )
        await server.stop()
        assert server.violations == []  # no batch over 500,000 bytes, no event over 32 KB
        assert all(c.status == 200 for c in server.calls)  # nothing refused, nothing split
        assert max(len(orjson.dumps(c.body)) for c in server.calls) > 400_000  # batches fill up
        got = sorted(m["messageId"] for c in server.accepted for m in c.body["batch"])
        assert got == sorted(m["messageId"] for m in messages)

    run(scenario())
    [headers] = dlq_headers(kafka_bootstrap, bench, 1)
    assert headers["error_reason"] == "too_large" and "32768" in headers["error"]
