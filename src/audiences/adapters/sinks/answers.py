"""Reading a destination's answer beyond its status (pure): per-type hooks.

The status decides a request's fate (policy.py); some APIs say more:
- `failed_items`: a 2xx that still refuses some of the objects a request carried.
  Braze `/users/track` answers 201/200 `{"message": "success", "errors": [{"type",
  "input_array": "attributes"|"events", "index"}]}` (non-fatal errors: the other objects
  were processed); Customer.io Track v2 `/api/v2/batch` answers 200/207 `{"errors":
  [{"batch_index", "reason", "field", "message"}]}`. Each entry names an object of the
  request (`Request.objects`), hence the messages it came from: those are dead-lettered
  (`rejected`, the entry as the error), the others are delivered. An entry naming no
  object of the request (no index, out of range) is logged and ignored: the API said
  2xx, and which object it meant cannot be known.
- `rate_limit_wait_s`: a 429's wait from vendor headers when `Retry-After` is absent:
  Braze's `X-RateLimit-Reset` (unix seconds at which the window resets).

Anything in an answer is untrusted: a body that is not JSON, or entries of the wrong
shape, never raise.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import orjson

log = logging.getLogger(__name__)
REASON_CHARS = 300
# (array, index, reason): `index` -1 when the entry names no object
Entry = tuple[str, int, str]


def failed_items(
    kind: str, objects: Mapping[str, tuple[tuple[int, ...], ...]], content: str
) -> dict[int, str]:
    """Message index -> why the destination refused it, from a 2xx answer's body."""
    reader = _READERS.get(kind)
    if reader is None or not objects or not content:
        return {}
    try:
        body = orjson.loads(content)
    except orjson.JSONDecodeError:
        return {}
    failures: dict[int, str] = {}
    for array, index, reason in reader(body):
        owners = objects.get(array)
        if owners is None or not 0 <= index < len(owners):
            log.warning("%s: an error the request cannot be matched to: %s", kind, reason)
            continue
        for message in owners[index]:
            failures.setdefault(message, reason)
    return failures


def _integer(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else -1


def _braze(body: Any) -> Iterator[Entry]:
    errors = body.get("errors") if isinstance(body, dict) else None
    for error in errors if isinstance(errors, list) else []:
        if not isinstance(error, dict):
            yield "", -1, str(error)[:REASON_CHARS]
            continue
        array = error.get("input_array")
        kind = str(error.get("type") or "error")
        where = f"{array}[{error.get('index')}]"
        yield (
            array if isinstance(array, str) else "",
            _integer(error.get("index")),
            f"braze: {kind} ({where})"[:REASON_CHARS],
        )


def _customerio(body: Any) -> Iterator[Entry]:
    errors = body.get("errors") if isinstance(body, dict) else None
    for error in errors if isinstance(errors, list) else []:
        if not isinstance(error, dict):
            yield "", -1, str(error)[:REASON_CHARS]
            continue
        text = error.get("message") or f"{error.get('reason')}: {error.get('field')}"
        where = f"batch[{error.get('batch_index')}]"
        yield (
            "batch",
            _integer(error.get("batch_index")),
            f"customerio: {text} ({where})"[:REASON_CHARS],
        )


_READERS: dict[str, Callable[[Any], Iterator[Entry]]] = {
    "braze": _braze,
    "customerio": _customerio,
}


def rate_limit_wait_s(
    kind: str, status: int | None, headers: Mapping[str, str], now_s: float
) -> float | None:
    """Seconds a 429 asks to wait through vendor headers (None: they say nothing)."""
    if status != 429 or kind != "braze":
        return None
    value = headers.get("x-ratelimit-reset")
    if not value:
        return None
    try:
        reset = float(value.strip())
    except ValueError:
        return None
    if reset != reset or reset in (float("inf"), float("-inf")):  # NaN, inf
        return None
    return max(0.0, reset - now_s)
