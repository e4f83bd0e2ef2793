"""The Segment-compatible collector over HTTP and the real Kafka protocol (SPEC §7)."""

from __future__ import annotations

import asyncio
import base64
import gzip
import logging
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest
import requests
from harness import T0, Engine, _TopicReader
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from audiences.adapters.http.collector import Collector
from audiences.adapters.kafka.clients import KafkaClients
from audiences.adapters.kafka.topics import Topics, ensure_topics
from audiences.adapters.settings import Settings
from audiences.core.events import format_iso
from audiences.core.partitioning import partition_for
from audiences.errors import DeliveryError
from shared import isolated_settings

pytestmark = pytest.mark.kafka

KEY = "write-key-1"
OTHER_KEY = "write-key-2"
T = TypeVar("T")


class RunningCollector:
    """A `Collector` serving on a free port from an event loop in a thread of its own."""

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.collector = Collector(settings, KafkaClients(settings), **kwargs)
        self.url = self.call(self.collector.start(port=0))

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def post(self, path: str, body: Any = None, key: str | None = KEY, **kwargs: Any) -> Any:
        headers = kwargs.pop("headers", {})
        if key is not None:
            headers["Authorization"] = "Basic " + base64.b64encode(f"{key}:".encode()).decode()
        data = kwargs.pop("data", None)
        if data is None:
            data = orjson.dumps(body)
        return requests.post(self.url + path, data=data, headers=headers, timeout=30, **kwargs)

    def close(self) -> None:
        self.call(self.collector.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@pytest.fixture
def settings(kafka_bootstrap: str, unique_name: Callable[..., str], tmp_path: Path) -> Settings:
    made = isolated_settings(
        kafka_bootstrap,
        unique_name("c"),
        str(tmp_path),
        partitions=3,
        write_keys=f"{KEY}, {OTHER_KEY}",
    )
    ensure_topics(made, Topics.from_settings(made))
    return made


@pytest.fixture
def start(settings: Settings) -> Iterator[Callable[..., RunningCollector]]:
    started: list[RunningCollector] = []

    def make(settings: Settings = settings, **kwargs: Any) -> RunningCollector:
        started.append(RunningCollector(settings, **kwargs))
        return started[-1]

    yield make
    for running in started:
        running.close()


@pytest.fixture
def events_topic(settings: Settings) -> Iterator[_TopicReader]:
    reader = _TopicReader(settings.kafka_bootstrap, settings.events_topic)
    yield reader
    reader.close()


@pytest.fixture
def dlq_topic(settings: Settings) -> Iterator[_TopicReader]:
    reader = _TopicReader(settings.kafka_bootstrap, settings.events_dlq_topic)
    yield reader
    reader.close()


def headers_of(message: Any) -> dict[str, str]:
    return {name: (value or b"").decode() for name, value in message.headers() or ()}


def values(messages: list[Any]) -> list[dict[str, Any]]:
    return [orjson.loads(m.value()) for m in messages]


# -- unmodified Segment clients ---------------------------------------------------------


def test_segment_python_client_with_gzip_and_batching_delivers_to_kafka(
    start: Callable[..., RunningCollector], events_topic: _TopicReader
) -> None:
    from segment.analytics import Client

    collector = start()
    errors: list[Any] = []
    client = Client(
        KEY,
        host=collector.url,
        gzip=True,
        sync_mode=False,
        upload_size=4,  # several batches
        max_retries=0,
        on_error=lambda error, batch: errors.append(error),
    )
    client.identify("user-1", {"email": "u1@example.com", "plan": "pro"})
    client.track("user-1", "Checkout Started", {"cart_id": "c1", "revenue": 9.5})
    client.page("user-2", "Docs", "Install", {"url": "https://example.com/docs"})
    client.screen("user-2", "App", "Home")
    client.group("user-1", "group-7", {"name": "Acme"})
    client.alias("anon-9", "user-1")
    client.track(anonymous_id="anon-3", event="Product Viewed", properties={"sku": "s-1"})
    client.flush()
    client.shutdown()
    assert errors == []

    found = {
        (e["type"], e.get("event") or e.get("name")): e for e in values(events_topic.read(7, 30))
    }
    assert set(found) == {
        ("identify", None),
        ("track", "Checkout Started"),
        ("page", "Install"),
        ("screen", "Home"),
        ("group", None),
        ("alias", None),
        ("track", "Product Viewed"),
    }
    checkout = found[("track", "Checkout Started")]
    assert checkout["userId"] == "user-1"
    assert checkout["properties"] == {"cart_id": "c1", "revenue": 9.5}
    assert checkout["context"]["library"]["name"] == "analytics-python"
    assert found[("identify", None)]["traits"] == {"email": "u1@example.com", "plan": "pro"}
    assert found[("page", "Install")]["properties"]["url"] == "https://example.com/docs"
    assert found[("group", None)]["groupId"] == "group-7"
    assert found[("alias", None)]["previousId"] == "anon-9"
    for event in found.values():
        assert len(event["messageId"]) == 36  # the client's uuid4, kept
        assert event["sentAt"] and event["receivedAt"] and event["originalTimestamp"]
        assert event["timestamp"].endswith("Z")
        assert "writeKey" not in event
    for msg in events_topic.seen:
        event = orjson.loads(msg.value())
        assert msg.key() == (event.get("userId") or event["anonymousId"]).encode()


def test_analytics_js_short_forms_with_the_write_key_in_a_text_plain_body(
    start: Callable[..., RunningCollector], events_topic: _TopicReader
) -> None:
    collector = start()
    sent = format_iso(T0)
    common = {
        "writeKey": OTHER_KEY,
        "sentAt": sent,
        "context": {"library": {"name": "analytics.js"}},
    }
    calls = [
        ("/v1/t", {"event": "Product Viewed", "userId": "js-1", "timestamp": sent, **common}),
        ("/v1/i", {"anonymousId": "anon-js", "traits": {"plan": "free"}, **common}),
        ("/v1/p", {"anonymousId": "anon-js", "name": "Home", **common}),
        ("/v1/s", {"userId": "js-1", "name": "Cart", **common}),
        ("/v1/g", {"userId": "js-1", "groupId": "g-1", **common}),
        ("/v1/a", {"userId": "js-1", "previousId": "anon-js", **common}),
        (
            "/v1/b",
            {"batch": [{"type": "track", "userId": "js-2", "event": "Signed Up"}], **common},
        ),
    ]
    for path, body in calls:
        response = collector.post(
            path, body, key=None, headers={"Content-Type": "text/plain;charset=UTF-8"}
        )
        assert (response.status_code, response.json()) == (200, {"success": True}), path
        assert response.headers["Access-Control-Allow-Origin"] == "*"
    events = values(events_topic.read(len(calls), 30))
    assert sorted(e["type"] for e in events if e.get("userId") == "js-1") == [
        "alias",
        "group",
        "screen",
        "track",
    ]
    by_type = {e["type"]: e for e in events if e.get("userId") != "js-2"}
    assert by_type["identify"]["traits"] == {"plan": "free"}
    assert by_type["page"]["name"] == "Home"
    assert any(e.get("event") == "Signed Up" for e in events)
    for event in events:
        assert "writeKey" not in event
        assert event["context"]["library"]["name"] == "analytics.js"

    preflight = requests.options(
        collector.url + "/v1/t",
        headers={"Origin": "https://shop.example", "Access-Control-Request-Method": "POST"},
        timeout=10,
    )
    assert preflight.status_code == 204
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]


def test_analytics_js_gets_source_settings_pointing_back_at_the_collector(
    start: Callable[..., RunningCollector],
) -> None:
    collector = start()
    response = requests.get(f"{collector.url}/v1/projects/{KEY}/settings", timeout=10)
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    segmentio = response.json()["integrations"]["Segment.io"]
    assert segmentio == {
        "apiKey": KEY,
        "apiHost": collector.url.removeprefix("http://") + "/v1",
        "protocol": "http",
    }


def test_the_settings_route_does_not_tell_whether_a_key_is_valid(
    start: Callable[..., RunningCollector],
) -> None:
    """Same status, headers and body (but the echoed key) for a valid and an invalid key:
    the public settings route is no oracle for guessing write keys."""
    collector = start()
    wrong_key = "write-key-X"  # as long as KEY: even Content-Length is the same
    assert len(wrong_key) == len(KEY)
    valid = requests.get(f"{collector.url}/v1/projects/{KEY}/settings", timeout=10)
    invalid = requests.get(f"{collector.url}/v1/projects/{wrong_key}/settings", timeout=10)
    assert valid.status_code == invalid.status_code == 200
    assert invalid.content == valid.content.replace(KEY.encode(), wrong_key.encode())

    def headers(response: requests.Response) -> dict[str, str]:
        return {k: v for k, v in response.headers.items() if k.lower() != "date"}

    assert headers(valid) == headers(invalid)
    # the calls themselves check the key
    assert collector.post("/v1/track", GOOD, key=wrong_key).status_code == 401


# -- keys, partitions and enrichment ----------------------------------------------------


def test_events_are_keyed_by_user_on_the_murmur2_partition(
    start: Callable[..., RunningCollector], events_topic: _TopicReader, settings: Settings
) -> None:
    collector = start(clock=lambda: T0)
    batch = [
        {"type": "identify", "userId": f"user-{i}"}
        if i % 3
        else {"type": "page", "anonymousId": f"anon-{i}"}
        for i in range(24)
    ]
    response = collector.post("/v1/batch", {"batch": batch})
    assert response.status_code == 200, response.text
    records = events_topic.read(24, 30)
    ids = set()
    for msg in records:
        event = orjson.loads(msg.value())
        assert msg.key() == (event.get("userId") or event.get("anonymousId")).encode()
        # Java's default partitioner, as every producer of `events` and the API routing
        assert msg.partition() == partition_for(msg.key(), settings.partitions)
        assert event["receivedAt"] == format_iso(T0)
        assert event["timestamp"] == format_iso(T0)
        ids.add(event["messageId"])
    assert len(ids) == 24  # generated, one each
    assert len({m.partition() for m in records}) > 1


def test_collected_events_drive_the_evaluator(
    engine: Engine, start: Callable[..., RunningCollector]
) -> None:
    engine.apply({"key": "signed_up", "condition": {"performed": {"event": "Signed Up"}}})
    engine.start()
    collector = start(engine.settings.replace(write_keys=KEY), clock=lambda: T0)
    for user in ("eve", "bob"):
        response = collector.post(
            "/v1/track", {"userId": user, "event": "Signed Up", "timestamp": format_iso(T0)}
        )
        assert response.status_code == 200
    entered = engine.outputs(2)
    assert sorted(o["userId"] for o in entered) == ["bob", "eve"]
    assert {o["event"] for o in entered} == {"Audience Entered"}


# -- every rejection --------------------------------------------------------------------

GOOD = {"userId": "u1", "event": "E"}


@pytest.mark.parametrize(
    ("path", "kwargs", "status", "message"),
    [
        ("/v1/track", {"body": GOOD, "key": "wrong"}, 401, "invalid write key"),
        (
            "/v1/track",
            {"body": {**GOOD, "writeKey": "wrong"}, "key": None},
            401,
            "invalid write key",
        ),
        ("/v1/track", {"body": GOOD, "key": None}, 401, "missing write key"),
        ("/v1/track", {"data": b'{"userId": "u1", ', "key": KEY}, 400, "invalid JSON"),
        (
            "/v1/batch",
            {"data": b"\x1f\x8b garbage", "headers": {"Content-Encoding": "gzip"}},
            400,
            "body is not valid gzip",
        ),
        ("/v1/track", {"data": b"[1, 2]"}, 400, "body must be a JSON object"),
        ("/v1/batch", {"body": {"batch": {"type": "track"}}}, 400, "batch: must be a list"),
        (
            "/v1/batch",
            {
                "body": {
                    "batch": [{**GOOD, "type": "track", "properties": {"x": "y" * 20_000}}] * 30
                }
            },
            400,
            "body is over the 500 KB limit (512000 bytes)",
        ),
        (
            "/v1/batch",
            {"data": gzip.compress(b'{"batch": [' + b"{}," * 300_000 + b"{}]}")},
            400,
            "body is over the 500 KB limit",
        ),
        ("/v1/trak", {"body": GOOD}, 404, "no such endpoint: POST /v1/trak"),
        ("/v2/track", {"body": GOOD}, 404, "Not Found: POST /v2/track"),
        (
            "/v1/track",
            {"data": b'{"userId": "u", "event": "E", "properties": {"n": 1e400}}'},
            400,
            "invalid JSON",
        ),
    ],
    ids=[
        "bad-key",
        "bad-body-key",
        "missing-key",
        "invalid-json",
        "gzip-garbage",
        "not-an-object",
        "batch-not-a-list",
        "oversize-batch",
        "oversize-gzipped-batch",
        "unknown-endpoint",
        "unknown-path",
        "number-beyond-double",
    ],
)
def test_rejections_have_their_status_and_message_and_produce_nothing(
    start: Callable[..., RunningCollector],
    events_topic: _TopicReader,
    dlq_topic: _TopicReader,
    path: str,
    kwargs: dict[str, Any],
    status: int,
    message: str,
) -> None:
    collector = start()
    kwargs = dict(kwargs)
    if "gzip" in path or kwargs.get("data", b"")[:2] == b"\x1f\x8b":
        kwargs.setdefault("headers", {})["Content-Encoding"] = "gzip"
    response = collector.post(path, kwargs.pop("body", None), **kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["success"] is False and body["code"]
    assert message in body["message"], body["message"]
    assert collector.post("/v1/identify", {"userId": "after"}).status_code == 200
    [only] = values(events_topic.read(1, 30))  # read() fails if anything more arrived
    assert only["userId"] == "after"
    assert dlq_topic.read(0, 0) == []  # a refused request dead-letters nothing


@pytest.mark.parametrize(
    ("path", "body", "reason", "error"),
    [
        ("/v1/track", {"event": "E"}, "missing_user", "userId: userId or anonymousId is required"),
        ("/v1/track", {"userId": "u1"}, "missing_event", "event: track events need a non-empty"),
        ("/v1/group", {"userId": "u1"}, "missing_field", "groupId: required for group calls"),
        (
            "/v1/track",
            {**GOOD, "properties": {"x": "y" * 33_000}},
            "oversized",
            "over the 32 KB limit per event (32768 bytes)",
        ),
        (
            "/v1/track",
            {**GOOD, "timestamp": "2099-01-01T00:00:00Z"},
            "future_timestamp",
            "timestamp: event time",
        ),
        (  # SPEC §11: numbers outside 64 bits / ISO are invalid input, never a 500
            "/v1/track",
            {**GOOD, "timestamp": 1e20},
            "bad_timestamp",
            "timestamp: timestamp is outside 1970..9999",
        ),
    ],
    ids=["missing-user", "missing-event", "missing-group-id", "oversize-event", "future", "1e20"],
)
def test_an_invalid_single_call_is_answered_200_and_dead_lettered_with_its_reason(
    start: Callable[..., RunningCollector],
    events_topic: _TopicReader,
    dlq_topic: _TopicReader,
    settings: Settings,
    path: str,
    body: dict[str, Any],
    reason: str,
    error: str,
) -> None:
    collector = start()
    response = collector.post(path, {**body, "writeKey": KEY}, key=None)
    assert (response.status_code, response.json()) == (200, {"success": True})
    [letter] = dlq_topic.read(1, 30)  # read() fails if anything more arrived
    headers = headers_of(letter)
    assert headers["error_reason"] == reason
    assert error in headers["error"], headers["error"]
    assert headers["source_topic"] == ""
    assert (headers["source_partition"], headers["source_offset"]) == ("-1", "-1")
    assert (headers["source"], headers["request_path"]) == ("collector", path)
    assert orjson.loads(letter.value()) == body  # as sent, without the write key
    assert letter.key() == (b"u1" if "userId" in body else None)
    assert collector.post("/v1/identify", {"userId": "after"}).status_code == 200
    [only] = values(events_topic.read(1, 30))
    assert only["userId"] == "after"


def test_each_invalid_batch_item_is_dead_lettered_and_its_neighbours_delivered(
    start: Callable[..., RunningCollector],
    events_topic: _TopicReader,
    dlq_topic: _TopicReader,
) -> None:
    collector = start()

    def scrape(name: str, **labels: str) -> float:  # the collector runs in this process
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before = {
        reason: scrape("audiences_collector_invalid_events_total", reason=reason)
        for reason in ("missing_event", "bad_timestamp", "not_an_object")
    }
    invalid_before = scrape("audiences_events_invalid_total", reason="missing_event")
    good = [
        {"type": "track", "userId": f"u{n}", "event": "E", "messageId": f"m{n}"} for n in range(4)
    ]
    items: list[Any] = [
        good[0],
        {"type": "track", "userId": "bad-1"},  # no event
        good[1],
        {**good[2], "messageId": "bad-2", "timestamp": 1e20},
        "not an object",
        good[2],
        good[3],
    ]
    response = collector.post("/v1/batch", {"batch": items})
    assert (response.status_code, response.json()) == (200, {"success": True})
    delivered = values(events_topic.read(4, 30))
    assert sorted(e["messageId"] for e in delivered) == ["m0", "m1", "m2", "m3"]
    letters = {headers_of(m)["error"].split(":")[0]: m for m in dlq_topic.read(3, 30)}
    assert set(letters) == {"batch[1].event", "batch[3].timestamp", "batch[4]"}
    assert headers_of(letters["batch[1].event"])["error_reason"] == "missing_event"
    assert letters["batch[1].event"].key() == b"bad-1"
    assert orjson.loads(letters["batch[1].event"].value()) == items[1]
    assert headers_of(letters["batch[3].timestamp"])["error_reason"] == "bad_timestamp"
    assert orjson.loads(letters["batch[4]"].value()) == "not an object"
    assert letters["batch[4]"].key() is None
    for reason in before:
        assert (
            scrape("audiences_collector_invalid_events_total", reason=reason) == before[reason] + 1
        )
    assert scrape("audiences_events_invalid_total", reason="missing_event") == invalid_before + 1


def test_a_dead_letter_kafka_does_not_acknowledge_makes_the_request_503(
    start: Callable[..., RunningCollector], settings: Settings
) -> None:
    """200 promises the dead letters too: when `events-dlq` refuses them the client is
    told to retry (the valid events it re-sends carry the same messageIds)."""
    collector = start()
    producer = collector.collector.producer
    assert producer is not None
    send = producer.send

    async def refusing_dlq(topic: str, *args: Any, **kwargs: Any) -> None:
        if topic == settings.events_dlq_topic:
            raise DeliveryError("Kafka refused the events: injected", retry_after_s=5)
        await send(topic, *args, **kwargs)

    producer.send = refusing_dlq  # type: ignore[method-assign]
    batch = {"batch": [{"type": "identify", "userId": "u1"}, {"type": "track", "userId": "u2"}]}
    response = collector.post("/v1/batch", batch)
    assert (response.status_code, response.headers["Retry-After"]) == (503, "5"), response.text
    assert response.json()["code"] == "unavailable"
    assert collector.post("/v1/batch", {"batch": batch["batch"][:1]}).status_code == 200


def test_segment_python_client_batch_with_one_bad_item_delivers_all_the_good_ones(
    start: Callable[..., RunningCollector],
    events_topic: _TopicReader,
    dlq_topic: _TopicReader,
) -> None:
    """analytics-python treats a 400 as final and drops the whole batch: one bad item must
    not cost its neighbours. The library checks what it can; an event stamped two days
    after the batch's `sentAt` (future_timestamp once skew-corrected) is one it sends."""
    from segment.analytics import Client

    collector = start()
    errors: list[Any] = []
    client = Client(
        KEY,
        host=collector.url,
        gzip=True,
        sync_mode=False,
        upload_size=100,  # one batch
        max_retries=0,
        on_error=lambda error, batch: errors.append(error),
    )
    client.track("user-1", "Checkout Started", {"n": 1})
    client.track("user-2", "Far Future", timestamp=datetime.now(UTC) + timedelta(days=2))
    client.identify("user-3", {"plan": "pro"})
    client.track("user-4", "Checkout Started", {"n": 4})
    client.flush()
    client.shutdown()
    assert errors == []
    found = values(events_topic.read(3, 30))
    assert sorted(e["userId"] for e in found) == ["user-1", "user-3", "user-4"]
    [letter] = dlq_topic.read(1, 30)
    assert headers_of(letter)["error_reason"] == "future_timestamp"
    assert orjson.loads(letter.value())["event"] == "Far Future"


def _partial_post(
    url: str, path: str, headers: dict[str, str], declared: int
) -> tuple[int, dict[str, str], dict[str, Any]]:
    """A POST that declares a `declared`-byte body and sends only its first KB: an answer
    can only come if the server decided without reading the body (else the socket times
    out and the test fails)."""
    host, _, port = url.removeprefix("http://").partition(":")
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    request = (
        (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {declared}\r\n"
            f"Content-Type: application/json\r\n{head}\r\n"
        ).encode()
        + b"\x1f\x8b"
        + b"\0" * 1022
    )
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(request)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed without an answer: {answer!r}"
            answer += chunk
        header_block, _, body = answer.partition(b"\r\n\r\n")
        status_line, *lines = header_block.decode().split("\r\n")
        fields = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        while len(body) < int(fields["content-length"]):
            chunk = sock.recv(65536)
            assert chunk, "connection closed in the middle of the answer"
            body += chunk
    return int(status_line.split()[1]), fields, orjson.loads(body)


def _basic(key: str) -> str:
    return "Basic " + base64.b64encode(f"{key}:".encode()).decode()


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({"Authorization": _basic("wrong"), "Content-Encoding": "gzip"}, "invalid write key"),
        ({"Authorization": "Bearer what", "Content-Encoding": "gzip"}, "must be HTTP Basic"),
        ({"Content-Encoding": "gzip"}, "a compressed body needs the write key in HTTP Basic"),
    ],
    ids=["bad-basic-key", "not-basic", "no-key-gzip"],
)
def test_a_bad_key_is_refused_before_the_body_is_read(
    start: Callable[..., RunningCollector], headers: dict[str, str], message: str
) -> None:
    collector = start()
    status, fields, body = _partial_post(collector.url, "/v1/batch", headers, 500 * 1024)
    assert (status, body["code"]) == (401, "unauthorized")
    assert fields["connection"] == "close"  # the rest of the body is not drained either
    assert message in body["message"]
    assert collector.post("/v1/identify", {"userId": "after"}).status_code == 200


def test_a_write_key_over_its_rate_limit_gets_429_with_retry_after(
    start: Callable[..., RunningCollector], settings: Settings, events_topic: _TopicReader
) -> None:
    now = [1000.0]
    limited = settings.replace(collector_rate_limit=2, collector_rate_burst=3)
    collector = start(limited, rate_clock=lambda: now[0])

    def scrape() -> float:  # the counter of this process (the collector runs in it)
        return REGISTRY.get_sample_value("audiences_collector_rate_limited_total") or 0.0

    before = scrape()

    def batch(size: int, key: str = KEY) -> requests.Response:
        items = [{"type": "track", "userId": f"u{i}", "event": "E"} for i in range(size)]
        return collector.post("/v1/batch", {"batch": items}, key=key)

    assert batch(3).status_code == 200  # the whole burst
    refused = collector.post("/v1/track", GOOD)
    assert refused.status_code == 429, refused.text
    assert refused.json()["code"] == "rate_limited" and refused.headers["Retry-After"] == "1"
    # the key in the body is limited too, and a spent key is refused before its body is read
    in_body = collector.post("/v1/track", {**GOOD, "writeKey": KEY}, key=None)
    assert in_body.status_code == 429
    status, fields, _ = _partial_post(
        collector.url, "/v1/batch", {"Authorization": _basic(KEY)}, 400 * 1024
    )
    assert (status, fields["retry-after"]) == (429, "1")
    assert batch(3, OTHER_KEY).status_code == 200  # each key has its own bucket

    now[0] += 0.5  # one event's worth
    assert collector.post("/v1/track", GOOD).status_code == 200
    assert collector.post("/v1/track", GOOD).status_code == 429
    now[0] += 60  # full again: a batch larger than the burst passes once, then the key waits
    assert batch(5).status_code == 200
    again = collector.post("/v1/track", GOOD)
    assert (again.status_code, again.headers["Retry-After"]) == (429, "2")
    assert scrape() - before == 5
    assert len(events_topic.read(3 + 3 + 1 + 5, 30)) == 12  # fails if anything more arrived


def test_a_get_on_an_endpoint_is_405_json(start: Callable[..., RunningCollector]) -> None:
    response = requests.get(start().url + "/v1/track", timeout=10)
    assert response.status_code == 405
    assert response.json()["message"] == "Method Not Allowed: GET /v1/track"


def test_no_write_keys_means_no_collector(settings: Settings) -> None:
    keyless = settings.replace(write_keys=" , ")
    with pytest.raises(Exception, match="AUDIENCES_WRITE_KEYS"):
        Collector(keyless, KafkaClients(keyless))


# -- backpressure -----------------------------------------------------------------------


def _dead_bootstrap() -> str:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize(
    "limit",
    [
        {"collector_max_inflight_events": 4},  # the collector's own budget refuses
        {"collector_max_inflight_events": 1_000, "queue.buffering.max.messages": 3},  # librdkafka's
    ],
    ids=["inflight-budget", "producer-queue"],
)
def test_a_flood_while_kafka_is_down_gets_503_with_retry_after_and_stays_bounded(
    start: Callable[..., RunningCollector], settings: Settings, limit: dict[str, Any]
) -> None:
    producer_config = {"message.timeout.ms": 1_500, **{k: v for k, v in limit.items() if "." in k}}
    down = settings.replace(
        kafka_bootstrap=_dead_bootstrap(),
        collector_ack_timeout_ms=300,
        **{k: v for k, v in limit.items() if "." not in k},
    )
    collector = start(down, producer_config=producer_config)
    producer = collector.collector.producer
    assert producer is not None
    peak = [0]

    def post(i: int) -> requests.Response:
        peak[0] = max(peak[0], producer.inflight[0])
        return collector.post(
            "/v1/track", {"userId": f"u{i}", "event": "Flood", "properties": {"i": i}}
        )

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(post, range(60)))
    assert {r.status_code for r in responses} == {503}
    assert all(r.json()["code"] == "unavailable" for r in responses)
    assert all(int(r.headers["Retry-After"]) >= 1 for r in responses)
    messages = {r.json()["message"] for r in responses}
    queue_limited = "queue.buffering.max.messages" in limit
    refused = "producer queue is full" if queue_limited else "too many events waiting"
    assert any(refused in m for m in messages), messages  # refused at once
    assert any("did not acknowledge" in m for m in messages), messages  # waited, then gave up
    assert {r.headers["Retry-After"] for r in responses if refused in r.json()["message"]} == {"1"}
    # never more than the budget, or the queue plus the one produce() being refused
    # (librdkafka's own len() also counts delivery reports being served: not a bound)
    assert peak[0] <= 4 and producer.inflight[0] <= 4
    assert requests.get(collector.url + "/healthz", timeout=5).json() == {"status": "ok"}

    # the budget comes back when librdkafka gives up on the queued records
    deadline = time.monotonic() + 10
    while producer.inflight != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert producer.inflight == (0, 0)
    assert producer.queued() == 0


# -- producer and operations ------------------------------------------------------------


def test_idempotent_producer_gets_a_producer_id_from_the_broker(
    start: Callable[..., RunningCollector], events_topic: _TopicReader
) -> None:
    lines: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger(f"test-librdkafka-{id(lines)}")
    logger.addHandler(Capture())
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    collector = start(producer_config={"debug": "eos", "logger": logger})
    assert collector.post("/v1/identify", {"userId": "u1"}).status_code == 200
    events_topic.read(1, 30)
    assert any("Acquired PID" in line for line in lines), lines[-20:]


def _sample(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def test_metrics_count_requests_by_endpoint_and_status_and_events_by_type(
    start: Callable[..., RunningCollector], events_topic: _TopicReader
) -> None:
    collector = start()

    def scrape() -> str:
        response = requests.get(collector.url + "/metrics", timeout=5)
        assert response.status_code == 200
        return response.text

    before = scrape()
    assert collector.post("/v1/t", {"userId": "u", "event": "E"}).status_code == 200
    batch = {"batch": [{"type": "page", "userId": "u"}, {"type": "page", "userId": "v"}]}
    assert collector.post("/v1/batch", batch).status_code == 200
    assert collector.post("/v1/track", GOOD, key="nope").status_code == 401
    assert collector.post("/v1/nope", GOOD).status_code == 404
    events_topic.read(3, 30)
    after = scrape()

    def delta(name: str, **labels: str) -> float:
        return _sample(after, name, **labels) - _sample(before, name, **labels)

    requests_total = "audiences_collector_requests_total"
    assert delta(requests_total, endpoint="track", status="200") == 1
    assert delta(requests_total, endpoint="batch", status="200") == 1
    assert delta(requests_total, endpoint="track", status="401") == 1
    assert delta(requests_total, endpoint="unknown", status="404") == 1
    assert delta("audiences_collector_events_total", type="page") == 2
    assert delta("audiences_collector_events_total", type="track") == 1
    assert _sample(after, "audiences_collector_inflight_events") == 0
    assert delta("audiences_collector_request_duration_seconds_count", endpoint="batch") == 1
    assert requests.get(collector.url + "/healthz", timeout=5).json() == {"status": "ok"}


def test_a_fatal_producer_error_turns_health_red_and_requests_to_503(
    start: Callable[..., RunningCollector],
) -> None:
    class Fatal:
        def fatal(self) -> bool:
            return True

        def code(self) -> int:
            return -150

        def __str__(self) -> str:
            return 'KafkaError{code=_FATAL,val=-150,str="fenced"}'

    collector = start()
    producer = collector.collector.producer
    assert producer is not None
    producer._errors(Fatal())  # what librdkafka's error_cb delivers
    health = requests.get(collector.url + "/healthz", timeout=5)
    assert health.status_code == 503 and "fenced" in health.json()["reason"]
    response = collector.post("/v1/identify", {"userId": "u1"})
    assert response.status_code == 503 and response.headers["Retry-After"] == "5"
    assert "Kafka producer failed" in response.json()["message"]
