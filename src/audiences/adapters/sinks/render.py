"""Output messages -> the requests each destination type expects (pure, no I/O).

Input: output messages of `audience-events` (SPEC §5), in topic order.
Output: `Request`s in the order they must be sent, each naming the messages it
carries (`indexes`), so delivery outcomes can be attributed per message.

Per type (SPEC §6; payloads follow each vendor's documented API):
- webhook: the message itself (`batch_size: 1`) or a JSON array of messages;
  Standard Webhooks headers are added at send time (`webhook_headers`), since
  each attempt carries a fresh timestamp and signature.
- braze: `POST /users/track`, Bearer key; `attributes` (one object per user per
  request, later values win, `{external_id, K: true|false}`) and `events`
  (`{external_id, name, time: ISO-8601, properties}`), at most 75 of each.
- customerio: Track API v1, Basic site_id:api_key; `PUT /api/v1/customers/{id}`
  with attributes as top-level body keys, `POST /api/v1/customers/{id}/events`
  with `{name, data, timestamp: unix seconds}`. One request per message and mode.
- segment: `POST /v1/batch`, Basic write_key:, `{"batch": [...]}` of Segment-Spec
  track / identify messages, split to stay under Segment's 500 KB per request.
- kafka: the same messages, keyed by user, to another topic.

`mode` picks the track message (custom event), an identify message (custom
attribute `{K: true|false}`), or both. Braze and Customer.io need a user id:
anonymous profiles are skipped for them.

`User Deleted` (a profile deleted, SPEC §4) goes to every destination whatever its
`audiences` and `mode`, unless it sets `forward_deletions: false` (then skipped):
- braze: `POST /users/delete` `{"external_ids": [...]}`, at most 50 per request
  (Braze's limit), between the `/users/track` requests of the messages around it;
- customerio: `DELETE /api/v1/customers/{id}`;
- webhook, segment: the `User Deleted` track message itself (signed, batched as usual);
- kafka: a `delete` record keyed by the id, `{"type": "delete", "userId" (or
  "anonymousId"), "messageId", "timestamp"}`.
Anonymous ids are skipped for Braze and Customer.io, as for every message. A 404
(no such user) from Braze or Customer.io to a deletion is what the deletion asked
for: it counts as delivered (`absent_ok`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import quote

import orjson

from audiences.adapters.sinks.config import Destination
from audiences.adapters.sinks.pii import contact_traits
from audiences.core.outputs import USER_DELETED

SEGMENT_MAX_BATCH_BYTES = 500 * 1024 - 1024  # Segment: 500 KB per batch request; keep a margin
BRAZE_MAX_DELETIONS = 50  # Braze: up to 50 external_ids per /users/delete request
JSON = (("Content-Type", "application/json"),)


@dataclass(frozen=True)
class Request:
    """One call to a destination: an HTTP request, or a set of Kafka records."""

    method: str  # POST | PUT | DELETE | PRODUCE
    url: str  # full URL; the topic for PRODUCE
    indexes: tuple[int, ...]  # the messages (positions in the rendered list) it carries
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    webhook_id: str = ""  # webhook: signed at send time
    records: tuple[tuple[bytes, bytes], ...] = field(default=(), repr=False)
    absent_ok: bool = False  # a deletion: 404 (no such user) means done


@dataclass(frozen=True)
class Rendered:
    requests: list[Request]
    skipped: tuple[int, ...]  # messages this destination does not take (selection, anonymous)


def subject(message: dict[str, Any]) -> tuple[str, Any] | None:
    """(audience or trait key, its value) announced by an output message."""
    props = message.get("properties")
    if not isinstance(props, dict):
        return None
    key = props.get("trait_key") if message.get("event") == "Trait Computed" else None
    key = key or props.get("audience_key")
    if not isinstance(key, str):
        return None
    return key, props.get(key)


def is_deletion(message: dict[str, Any]) -> bool:
    """A `User Deleted` output (SPEC §4): the profile was deleted."""
    return message.get("type") == "track" and message.get("event") == USER_DELETED


def user_id(message: dict[str, Any]) -> str | None:
    value = message.get("userId")
    return value if isinstance(value, str) and value else None


def profile_id(message: dict[str, Any]) -> str:
    return str(user_id(message) or message.get("anonymousId") or "")


def track_message(message: dict[str, Any], hashed: bool) -> dict[str, Any]:
    """The output message as published, with contact traits hashed when asked to."""
    context = message.get("context")
    if not hashed or not isinstance(context, dict) or not context.get("traits"):
        return message
    traits = dict(context["traits"])
    traits.update(contact_traits(traits, hashed))
    return {**message, "context": {**context, "traits": traits}}


def identify_message(message: dict[str, Any], hashed: bool) -> dict[str, Any]:
    """A Segment-Spec identify setting the audience as a trait (`{K: true|false}`).

    Its messageId derives from the track message's, so it is deterministic too."""
    key, value = subject(message) or ("", None)
    context = message.get("context") if isinstance(message.get("context"), dict) else {}
    traits = {**contact_traits((context or {}).get("traits"), hashed), key: value}
    identify: dict[str, Any] = {"type": "identify"}
    if user_id(message):
        identify["userId"] = message["userId"]
    else:
        identify["anonymousId"] = message.get("anonymousId")
    identify["messageId"] = hashlib.sha256(
        f"{message.get('messageId')}|identify".encode()
    ).hexdigest()
    identify["timestamp"] = message.get("timestamp")
    identify["traits"] = traits
    if context and "personas" in context:
        identify["context"] = {"personas": context["personas"]}
    return identify


def render_requests(destination: Destination, messages: Sequence[dict[str, Any]]) -> Rendered:
    """The requests carrying `messages` to `destination`, in sending order."""
    taken: list[int] = []
    skipped: list[int] = []
    needs_user = destination.type in ("braze", "customerio")
    for index, message in enumerate(messages):
        if is_deletion(message):
            wanted = destination.forward_deletions and profile_id(message) != ""
            if not wanted or (needs_user and user_id(message) is None):
                skipped.append(index)
            else:
                taken.append(index)
            continue
        found = subject(message)
        if (
            found is None
            or not destination.selects(found[0])
            or (needs_user and user_id(message) is None)
        ):
            skipped.append(index)
        else:
            taken.append(index)
    renderer = _RENDERERS[destination.type]
    requests = renderer(destination, messages, taken) if taken else []
    return Rendered(requests, tuple(skipped))


def _units(destination: Destination, message: dict[str, Any]) -> list[dict[str, Any]]:
    if is_deletion(message):
        return [message]  # whatever the mode: a deletion is no audience to set
    units = []
    if "track" in destination.modes:
        units.append(track_message(message, destination.hash_pii))
    if "identify" in destination.modes:
        units.append(identify_message(message, destination.hash_pii))
    return units


def _chunks(indexes: list[int], size: int) -> list[list[int]]:
    return [indexes[i : i + size] for i in range(0, len(indexes), size)]


def _render_webhook(
    destination: Destination, messages: Sequence[dict[str, Any]], taken: list[int]
) -> list[Request]:
    requests = []
    if destination.batch_size == 1:
        for i in taken:
            for unit in _units(destination, messages[i]):
                requests.append(_webhook_request(destination, (i,), orjson.dumps(unit), unit))
        return requests
    for chunk in _chunks(taken, destination.batch_size):
        units = [unit for i in chunk for unit in _units(destination, messages[i])]
        requests.append(_webhook_request(destination, tuple(chunk), orjson.dumps(units), units[0]))
    return requests


def _webhook_request(
    destination: Destination, indexes: tuple[int, ...], body: bytes, first: dict[str, Any]
) -> Request:
    return Request(
        "POST",
        destination.url,
        indexes,
        body,
        JSON,
        webhook_id=str(first.get("messageId") or ""),
    )


def sign_webhook(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """Standard Webhooks `v1,<base64 HMAC-SHA256>` over `{id}.{timestamp}.{body}`."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def webhook_headers(
    destination: Destination, request: Request, now_s: int
) -> list[tuple[str, str]]:
    """Headers of one attempt: the request's own plus, for webhooks, the signature."""
    headers = list(request.headers)
    if destination.type == "webhook":
        headers += [("webhook-id", request.webhook_id), ("webhook-timestamp", str(now_s))]
        if destination.secret:
            signature = sign_webhook(destination.secret, request.webhook_id, now_s, request.body)
            headers.append(("webhook-signature", signature))
    return headers


def _basic(user: str, password: str) -> tuple[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return ("Authorization", f"Basic {token}")


def _render_braze(
    destination: Destination, messages: Sequence[dict[str, Any]], taken: list[int]
) -> list[Request]:
    base = destination.url.rstrip("/")
    url = base + "/users/track"
    headers = (*JSON, ("Authorization", f"Bearer {destination.api_key}"))
    requests = []
    for deleting, run in _runs(messages, taken):
        if deleting:
            for chunk in _chunks(run, min(destination.batch_size, BRAZE_MAX_DELETIONS)):
                ids = list(dict.fromkeys(str(messages[i]["userId"]) for i in chunk))
                body = orjson.dumps({"external_ids": ids})
                requests.append(
                    Request(
                        "POST", base + "/users/delete", tuple(chunk), body, headers, absent_ok=True
                    )
                )
        else:
            requests.extend(_braze_track(destination, messages, run, url, headers))
    return requests


def _runs(messages: Sequence[dict[str, Any]], taken: list[int]) -> list[tuple[bool, list[int]]]:
    """`taken` cut into runs of deletions and of other messages, in order."""
    runs: list[tuple[bool, list[int]]] = []
    for i in taken:
        deleting = is_deletion(messages[i])
        if runs and runs[-1][0] == deleting:
            runs[-1][1].append(i)
        else:
            runs.append((deleting, [i]))
    return runs


def _braze_track(
    destination: Destination,
    messages: Sequence[dict[str, Any]],
    taken: list[int],
    url: str,
    headers: tuple[tuple[str, str], ...],
) -> list[Request]:
    requests = []
    for chunk in _chunks(taken, destination.batch_size):  # batch_size <= 75 (validated)
        attributes: dict[str, dict[str, Any]] = {}
        events = []
        for i in chunk:
            message = messages[i]
            external_id = str(message["userId"])
            key, value = subject(message) or ("", None)
            if "identify" in destination.modes:
                attributes.setdefault(external_id, {"external_id": external_id})[key] = value
            if "track" in destination.modes:
                events.append(
                    {
                        "external_id": external_id,
                        "name": message.get("event"),
                        "time": message.get("timestamp"),
                        "properties": message.get("properties", {}),
                    }
                )
        body: dict[str, Any] = {}
        if attributes:
            body["attributes"] = list(attributes.values())
        if events:
            body["events"] = events
        requests.append(Request("POST", url, tuple(chunk), orjson.dumps(body), headers))
    return requests


def _unix_seconds(iso: Any) -> int | None:
    if not isinstance(iso, str):
        return None
    try:
        return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return None


def _render_customerio(
    destination: Destination, messages: Sequence[dict[str, Any]], taken: list[int]
) -> list[Request]:
    base = destination.url.rstrip("/") + "/api/v1/customers/"
    headers = (*JSON, _basic(destination.site_id, destination.api_key))
    requests = []
    for i in taken:
        message = messages[i]
        customer = base + quote(str(message["userId"]), safe="")
        if is_deletion(message):
            auth = (_basic(destination.site_id, destination.api_key),)
            requests.append(Request("DELETE", customer, (i,), b"", auth, absent_ok=True))
            continue
        key, value = subject(message) or ("", None)
        if "identify" in destination.modes:
            context = message.get("context")
            traits = context.get("traits") if isinstance(context, dict) else None
            attributes = {**contact_traits(traits, destination.hash_pii), key: value}
            requests.append(Request("PUT", customer, (i,), orjson.dumps(attributes), headers))
        if "track" in destination.modes:
            event: dict[str, Any] = {
                "name": message.get("event"),
                "data": message.get("properties", {}),
            }
            timestamp = _unix_seconds(message.get("timestamp"))
            if timestamp is not None:
                event["timestamp"] = timestamp
            requests.append(
                Request("POST", customer + "/events", (i,), orjson.dumps(event), headers)
            )
    return requests


def _render_segment(
    destination: Destination, messages: Sequence[dict[str, Any]], taken: list[int]
) -> list[Request]:
    url = destination.url.rstrip("/") + "/v1/batch"
    headers = (*JSON, _basic(destination.write_key, ""))
    requests: list[Request] = []
    batch: list[bytes] = []
    indexes: list[int] = []
    size = 0

    def close() -> None:
        if batch:
            body = b'{"batch":[' + b",".join(batch) + b"]}"
            requests.append(Request("POST", url, tuple(indexes), body, headers))
            batch.clear()
            indexes.clear()

    for i in taken:
        encoded = [orjson.dumps(unit) for unit in _units(destination, messages[i])]
        grows = sum(len(e) + 1 for e in encoded)
        if indexes and (
            len(indexes) >= destination.batch_size or size + grows > SEGMENT_MAX_BATCH_BYTES
        ):
            close()
            size = 0
        batch.extend(encoded)
        indexes.append(i)
        size += grows
    close()
    return requests


def _render_kafka(
    destination: Destination, messages: Sequence[dict[str, Any]], taken: list[int]
) -> list[Request]:
    requests = []
    for chunk in _chunks(taken, destination.batch_size):
        records = tuple(
            (profile_id(messages[i]).encode(), orjson.dumps(unit))
            for i in chunk
            for unit in _kafka_units(destination, messages[i])
        )
        requests.append(Request("PRODUCE", destination.topic, tuple(chunk), records=records))
    return requests


def _kafka_units(destination: Destination, message: dict[str, Any]) -> list[dict[str, Any]]:
    if not is_deletion(message):
        return _units(destination, message)
    who = "userId" if user_id(message) else "anonymousId"
    record = {
        "type": "delete",
        who: profile_id(message),
        "messageId": message.get("messageId"),
        "timestamp": message.get("timestamp"),
    }
    return [record]


_RENDERERS = {
    "webhook": _render_webhook,
    "braze": _render_braze,
    "customerio": _render_customerio,
    "segment": _render_segment,
    "kafka": _render_kafka,
}
