"""Local aiohttp servers standing in for webhook receivers, Braze, Customer.io and Segment.

Each checks a request exactly as the vendor documents it (method, path, auth
header, body shape, batch limits); a request that breaks a rule is answered
400 and its problem recorded in `violations`, so a test fails on any drift.
Accepted requests are recorded in `accepted` with their arrival time
(`time.monotonic()`, the same clock the tests use).

Failures are scripted: `script([500, 500])` answers the next two requests
500; `script([(429, {"Retry-After": "2"})])` adds headers; `down = True`
answers nothing until the client gives up; `reject` refuses chosen requests
with 400 and a JSON error body.

Deletions answer as the vendors document them: Braze `POST /users/delete`
(`{"external_ids": [...]}`, at most 50, Bearer key) answers 201
`{"deleted": N, "message": "success"}`, N the users it knew (ids it never saw
count 0, no error); Customer.io `DELETE /api/v1/customers/{id}` (no body,
Basic site:key) answers 200 `{}` whether or not the customer existed. A wrong
key is 401 (Braze `{"message": "Invalid API Key"}`, Customer.io
`{"meta": {"error": "Unauthorized request"}}`). Users the fake knows (`users`)
are those a `/users/track` or `PUT` created; `deleted` lists the ids deleted.

Switches a test flips, answering every request of any route as the vendors do:
`refuse_auth = 401` (or 403) answers that status with the vendor's error body
(credentials revoked) until set back to None; `gone = True` answers 410.
Redirects: `{url base}/redirect/{301|302|303|307|308}` answers that status with
`Location: {url base}/landing`, a page answering 200 to any method — what a
moved endpoint looks like to a client that follows redirects.

Webhooks are verified with the official `standardwebhooks` package
(`Webhook(secret).verify(body, headers)`), the fake's `secret` being the one
the sink signs with; a failing verification answers 401 (and is a violation).
Segment answers 400 to a batch over 500,000 bytes or an event over 32 KB.
Per-object refusals answer 2xx, as the vendors do (checked against their docs):
- Braze `/users/track` (https://www.braze.com/docs/api/endpoints/user_data/post_user_track/,
  https://www.braze.com/docs/api/errors/): an object without exactly one identifier
  (`external_id`, `user_alias {alias_name, alias_label}`, `braze_id`), or one
  `refuse_object(array, obj)` names, is a non-fatal error: 201 `{"message": "success",
  "errors": [{"type", "input_array", "index"}]}`, the other objects processed. More than 75
  objects in an array is a fatal 400. An alias object creates its profile (in `aliases`)
  only with `_update_existing_only: false`.
- Customer.io Track v2 `POST /api/v2/batch` (< 500 KB, `{"batch": [...]}` of person
  operations identify / event / delete): an invalid item, or one `refuse_item(item)`
  names, answers 207 `{"errors": [{"batch_index", "reason", "field", "message"}]}`, the
  others processed; all fine is 200 `{}`. Events (v1 and v2) may carry `id`, which must
  be a ULID (https://docs.customer.io/journeys/events/#deduplicating-events): anything
  else is a 400 (v1) or an item error (v2). `event_ids` lists the ids received.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import unquote

import orjson
from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

WEBHOOK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
BRAZE_KEY = "braze-rest-key"
CIO_SITE, CIO_KEY = "cio-site", "cio-key"
SEGMENT_WRITE_KEY = "segment-write-key"
KINDS = ("webhook", "braze", "customerio", "segment")
SEGMENT_MAX_BATCH_BYTES = 500_000  # Segment: "a maximum of 500KB per batch request"
SEGMENT_MAX_EVENT_BYTES = 32 * 1024  # "... and 32KB per call"
REDIRECTS = (301, 302, 303, 307, 308)
AUTH_ERROR = {  # each vendor's answer to a revoked key
    "webhook": {"error": "unauthorized"},
    "braze": {"message": "Invalid API Key"},
    "customerio": {"meta": {"error": "Unauthorized request"}},
    "segment": {"error": "Invalid write key"},
}
Headers = dict[str, str] | Callable[[], dict[str, str]]


@dataclass
class Call:
    at: float
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    status: int


class Invalid(Exception):
    pass


def _check(condition: bool, problem: str) -> None:
    if not condition:
        raise Invalid(problem)


def _iso(value: Any) -> bool:
    try:
        datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _customer_id(request: web.Request) -> str:
    """The {id} of /api/v1/customers/{id}[/events], percent-decoded."""
    return unquote(request.raw_path.split("?", 1)[0].split("/")[4])


CROCKFORD = set("0123456789ABCDEFGHJKMNPQRSTVWXYZ")


def _ulid(value: Any) -> bool:
    """26 Crockford base32 characters, the first at most 7 (128 bits)."""
    return (
        isinstance(value, str)
        and len(value) == 26
        and set(value.upper()) <= CROCKFORD
        and value[0] in "01234567"
    )


def _braze_identifier_problem(item: dict[str, Any]) -> str | None:
    """Braze's non-fatal error for an object that names no single user."""
    present = [k for k in ("external_id", "user_alias", "braze_id") if k in item]
    if len(present) != 1:
        return "'external_id' or 'braze_id' or 'user_alias' is required"
    if present == ["user_alias"]:
        alias = item["user_alias"]
        ok = isinstance(alias, dict) and set(alias) == {"alias_name", "alias_label"}
        if not ok or not all(isinstance(v, str) and v for v in alias.values()):
            return "'user_alias' needs 'alias_name' and 'alias_label'"
    elif not isinstance(item[present[0]], str) or not item[present[0]]:
        return f"'{present[0]}' must be a string"
    return None


def _cio_item_problem(item: Any) -> tuple[str, str, str] | None:
    """(reason, field, message) for a Track v2 person operation Customer.io refuses."""
    if not isinstance(item, dict) or item.get("type") != "person":
        return "invalid", "type", "type must be person"
    identifiers = item.get("identifiers")
    if not isinstance(identifiers, dict) or len(identifiers) != 1:
        return "required", "identifiers", "exactly one of id, email, cio_id"
    person = identifiers.get("id")
    if not isinstance(person, str) or not person:
        return "invalid", "identifiers.id", "id must be a non-empty string"
    action = item.get("action")
    if action not in ("identify", "event", "delete"):
        return "invalid", "action", f"unsupported action {action!r}"
    if action == "identify" and not isinstance(item.get("attributes"), dict):
        return "required", "attributes", "identify needs attributes"
    if action == "event":
        if not isinstance(item.get("name"), str) or not item["name"]:
            return "required", "name", "event needs a name"
        if "id" in item and not _ulid(item["id"]):
            return "invalid", "id", "id must be a ULID"
        stamp = item.get("timestamp")
        if stamp is not None and not (isinstance(stamp, int) and stamp < 10**11):
            return "invalid", "timestamp", "timestamp must be unix seconds"
    return None


class FakeDestination:
    """One fake API of `kind` on 127.0.0.1 (ephemeral port); `url` once started."""

    def __init__(self, kind: str, secret: str = WEBHOOK_SECRET) -> None:
        assert kind in KINDS
        self.kind = kind
        self.secret = secret  # webhook: the Standard Webhooks secret requests must verify with
        self.url = ""
        self.base = ""  # scheme://host:port
        self.refuse_auth: int | None = None  # 401 / 403 to everything while set
        self.gone = False  # 410 to everything while set
        self.calls: list[Call] = []  # every request, in arrival order
        self.accepted: list[Call] = []  # requests answered 2xx
        self.violations: list[str] = []
        self.down = False
        self.reject: Callable[[Any], bool] | None = None
        self.users: set[str] = set()  # braze / customerio: ids created by track or PUT
        self.deleted: list[str] = []  # ids deleted, in order (repeats included)
        self.aliases: set[tuple[str, str]] = set()  # braze: alias-only profiles created
        self.event_ids: list[str] = []  # customerio: event `id`s received (v1 and v2)
        # per-object refusals answered 2xx with an errors array (see the module doc)
        self.refuse_object: Callable[[str, dict[str, Any]], str | None] | None = None
        self.refuse_item: Callable[[dict[str, Any]], str | None] | None = None
        self._script: list[tuple[int, Headers]] = []
        self._runner: web.AppRunner | None = None

    def script(self, answers: list[int | tuple[int, Headers]]) -> None:
        """The next answers; headers may be a function called when the answer is made
        (e.g. a rate-limit reset relative to the request's arrival)."""
        self._script = [a if isinstance(a, tuple) else (a, {}) for a in answers]

    async def start(self) -> FakeDestination:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base = f"http://127.0.0.1:{port}"
        self.url = self.base + ("/hooks/audiences" if self.kind == "webhook" else "")
        return self

    async def stop(self) -> None:
        self.down = False
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        arrived = time.monotonic()
        raw = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        call = Call(arrived, request.method, request.path, headers, None, 0)
        self.calls.append(call)
        if self.down:
            while self.down:  # no answer: the client times out (released when back up)
                await asyncio.sleep(0.02)
            return self._answer(call, 503, {"error": "was down"})
        if request.path.startswith("/redirect/"):
            status = int(request.path.rsplit("/", 1)[1])
            assert status in REDIRECTS
            location = {"Location": self.base + "/landing"}
            return self._answer(call, status, {"moved": True}, headers=location)
        if request.path == "/landing":  # where redirects lead: a page taking anything
            return self._answer(call, 200, {})
        if self.refuse_auth is not None:
            return self._answer(call, self.refuse_auth, AUTH_ERROR[self.kind])
        if self.gone:
            return self._answer(call, 410, {"error": "this endpoint is gone"})
        unauthorized = self._unauthorized(request, headers)
        if unauthorized is not None:
            return self._answer(call, 401, unauthorized)
        if self.kind == "customerio" and request.method == "DELETE":
            return self._delete_customer(call, request, raw)
        try:
            call.body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return self._answer(call, 400, {"error": "invalid JSON"}, "body is not JSON")
        if self.kind == "braze" and request.path == "/users/delete":
            return self._delete_braze_users(call, request, call.body)
        if self.kind == "webhook":
            try:
                Webhook(self.secret).verify(raw, headers)
            except WebhookVerificationError as exc:
                problem = f"standardwebhooks: {exc}"
                return self._answer(call, 401, {"error": problem}, problem)
        try:
            getattr(self, f"_check_{self.kind}")(request, headers, raw, call.body)
        except Invalid as problem:
            return self._answer(call, 400, {"error": str(problem)}, str(problem))
        scripted = self._scripted(call)
        if scripted is not None:
            return scripted
        if self.reject is not None and self.reject(call.body):
            return self._answer(call, 400, {"error": "user rejected by test"})
        if self.kind == "braze":
            return self._track_braze(call, call.body)
        if self.kind == "customerio" and request.path == "/api/v2/batch":
            return self._batch_customerio(call, call.body)
        self._remember(request, call.body)
        ok = {
            "webhook": (200, {}),
            "braze": (201, {"message": "success"}),
            "customerio": (200, {}),
            "segment": (200, {"success": True}),
        }[self.kind]
        return self._answer(call, *ok)

    def _unauthorized(self, request: web.Request, headers: dict[str, str]) -> Any:
        """The vendors' 401 for a wrong key (on the deletion routes; elsewhere a wrong key
        stays a recorded violation, as before)."""
        authorization = headers.get("authorization")
        braze = self.kind == "braze" and request.path == "/users/delete"
        if braze and authorization != f"Bearer {BRAZE_KEY}":
            return {"message": "Invalid API Key"}
        customerio = self.kind == "customerio" and request.method == "DELETE"
        if customerio and authorization != _basic(CIO_SITE, CIO_KEY):
            return {"meta": {"error": "Unauthorized request"}}
        return None

    def _remember(self, request: web.Request, body: Any) -> None:
        if self.kind == "customerio" and request.method == "PUT":
            self.users.add(_customer_id(request))
        elif self.kind == "customerio" and isinstance(body, dict) and "id" in body:
            self.event_ids.append(body["id"])

    def _track_braze(self, call: Call, body: dict[str, Any]) -> web.Response:
        """Objects are processed one by one; the refused ones are non-fatal errors."""
        errors = []
        counts = {}
        for array in ("attributes", "events"):
            processed = 0
            for index, item in enumerate(body.get(array, [])):
                problem = _braze_identifier_problem(item)
                if problem is None and self.refuse_object is not None:
                    problem = self.refuse_object(array, item)
                if problem is not None:
                    errors.append({"type": problem, "input_array": array, "index": index})
                    continue
                processed += 1
                if "external_id" in item:
                    self.users.add(item["external_id"])
                elif array == "attributes" and item.get("_update_existing_only") is False:
                    alias = item["user_alias"]
                    self.aliases.add((alias["alias_name"], alias["alias_label"]))
            if array in body:
                counts[f"{array}_processed"] = processed
        answer: dict[str, Any] = {"message": "success", **counts}
        if errors:
            answer["errors"] = errors
        return self._answer(call, 201, answer)

    def _batch_customerio(self, call: Call, body: dict[str, Any]) -> web.Response:
        errors = []
        for index, item in enumerate(body["batch"]):
            problem = _cio_item_problem(item)
            refused = self.refuse_item(item) if self.refuse_item is not None else None
            if problem is None and refused is not None:
                problem = ("invalid", "identifiers", refused)
            if problem is not None:
                reason, field, message = problem
                errors.append(
                    {"batch_index": index, "reason": reason, "field": field, "message": message}
                )
                continue
            person = item["identifiers"]["id"]
            if item["action"] == "identify":
                self.users.add(person)
            elif item["action"] == "delete":
                self.users.discard(person)
                self.deleted.append(person)
            elif "id" in item:
                self.event_ids.append(item["id"])
        if errors:
            return self._answer(call, 207, {"errors": errors})
        return self._answer(call, 200, {})

    def _scripted(self, call: Call) -> web.Response | None:
        if not self._script:
            return None
        status, extra = self._script.pop(0)
        headers = extra() if callable(extra) else extra
        return self._answer(call, status, {"error": "scripted"}, headers=headers)

    def _delete_braze_users(self, call: Call, request: web.Request, body: Any) -> web.Response:
        """POST /users/delete: one kind of identifier, at most 50 of them."""
        try:
            _check(request.method == "POST", "POST /users/delete")
            _check(isinstance(body, dict) and len(body) == 1, "exactly one kind of identifier")
            if "user_aliases" in body:
                return self._delete_braze_aliases(call, body["user_aliases"])
            ids = body.get("external_ids")
            _check(isinstance(ids, list) and 0 < len(ids) <= 50, "external_ids: 1..50")
            _check(all(isinstance(i, str) and i for i in ids), "external_ids: strings")
        except Invalid as problem:
            return self._answer(call, 400, {"message": str(problem)}, str(problem))
        scripted = self._scripted(call)
        if scripted is not None:
            return scripted
        known = [i for i in ids if i in self.users]
        self.users.difference_update(ids)
        self.deleted += ids
        return self._answer(call, 201, {"deleted": len(known), "message": "success"})

    def _delete_braze_aliases(self, call: Call, aliases: Any) -> web.Response:
        """POST /users/delete `{"user_aliases": [{alias_name, alias_label}]}`, at most 50."""
        try:
            _check(isinstance(aliases, list) and 0 < len(aliases) <= 50, "user_aliases: 1..50")
            for alias in aliases:
                _check(
                    isinstance(alias, dict) and set(alias) == {"alias_name", "alias_label"},
                    "user_aliases: {alias_name, alias_label}",
                )
        except Invalid as problem:
            return self._answer(call, 400, {"message": str(problem)}, str(problem))
        scripted = self._scripted(call)
        if scripted is not None:
            return scripted
        keys = [(a["alias_name"], a["alias_label"]) for a in aliases]
        known = [k for k in keys if k in self.aliases]
        self.aliases.difference_update(keys)
        self.deleted += [f"alias:{name}" for name, _ in keys]
        return self._answer(call, 201, {"deleted": len(known), "message": "success"})

    def _delete_customer(self, call: Call, request: web.Request, raw: bytes) -> web.Response:
        """DELETE /api/v1/customers/{id}: no body; 200 `{}` known or not."""
        parts = request.raw_path.split("?", 1)[0].split("/")
        try:
            _check(request.path.startswith("/api/v1/customers/") and len(parts) == 5, "path")
            _check(raw == b"", "DELETE takes no body")
        except Invalid as problem:
            return self._answer(call, 400, {"meta": {"error": str(problem)}}, str(problem))
        scripted = self._scripted(call)
        if scripted is not None:
            return scripted
        customer = _customer_id(request)
        self.users.discard(customer)
        self.deleted.append(customer)
        return self._answer(call, 200, {})

    def _answer(
        self,
        call: Call,
        status: int,
        body: Any,
        violation: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> web.Response:
        call.status = status
        if violation is not None:
            self.violations.append(f"{call.method} {call.path}: {violation}")
        if 200 <= status < 300:
            self.accepted.append(call)
        return web.json_response(body, status=status, headers=headers)

    # -- the documented contracts ----------------------------------------------------------------

    def _check_webhook(
        self, request: web.Request, headers: dict[str, str], raw: bytes, body: Any
    ) -> None:
        """Standard Webhooks (signature verified in `_handle`); `webhook-id` = the messageId
        of a single message, `msg_` + hex SHA-256 of the JSON array of a batch's messageIds."""
        _check(request.method == "POST" and request.path == "/hooks/audiences", "POST the URL")
        _check(headers.get("content-type", "").startswith("application/json"), "content-type")
        items = body if isinstance(body, list) else [body]
        _check(bool(items) and all(isinstance(m, dict) for m in items), "message objects")
        ids = [m.get("messageId") for m in items]
        expected = (
            ids[0] if len(ids) == 1 else "msg_" + hashlib.sha256(orjson.dumps(ids)).hexdigest()
        )
        _check(headers.get("webhook-id") == expected, "webhook-id")

    def _check_braze(
        self, request: web.Request, headers: dict[str, str], raw: bytes, body: Any
    ) -> None:
        """POST /users/track, Bearer key, <= 75 attributes / events / purchases."""
        _check(request.method == "POST" and request.path == "/users/track", "POST /users/track")
        _check(headers.get("authorization") == f"Bearer {BRAZE_KEY}", "Bearer REST API key")
        _check(isinstance(body, dict), "body must be an object")
        _check(set(body) <= {"attributes", "events", "purchases"}, f"unknown keys {set(body)}")
        _check(bool(body), "nothing to track")
        for name in ("attributes", "events"):
            items = body.get(name, [])
            _check(isinstance(items, list) and len(items) <= 75, f"{name}: at most 75 objects")
            _check(all(isinstance(item, dict) for item in items), f"{name}: objects")
            for item in items:
                flag = item.get("_update_existing_only", False)
                _check(isinstance(flag, bool), f"{name}: _update_existing_only is a boolean")
        for event in body.get("events", []):
            _check(isinstance(event.get("name"), str), "events: name")
            _check(_iso(event.get("time")), "events: time must be ISO-8601")
            _check(isinstance(event.get("properties", {}), dict), "events: properties object")

    def _check_customerio(
        self, request: web.Request, headers: dict[str, str], raw: bytes, body: Any
    ) -> None:
        """Track API v1: PUT /api/v1/customers/{id}, POST .../{id}/events, Basic site:key;
        Track API v2: POST /api/v2/batch."""
        _check(headers.get("authorization") == _basic(CIO_SITE, CIO_KEY), "Basic site_id:api_key")
        _check(isinstance(body, dict), "body must be an object")
        if request.path == "/api/v2/batch":
            _check(request.method == "POST", "POST /api/v2/batch")
            _check(len(raw) < 500_000, "batch over 500kb")
            _check(set(body) == {"batch"} and isinstance(body["batch"], list), "{batch: [...]}")
            _check(len(body["batch"]) > 0, "an empty batch")
            return
        parts = request.path.split("/")
        _check(request.path.startswith("/api/v1/customers/") and len(parts) in (5, 6), "path")
        if len(parts) == 5:
            _check(request.method == "PUT", "attributes are PUT")
        else:
            _check(request.method == "POST" and parts[5] == "events", "events are POSTed")
            _check(isinstance(body.get("name"), str), "event name")
            _check(isinstance(body.get("data", {}), dict), "event data object")
            stamp = body.get("timestamp")
            _check(
                stamp is None or (isinstance(stamp, int) and stamp < 10**11),
                "timestamp must be unix seconds",
            )
            _check("id" not in body or _ulid(body["id"]), "id must be a ULID")

    def _check_segment(
        self, request: web.Request, headers: dict[str, str], raw: bytes, body: Any
    ) -> None:
        """POST /v1/batch, Basic write_key:, <= 500 KB, <= 2500 messages of <= 32 KB."""
        _check(request.method == "POST" and request.path == "/v1/batch", "POST /v1/batch")
        _check(headers.get("authorization") == _basic(SEGMENT_WRITE_KEY, ""), "write key auth")
        _check(len(raw) <= SEGMENT_MAX_BATCH_BYTES, "batch over 500 KB")
        _check(isinstance(body, dict) and isinstance(body.get("batch"), list), "{batch: [...]}")
        _check(0 < len(body["batch"]) <= 2500, "1..2500 messages")
        for message in body["batch"]:
            _check(len(orjson.dumps(message)) <= SEGMENT_MAX_EVENT_BYTES, "message over 32 KB")
            _check(message.get("type") in ("track", "identify"), "type")
            _check(bool(message.get("userId") or message.get("anonymousId")), "no user id")
            _check(bool(message.get("messageId")), "messageId")
            if message["type"] == "track":
                _check(isinstance(message.get("event"), str), "track needs event")
            else:
                _check(isinstance(message.get("traits"), dict), "identify needs traits")


def audience_destination_problems(message: dict[str, Any]) -> list[str]:
    """What a Segment Actions audience destination would find missing in `message` (an
    Engage audience event as Segment forwards it): the mappings of LaunchDarkly
    Audiences' "Sync Engage Audience" action (segmentio/action-destinations,
    launchdarkly-audiences/syncAudience: every field required) — the audience from
    `context.personas.computation_key`, the event kept only when
    `context.personas.computation_class` is `audience`, the user from `userId` else
    `anonymousId`, membership as the boolean `properties[key]` (track) or `traits[key]`
    (identify) — and the external audience id that other audience destinations (Dynamic
    Yield, ...) map from `context.personas.computation_id` and `space_id`."""
    problems: list[str] = []
    personas = (message.get("context") or {}).get("personas")
    if not isinstance(personas, dict):
        return ["no context.personas"]
    for field in ("computation_key", "computation_class", "computation_id", "space_id"):
        if not isinstance(personas.get(field), str) or not personas[field]:
            problems.append(f"context.personas.{field} missing")
    if personas.get("computation_class") != "audience":
        problems.append("computation_class is not 'audience' (LaunchDarkly ignores the event)")
    if not (message.get("userId") or message.get("anonymousId")):
        problems.append("no userId or anonymousId (context_key)")
    values = message.get("properties") if "properties" in message else message.get("traits")
    key = personas.get("computation_key")
    if not isinstance(values, dict) or not isinstance(values.get(key), bool):
        problems.append(f"no boolean membership at properties/traits[{key!r}]")
    return problems
