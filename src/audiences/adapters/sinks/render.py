"""Output messages -> the requests each destination type expects (pure, no I/O).

Input: output messages of `audience-events` (SPEC §5), in topic order.
Output: `Request`s in the order they must be sent, each naming the messages it
carries (`indexes`), so delivery outcomes can be attributed per message.

Per type (SPEC §6; payloads follow each vendor's documented API):
- webhook: the message itself (`batch_size: 1`) or a JSON array of messages;
  Standard Webhooks headers are added at send time (`webhook_headers`), since
  each attempt carries a fresh timestamp and signature; `webhook-id` derives
  from every messageId of the body (`batch_webhook_id`).
- braze: `POST /users/track`, Bearer key; `attributes` (one object per profile per
  request, later values win, `{external_id, K: true|false}`) and `events`
  (`{external_id, name, time: ISO-8601, properties}`); requests are cut by objects
  (<= 75 of each, <= `objects_per_request` together when set), `batch_size` counts
  messages. Anonymous profiles as `user_alias` when `anonymous_alias_label` is set.
  `Request.objects` maps each object back to its messages (Braze's `errors[]`).
- customerio: `batch_size: 1`: Track API v1, Basic site_id:api_key;
  `PUT /api/v1/customers/{id}` with attributes as top-level body keys,
  `POST /api/v1/customers/{id}/events` with `{name, id: ULID, data, timestamp:
  unix seconds}`, one request per message and mode. `batch_size` > 1: Track API v2
  `POST /api/v2/batch` of person operations (identify / event / delete), < 500 KB.
  The event `id` (Customer.io's dedupe key, a ULID) derives from the messageId.
- segment: `POST /v1/batch`, Basic write_key:, `{"batch": [...]}` of Segment-Spec
  track / identify messages, split by encoded size to stay within Segment's
  500,000 bytes per request; a message with an event over 32 KB is not sent
  (`Rendered.refused`: Segment would drop it).
- kafka: the same messages, keyed by user, to another topic.

`mode` picks the track message (custom event), an identify message (custom
attribute `{K: true|false}`), or both. Braze and Customer.io need a user id:
anonymous profiles are skipped for them (Braze: unless `anonymous_alias_label`).

Holdout outputs (`properties.holdout: true`, SPEC §3: the audience's control group) are
skipped by every destination — `Rendered.holdout` names them, the deliverer counts them
in `audiences_holdout_skipped_total{destination, audience}` — except a `kafka`
destination with `include_holdout: true`, which forwards them like any other.

`User Deleted` (a profile deleted, SPEC §4) goes to every destination whatever its
`audiences` and `mode`, unless it sets `forward_deletions: false` (then skipped):
- braze: `POST /users/delete` `{"external_ids": [...]}` (or `{"user_aliases": [...]}`
  for aliased anonymous profiles), at most 50 per request (Braze's limit), between
  the `/users/track` requests of the messages around it;
- customerio: `DELETE /api/v1/customers/{id}` (v2: a `delete` batch item);
- webhook, segment: the `User Deleted` track message itself (signed, batched as usual);
- kafka: a `delete` record keyed by the id, `{"type": "delete", "userId" (or
  "anonymousId"), "messageId", "timestamp"}`.
Anonymous ids are skipped for Braze (without aliases) and Customer.io. A 404
(no such user) from Braze or Customer.io to a deletion is what the deletion asked
for: it counts as delivered (`absent_ok`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any
from urllib.parse import quote

import orjson

from audiences.adapters.sinks.config import Destination, webhook_key
from audiences.adapters.sinks.pii import DEFAULT_PHONE_REGION, PII_TRAITS, contact_traits
from audiences.core.outputs import USER_DELETED

# Segment's tracking API: a batch request of at most 500 KB and events of at most 32 KB (it
# answers 400 to a larger batch and drops a larger event); analytics-python keeps batches
# under 475,000 bytes and events under 32 KiB.
SEGMENT_MAX_BATCH_BYTES = 500_000
SEGMENT_MAX_EVENT_BYTES = 32 * 1024
BRAZE_MAX_DELETIONS = 50  # Braze: up to 50 external_ids per /users/delete request
BRAZE_MAX_OBJECTS = 75  # Braze /users/track: <= 75 attributes and <= 75 events per request
CIO_MAX_BATCH_BYTES = 500 * 1000 - 1024  # Customer.io /api/v2/batch: "smaller than 500kb"
CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # ULID's base32 alphabet
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
    # the body's arrays of objects -> per object, the messages it came from (positions in
    # the rendered list), so a 2xx naming refused objects dead-letters them (answers.py)
    objects: Mapping[str, tuple[tuple[int, ...], ...]] = field(
        default_factory=dict, repr=False, compare=False
    )


@dataclass(frozen=True)
class Rendered:
    requests: list[Request]
    skipped: tuple[int, ...]  # messages this destination does not take (selection, anonymous)
    # messages the destination would drop whatever we do (e.g. over Segment's 32 KB):
    # dead-lettered without a request, (index, why)
    refused: tuple[tuple[int, str], ...] = ()
    # the skipped messages it would take but for the holdout (SPEC §3): (index, audience)
    holdout: tuple[tuple[int, str], ...] = ()


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


def is_holdout(message: dict[str, Any]) -> bool:
    """An output for a member of the audience's holdout (`properties.holdout: true`)."""
    props = message.get("properties")
    return isinstance(props, dict) and props.get("holdout") is True


def is_deletion(message: dict[str, Any]) -> bool:
    """A `User Deleted` output (SPEC §4): the profile was deleted."""
    return message.get("type") == "track" and message.get("event") == USER_DELETED


def user_id(message: dict[str, Any]) -> str | None:
    value = message.get("userId")
    return value if isinstance(value, str) and value else None


def _anonymous_id(message: dict[str, Any]) -> str | None:
    value = message.get("anonymousId")
    return value if isinstance(value, str) and value else None


def group_id(message: dict[str, Any]) -> str | None:
    """The account of an account audience's output (SPEC §5: `groupId`, no user id)."""
    value = message.get("groupId")
    if not isinstance(value, str) or not value or "userId" in message or "anonymousId" in message:
        return None
    return value


def group_messages(message: dict[str, Any]) -> list[dict[str, Any]]:
    """Segment-Spec `group` calls setting an account audience as a group trait
    (`{K: true|false}`): one per user linked to the account (`properties.linked_users`;
    Segment's group call needs a user), or one with `anonymousId` `group:{groupId}` when
    none is linked. Their messageIds derive from the output's: deterministic."""
    gid = group_id(message) or ""
    key, value = subject(message) or ("", None)
    props = message.get("properties")
    users = props.get("linked_users") if isinstance(props, dict) else None
    who: list[tuple[str, str]] = [
        ("userId", u) for u in (users if isinstance(users, list) else []) if isinstance(u, str)
    ] or [("anonymousId", "group:" + gid)]
    context = message.get("context")
    out = []
    for id_field, ident in who:
        call: dict[str, Any] = {
            "type": "group",
            id_field: ident,
            "groupId": gid,
            "messageId": hashlib.sha256(
                f"{message.get('messageId')}|group|{ident}".encode()
            ).hexdigest(),
            "timestamp": message.get("timestamp"),
            "traits": {key: value},
        }
        if isinstance(context, dict) and "personas" in context:
            call["context"] = {"personas": context["personas"]}
        out.append(call)
    return out


def profile_id(message: dict[str, Any]) -> str:
    return str(user_id(message) or message.get("anonymousId") or "")


def track_message(
    message: dict[str, Any], hashed: bool, phone_region: str = DEFAULT_PHONE_REGION
) -> dict[str, Any]:
    """The output message as published, with contact traits hashed when asked to."""
    context = message.get("context")
    if not hashed or not isinstance(context, dict) or not context.get("traits"):
        return message
    traits = dict(context["traits"])
    contact = contact_traits(traits, hashed, phone_region)
    for name in PII_TRAITS:  # one that cannot be hashed (not a string) is not sent
        if traits.get(name) and name not in contact:
            del traits[name]
    traits.update(contact)
    return {**message, "context": {**context, "traits": traits}}


def identify_message(
    message: dict[str, Any], hashed: bool, phone_region: str = DEFAULT_PHONE_REGION
) -> dict[str, Any]:
    """A Segment-Spec identify setting the audience as a trait (`{K: true|false}`).

    Its messageId derives from the track message's, so it is deterministic too."""
    key, value = subject(message) or ("", None)
    context = message.get("context") if isinstance(message.get("context"), dict) else {}
    contact = contact_traits((context or {}).get("traits"), hashed, phone_region)
    traits = {**contact, key: value}
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


def per_user_messages(message: dict[str, Any]) -> list[dict[str, Any]]:
    """An account audience's output as one message per linked user (Braze, Customer.io:
    the account's membership set on each of its users): `userId` the user, the account
    in `properties.groupId`, a messageId derived from the output's and the user."""
    gid = group_id(message) or ""
    props = message.get("properties")
    props = props if isinstance(props, dict) else {}
    users = props.get("linked_users")
    out = []
    for user in users if isinstance(users, list) else []:
        if not isinstance(user, str) or not user:
            continue
        per = {k: v for k, v in message.items() if k != "groupId"}
        per["userId"] = user
        per["messageId"] = hashlib.sha256(
            f"{message.get('messageId')}|user|{user}".encode()
        ).hexdigest()
        per["properties"] = {k: v for k, v in props.items() if k != "linked_users"} | {
            "groupId": gid
        }
        out.append(per)
    return out


def render_requests(destination: Destination, messages: Sequence[dict[str, Any]]) -> Rendered:
    """The requests carrying `messages` to `destination`, in sending order."""
    if destination.type in ("braze", "customerio") and any(
        group_id(m) is not None and not is_deletion(m) for m in messages
    ):
        return _fanned_out(destination, messages)
    return _render_requests(destination, messages)


def _fanned_out(destination: Destination, messages: Sequence[dict[str, Any]]) -> Rendered:
    """Account outputs sent per linked user (`per_user_messages`), rendered as user
    outputs, with every request's messages mapped back to the outputs they came from
    (an output with no linked user is skipped)."""
    expanded: list[dict[str, Any]] = []
    origin: list[int] = []
    for i, message in enumerate(messages):
        parts = (
            per_user_messages(message)
            if group_id(message) is not None and not is_deletion(message)
            else [message]
        )
        expanded.extend(parts)
        origin.extend(i for _ in parts)
    rendered = _render_requests(destination, expanded)

    def back(indexes: Sequence[int]) -> tuple[int, ...]:
        return tuple(dict.fromkeys(origin[j] for j in indexes))

    requests = [
        replace(
            r,
            indexes=back(r.indexes),
            objects={name: tuple(back(o) for o in objs) for name, objs in r.objects.items()},
        )
        for r in rendered.requests
    ]
    carried = {i for r in requests for i in r.indexes}
    refused = tuple(dict.fromkeys((origin[j], why) for j, why in rendered.refused))
    refused_ids = {i for i, _ in refused}
    skipped = tuple(i for i in range(len(messages)) if i not in carried and i not in refused_ids)
    holdout = tuple(dict.fromkeys((origin[j], key) for j, key in rendered.holdout))
    return Rendered(requests, skipped, refused, holdout)


def _render_requests(destination: Destination, messages: Sequence[dict[str, Any]]) -> Rendered:
    taken: list[int] = []
    skipped: list[int] = []
    holdout: list[tuple[int, str]] = []
    needs_user = destination.type in ("braze", "customerio")
    for index, message in enumerate(messages):
        known = user_id(message) is not None or (
            bool(destination.anonymous_alias_label) and _anonymous_id(message) is not None
        )
        if is_deletion(message):
            wanted = destination.forward_deletions and profile_id(message) != ""
            if not wanted or (needs_user and not known):
                skipped.append(index)
            else:
                taken.append(index)
            continue
        found = subject(message)
        if (
            found is None
            or not destination.selects(found[0])
            or (needs_user and not known)
            or not _has_units(destination, message)
        ):
            skipped.append(index)
        elif is_holdout(message) and not destination.include_holdout:
            skipped.append(index)
            holdout.append((index, found[0]))
        else:
            taken.append(index)
    refused: list[tuple[int, str]] = []
    if destination.type == "segment":
        taken, refused = _segment_sized(destination, messages, taken)
    renderer = _RENDERERS[destination.type]
    requests = renderer(destination, messages, taken) if taken else []
    return Rendered(requests, tuple(skipped), tuple(refused), tuple(holdout))


def _segment_sized(
    destination: Destination, messages: Sequence[dict[str, Any]], taken: list[int]
) -> tuple[list[int], list[tuple[int, str]]]:
    """`taken` without the messages Segment would drop (an event over 32 KB), and those."""
    kept, refused = [], []
    for i in taken:
        largest = max(len(orjson.dumps(unit)) for unit in _units(destination, messages[i]))
        if largest > SEGMENT_MAX_EVENT_BYTES:
            refused.append(
                (
                    i,
                    f"event of {largest} bytes is over Segment's {SEGMENT_MAX_EVENT_BYTES} "
                    "bytes per event (Segment would drop it); not sent",
                )
            )
        else:
            kept.append(i)
    return kept, refused


def _has_units(destination: Destination, message: dict[str, Any]) -> bool:
    """Whether the destination's modes make anything of an audience message: account
    audiences' outputs go to Segment only as `group` calls (Segment needs a user for a
    track), to webhooks and Kafka as the track message; user outputs need track or
    identify."""
    modes = destination.modes
    if group_id(message) is not None:
        return "group" in modes or ("track" in modes and destination.type != "segment")
    return "track" in modes or "identify" in modes


def _units(destination: Destination, message: dict[str, Any]) -> list[dict[str, Any]]:
    if is_deletion(message):
        return [message]  # whatever the mode: a deletion is no audience to set
    if group_id(message) is not None:
        account: list[dict[str, Any]] = []
        if "track" in destination.modes and destination.type != "segment":
            account.append(message)
        if "group" in destination.modes:
            account.extend(group_messages(message))
        return account
    units = []
    if "track" in destination.modes:
        units.append(track_message(message, destination.hash_pii, destination.phone_region))
    if "identify" in destination.modes:
        units.append(identify_message(message, destination.hash_pii, destination.phone_region))
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
                body = orjson.dumps(unit)
                requests.append(_webhook_request(destination, (i,), body, batch_webhook_id([unit])))
        return requests
    for chunk in _chunks(taken, destination.batch_size):
        units = [unit for i in chunk for unit in _units(destination, messages[i])]
        requests.append(
            _webhook_request(
                destination, tuple(chunk), orjson.dumps(units), batch_webhook_id(units)
            )
        )
    return requests


def batch_webhook_id(units: Sequence[dict[str, Any]]) -> str:
    """A batch's `webhook-id`: derived from every messageId it holds, in order, so two
    batches share an id (and a receiver's dedupe drops one) only if they hold the same
    messages. A single message keeps its messageId."""
    ids = [str(unit.get("messageId") or "") for unit in units]
    if len(ids) == 1:
        return ids[0]
    return "msg_" + hashlib.sha256(orjson.dumps(ids)).hexdigest()


def _webhook_request(
    destination: Destination, indexes: tuple[int, ...], body: bytes, webhook_id: str
) -> Request:
    return Request("POST", destination.url, indexes, body, JSON, webhook_id=webhook_id)


def sign_webhook(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """Standard Webhooks `v1,<base64 HMAC-SHA256>` over `{id}.{timestamp}.{body}`."""
    key = webhook_key(secret)
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
        if deleting:  # one kind of identifier per request: external ids, then aliases
            known = [i for i in run if user_id(messages[i]) is not None]
            aliased = [i for i in run if user_id(messages[i]) is None]
            for chunk in _chunks(known, min(destination.batch_size, BRAZE_MAX_DELETIONS)):
                ids = list(dict.fromkeys(str(messages[i]["userId"]) for i in chunk))
                body = orjson.dumps({"external_ids": ids})
                requests.append(
                    Request(
                        "POST", base + "/users/delete", tuple(chunk), body, headers, absent_ok=True
                    )
                )
            for chunk in _chunks(aliased, min(destination.batch_size, BRAZE_MAX_DELETIONS)):
                aliases = [_braze_who(destination, messages[i])[1]["user_alias"] for i in chunk]
                unique = list({(a["alias_name"], a["alias_label"]): a for a in aliases}.values())
                body = orjson.dumps({"user_aliases": unique})
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


def _braze_who(destination: Destination, message: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(a key naming the profile, the identifier fields of its Braze objects)."""
    external_id = user_id(message)
    if external_id is not None:
        return "e:" + external_id, {"external_id": external_id}
    alias_name = str(_anonymous_id(message))
    alias = {"alias_name": alias_name, "alias_label": destination.anonymous_alias_label}
    return "a:" + alias_name, {"user_alias": alias}


def _braze_track(
    destination: Destination,
    messages: Sequence[dict[str, Any]],
    taken: list[int],
    url: str,
    headers: tuple[tuple[str, str], ...],
) -> list[Request]:
    """`/users/track` requests cut by objects: <= 75 attributes and <= 75 events each
    (one attributes object per profile per request, later values win), <=
    `objects_per_request` of both together when set, and at most `batch_size` messages."""
    requests: list[Request] = []
    attributes: dict[str, dict[str, Any]] = {}
    owners: dict[str, list[int]] = {}
    events: list[dict[str, Any]] = []
    carried: list[int] = []

    def close() -> None:
        if not carried:
            return
        body: dict[str, Any] = {}
        if attributes:
            body["attributes"] = list(attributes.values())
        if events:
            body["events"] = events
        objects = {
            "attributes": tuple(tuple(owners[who]) for who in attributes),
            "events": tuple((i,) for i in carried if "track" in destination.modes),
        }
        requests.append(
            Request("POST", url, tuple(carried), orjson.dumps(body), headers, objects=objects)
        )

    for i in taken:
        message = messages[i]
        who, identity = _braze_who(destination, message)
        identify = "identify" in destination.modes
        track = "track" in destination.modes
        more_attributes = len(attributes) + (identify and who not in attributes)
        more_events = len(events) + track
        combined = destination.objects_per_request
        if carried and (
            len(carried) >= destination.batch_size
            or more_attributes > BRAZE_MAX_OBJECTS
            or more_events > BRAZE_MAX_OBJECTS
            or (combined is not None and more_attributes + more_events > combined)
        ):
            close()
            attributes, owners, events, carried = {}, {}, [], []
        key, value = subject(message) or ("", None)
        if identify:
            if who not in attributes:
                attributes[who] = dict(identity)
                if destination.update_existing_only is not None:
                    attributes[who]["_update_existing_only"] = destination.update_existing_only
                elif "user_alias" in identity:  # else Braze creates no alias-only profile
                    attributes[who]["_update_existing_only"] = False
                owners[who] = []
            attributes[who][key] = value
            owners[who].append(i)
        if track:
            events.append(
                {
                    **identity,
                    "name": message.get("event"),
                    "time": message.get("timestamp"),
                    "properties": message.get("properties", {}),
                }
            )
        carried.append(i)
    close()
    return requests


def _unix_ms(iso: Any) -> int | None:
    if not isinstance(iso, str):
        return None
    try:
        return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)
    except (ValueError, OverflowError, OSError):
        return None


def _unix_seconds(iso: Any) -> int | None:
    ms = _unix_ms(iso)
    return None if ms is None else ms // 1000


def event_ulid(message: dict[str, Any]) -> str:
    """Customer.io's event `id` (its dedupe key, which must be a ULID), derived from the
    output messageId: the event time's 48-bit milliseconds, then 80 bits of
    sha256(messageId). The same message always gets the same id."""
    ms = min(max(_unix_ms(message.get("timestamp")) or 0, 0), 2**48 - 1)
    digest = hashlib.sha256(str(message.get("messageId") or "").encode()).digest()
    value = (ms << 80) | int.from_bytes(digest[:10], "big")
    return "".join(CROCKFORD[(value >> (5 * k)) & 31] for k in range(25, -1, -1))


def _cio_attributes(destination: Destination, message: dict[str, Any]) -> dict[str, Any]:
    key, value = subject(message) or ("", None)
    context = message.get("context")
    traits = context.get("traits") if isinstance(context, dict) else None
    return {**contact_traits(traits, destination.hash_pii, destination.phone_region), key: value}


def _cio_event(message: dict[str, Any]) -> dict[str, Any]:
    event: dict[str, Any] = {"name": message.get("event"), "id": event_ulid(message)}
    timestamp = _unix_seconds(message.get("timestamp"))
    if timestamp is not None:
        event["timestamp"] = timestamp
    return event


def _render_customerio(
    destination: Destination, messages: Sequence[dict[str, Any]], taken: list[int]
) -> list[Request]:
    if destination.batch_size > 1:
        return _render_customerio_batch(destination, messages, taken)
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
        if "identify" in destination.modes:
            attributes = _cio_attributes(destination, message)
            requests.append(Request("PUT", customer, (i,), orjson.dumps(attributes), headers))
        if "track" in destination.modes:
            event = {**_cio_event(message), "data": message.get("properties", {})}
            requests.append(
                Request("POST", customer + "/events", (i,), orjson.dumps(event), headers)
            )
    return requests


def _cio_items(destination: Destination, message: dict[str, Any]) -> list[dict[str, Any]]:
    """Track API v2 entity operations for one message, in order."""
    person = {"type": "person", "identifiers": {"id": str(message["userId"])}}
    if is_deletion(message):
        return [{**person, "action": "delete"}]
    items = []
    if "identify" in destination.modes:
        attributes = _cio_attributes(destination, message)
        items.append({**person, "action": "identify", "attributes": attributes})
    if "track" in destination.modes:
        event = _cio_event(message)
        items.append(
            {**person, "action": "event", **event, "attributes": message.get("properties", {})}
        )
    return items


def _render_customerio_batch(
    destination: Destination, messages: Sequence[dict[str, Any]], taken: list[int]
) -> list[Request]:
    """`batch_size` > 1: Track API v2 `POST /api/v2/batch` `{"batch": [...]}`, at most
    `batch_size` messages and < 500 KB per request."""
    url = destination.url.rstrip("/") + "/api/v2/batch"
    headers = (*JSON, _basic(destination.site_id, destination.api_key))
    requests: list[Request] = []
    batch: list[bytes] = []
    owners: list[tuple[int, ...]] = []
    carried: list[int] = []
    size = 0

    def close() -> None:
        if carried:
            body = b'{"batch":[' + b",".join(batch) + b"]}"
            objects = {"batch": tuple(owners)}
            requests.append(Request("POST", url, tuple(carried), body, headers, objects=objects))

    for i in taken:
        encoded = [orjson.dumps(item) for item in _cio_items(destination, messages[i])]
        grows = sum(len(e) + 1 for e in encoded)
        if carried and (
            len(carried) >= destination.batch_size or size + grows > CIO_MAX_BATCH_BYTES
        ):
            close()
            batch, owners, carried, size = [], [], [], 0
        batch.extend(encoded)
        owners.extend((i,) for _ in encoded)
        carried.append(i)
        size += grows
    close()
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
        grows = sum(len(e) + 1 for e in encoded)  # each with its comma
        # the body is `{"batch":[` + the events joined by commas + `]}`: size + 11 bytes
        if indexes and (
            len(indexes) >= destination.batch_size
            or len(b'{"batch":[]}') - 1 + size + grows > SEGMENT_MAX_BATCH_BYTES
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
            ((profile_id(messages[i]) or _account_key(messages[i])).encode(), orjson.dumps(unit))
            for i in chunk
            for unit in _kafka_units(destination, messages[i])
        )
        requests.append(Request("PRODUCE", destination.topic, tuple(chunk), records=records))
    return requests


def _account_key(message: dict[str, Any]) -> str:
    gid = group_id(message)
    return "" if gid is None else "group:" + gid


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
