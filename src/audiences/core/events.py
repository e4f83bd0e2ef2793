"""Segment-Spec events: parsing, validation and skew-corrected event time.

`parse_event` is on the hot path (once per consumed record): it does the
checks that decide whether an event can be evaluated and nothing more. Full
schema documentation lives in `schemas/events/`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, Final

import orjson

from audiences.errors import InvalidEventError

MAX_EVENT_BYTES: Final = 32 * 1024
EVENT_TYPES = frozenset({"track", "identify", "page", "screen", "group", "alias"})
# Control records on the events topic (SPEC §4): `delete` and `unsuppress` from
# users and the API; `merge` written by workers to move anonymous profiles.
CONTROL_TYPES = frozenset({"delete", "unsuppress", "merge", "account"})
MAX_CONTROL_BYTES: Final = 1024 * 1024  # a merge record carries a whole profile
MERGE_PREFIX: Final = b'{"type":"merge",'  # how orjson writes the records of `merge_request` & co
# Event times are epoch ms in [0, MAX_EVENT_TIME_MS]: 1970-01-01 .. 9999-12-31T23:59:59.999Z,
# the range ISO-8601 (and `format_iso`, the state codec, the due-index) can represent.
# Anything else is rejected as `bad_timestamp` (SPEC §11: invalid input, never a crash).
MIN_EVENT_TIME_MS: Final = 0
MAX_EVENT_TIME_MS: Final = 253_402_300_799_999
# SPEC §11: an event stamped more than this after its receipt is `future_timestamp`.
MAX_FUTURE_MS: Final = 24 * 3_600_000

_EMPTY: dict[str, Any] = {}
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)


@dataclass(slots=True)
class Event:
    """A validated input event. Times are UTC epoch milliseconds. Treat as immutable
    (not `frozen`: a frozen dataclass costs ~1.5 µs more per event to build)."""

    type: str
    user_id: str | None
    anonymous_id: str | None
    name: str | None  # `event` of a track, `name` of a page/screen
    message_id: str | None
    timestamp_ms: int
    properties: dict[str, Any]
    traits: dict[str, Any]
    context: dict[str, Any]
    raw: dict[str, Any]

    def __init__(  # written out: the one `dataclass` generates runs interpreted under mypyc
        self,
        type: str,
        user_id: str | None,
        anonymous_id: str | None,
        name: str | None,
        message_id: str | None,
        timestamp_ms: int,
        properties: dict[str, Any],
        traits: dict[str, Any],
        context: dict[str, Any],
        raw: dict[str, Any],
    ) -> None:
        self.type = type
        self.user_id = user_id
        self.anonymous_id = anonymous_id
        self.name = name
        self.message_id = message_id
        self.timestamp_ms = timestamp_ms
        self.properties = properties
        self.traits = traits
        self.context = context
        self.raw = raw

    @property
    def link_id(self) -> str | None:
        """The other id an event links to its userId: `previousId` of an alias, else the
        `anonymousId` of an event carrying both (SPEC §4)."""
        if self.user_id is None:
            return None
        other = self.raw.get("previousId") if self.type == "alias" else self.anonymous_id
        if isinstance(other, str) and other and other != self.user_id:
            return other
        return None

    @property
    def key(self) -> str:
        """The profile key: userId, else anonymousId (the Kafka record key too)."""
        return self.user_id or self.anonymous_id or ""

    def get(self, path: tuple[str, ...]) -> Any:
        """Value at a path compiled by `compile_path`; None when absent."""
        node: Any = self.raw
        for part in path:
            if not isinstance(node, dict):
                return None
            node = node.get(part)
            if node is None:
                return None
        return node


def compile_path(path: str) -> tuple[str, ...]:
    """Split a dotted path. Paths start at the event root (`properties.x`,
    `context.os.name`, `traits.plan`); a path whose first segment is not a
    Segment top-level field is read from `properties` as a convenience."""
    parts = tuple(path.split("."))
    if parts[0] not in _TOP_LEVEL:
        return ("properties", *parts)
    return parts


_TOP_LEVEL = frozenset(
    {
        "type",
        "event",
        "name",
        "userId",
        "anonymousId",
        "messageId",
        "timestamp",
        "properties",
        "traits",
        "context",
        "integrations",
        "groupId",
        "previousId",
        "sentAt",
        "receivedAt",
        "originalTimestamp",
    }
)


def parse_iso_ms(value: Any) -> int | None:
    """Epoch ms of an ISO-8601 string (or a number of epoch ms); None if unreadable.

    Never raises: booleans, NaN and infinities are unreadable. The result is not
    range-checked (dates before 1970 compare fine in trait conditions); event times
    are, by `event_time_ms`."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if math.isfinite(value) else None
    if not isinstance(value, str):
        return None
    if len(value) == 24:  # Segment's own shape, 2026-01-02T03:04:05.678Z: the fast path
        ms = _segment_iso_ms(value)
        if ms >= 0:
            return ms
    try:
        parsed = datetime.fromisoformat(value)
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        since = parsed - _EPOCH  # integer arithmetic: floats lose a millisecond
        # (days, seconds, microseconds: what `since // _ONE_MS` reads, without its cost)
        return (since.days * 86_400 + since.seconds) * 1000 + since.microseconds // 1000
    except (ValueError, OverflowError):
        return None


# Epoch ms of a minute, by the first 17 characters of Segment's ISO shape (with the
# colon before the seconds); emptied when full: a minute each, as `_iso_minute`. The
# last minute read is checked first: times mostly come in order.
_MINUTE_MS: Final[dict[str, int]] = {}
_MINUTE_MS_LIMIT: Final = 65_536
# (one tuple, swapped whole: threads that parse at once never pair a minute and another's prefix)
_LAST_MINUTE: Final[list[tuple[str, int]]] = [("", 0)]


def _segment_iso_ms(value: str) -> int:
    """Epoch ms of a 24-character `YYYY-MM-DDTHH:MM:SS.mmmZ`, or -1 for any other
    string (the caller then parses it with `datetime.fromisoformat`, which gives the
    same result for this shape: this only skips its cost). The minute is parsed by
    `fromisoformat` once and remembered; the seconds and milliseconds must be ASCII
    digits, the seconds at most 59."""
    if value[23] != "Z" or value[19] != "." or value[16] != ":":
        return -1
    s1 = ord(value[17]) - 48
    s2 = ord(value[18]) - 48
    m1 = ord(value[20]) - 48
    m2 = ord(value[21]) - 48
    m3 = ord(value[22]) - 48
    if not (0 <= s1 <= 5 and 0 <= s2 <= 9 and 0 <= m1 <= 9 and 0 <= m2 <= 9 and 0 <= m3 <= 9):
        return -1
    within = (s1 * 10 + s2) * 1000 + m1 * 100 + m2 * 10 + m3
    prefix, minute = _LAST_MINUTE[0]
    if prefix and value.startswith(prefix):
        return minute + within
    prefix = value[:17]
    found = _MINUTE_MS.get(prefix)
    if found is None:
        if value[4] != "-" or value[7] != "-" or value[10] != "T" or value[13] != ":":
            return -1
        try:
            since = datetime.fromisoformat(value[:16]).replace(tzinfo=UTC) - _EPOCH
        except ValueError:
            return -1
        found = (since.days * 86_400 + since.seconds) * 1000
        if len(_MINUTE_MS) >= _MINUTE_MS_LIMIT:
            _MINUTE_MS.clear()
        _MINUTE_MS[prefix] = found
    _LAST_MINUTE[0] = (prefix, found)
    return found + within


def is_event_time(ms: int) -> bool:
    """Whether epoch ms `ms` is in the range event times may take."""
    return MIN_EVENT_TIME_MS <= ms <= MAX_EVENT_TIME_MS


def format_iso(ms: int) -> str:
    """ISO-8601 UTC with milliseconds, as Segment writes it."""
    minutes, millis_in_minute = divmod(ms, 60_000)
    seconds, millis = divmod(millis_in_minute, 1000)
    return f"{_iso_minute(minutes)}{seconds:02d}.{millis:03d}Z"


@lru_cache(maxsize=65_536)  # a minute each: 45 days
def _iso_minute(minutes: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:", time.gmtime(minutes * 60))


def event_time_ms(raw: dict[str, Any], received_at_ms: int) -> int:
    """Event time with Segment's clock-skew correction.

    When the client sent `sentAt`, its clock's offset is removed:
    `timestamp = receivedAt - (sentAt - (originalTimestamp or timestamp))`, with
    the Kafka record time standing in for a missing `receivedAt`. Otherwise
    `timestamp`, else `originalTimestamp`, else `receivedAt`, else the record time.

    Every time read and the result must lie in [MIN_EVENT_TIME_MS, MAX_EVENT_TIME_MS]
    (numbers: finite epoch ms, not booleans); otherwise `bad_timestamp`.
    """
    received = raw.get("receivedAt")
    sent = raw.get("sentAt")
    original = raw.get("originalTimestamp")
    timestamp = raw.get("timestamp")
    client = original if original is not None else timestamp
    if sent is not None and client is not None:
        received_ms = (
            _time_field(received, "receivedAt") if received is not None else received_at_ms
        )
        corrected = received_ms - (_time_field(sent, "sentAt") - _time_field(client, "timestamp"))
        if not is_event_time(corrected):
            raise InvalidEventError(
                "bad_timestamp", f"skew-corrected time {corrected} is outside 1970..9999"
            )
        return corrected
    # (written out: a loop over the three names builds a tuple per event compiled)
    if timestamp is not None:
        return _time_field(timestamp, "timestamp")
    if original is not None:
        return _time_field(original, "originalTimestamp")
    if received is not None:
        return _time_field(received, "receivedAt")
    if not is_event_time(received_at_ms):
        raise InvalidEventError("bad_timestamp", f"no event time (record time {received_at_ms})")
    return received_at_ms


def future_timestamp(event: Event, record_ms: int) -> str | None:
    """Why `event` is stamped too far ahead to be evaluated (SPEC §11), or None.

    The reference is the Kafka record time (`record_ms`); a record without one (< 0)
    falls back to the event's `receivedAt`, and with neither nothing is checked. The
    record time comes first because it is free (`receivedAt` would cost an ISO parse
    per event) and, with `message.timestamp.type=LogAppendTime` on the topic, the
    broker's own clock that no producer can set; the collector stamps `receivedAt`
    from the clock it produces with, so for its records both agree anyway."""
    ts = event.timestamp_ms
    if record_ms >= 0:
        if ts > record_ms + MAX_FUTURE_MS:
            return f"event time {format_iso(ts)} is more than 24 h after the record's time"
        return None
    received = parse_iso_ms(event.raw.get("receivedAt"))
    if received is not None and ts > received + MAX_FUTURE_MS:
        return f"event time {format_iso(ts)} is more than 24 h after its receivedAt"
    return None


def _time_field(value: Any, field: str) -> int:
    ms = parse_iso_ms(value)
    if ms is None:
        raise InvalidEventError("bad_timestamp", f"{field} is not an ISO-8601 time")
    if not is_event_time(ms):
        raise InvalidEventError("bad_timestamp", f"{field} is outside 1970..9999")
    return ms


def _optional_id(raw: dict[str, Any], field: str) -> str | None:
    value = raw.get(field)
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise InvalidEventError("bad_field", f"{field} must be a string")


def _optional_object(raw: dict[str, Any], field: str) -> dict[str, Any]:
    value = raw.get(field)
    if value is None:
        return _EMPTY
    if not isinstance(value, dict):
        raise InvalidEventError("bad_field", f"{field} must be an object")
    return value


def parse_event(data: bytes | dict[str, Any], received_at_ms: int) -> Event:
    """Decode and validate one record; raises InvalidEventError with a reason."""
    if isinstance(data, dict):
        raw: Any = data
    else:  # (one type per isinstance: a union of types is built at every call compiled)
        if not isinstance(data, bytes):
            data = bytes(data)  # a bytearray or memoryview
        size = len(data)
        # Merge records (written by workers, `"type":"merge"` first) carry whole profiles.
        limit = MAX_CONTROL_BYTES if data.startswith(MERGE_PREFIX) else MAX_EVENT_BYTES
        if size > limit:
            raise InvalidEventError("oversized", f"{size} bytes > {limit}")
        try:
            raw = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise InvalidEventError("undecodable", f"invalid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise InvalidEventError("not_an_object", "an event must be a JSON object")
    kind = raw.get("type")
    if kind not in EVENT_TYPES and kind not in CONTROL_TYPES:
        raise InvalidEventError("unknown_type", f"type {kind!r} is not a Segment event type")
    user_id = _optional_id(raw, "userId")
    anonymous_id = _optional_id(raw, "anonymousId")
    if user_id is None and anonymous_id is None:
        raise InvalidEventError("missing_user", "userId or anonymousId is required")
    name: Any = None
    if kind == "track":
        name = raw.get("event")
        if not isinstance(name, str) or not name:
            raise InvalidEventError("missing_event", "track events need a non-empty `event`")
    elif kind in ("page", "screen"):
        name = raw.get("name")
        if name is not None and not isinstance(name, str):
            raise InvalidEventError("bad_field", "name must be a string")
    message_id = raw.get("messageId")
    if message_id is not None and not isinstance(message_id, str):
        message_id = str(message_id)
    return Event(
        type=kind,
        user_id=user_id,
        anonymous_id=anonymous_id,
        name=name,
        message_id=message_id,
        timestamp_ms=event_time_ms(raw, received_at_ms),
        properties=_optional_object(raw, "properties"),
        traits=_optional_object(raw, "traits"),
        context=_optional_object(raw, "context"),
        raw=raw,
    )
