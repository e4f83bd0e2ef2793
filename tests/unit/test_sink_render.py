"""Rendering output messages into each destination's documented request shape (pure)."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest

from audiences.adapters.sinks.config import Destination, parse_destinations
from audiences.adapters.sinks.pii import hash_pii
from audiences.adapters.sinks.render import (
    SEGMENT_MAX_BATCH_BYTES,
    identify_message,
    render_requests,
    sign_webhook,
    webhook_headers,
)
from shared import deleted_message, output_message

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
EMAIL_HASH = "542d240129883c019e106e3b1b2d3f3cb3537c43c425364de8e951d5a3083345"


def destination(**raw: Any) -> Destination:
    return parse_destinations([{"name": "d", **raw}], {})[0]


def test_hash_pii_matches_the_published_test_vector() -> None:
    assert hash_pii(" Person@Example.com ") == EMAIL_HASH
    assert hash_pii("person@example.com") == EMAIL_HASH
    assert hash_pii(EMAIL_HASH) == EMAIL_HASH  # already hashed: passes through
    assert hash_pii(EMAIL_HASH.upper()) == EMAIL_HASH.upper()
    assert hash_pii("+1 555 0100") != hash_pii("+1 555 0101")


def test_standard_webhooks_signature_matches_the_reference_vector() -> None:
    signature = sign_webhook(
        SECRET, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}'
    )
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_webhook_single_message_is_the_output_json_signed_at_send_time() -> None:
    hook = destination(type="webhook", url="http://h/in", secret=SECRET, hash_pii=True)
    message = output_message("u1", email=" Person@Example.com ")
    [request] = render_requests(hook, [message]).requests
    body = orjson.loads(request.body)
    assert body["messageId"] == message["messageId"] and body["event"] == "Audience Entered"
    assert body["context"]["traits"]["email"] == EMAIL_HASH
    assert message["context"]["traits"]["email"] == " Person@Example.com "  # input untouched
    headers = dict(webhook_headers(hook, request, 1_700_000_000))
    assert headers["webhook-id"] == message["messageId"]
    assert headers["webhook-timestamp"] == "1700000000"
    assert headers["webhook-signature"] == sign_webhook(
        SECRET, message["messageId"], 1_700_000_000, request.body
    )
    assert headers["Content-Type"] == "application/json"


def test_webhook_batches_are_arrays_identified_by_their_first_message() -> None:
    hook = destination(type="webhook", url="http://h", batch_size=2, mode="both")
    messages = [output_message(f"u{i}") for i in range(3)]
    first, second = render_requests(hook, messages).requests
    assert first.indexes == (0, 1) and second.indexes == (2,)
    units = orjson.loads(first.body)
    assert [u["type"] for u in units] == ["track", "identify", "track", "identify"]
    assert first.webhook_id == messages[0]["messageId"]
    assert "webhook-signature" not in dict(webhook_headers(hook, first, 1))  # no secret


def test_identify_message_sets_the_audience_trait_with_a_derived_message_id() -> None:
    message = output_message("u1", entered=False, email="a@b.c")
    identify = identify_message(message, hashed=False)
    assert identify["type"] == "identify" and identify["userId"] == "u1"
    assert identify["traits"] == {"cart_abandoners": False, "email": "a@b.c"}
    assert identify["timestamp"] == message["timestamp"]
    assert len(identify["messageId"]) == 64 and identify["messageId"] != message["messageId"]
    assert identify_message(message, hashed=False)["messageId"] == identify["messageId"]
    # as Engage's identify calls: the audience's context.personas, no contact traits twice
    assert identify["context"] == {"personas": message["context"]["personas"]}


def test_braze_users_track_with_attributes_per_user_and_events() -> None:
    braze = destination(type="braze", url="https://rest.iad-01.braze.com/", api_key="key")
    messages = [
        output_message("u1", seq=1),
        output_message("u1", entered=False, seq=2),
        output_message("u2", audience="vip"),
    ]
    [request] = render_requests(braze, messages).requests
    assert (request.method, request.url) == ("POST", "https://rest.iad-01.braze.com/users/track")
    assert ("Authorization", "Bearer key") in request.headers
    body = orjson.loads(request.body)
    # one attributes object per user: the later value wins (in topic order)
    assert body["attributes"] == [
        {"external_id": "u1", "cart_abandoners": False},
        {"external_id": "u2", "vip": True},
    ]
    assert [(e["external_id"], e["name"], e["time"]) for e in body["events"]] == [
        ("u1", "Audience Entered", messages[0]["timestamp"]),
        ("u1", "Audience Exited", messages[1]["timestamp"]),
        ("u2", "Audience Entered", messages[2]["timestamp"]),
    ]
    assert body["events"][0]["properties"] == messages[0]["properties"]


def test_braze_never_exceeds_75_objects_per_array_and_skips_anonymous_profiles() -> None:
    braze = destination(type="braze", url="https://b", api_key="k")
    messages = [output_message(f"u{i}") for i in range(160)]
    messages.append(output_message("anon", anonymous=True))
    rendered = render_requests(braze, messages)
    sizes = [len(orjson.loads(r.body)["events"]) for r in rendered.requests]
    assert sizes == [75, 75, 10]
    assert rendered.skipped == (160,)


def test_customerio_track_api_v1_attributes_and_events() -> None:
    cio = destination(type="customerio", site_id="site", api_key="key", hash_pii=True)
    message = output_message("user/1", email="Person@Example.com")
    put, post = render_requests(cio, [message]).requests
    auth = "Basic " + base64.b64encode(b"site:key").decode()
    assert (put.method, put.url) == ("PUT", "https://track.customer.io/api/v1/customers/user%2F1")
    assert orjson.loads(put.body) == {"cart_abandoners": True, "email": EMAIL_HASH}
    assert (post.method, post.url) == (
        "POST",
        "https://track.customer.io/api/v1/customers/user%2F1/events",
    )
    assert orjson.loads(post.body) == {
        "name": "Audience Entered",
        "data": message["properties"],
        "timestamp": 1_767_225_600,
    }
    assert ("Authorization", auth) in put.headers and ("Authorization", auth) in post.headers


def test_segment_batch_with_write_key_basic_auth_under_500_kb() -> None:
    segment = destination(type="segment", write_key="wk", mode="both", batch_size=2)
    messages = [output_message(f"u{i}") for i in range(3)]
    first, second = render_requests(segment, messages).requests
    assert first.url == "https://api.segment.io/v1/batch"
    assert ("Authorization", "Basic " + base64.b64encode(b"wk:").decode()) in first.headers
    batch = orjson.loads(first.body)["batch"]
    assert [(m["type"], m["userId"]) for m in batch] == [
        ("track", "u0"),
        ("identify", "u0"),
        ("track", "u1"),
        ("identify", "u1"),
    ]
    assert second.indexes == (2,)
    big = destination(type="segment", write_key="wk", batch_size=2500)
    padding = "x" * 20_000
    heavy = [{**output_message(f"u{i}"), "padding": padding} for i in range(60)]
    requests = render_requests(big, heavy).requests
    assert len(requests) > 1
    assert all(len(r.body) <= SEGMENT_MAX_BATCH_BYTES + 20 for r in requests)
    assert sum(len(r.indexes) for r in requests) == 60


def test_kafka_records_keyed_by_user_in_the_output_format() -> None:
    kafka = destination(type="kafka", topic="out", mode="both")
    [request] = render_requests(kafka, [output_message("u1")]).requests
    assert request.method == "PRODUCE" and request.url == "out"
    (key1, track), (key2, identify) = request.records
    assert key1 == key2 == b"u1"
    assert orjson.loads(track) == output_message("u1")
    assert orjson.loads(identify)["type"] == "identify"


@pytest.mark.parametrize("selection", [["vip"], "vip"])
def test_audience_selection_skips_other_audiences(selection: Any) -> None:
    hook = destination(type="webhook", url="http://h", audiences=selection)
    rendered = render_requests(hook, [output_message("u1"), output_message("u2", audience="vip")])
    assert rendered.skipped == (0,)
    assert [r.indexes for r in rendered.requests] == [(1,)]


# -- deletions (SPEC §4/§6): forwarded whatever `audiences` selects, unless opted out ----------


def test_braze_deletion_is_users_delete_between_the_track_requests_around_it() -> None:
    braze = destination(type="braze", url="https://rest.braze", api_key="k", audiences=["vip"])
    messages = [
        output_message("u1", audience="vip", entered=False),
        deleted_message("u1"),
        deleted_message("u2"),  # never in `vip`: deleted there too
        deleted_message("a9", anonymous=True),  # Braze needs an external id: skipped
        output_message("u3", audience="vip"),
    ]
    rendered = render_requests(braze, messages)
    assert rendered.skipped == (3,)
    track, delete, track2 = rendered.requests
    assert (track.url, track.indexes, track2.indexes) == (
        "https://rest.braze/users/track",
        (0,),
        (4,),
    )
    assert (delete.method, delete.url, delete.indexes) == (
        "POST",
        "https://rest.braze/users/delete",
        (1, 2),
    )
    assert orjson.loads(delete.body) == {"external_ids": ["u1", "u2"]}
    assert dict(delete.headers)["Authorization"] == "Bearer k"
    assert delete.absent_ok and not track.absent_ok


def test_braze_deletes_at_most_50_users_per_request() -> None:
    braze = destination(type="braze", url="https://rest.braze", api_key="k")
    requests = render_requests(braze, [deleted_message(f"u{i}") for i in range(120)]).requests
    assert [len(orjson.loads(r.body)["external_ids"]) for r in requests] == [50, 50, 20]
    assert [i for r in requests for i in r.indexes] == list(range(120))


def test_customerio_deletion_is_delete_customer_with_basic_auth() -> None:
    cio = destination(type="customerio", site_id="s", api_key="k", audiences=["vip"])
    messages = [deleted_message("user/1"), deleted_message("a1", anonymous=True)]
    rendered = render_requests(cio, messages)
    assert rendered.skipped == (1,)
    [request] = rendered.requests
    assert (request.method, request.url, request.body) == (
        "DELETE",
        "https://track.customer.io/api/v1/customers/user%2F1",
        b"",
    )
    token = base64.b64encode(b"s:k").decode()
    assert dict(request.headers) == {"Authorization": f"Basic {token}"}
    assert request.absent_ok


@pytest.mark.parametrize("mode", ["track", "identify", "both"])
def test_webhook_gets_the_user_deleted_message_itself_whatever_its_mode(mode: str) -> None:
    hook = destination(type="webhook", url="http://h", secret=SECRET, mode=mode, audiences=["vip"])
    message = deleted_message("a1", anonymous=True, linked_to="u1")
    [request] = render_requests(hook, [message]).requests
    assert orjson.loads(request.body) == message
    assert request.webhook_id == message["messageId"] and not request.absent_ok
    headers = dict(webhook_headers(hook, request, 1_700_000_000))
    assert headers["webhook-signature"] == sign_webhook(
        SECRET, message["messageId"], 1_700_000_000, request.body
    )


def test_segment_forwards_the_user_deleted_track_call_in_its_batch() -> None:
    segment = destination(type="segment", write_key="wk", mode="both", audiences=["vip"])
    messages = [output_message("u1", audience="vip"), deleted_message("u1")]
    [request] = render_requests(segment, messages).requests
    batch = orjson.loads(request.body)["batch"]
    assert [(m["type"], m.get("event")) for m in batch] == [
        ("track", "Audience Entered"),
        ("identify", None),
        ("track", "User Deleted"),
    ]
    assert batch[2] == messages[1]


def test_kafka_deletion_is_a_delete_record_keyed_by_the_id() -> None:
    kafka = destination(type="kafka", topic="out", mode="both", audiences=["vip"])
    user, anonymous = deleted_message("u1"), deleted_message("a1", anonymous=True)
    [request] = render_requests(kafka, [user, anonymous]).requests
    assert [(key, orjson.loads(value)) for key, value in request.records] == [
        (
            b"u1",
            {
                "type": "delete",
                "userId": "u1",
                "messageId": user["messageId"],
                "timestamp": user["timestamp"],
            },
        ),
        (
            b"a1",
            {
                "type": "delete",
                "anonymousId": "a1",
                "messageId": anonymous["messageId"],
                "timestamp": anonymous["timestamp"],
            },
        ),
    ]


@pytest.mark.parametrize(
    "raw",
    [
        {"type": "webhook", "url": "http://h"},
        {"type": "braze", "url": "http://b", "api_key": "k"},
        {"type": "customerio", "site_id": "s", "api_key": "k"},
        {"type": "segment", "write_key": "w"},
        {"type": "kafka", "topic": "t"},
    ],
)
def test_forward_deletions_false_skips_deletions_only(raw: dict[str, Any]) -> None:
    opted_out = destination(**raw, forward_deletions=False)
    rendered = render_requests(opted_out, [deleted_message("u1"), output_message("u1")])
    assert rendered.skipped == (0,)
    assert {i for r in rendered.requests for i in r.indexes} == {1}
    assert render_requests(destination(**raw), [deleted_message("u1")]).skipped == ()
