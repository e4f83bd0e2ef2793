"""Parsing and validation of Segment events (SPEC §2)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson
import pytest
from factories import T0, event_dict, iso, make_event
from hypothesis import given, settings
from hypothesis import strategies as st

from audiences.core.events import (
    MAX_EVENT_BYTES,
    MAX_EVENT_TIME_MS,
    compile_path,
    event_time_ms,
    future_timestamp,
    parse_event,
    parse_iso_ms,
)
from audiences.errors import InvalidEventError


def reason_of(data: bytes | dict) -> str:
    with pytest.raises(InvalidEventError) as info:
        parse_event(data, T0)
    return info.value.reason


# -- accepted ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {"type": "track"},
        {"type": "identify", "event": None, "traits": {"email": "a@example.com"}},
        {"type": "page", "event": None, "name": "Home"},
        {"type": "screen", "event": None, "name": "Cart"},
        {"type": "group", "event": None, "groupId": "g1"},
        {"type": "alias", "event": None, "previousId": "anon-1"},
        {"type": "delete", "event": None},
    ],
    ids=lambda o: o["type"],
)
def test_every_segment_type_and_the_delete_control_are_accepted(overrides: dict) -> None:
    raw = event_dict(**overrides)
    event = parse_event(orjson.dumps(raw), T0)
    assert event.type == overrides["type"]
    assert event.user_id == "u1"
    assert event.key == "u1"
    assert event.raw == raw


def test_track_fields_are_exposed() -> None:
    event = make_event(
        ts=T0 + 5,
        messageId="m-1",
        properties={"cart_id": "A"},
        context={"os": {"name": "iOS"}},
    )
    assert (event.name, event.message_id, event.timestamp_ms) == ("Checkout Started", "m-1", T0 + 5)
    assert event.properties == {"cart_id": "A"}
    assert event.context == {"os": {"name": "iOS"}}
    assert event.traits == {}


def test_page_and_screen_name_is_the_event_name() -> None:
    assert make_event(type="page", event=None, name="Home").name == "Home"
    assert make_event(type="screen", event=None).name is None


def test_anonymous_profile_key() -> None:
    event = make_event(userId=None, anonymousId="anon-1")
    assert (event.user_id, event.anonymous_id, event.key) == (None, "anon-1", "anon-1")


def test_numeric_ids_become_strings() -> None:
    event = make_event(userId=42, messageId=7)
    assert event.user_id == "42"
    assert event.message_id == "7"


def test_event_of_exactly_32_kb_is_accepted() -> None:
    raw = event_dict(properties={"pad": ""})
    filler = MAX_EVENT_BYTES - len(orjson.dumps(raw))
    raw["properties"]["pad"] = "x" * filler
    data = orjson.dumps(raw)
    assert len(data) == MAX_EVENT_BYTES
    assert parse_event(data, T0).properties["pad"] == "x" * filler


# -- rejected, with a reason ---------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"{not json", "undecodable"),
        (b"\xff\xfe", "undecodable"),
        (b"[1, 2]", "not_an_object"),
        (b'"track"', "not_an_object"),
        (orjson.dumps(event_dict(type="trak")), "unknown_type"),
        (orjson.dumps(event_dict(type=None)), "unknown_type"),
        (orjson.dumps(event_dict(userId=None)), "missing_user"),
        (orjson.dumps(event_dict(userId="", anonymousId="")), "missing_user"),
        (orjson.dumps(event_dict(event=None)), "missing_event"),
        (orjson.dumps(event_dict(event="")), "missing_event"),
        (orjson.dumps(event_dict(event=3)), "missing_event"),
        (orjson.dumps(event_dict(userId=1.5)), "bad_field"),
        (orjson.dumps(event_dict(userId=True)), "bad_field"),
        (orjson.dumps(event_dict(anonymousId=["a"])), "bad_field"),
        (orjson.dumps(event_dict(properties="cart")), "bad_field"),
        (orjson.dumps(event_dict(context=[1])), "bad_field"),
        (orjson.dumps(event_dict(type="page", event=None, name=5)), "bad_field"),
        (orjson.dumps(event_dict(timestamp="yesterday")), "bad_timestamp"),
        (orjson.dumps(event_dict(timestamp=None, receivedAt="soon")), "bad_timestamp"),
        (
            orjson.dumps(event_dict(sentAt="later", originalTimestamp=iso(T0))),
            "bad_timestamp",
        ),
    ],
)
def test_rejection_reasons(data: bytes, reason: str) -> None:
    assert reason_of(data) == reason


def test_dicts_are_validated_like_bytes() -> None:
    assert reason_of(event_dict(userId=None)) == "missing_user"
    # JSON that is not an object. (A list passed as such breaks the signature, which
    # the compiled core enforces with a TypeError: callers hand bytes or a dict.)
    assert reason_of(b"[1]") == "not_an_object"


def test_oversized_is_checked_before_decoding() -> None:
    data = b"x" * (MAX_EVENT_BYTES + 1)  # not even JSON: size decides first
    assert reason_of(data) == "oversized"
    raw = event_dict(properties={"pad": ""})
    raw["properties"]["pad"] = "x" * (MAX_EVENT_BYTES + 1 - len(orjson.dumps(raw)))
    assert reason_of(orjson.dumps(raw)) == "oversized"


def test_error_message_carries_reason_and_detail() -> None:
    with pytest.raises(InvalidEventError) as info:
        parse_event(b"[]", T0)
    assert str(info.value).startswith("not_an_object: ")
    assert info.value.detail


# -- event time ----------------------------------------------------------------------


def test_skew_correction_uses_server_receipt_and_client_delay() -> None:
    # the client clock is 1 h fast: it stamped the call at T0+1h and sent it 5 s later;
    # the server received it at T0+2.5s, so the call really happened at T0-2.5s
    original = T0 + 1 * 3_600_000
    sent = original + 5_000
    received = T0 + 2_500
    raw = event_dict(
        timestamp=iso(original),
        originalTimestamp=iso(original),
        sentAt=iso(sent),
        receivedAt=iso(received),
    )
    assert event_time_ms(raw, received_at_ms=0) == received - (sent - original)
    assert parse_event(raw, 0).timestamp_ms == T0 - 2_500


def test_skew_correction_without_received_at_uses_the_receipt_time_given() -> None:
    raw = event_dict(timestamp=None, originalTimestamp=iso(T0), sentAt=iso(T0 + 700))
    assert event_time_ms(raw, received_at_ms=T0 + 10_000) == T0 + 9_300


def test_skew_correction_with_client_timestamp_and_no_original_timestamp() -> None:
    raw = event_dict(timestamp=iso(T0), sentAt=iso(T0 + 700), receivedAt=iso(T0 + 10_000))
    assert event_time_ms(raw, received_at_ms=0) == T0 + 9_300


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"timestamp": iso(T0 + 1), "originalTimestamp": iso(T0 + 2)}, T0 + 1),
        ({"originalTimestamp": iso(T0 + 2), "receivedAt": iso(T0 + 3)}, T0 + 2),
        ({"receivedAt": iso(T0 + 3)}, T0 + 3),
        ({}, T0 + 4),  # the receipt time passed in (the Kafka record time)
        ({"timestamp": T0 + 5}, T0 + 5),  # epoch ms numbers are read too
    ],
    ids=["timestamp", "originalTimestamp", "receivedAt", "argument", "epoch-ms"],
)
def test_event_time_fallback_order(fields: dict, expected: int) -> None:
    raw = event_dict(**{"timestamp": None, **fields})
    assert parse_event(raw, T0 + 4).timestamp_ms == expected


# Out-of-range event times used to parse and then raise later: in `format_iso`, in the
# state codec (orjson refuses ints beyond 64 bits) and in the runtime's due-index.
@pytest.mark.parametrize(
    "fields",
    [
        {"timestamp": 1e20},
        {"timestamp": 10**20},
        {"timestamp": float("inf")},
        {"timestamp": float("-inf")},
        {"timestamp": float("nan")},
        {"timestamp": True},
        {"timestamp": -1},
        {"timestamp": MAX_EVENT_TIME_MS + 1},
        {"timestamp": "1969-12-31T23:59:59.999Z"},
        {"timestamp": "0001-01-01T00:00:00+01:00"},
        {"timestamp": "9999-12-31T23:59:59.999-00:01"},
        {"timestamp": None, "originalTimestamp": 1e300},
        {"timestamp": None, "receivedAt": -5},
        # skew correction: each part readable, the corrected time out of range
        {"originalTimestamp": iso(T0), "sentAt": iso(T0 + 3_000_000_000_000)},
        {"originalTimestamp": iso(0), "sentAt": iso(0), "receivedAt": -1},
        {
            "originalTimestamp": "9999-12-31T23:59:59.999Z",
            "sentAt": iso(T0),
            "receivedAt": iso(T0 + 1),
        },
        # ... or a part itself out of range
        {"originalTimestamp": 1e20, "sentAt": 1e20},
        {"originalTimestamp": iso(T0), "sentAt": iso(T0), "receivedAt": float("nan")},
    ],
    ids=repr,
)
def test_event_times_outside_1970_to_9999_are_bad_timestamps(fields: dict) -> None:
    raw = event_dict(**fields)
    assert reason_of(raw) == "bad_timestamp"
    try:
        wire = orjson.dumps(raw)  # (JSON has no NaN/inf: orjson writes null; no ints > 64 bits)
    except orjson.JSONEncodeError:
        return
    if orjson.loads(wire) == raw:
        assert reason_of(wire) == "bad_timestamp"  # the wire form too


def test_record_time_outside_the_range_is_no_event_time() -> None:
    raw = event_dict(timestamp=None)
    with pytest.raises(InvalidEventError) as info:
        parse_event(raw, -1)  # librdkafka's "no timestamp"
    assert info.value.reason == "bad_timestamp"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        (MAX_EVENT_TIME_MS, MAX_EVENT_TIME_MS),
        (float(T0) + 0.7, T0),
        ("1970-01-01T00:00:00.000Z", 0),
        ("9999-12-31T23:59:59.999Z", MAX_EVENT_TIME_MS),
    ],
)
def test_event_time_range_is_inclusive(value: object, expected: int) -> None:
    event = parse_event(event_dict(timestamp=value), T0)
    assert event.timestamp_ms == expected
    assert iso(event.timestamp_ms)  # formats without raising


def test_parse_iso_ms_never_raises() -> None:
    for value in (float("nan"), float("inf"), float("-inf"), "99999-01-01", "2020-13-01", [1]):
        assert parse_iso_ms(value) is None
    assert parse_iso_ms("1950-06-01T00:00:00Z") < 0  # trait dates before 1970 still compare


def test_iso_parsing_accepts_offsets_and_naive_times_as_utc() -> None:
    assert parse_iso_ms("2023-11-14T22:13:20.000Z") == T0
    assert parse_iso_ms("2023-11-14T23:13:20+01:00") == T0
    assert parse_iso_ms("2023-11-14T22:13:20") == T0
    assert parse_iso_ms("2023-11-14T22:13:20.123456Z") == T0 + 123
    assert parse_iso_ms(True) is None
    assert parse_iso_ms("not a date") is None
    assert iso(T0 + 7) == "2023-11-14T22:13:20.007Z"


def test_iso_parsing_is_exact_to_the_millisecond() -> None:
    for ms in (1_079_337_347_472, 2_183_226_373_411):
        assert parse_iso_ms(iso(ms)) == ms


def reference_iso_ms(value: str) -> int | None:
    """What `parse_iso_ms` gives a string, by `datetime.fromisoformat` alone."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return (parsed - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)


# One character of Segment's shape changed to something `fromisoformat` may or may not
# take: other digits (Unicode ones too), signs, spaces, separators, underscores.
ODD_CHARACTERS = "0123456789+- _:.TZtz\u0663\u00b2\uff11"


@settings(max_examples=400)
@given(
    ms=st.integers(min_value=-62_135_596_800_000, max_value=MAX_EVENT_TIME_MS),
    changes=st.lists(st.tuples(st.integers(0, 23), st.sampled_from(ODD_CHARACTERS)), max_size=2),
)
def test_segment_shaped_times_parse_as_fromisoformat_does(
    ms: int, changes: list[tuple[int, str]]
) -> None:
    """The fast path for `YYYY-MM-DDTHH:MM:SS.mmmZ` gives what `fromisoformat` gives, on
    well-formed times (before 1970 too) and on ones with a character or two changed."""
    text = list(segment_shape(ms))
    for at, char in changes:
        text[at] = char
    value = "".join(text)
    assert len(value) == 24
    assert parse_iso_ms(value) == reference_iso_ms(value), value
    assert parse_iso_ms(value) == reference_iso_ms(value), value  # its minute remembered


def segment_shape(ms: int) -> str:
    """`YYYY-MM-DDTHH:MM:SS.mmmZ` of any epoch ms from year 1 (`format_iso` starts at 1970)."""
    moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def test_segment_shaped_times_out_of_range_are_unreadable() -> None:
    for value in (
        "2023-11-14T22:13:60.000Z",  # a leap second
        "2023-11-14T24:00:00.000Z",
        "2023-02-29T00:00:00.000Z",
        "2023-11-14T22:1a:20.000Z",
        "2023-11-14T22:13:2\u0663.000Z",
    ):
        assert parse_iso_ms(value) is None, value
    assert parse_iso_ms("2024-02-29T23:59:59.999Z") == 1_709_251_199_999


# -- paths ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "compiled"),
    [
        ("cart_id", ("properties", "cart_id")),
        ("items.sku", ("properties", "items", "sku")),
        ("properties.cart_id", ("properties", "cart_id")),
        ("context.os.name", ("context", "os", "name")),
        ("traits.plan", ("traits", "plan")),
        ("event", ("event",)),
    ],
)
def test_compile_path(path: str, compiled: tuple[str, ...]) -> None:
    assert compile_path(path) == compiled


def test_get_follows_compiled_paths() -> None:
    event = make_event(properties={"cart_id": "A", "n": 0, "ok": False}, context={"os": "iOS"})
    assert event.get(compile_path("cart_id")) == "A"
    assert event.get(compile_path("n")) == 0
    assert event.get(compile_path("ok")) is False
    assert event.get(compile_path("missing")) is None
    assert event.get(compile_path("context.os.name")) is None  # os is not an object
    assert event.get(compile_path("event")) == "Checkout Started"


# -- event-time tolerance (SPEC §11) --------------------------------------------------------

HOUR = 3_600_000


@pytest.mark.parametrize(
    ("ahead", "refused"), [(0, False), (23 * HOUR, False), (24 * HOUR, False), (25 * HOUR, True)]
)
def test_an_event_more_than_24_h_after_its_record_time_is_a_future_timestamp(
    ahead: int, refused: bool
) -> None:
    event = make_event(ts=T0 + ahead)
    detail = future_timestamp(event, T0)
    assert (detail is not None) == refused
    if refused:
        assert detail is not None and "more than 24 h" in detail


def test_the_year_2099_is_a_future_timestamp_and_the_past_is_not() -> None:
    assert future_timestamp(make_event(timestamp="2099-01-01T00:00:00Z"), T0) is not None
    assert future_timestamp(make_event(ts=T0 - 400 * 24 * HOUR), T0) is None  # a backfill


def test_received_at_stands_in_for_a_missing_record_time() -> None:
    late = make_event(ts=T0 + 25 * HOUR, receivedAt=iso(T0))
    assert future_timestamp(late, -1) is not None
    assert future_timestamp(make_event(ts=T0 + 23 * HOUR, receivedAt=iso(T0)), -1) is None
    # the record time, when there is one, is the reference (receivedAt is not parsed)
    assert future_timestamp(late, T0 + 2 * HOUR) is None
    assert future_timestamp(make_event(ts=T0 + 25 * HOUR), -1) is None  # nothing to compare


@pytest.mark.parametrize(
    "data",
    [
        b'{"type":"track","event":"E","userId":"u","timestamp":1e400}',
        b'{"type":"track","event":"E","userId":"u","properties":{"n":-1e400}}',
        b'{"type":"track","event":"E","userId":"u","properties":{"n":NaN}}',
        b'{"type":"track","event":"E","userId":"u","properties":{"n":Infinity}}',
    ],
)
def test_numbers_json_cannot_hold_are_undecodable(data: bytes) -> None:
    assert reason_of(data) == "undecodable"


@pytest.mark.parametrize(
    "timestamp",
    [
        "99999-01-01T00:00:00Z",
        "+099999-01-01T00:00:00Z",
        9_223_372_036_854_775_808,  # 2**63
        18_446_744_073_709_551_615,  # 2**64 - 1 (orjson reads it as an int)
        1.8446744073709552e19,  # 2**64 (orjson reads it as a float)
        -9_223_372_036_854_775_808,
    ],
)
def test_timestamps_beyond_64_bits_or_iso_are_bad_timestamps(timestamp: object) -> None:
    wire = orjson.dumps({"type": "track", "event": "E", "userId": "u", "timestamp": timestamp})
    assert reason_of(wire) == "bad_timestamp"


@settings(max_examples=500, deadline=None)
@given(
    st.datetimes(
        min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59, 999_999)
    ),
    st.sampled_from(["", "Z", "+05:30", "-11:00"]),
)
def test_an_iso_time_reads_as_whole_milliseconds_floored(moment: datetime, zone: str) -> None:
    """Any precision, any offset, before 1970 too: epoch ms floored, as the timedelta
    arithmetic `(t - epoch) // 1 ms` has it (the parser computes it from its fields)."""
    text = moment.isoformat() + zone
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    expected = (parsed - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)
    assert parse_iso_ms(text) == expected
