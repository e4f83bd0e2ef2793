"""Rendering output messages into each destination's documented request shape (pure)."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import orjson
import pytest

from audiences.adapters.sinks.config import Destination, parse_destinations
from audiences.adapters.sinks.pii import hash_phone, hash_pii, normalise_phone
from audiences.adapters.sinks.render import (
    CROCKFORD,
    SEGMENT_MAX_BATCH_BYTES,
    SEGMENT_MAX_EVENT_BYTES,
    event_ulid,
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


# sha256("14155552671"): Meta's `ph` form of +1 415-555-2671 (country code, digits only)
PHONE_HASH = hashlib.sha256(b"14155552671").hexdigest()


@pytest.mark.parametrize(
    ("phone", "region", "normalised"),
    [
        ("+1 415-555-2671", "US", "14155552671"),
        ("(415) 555-2671", "US", "14155552671"),  # no country code: the region's
        (" 415.555.2671 ", "US", "14155552671"),
        ("001 415 555 2671", "GB", "14155552671"),  # 00: the UK's international prefix
        ("020 7946 0958", "GB", "442079460958"),  # the trunk 0 dropped
        ("+44 20 7946 0958", "US", "442079460958"),  # its own country code wins
        ("06 12 34 56 78", "FR", "33612345678"),
        ("+33 (0)6 12 34 56 78", "US", "33612345678"),
        ("tel: +1 415 555 2671", "US", "14155552671"),
        ("12", "US", "12"),  # not a possible number: its digits
        ("ext. 12-34", "US", "1234"),
        ("n/a", "US", "n/a"),  # no digit at all: the trimmed lower-cased text
        (" NONE ", "US", "none"),
    ],
)
def test_phone_numbers_are_normalised_to_e164_digits(
    phone: str, region: str, normalised: str
) -> None:
    assert normalise_phone(phone, region) == normalised
    assert hash_phone(phone, region) == hashlib.sha256(normalised.encode()).hexdigest()


def test_phone_hashing_edge_cases_never_raise() -> None:
    assert hash_phone(PHONE_HASH) == PHONE_HASH  # already hashed: passes through
    assert hash_phone(f" {PHONE_HASH.upper()} ") == PHONE_HASH.upper()
    for junk in ("", " ", "+", "++1", "1" * 10_000, "+" + "9" * 300, "٤١٥٥٥٥٢٦٧١", "\x00"):
        assert len(hash_phone(junk)) == 64


def test_hash_pii_destinations_send_phones_as_hashed_e164_digits_in_their_region() -> None:
    message = output_message("u1", email="Person@Example.com")
    message["context"]["traits"]["phone"] = "(415) 555-2671"
    hook = destination(type="webhook", url="http://h", hash_pii=True)
    [request] = render_requests(hook, [message]).requests
    assert orjson.loads(request.body)["context"]["traits"] == {
        "email": EMAIL_HASH,
        "phone": PHONE_HASH,
    }
    uk = destination(
        type="segment", write_key="wk", hash_pii=True, phone_region="GB", mode="identify"
    )
    message["context"]["traits"]["phone"] = "020 7946 0958"
    [request] = render_requests(uk, [message]).requests
    [identify] = orjson.loads(request.body)["batch"]
    assert identify["traits"]["phone"] == hashlib.sha256(b"442079460958").hexdigest()
    message["context"]["traits"]["phone"] = "+1 415 555 2671"
    [request] = render_requests(hook, [message]).requests
    assert orjson.loads(request.body)["context"]["traits"]["phone"] == PHONE_HASH
    plain = destination(type="webhook", url="http://h")  # no hash_pii: sent as is
    [request] = render_requests(plain, [message]).requests
    assert orjson.loads(request.body)["context"]["traits"]["phone"] == "+1 415 555 2671"


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


def test_webhook_batches_are_arrays_identified_by_all_their_message_ids() -> None:
    hook = destination(type="webhook", url="http://h", batch_size=2, mode="both")
    messages = [output_message(f"u{i}") for i in range(3)]
    first, second = render_requests(hook, messages).requests
    assert first.indexes == (0, 1) and second.indexes == (2,)
    units = orjson.loads(first.body)
    assert [u["type"] for u in units] == ["track", "identify", "track", "identify"]
    ids = [u["messageId"] for u in units]
    assert first.webhook_id == "msg_" + hashlib.sha256(orjson.dumps(ids)).hexdigest()
    assert "webhook-signature" not in dict(webhook_headers(hook, first, 1))  # no secret
    # a batch sharing its first message with another is not the same webhook (a receiver
    # deduplicating on webhook-id would drop the second one's other messages)
    [other] = render_requests(hook, [messages[0], output_message("u9")]).requests
    assert other.webhook_id != first.webhook_id
    assert render_requests(hook, messages).requests[0].webhook_id == first.webhook_id  # stable
    # a batch holding one message keeps its messageId
    tracks = destination(type="webhook", url="http://h", batch_size=2)
    _, single = render_requests(tracks, messages).requests
    assert single.webhook_id == messages[2]["messageId"]


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
    cio = destination(type="customerio", site_id="site", api_key="key")
    message = output_message("user/1", email="Person@Example.com")
    put, post = render_requests(cio, [message]).requests
    auth = "Basic " + base64.b64encode(b"site:key").decode()
    assert (put.method, put.url) == ("PUT", "https://track.customer.io/api/v1/customers/user%2F1")
    # the address Customer.io sends to, as given (hash_pii is refused for customerio)
    assert orjson.loads(put.body) == {"cart_abandoners": True, "email": "Person@Example.com"}
    assert (post.method, post.url) == (
        "POST",
        "https://track.customer.io/api/v1/customers/user%2F1/events",
    )
    assert orjson.loads(post.body) == {
        "name": "Audience Entered",
        "id": event_ulid(message),
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
    assert all(len(r.body) <= SEGMENT_MAX_BATCH_BYTES for r in requests)
    assert sum(len(r.indexes) for r in requests) == 60


def test_segment_batches_fill_up_to_exactly_500000_bytes() -> None:
    """Events of a size that makes 16 of them fit under 500,000 bytes and 17 not: the
    body limit is counted to the byte (brackets and commas included)."""
    big = destination(type="segment", write_key="wk", batch_size=2500)
    one = len(orjson.dumps({**output_message("u00"), "padding": ""}))
    padding = "x" * (29_500 - one)
    heavy = [{**output_message(f"u{i:02}"), "padding": padding} for i in range(40)]
    assert all(len(orjson.dumps(m)) == 29_500 for m in heavy)
    requests = render_requests(big, heavy).requests
    assert [len(r.indexes) for r in requests] == [16, 16, 8]
    assert len(requests[0].body) == 16 * 29_500 + 15 + len(b'{"batch":[]}')  # 17 would be 501,528


def test_segment_refuses_an_event_over_32_kb_instead_of_sending_it() -> None:
    segment = destination(type="segment", write_key="wk", mode="both")
    small, huge, after = (output_message(f"u{i}") for i in range(3))
    huge["properties"] = {**huge["properties"], "padding": "x" * SEGMENT_MAX_EVENT_BYTES}
    rendered = render_requests(segment, [small, huge, after])
    [request] = rendered.requests
    assert request.indexes == (0, 2)
    [(index, why)] = rendered.refused
    assert index == 1 and "over Segment's 32768 bytes per event" in why
    # 32 KB exactly is still sent
    edge = output_message("u4")
    size = len(orjson.dumps({**edge, "properties": {**edge["properties"], "padding": ""}}))
    edge["properties"] = {**edge["properties"], "padding": "x" * (SEGMENT_MAX_EVENT_BYTES - size)}
    tracks = destination(type="segment", write_key="wk")
    assert render_requests(tracks, [edge]).refused == ()


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


def test_hash_pii_never_sends_a_contact_trait_in_clear() -> None:
    """A phone given as a JSON number is hashed as its digits; a value that is no string
    (list, object, float) is left out rather than sent unhashed."""
    message = output_message("u1")
    message["context"]["traits"] = {"phone": 14155552671, "email": ["a@b.c"], "plan": "pro"}
    hook = destination(type="webhook", url="http://h", hash_pii=True, mode="both", batch_size=2)
    [request] = render_requests(hook, [message]).requests
    track, identify = orjson.loads(request.body)
    assert track["context"]["traits"] == {"phone": PHONE_HASH, "plan": "pro"}
    assert identify["traits"] == {"phone": PHONE_HASH, "cart_abandoners": True}
    message["context"]["traits"] = {"phone": 4.15e9, "email": {"x": 1}}
    [request] = render_requests(hook, [message]).requests
    track, identify = orjson.loads(request.body)
    assert track["context"]["traits"] == {}
    assert identify["traits"] == {"cart_abandoners": True}


def test_braze_cuts_requests_by_objects_not_messages() -> None:
    # identify only: one attributes object per profile, however many messages it has
    attributes_only = destination(
        type="braze", url="https://b", api_key="k", mode="identify", batch_size=300
    )
    messages = [output_message(f"u{i % 3}", seq=i) for i in range(150)]
    [request] = render_requests(attributes_only, messages).requests
    body = orjson.loads(request.body)
    assert [a["external_id"] for a in body["attributes"]] == ["u0", "u1", "u2"]
    assert "events" not in body and request.indexes == tuple(range(150))
    assert request.objects["attributes"][1] == tuple(range(1, 150, 3))  # u1's messages
    # track only: one event per message, at most 75 per request
    events_only = destination(
        type="braze", url="https://b", api_key="k", mode="track", batch_size=300
    )
    requests = render_requests(events_only, messages).requests
    assert [len(orjson.loads(r.body)["events"]) for r in requests] == [75, 75]
    assert requests[1].objects["events"][0] == (75,)
    # both: each message is an attributes object (new profile) and an event
    both = destination(type="braze", url="https://b", api_key="k", batch_size=1000)
    many = [output_message(f"u{i}") for i in range(200)]
    requests = render_requests(both, many).requests
    bodies = [orjson.loads(r.body) for r in requests]
    assert [(len(b["attributes"]), len(b["events"])) for b in bodies] == [
        (75, 75),
        (75, 75),
        (50, 50),
    ]
    # a contract counting objects combined: 50 objects = 25 messages of two objects
    combined = destination(
        type="braze", url="https://b", api_key="k", batch_size=1000, objects_per_request=50
    )
    bodies = [orjson.loads(r.body) for r in render_requests(combined, many[:60]).requests]
    assert [len(b["attributes"]) + len(b["events"]) for b in bodies] == [50, 50, 20]
    # batch_size still caps the messages of one request
    small = destination(type="braze", url="https://b", api_key="k", batch_size=10)
    assert [len(r.indexes) for r in render_requests(small, many[:25]).requests] == [10, 10, 5]


def test_braze_update_existing_only_and_anonymous_profiles_as_user_alias() -> None:
    messages = [output_message("u1"), output_message("anon-1", anonymous=True)]
    plain = destination(type="braze", url="https://b", api_key="k")
    rendered = render_requests(plain, messages)
    assert rendered.skipped == (1,)  # no label: Braze cannot address an anonymous profile
    assert "_update_existing_only" not in orjson.loads(rendered.requests[0].body)["attributes"][0]
    aliased = destination(
        type="braze",
        url="https://b",
        api_key="k",
        anonymous_alias_label="audiences_anonymous_id",
        update_existing_only=True,
    )
    rendered = render_requests(aliased, messages)
    assert rendered.skipped == ()
    body = orjson.loads(rendered.requests[0].body)
    alias = {"alias_name": "anon-1", "alias_label": "audiences_anonymous_id"}
    assert body["attributes"] == [
        {"external_id": "u1", "_update_existing_only": True, "cart_abandoners": True},
        {"user_alias": alias, "_update_existing_only": True, "cart_abandoners": True},
    ]
    assert [e.get("external_id") or e["user_alias"] for e in body["events"]] == ["u1", alias]
    # without update_existing_only, alias objects say false: Braze creates alias-only
    # profiles only when told so
    creating = destination(type="braze", url="https://b", api_key="k", anonymous_alias_label="anon")
    body = orjson.loads(render_requests(creating, messages).requests[0].body)
    assert "_update_existing_only" not in body["attributes"][0]
    assert body["attributes"][1]["_update_existing_only"] is False
    # deleting an anonymous profile deletes its alias (one kind of identifier per request)
    deletions = [deleted_message("anon-1", anonymous=True), deleted_message("u1")]
    deletions.append(deleted_message("anon-1", anonymous=True))
    by_id, by_alias = render_requests(aliased, deletions).requests
    assert orjson.loads(by_id.body) == {"external_ids": ["u1"]} and by_id.indexes == (1,)
    assert orjson.loads(by_alias.body) == {"user_aliases": [alias]}
    assert by_alias.indexes == (0, 2) and by_alias.url == "https://b/users/delete"
    assert render_requests(plain, deletions[:1]).skipped == (0,)  # no label: skipped


def test_customerio_event_id_is_a_ulid_derived_from_the_message_id() -> None:
    first = output_message("u1", seq=1)
    again = dict(first)
    other = output_message("u1", seq=2)
    ulid = event_ulid(first)
    assert len(ulid) == 26 and set(ulid) <= set(CROCKFORD) and ulid[0] in "01234567"
    assert event_ulid(again) == ulid  # a redelivery carries the same dedupe key
    assert event_ulid(other) != ulid
    # the first 10 characters are the event time in milliseconds (ULID's timestamp)
    stamp = 0
    for char in ulid[:10]:
        stamp = stamp * 32 + CROCKFORD.index(char)
    assert stamp == 1_767_225_600_000
    garbage = {"messageId": None, "timestamp": "not a time"}
    assert event_ulid(garbage)[:10] == "0000000000"


def test_customerio_batch_size_over_1_uses_track_api_v2_batch() -> None:
    cio = destination(type="customerio", site_id="site", api_key="key", batch_size=2)
    messages = [output_message("u1", email="a@example.com"), output_message("u2")]
    messages.append(deleted_message("u3"))
    first, second = render_requests(cio, messages).requests
    auth = "Basic " + base64.b64encode(b"site:key").decode()
    assert (first.method, first.url) == ("POST", "https://track.customer.io/api/v2/batch")
    assert ("Authorization", auth) in first.headers
    batch = orjson.loads(first.body)["batch"]
    person = {"type": "person", "identifiers": {"id": "u1"}}
    assert batch[0] == {
        **person,
        "action": "identify",
        "attributes": {"email": "a@example.com", "cart_abandoners": True},
    }
    assert batch[1] == {
        **person,
        "action": "event",
        "name": "Audience Entered",
        "id": event_ulid(messages[0]),
        "timestamp": 1_767_225_600,
        "attributes": messages[0]["properties"],
    }
    assert [item["identifiers"]["id"] for item in batch] == ["u1", "u1", "u2", "u2"]
    assert first.objects["batch"] == ((0,), (0,), (1,), (1,)) and first.indexes == (0, 1)
    assert orjson.loads(second.body)["batch"] == [
        {"type": "person", "identifiers": {"id": "u3"}, "action": "delete"}
    ]


def test_customerio_batches_stay_under_500_kb() -> None:
    cio = destination(type="customerio", site_id="s", api_key="k", batch_size=100)
    padding = "x" * 30_000
    heavy = []
    for i in range(40):
        message = output_message(f"u{i}")
        message["properties"] = {**message["properties"], "padding": padding}
        heavy.append(message)
    requests = render_requests(cio, heavy).requests
    assert len(requests) > 1
    assert all(len(r.body) < 500_000 for r in requests)
    assert sum(len(r.indexes) for r in requests) == 40
