"""What the collector does with a request, without I/O (SPEC §7): endpoints, write-key
check, body decoding and limits, and turning Segment calls into `events` records.

A refused request raises `RejectedRequest` with the HTTP status. As Segment's HTTP API
does, only what makes the whole request unusable is refused (400): a body that is not
JSON (or not valid gzip), over 500 KB once decoded, not a JSON object, or a batch whose
`batch` is not a list; a bad or missing write key is 401 (checked before the body is read
when it comes in HTTP Basic). Everything else is answered 200. Choices, documented in
the README:

- **Invalid items are dead-lettered, one by one** (`events-dlq`): each item of a batch (or
  the body of a single call) that cannot become an event — over 32 KB once enriched,
  no `userId`/`anonymousId`, a track without `event`, a group without `groupId`, an
  alias without `previousId`, an unknown `type`, an unreadable or out-of-range time, an
  event stamped more than 24 h after `receivedAt` — becomes a `Rejected` for
  `events-dlq` with the evaluator's reason (`missing_user`, `oversized`, ...) and a
  detail naming the item and field (`batch[2].event: ...`); the valid items go through.
  Segment's client libraries treat a 400 as final and drop the whole batch, so a 400
  for one bad item would lose its neighbours.
- **Sizes** are of what goes to Kafka: a record over 32 KB would be dead-lettered by
  the evaluator (`core.events.MAX_EVENT_BYTES`), so it is dead-lettered here, after
  enrichment; a body over 500 KB (after gzip decoding) is refused whole.
- **Time**: `receivedAt` is stamped once per request; `timestamp` becomes the
  skew-corrected event time computed by `core.events.event_time_ms` (the evaluator's
  own rule), and the client's clock value moves to `originalTimestamp`, as Segment
  does. The written fields are chosen so the evaluator's `parse_event` computes the
  same time again instead of correcting twice (see `stamp_times`).
- `writeKey` never reaches Kafka (nor the DLQ); `delete` control records cannot be sent
  over HTTP (`unknown_type`).
- **Untrusted numbers and times** (SPEC §11): a time outside 1970..9999 or 64 bits in
  any time field (`bad_timestamp`), an event stamped more than 24 h after `receivedAt`
  (`future_timestamp`, `core.events.future_timestamp`, which the evaluator would
  dead-letter), or a value the JSON writer cannot write (`bad_field`) is dead-lettered
  for its item — never a 500.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import math
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from audiences.core.events import (
    EVENT_TYPES,
    MAX_EVENT_BYTES,
    event_time_ms,
    format_iso,
    future_timestamp,
    parse_event,
    parse_iso_ms,
)
from audiences.errors import InvalidEventError, RejectedRequest

MAX_BODY_BYTES = 500 * 1024  # any call, as decoded (Segment's batch limit)
GZIP_SLACK_BYTES = 1024  # a gzip body of incompressible data is a little larger than its content

# Path segment after /v1/ -> the call. analytics.js uses the one-letter forms.
ENDPOINTS: dict[str, str] = {
    **{kind: kind for kind in EVENT_TYPES},
    **{kind[0]: kind for kind in EVENT_TYPES},
    "batch": "batch",
    "b": "batch",
    "import": "batch",
}
# Fields the JSON Schemas (schemas/events/) require beyond what `parse_event` checks.
_REQUIRED: dict[str, tuple[str, ...]] = {"group": ("groupId",), "alias": ("previousId",)}
_SHARED_OBJECTS = ("context", "integrations")  # batch-level values apply to every item
_TIME_FIELDS = ("timestamp", "originalTimestamp", "sentAt")
_FIELD_OF_REASON = {
    "missing_user": "userId",
    "missing_event": "event",
    "unknown_type": "type",
    "bad_timestamp": "timestamp",
}
_KEY_FIELDS = ("userId", "anonymousId")


@dataclass(frozen=True, slots=True)
class Record:
    """One event ready for the `events` topic."""

    key: bytes
    value: bytes
    type: str


@dataclass(frozen=True, slots=True)
class Rejected:
    """One item that cannot become an event, for `events-dlq`: the item as the client
    sent it (without `writeKey`), keyed by its user when it names one, with the reason
    the evaluator would give and a detail naming the item and field."""

    key: bytes | None
    value: bytes
    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class Intake:
    """What one call brings: records for `events`, and items for `events-dlq`."""

    records: list[Record]
    rejected: list[Rejected]


class _Invalid(Exception):
    """An item is invalid (internal: becomes a `Rejected`)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def bad_request(message: str) -> RejectedRequest:
    return RejectedRequest(400, "invalid_request", message)


def unauthorized(message: str) -> RejectedRequest:
    return RejectedRequest(401, "unauthorized", message)


def too_large() -> RejectedRequest:
    return bad_request(f"body is over the 500 KB limit ({MAX_BODY_BYTES} bytes)")


# -- auth -------------------------------------------------------------------------------


def key_from_authorization(header: str) -> str:
    """The write key of an `Authorization: Basic base64(key:)` header (Segment's form)."""
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic" or not encoded.strip():
        raise unauthorized("Authorization must be HTTP Basic with the write key as user name")
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise unauthorized("Authorization: malformed Basic credentials") from None
    return decoded.partition(":")[0]


def key_from_body(body: dict[str, Any]) -> str:
    key = body.get("writeKey")
    if not isinstance(key, str) or not key:
        raise unauthorized("missing write key: use HTTP Basic auth or `writeKey` in the body")
    return key


def check_write_key(candidate: str, keys: Sequence[bytes]) -> None:
    """Raise 401 unless `candidate` is one of `keys`. Every key is compared, each in
    constant time, so timing reveals neither a key nor which key matched."""
    given = candidate.encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key)
    if not matched:
        raise unauthorized("invalid write key")


# -- rate limit -------------------------------------------------------------------------


class RateLimiter:
    """A token bucket per write key: `rate` events per second, at most `burst` at once.

    `admit(key)` refuses (429 with Retry-After) a request whose key's bucket is empty,
    before its body is read when the key came in the Authorization header; `charge(key,
    n)` takes the request's `n` events once they are known. A charge may overdraw the
    bucket (a batch larger than the burst is accepted once, then the key waits until the
    debt is paid back), so no valid batch is refused forever. Keys are the configured
    write keys only (checked before), so the buckets are bounded."""

    def __init__(
        self, rate: float, burst: float = 0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst if burst > 0 else max(rate, 1.0)
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, when)

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def _tokens(self, key: str) -> float:
        now = self._clock()
        tokens, then = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        self._buckets[key] = (tokens, now)
        return tokens

    def admit(self, key: str) -> None:
        if not self.enabled:
            return
        tokens = self._tokens(key)
        if tokens < 1:
            wait = max(1, math.ceil((1 - tokens) / self.rate))
            raise RejectedRequest(
                429,
                "rate_limited",
                f"rate limit of this write key spent ({self.rate:g} events/s, burst "
                f"{self.burst:g}); retry in {wait}s",
                retry_after_s=wait,
            )

    def charge(self, key: str, events: int) -> None:
        if not self.enabled:
            return
        tokens = self._tokens(key)
        self._buckets[key] = (tokens - events, self._buckets[key][1])


# -- body -------------------------------------------------------------------------------


def decode_body(raw: bytes, content_encoding: str | None) -> bytes:
    """The request body, gunzipped when `Content-Encoding: gzip`, within 500 KB
    (decompression stops past the limit: no gzip bomb inflates in memory)."""
    limit = MAX_BODY_BYTES
    encoding = (content_encoding or "identity").strip().lower()
    if encoding in ("", "identity"):
        data = raw
    elif encoding in ("gzip", "x-gzip"):
        inflater = zlib.decompressobj(wbits=31)
        try:
            data = inflater.decompress(raw, limit + 1)
        except zlib.error as exc:
            raise bad_request(f"body is not valid gzip: {exc}") from None
        if len(data) <= limit and not inflater.eof:
            raise bad_request("body is not valid gzip: truncated stream")
    else:
        raise bad_request(f"unsupported Content-Encoding {content_encoding!r} (use gzip)")
    if len(data) > limit:
        raise too_large()
    return data


def parse_body(data: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"invalid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request("body must be a JSON object")
    return body


# -- events -----------------------------------------------------------------------------


def events(
    kind: str, body: dict[str, Any], received_at_ms: int, new_id: Callable[[], str]
) -> Intake:
    """The records of one call (one for /v1/track etc., one per item for /v1/batch) and
    the items to dead-letter instead. Only a `batch` that is not a list refuses the call."""
    if kind != "batch":
        return _split([(body, kind, "")], {}, received_at_ms, new_id)
    items = body.get("batch")
    if not isinstance(items, list):
        raise bad_request("batch: must be a list of events")
    shared = {name: body[name] for name in (*_SHARED_OBJECTS, "sentAt") if name in body}
    return _split(
        [
            (item, item.get("type") if isinstance(item, dict) else None, f"batch[{index}]")
            for index, item in enumerate(items)
        ],
        shared,
        received_at_ms,
        new_id,
    )


def _split(
    items: list[tuple[Any, Any, str]],
    shared: dict[str, Any],
    received_at_ms: int,
    new_id: Callable[[], str],
) -> Intake:
    records: list[Record] = []
    rejected: list[Rejected] = []
    for item, kind, path in items:
        try:
            if not isinstance(item, dict):
                raise _Invalid("not_an_object", f"{path}: must be an object")
            if kind not in EVENT_TYPES:
                raise _Invalid(
                    "unknown_type",
                    f"{path}.type: must be one of {', '.join(sorted(EVENT_TYPES))}, got {kind!r}",
                )
            records.append(_record(item, kind, shared, received_at_ms, new_id, path))
        except _Invalid as exc:
            rejected.append(_rejected(item, exc))
    return Intake(records, rejected)


def _rejected(item: Any, invalid: _Invalid) -> Rejected:
    """The dead letter of an invalid item: the item as sent (less `writeKey`)."""
    key: bytes | None = None
    if isinstance(item, dict):
        item = {name: value for name, value in item.items() if name != "writeKey"}
        for field in _KEY_FIELDS:
            value = item.get(field)
            if isinstance(value, str | int) and not isinstance(value, bool) and value != "":
                key = str(value).encode()
                break
    try:
        value = orjson.dumps(item)
    except TypeError:  # an int beyond 64 bits: the standard library writes it
        value = json.dumps(item, separators=(",", ":"), default=repr).encode()
    return Rejected(key, value, invalid.reason, invalid.detail)


def _record(
    item: dict[str, Any],
    kind: str,
    shared: dict[str, Any],
    received_at_ms: int,
    new_id: Callable[[], str],
    path: str,
) -> Record:
    prefix = f"{path}." if path else ""
    try:
        event = enrich(item, kind, shared, received_at_ms, new_id, prefix)
        parsed = parse_event(event, received_at_ms)
    except InvalidEventError as exc:
        field = _FIELD_OF_REASON.get(exc.reason) or exc.detail.split(" ", 1)[0]
        raise _Invalid(exc.reason, f"{prefix}{field}: {exc.detail}") from None
    future = future_timestamp(parsed, received_at_ms)
    if future is not None:  # SPEC §11: the evaluator would dead-letter it
        raise _Invalid("future_timestamp", f"{prefix}timestamp: {future}")
    for field in _REQUIRED.get(kind, ()):
        if event.get(field) in (None, ""):
            raise _Invalid("missing_field", f"{prefix}{field}: required for {kind} calls")
    try:
        value = orjson.dumps(event)
    except TypeError as exc:  # (orjson.JSONEncodeError is one) e.g. an int beyond 64 bits
        raise _Invalid(
            "bad_field", f"{path or 'event'}: cannot be written as JSON: {exc}"
        ) from None
    if len(value) > MAX_EVENT_BYTES:
        where = path or "event"
        raise _Invalid(
            "oversized",
            f"{where}: {len(value)} bytes, over the 32 KB limit per event ({MAX_EVENT_BYTES} bytes)",
        )
    return Record(key=parsed.key.encode(), value=value, type=kind)


def enrich(
    item: dict[str, Any],
    kind: str,
    shared: dict[str, Any],
    received_at_ms: int,
    new_id: Callable[[], str],
    prefix: str = "",
) -> dict[str, Any]:
    """A copy of `item` as it goes to Kafka: `type` from the endpoint, batch-level
    `context`/`integrations`/`sentAt` under the item's own, `messageId` generated when
    missing, `writeKey` removed, `receivedAt` stamped and times corrected."""
    event = dict(item)
    event.pop("writeKey", None)
    event["type"] = kind
    for name in _SHARED_OBJECTS:
        common = shared.get(name)
        own = event.get(name)
        if isinstance(common, dict) and (own is None or isinstance(own, dict)):
            event[name] = {**common, **(own or {})}  # the item's own keys win
    if event.get("sentAt") is None and "sentAt" in shared:
        event["sentAt"] = shared["sentAt"]
    message_id = event.get("messageId")
    if message_id is None or message_id == "":
        event["messageId"] = new_id()
    stamp_times(event, received_at_ms, prefix)
    return event


def stamp_times(event: dict[str, Any], received_at_ms: int, prefix: str = "") -> None:
    """Stamp `receivedAt` and write the skew-corrected `timestamp` (in place).

    The time is `event_time_ms` — the evaluator's rule — so it cannot drift from it:
    `receivedAt - (sentAt - client time)` when the client sent `sentAt`. The fields are
    then written so that `parse_event` computes the same time again: the client's time
    is kept as `originalTimestamp` (which `parse_event` prefers over `timestamp`), and
    an event without a client time gets its `sentAt` there (it happened when sent; the
    correction is then zero). Without `sentAt` there is nothing to correct.
    """
    for name in _TIME_FIELDS:
        value = event.get(name)
        if value is not None and parse_iso_ms(value) is None:
            raise _Invalid("bad_timestamp", f"{prefix}{name}: not an ISO-8601 time: {value!r}")
    event["receivedAt"] = format_iso(received_at_ms)
    corrected_ms = event_time_ms(event, received_at_ms)
    if event.get("sentAt") is not None:
        client = event.get("originalTimestamp")
        if client is None:
            client = event.get("timestamp")
        event["originalTimestamp"] = event["sentAt"] if client is None else client
    event["timestamp"] = format_iso(corrected_ms)
