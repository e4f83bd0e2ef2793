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
from shared import output_message

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
