"""The collector's request handling without I/O (SPEC §7): auth, bodies, limits,
enrichment and the time fields the evaluator reads back."""

from __future__ import annotations

import base64
import gzip
import itertools
from typing import Any

import orjson
import pytest
from factories import T0, iso

from audiences.adapters.http import intake
from audiences.core.events import MAX_EVENT_BYTES, parse_event, parse_iso_ms
from audiences.errors import RejectedRequest

S = 1_000
KEYS = [b"key-one", b"key-two"]


def ids() -> Any:
    counter = itertools.count(1)
    return lambda: f"gen-{next(counter)}"


def rejected(call: Any, *args: Any) -> RejectedRequest:
    with pytest.raises(RejectedRequest) as info:
        call(*args)
    return info.value


def one(kind: str, body: dict[str, Any], received: int = T0) -> dict[str, Any]:
    taken = intake.events(kind, body, received, ids())
    assert not taken.rejected, taken.rejected
    [record] = taken.records
    return orjson.loads(record.value)


def dead(kind: str, body: dict[str, Any], received: int = T0) -> intake.Rejected:
    """The dead letter of a call whose only event is invalid."""
    taken = intake.events(kind, body, received, ids())
    assert taken.records == []
    [rejected] = taken.rejected
    return rejected


def basic(user: str, password: str = "") -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# -- endpoints and auth -----------------------------------------------------------------


def test_every_call_and_its_analytics_js_short_form_is_routed() -> None:
    for kind in ("track", "identify", "page", "screen", "group", "alias"):
        assert intake.ENDPOINTS[kind] == kind
        assert intake.ENDPOINTS[kind[0]] == kind
    assert intake.ENDPOINTS["batch"] == intake.ENDPOINTS["b"] == "batch"
    assert "delete" not in intake.ENDPOINTS and "d" not in intake.ENDPOINTS


def test_basic_auth_carries_the_write_key_as_user_name() -> None:
    assert intake.key_from_authorization(basic("key-two")) == "key-two"
    assert intake.key_from_authorization(basic("key-one", "ignored")) == "key-one"
    intake.check_write_key(intake.key_from_authorization(basic("key-two")), KEYS)


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("Bearer abc", "Authorization must be HTTP Basic"),
        ("Basic", "Authorization must be HTTP Basic"),
        ("Basic !!notbase64!!", "malformed Basic credentials"),
    ],
)
def test_malformed_authorization_is_401(header: str, message: str) -> None:
    error = rejected(intake.key_from_authorization, header)
    assert (error.status, error.code) == (401, "unauthorized")
    assert message in error.message


def test_wrong_key_is_401_and_every_configured_key_works() -> None:
    for key in KEYS:
        intake.check_write_key(key.decode(), KEYS)
    for wrong in ("key-three", "key-on", "key-one ", ""):
        error = rejected(intake.check_write_key, wrong, KEYS)
        assert (error.status, error.message) == (401, "invalid write key")


def test_write_key_in_the_body_and_missing_key() -> None:
    assert intake.key_from_body({"writeKey": "key-one"}) == "key-one"
    for body in ({}, {"writeKey": ""}, {"writeKey": 7}):
        error = rejected(intake.key_from_body, body)
        assert error.status == 401 and "missing write key" in error.message


def test_keys_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[bytes, bytes]] = []

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return a == b

    monkeypatch.setattr(intake.hmac, "compare_digest", spy)
    intake.check_write_key("key-one", KEYS)
    assert compared == [(b"key-one", b"key-one"), (b"key-one", b"key-two")]  # no early exit


# -- bodies and limits ------------------------------------------------------------------


def test_gzip_bodies_are_decoded() -> None:
    data = orjson.dumps({"userId": "u1", "event": "E"})
    assert intake.decode_body(gzip.compress(data), "gzip") == data
    assert intake.decode_body(data, None) == data
    assert intake.decode_body(data, "identity") == data


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"definitely not gzip", "body is not valid gzip"),
        (gzip.compress(b'{"userId": "u1"}')[:-12], "body is not valid gzip: truncated stream"),
    ],
)
def test_gzip_garbage_is_400(raw: bytes, message: str) -> None:
    error = rejected(intake.decode_body, raw, "gzip")
    assert error.status == 400 and message in error.message


def test_unknown_content_encoding_is_400() -> None:
    error = rejected(intake.decode_body, b"{}", "br")
    assert error.status == 400 and "unsupported Content-Encoding 'br'" in error.message


def test_size_limits_apply_to_the_decoded_body_and_stop_inflating() -> None:
    bomb = gzip.compress(b" " * (50 * 1024 * 1024))  # 50 MB of spaces, ~50 KB gzipped
    error = rejected(intake.decode_body, bomb, "gzip")
    assert error.message == "body is over the 500 KB limit (512000 bytes)"
    error = rejected(intake.decode_body, b" " * (intake.MAX_BODY_BYTES + 1), None)
    assert error.status == 400
    assert intake.decode_body(b" " * intake.MAX_BODY_BYTES, None)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"{not json", "invalid JSON"),
        (b"", "invalid JSON"),
        (b"[1, 2]", "body must be a JSON object"),
    ],
)
def test_invalid_json_is_400(data: bytes, message: str) -> None:
    error = rejected(intake.parse_body, data)
    assert error.status == 400 and error.message.startswith(message)


# -- events -----------------------------------------------------------------------------


def test_single_call_is_typed_by_its_endpoint_keyed_by_user_and_enriched() -> None:
    [record] = intake.events(
        "track",
        {"type": "identify", "userId": "u1", "event": "Signed Up", "writeKey": "key-one"},
        T0,
        ids(),
    ).records
    event = orjson.loads(record.value)
    assert record.key == b"u1" and record.type == "track"
    assert event["type"] == "track"
    assert event["messageId"] == "gen-1"
    assert event["receivedAt"] == iso(T0)
    assert "writeKey" not in event


def test_key_is_user_id_else_anonymous_id_as_the_evaluator_reads_it() -> None:
    def key(body: dict[str, Any]) -> bytes:
        return intake.events("identify", body, T0, ids()).records[0].key

    assert key({"userId": "u1", "anonymousId": "a1"}) == b"u1"
    assert key({"userId": "", "anonymousId": "a1"}) == b"a1"
    assert key({"anonymousId": "a1"}) == b"a1"
    assert key({"userId": 42}) == b"42"
    body = {"userId": 42, "anonymousId": "a1"}
    assert key(body) == parse_event(one("identify", body), T0).key.encode()


def test_client_message_id_is_kept() -> None:
    assert one("identify", {"userId": "u1", "messageId": "m-1"})["messageId"] == "m-1"
    assert one("identify", {"userId": "u1", "messageId": ""})["messageId"] == "gen-1"


@pytest.mark.parametrize(
    ("fields", "timestamp", "original"),
    [
        # client clock 10 s fast: sent 1 s after the event, received at T0
        (
            {"timestamp": iso(T0 + 9 * S), "sentAt": iso(T0 + 10 * S)},
            T0 - 1 * S,
            iso(T0 + 9 * S),
        ),
        ({"originalTimestamp": iso(T0 - 5 * S), "sentAt": iso(T0)}, T0 - 5 * S, iso(T0 - 5 * S)),
        # no client event time: it happened when sent
        ({"sentAt": iso(T0 + 60 * S)}, T0, iso(T0 + 60 * S)),
        # no sentAt: nothing to correct
        ({"timestamp": iso(T0 - 3 * S)}, T0 - 3 * S, None),
        ({"originalTimestamp": iso(T0 - 3 * S)}, T0 - 3 * S, iso(T0 - 3 * S)),
        ({}, T0, None),
    ],
    ids=["skewed", "original", "sent-only", "no-sentAt", "original-only", "none"],
)
def test_timestamp_is_skew_corrected_once(
    fields: dict[str, Any], timestamp: int, original: str | None
) -> None:
    event = one("track", {"userId": "u1", "event": "E", **fields})
    assert event["receivedAt"] == iso(T0)
    assert event["timestamp"] == iso(timestamp)
    assert event.get("originalTimestamp") == original
    # the evaluator re-derives the same time from the record, whenever it reads it
    for record_time in (T0, T0 + 3_600 * S):
        assert parse_event(orjson.dumps(event), record_time).timestamp_ms == timestamp


def test_unreadable_times_are_dead_lettered_naming_the_field() -> None:
    letter = dead("track", {"userId": "u1", "event": "E", "sentAt": "yesterday"})
    assert letter.reason == "bad_timestamp"
    assert letter.detail == "sentAt: not an ISO-8601 time: 'yesterday'"
    [letter] = intake.events(
        "batch", {"batch": [{"type": "page", "userId": "u", "timestamp": []}]}, T0, ids()
    ).rejected
    assert letter.detail == "batch[0].timestamp: not an ISO-8601 time: []"


@pytest.mark.parametrize(
    ("kind", "body", "reason", "message"),
    [
        ("track", {"event": "E"}, "missing_user", "userId: userId or anonymousId is required"),
        ("track", {"userId": "", "anonymousId": None, "event": "E"}, "missing_user", "userId: "),
        ("track", {"userId": "u1"}, "missing_event", "event: track events need a non-empty"),
        ("track", {"userId": "u1", "event": ""}, "missing_event", "event: track events need"),
        ("track", {"userId": ["u1"], "event": "E"}, "bad_field", "userId: userId must be a"),
        ("track", {"userId": "u1", "event": "E", "properties": 3}, "bad_field", "properties: "),
        ("page", {"userId": "u1", "name": 5}, "bad_field", "name: name must be a string"),
        ("group", {"userId": "u1"}, "missing_field", "groupId: required for group calls"),
        ("alias", {"userId": "u1"}, "missing_field", "previousId: required for alias calls"),
    ],
)
def test_an_invalid_single_call_is_dead_lettered_with_its_reason_and_field(
    kind: str, body: dict[str, Any], reason: str, message: str
) -> None:
    letter = dead(kind, {**body, "writeKey": "key-one"})
    assert letter.reason == reason
    assert letter.detail.startswith(message), letter.detail
    assert orjson.loads(letter.value) == body  # as sent, less the write key


def test_dead_letters_are_keyed_by_the_user_they_name() -> None:
    assert dead("track", {"userId": "u1"}).key == b"u1"
    assert dead("track", {"userId": 42}).key == b"42"
    assert dead("track", {"userId": "", "anonymousId": "a1"}).key == b"a1"
    assert dead("track", {"event": "E"}).key is None
    assert dead("track", {"userId": True, "event": "E"}).key is None


def test_batch_items_get_batch_context_sent_at_and_their_own_paths_in_errors() -> None:
    body = {
        "batch": [
            {"type": "track", "userId": "u1", "event": "A", "timestamp": iso(T0 + 9 * S)},
            {
                "type": "identify",
                "anonymousId": "a1",
                "context": {"ip": "1.2.3.4", "library": {"name": "mine"}},
                "sentAt": iso(T0),
            },
        ],
        "context": {"library": {"name": "analytics-python"}, "locale": "en"},
        "integrations": {"All": True},
        "sentAt": iso(T0 + 10 * S),
        "writeKey": "key-one",
    }
    first, second = (orjson.loads(r.value) for r in intake.events("batch", body, T0, ids()).records)
    assert first["context"] == {"library": {"name": "analytics-python"}, "locale": "en"}
    assert second["context"] == {"library": {"name": "mine"}, "locale": "en", "ip": "1.2.3.4"}
    assert first["integrations"] == second["integrations"] == {"All": True}
    assert first["timestamp"] == iso(T0 - 1 * S)  # batch sentAt corrects the skew
    assert second["timestamp"] == iso(T0)
    assert "writeKey" not in first and "writeKey" not in second


@pytest.mark.parametrize(
    "body", [{}, {"batch": {"type": "track"}}, {"batch": "x"}, {"batch": None}]
)
def test_a_batch_that_is_not_a_list_is_400(body: dict[str, Any]) -> None:
    error = rejected(intake.events, "batch", body, T0, ids())
    assert error.status == 400 and error.message == "batch: must be a list of events"


GOOD = {"type": "identify", "userId": "u"}


@pytest.mark.parametrize(
    ("bad", "reason", "message"),
    [
        ("x", "not_an_object", "batch[1]: must be an object"),
        (None, "not_an_object", "batch[1]: must be an object"),
        ({"userId": "u"}, "unknown_type", "batch[1].type: must be one of alias, group, identify"),
        ({"type": "delete", "userId": "u"}, "unknown_type", "batch[1].type: must be one of"),
        ({"type": "track", "userId": "u"}, "missing_event", "batch[1].event: track events need"),
        ({"type": "page"}, "missing_user", "batch[1].userId: userId or anonymousId is required"),
        ({"type": "group", "userId": "u"}, "missing_field", "batch[1].groupId: required"),
    ],
)
def test_an_invalid_batch_item_is_dead_lettered_and_its_neighbours_kept(
    bad: Any, reason: str, message: str
) -> None:
    body = {"batch": [GOOD, bad, {**GOOD, "userId": "v"}], "writeKey": "key-one"}
    taken = intake.events("batch", body, T0, ids())
    assert [r.key for r in taken.records] == [b"u", b"v"]
    [letter] = taken.rejected
    assert letter.reason == reason
    assert letter.detail.startswith(message), letter.detail
    assert orjson.loads(letter.value) == bad  # the item as sent, not enriched


def test_every_invalid_item_of_a_batch_is_dead_lettered_in_order() -> None:
    items = [{"type": "track", "userId": f"u{n}"} for n in range(3)]
    taken = intake.events("batch", {"batch": [*items, GOOD]}, T0, ids())
    assert [r.key for r in taken.records] == [b"u"]
    assert [r.detail.split(":")[0] for r in taken.rejected] == [
        "batch[0].event",
        "batch[1].event",
        "batch[2].event",
    ]


def test_empty_batch_has_no_records() -> None:
    assert intake.events("batch", {"batch": []}, T0, ids()) == intake.Intake([], [])


def test_event_over_32_kb_once_enriched_is_dead_lettered_as_oversized() -> None:
    body = {"userId": "u1", "event": "E", "properties": {"blob": "x" * (MAX_EVENT_BYTES - 80)}}
    letter = dead("track", body)
    assert letter.reason == "oversized" and letter.key == b"u1"
    assert "over the 32 KB limit per event (32768 bytes)" in letter.detail
    assert orjson.loads(letter.value) == body
    batch = {"batch": [GOOD, {**body, "type": "track"}]}
    taken = intake.events("batch", batch, T0, ids())
    assert len(taken.records) == 1
    [letter] = taken.rejected
    assert letter.detail.startswith("batch[1]: ") and "over the 32 KB limit" in letter.detail


def test_received_at_is_server_time_even_when_the_client_sends_one() -> None:
    event = one("identify", {"userId": "u1", "receivedAt": iso(T0 - 99 * S)})
    assert event["receivedAt"] == iso(T0)
    assert parse_iso_ms(event["timestamp"]) == T0


# -- out-of-range numbers and future times (SPEC §11): dead letters naming the item, never a 500


@pytest.mark.parametrize(
    ("item", "reason", "message"),
    [
        ({"timestamp": 1e20}, "bad_timestamp", "timestamp: timestamp is outside 1970..9999"),
        ({"timestamp": 2**70}, "bad_timestamp", "timestamp: timestamp is outside 1970..9999"),
        ({"timestamp": -1}, "bad_timestamp", "timestamp: timestamp is outside 1970..9999"),
        ({"originalTimestamp": 1e20, "sentAt": iso(T0)}, "bad_timestamp", "timestamp: timestamp"),
        ({"sentAt": -(2**62), "timestamp": iso(T0)}, "bad_timestamp", "timestamp: sentAt is"),
        ({"timestamp": "99999-01-01T00:00:00Z"}, "bad_timestamp", "timestamp: not an ISO-8601"),
        ({"timestamp": float("nan")}, "bad_timestamp", "timestamp: not an ISO-8601 time"),
        ({"timestamp": float("inf")}, "bad_timestamp", "timestamp: not an ISO-8601 time"),
        ({"properties": {"n": 2**64}}, "bad_field", "batch[1]: cannot be written as JSON"),
    ],
)
def test_numbers_outside_64_bits_or_iso_are_dead_lettered_for_their_item(
    item: dict[str, Any], reason: str, message: str
) -> None:
    good = {"type": "track", "userId": "u1", "event": "E"}
    body = {"batch": [good, {**good, **item}]}
    taken = intake.events("batch", body, T0, ids())
    assert len(taken.records) == 1
    [letter] = taken.rejected
    expected = message if message.startswith("batch[1]") else f"batch[1].{message}"
    assert letter.reason == reason
    assert letter.detail.startswith(expected), letter.detail
    assert letter.key == b"u1" and letter.value  # written whatever the numbers


def test_uint64_numbers_are_accepted_as_orjson_reads_them() -> None:
    value = one("track", {"userId": "u1", "event": "E", "properties": {"n": 2**64 - 1}})
    assert value["properties"]["n"] == 2**64 - 1
    # beyond that, orjson reads a float (and 1e400, NaN, Infinity are invalid JSON)
    assert isinstance(orjson.loads(b"18446744073709551616"), float)
    for data in (b"1e400", b"NaN", b"Infinity"):
        assert rejected(intake.parse_body, data).status == 400


def test_an_event_stamped_more_than_24_h_after_receipt_is_dead_lettered() -> None:
    day = 24 * 3600 * S
    ahead = one("track", {"userId": "u1", "event": "E", "timestamp": iso(T0 + day - 1)})
    assert ahead["timestamp"] == iso(T0 + day - 1)  # within the tolerance: accepted
    letter = dead("track", {"userId": "u1", "event": "E", "timestamp": iso(T0 + day + 1)})
    assert letter.reason == "future_timestamp"
    assert letter.detail.startswith("timestamp: event time")
    # a client clock that is ahead is corrected first (sentAt): not a future event
    skewed = {"userId": "u1", "event": "E", "timestamp": iso(T0 + 2 * day)}
    assert one("track", {**skewed, "sentAt": iso(T0 + 2 * day)})["timestamp"] == iso(T0)
