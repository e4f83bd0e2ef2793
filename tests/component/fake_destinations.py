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
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import unquote

import orjson
from aiohttp import web

WEBHOOK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
BRAZE_KEY = "braze-rest-key"
CIO_SITE, CIO_KEY = "cio-site", "cio-key"
SEGMENT_WRITE_KEY = "segment-write-key"
KINDS = ("webhook", "braze", "customerio", "segment")


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


class FakeDestination:
    """One fake API of `kind` on 127.0.0.1 (ephemeral port); `url` once started."""

    def __init__(self, kind: str) -> None:
        assert kind in KINDS
        self.kind = kind
        self.url = ""
        self.calls: list[Call] = []  # every request, in arrival order
        self.accepted: list[Call] = []  # requests answered 2xx
        self.violations: list[str] = []
        self.down = False
        self.reject: Callable[[Any], bool] | None = None
        self.users: set[str] = set()  # braze / customerio: ids created by track or PUT
        self.deleted: list[str] = []  # ids deleted, in order (repeats included)
        self._script: list[tuple[int, dict[str, str]]] = []
        self._runner: web.AppRunner | None = None

    def script(self, answers: list[int | tuple[int, dict[str, str]]]) -> None:
        self._script = [a if isinstance(a, tuple) else (a, {}) for a in answers]

    async def start(self) -> FakeDestination:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}" + (
            "/hooks/audiences" if self.kind == "webhook" else ""
        )
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
        try:
            getattr(self, f"_check_{self.kind}")(request, headers, raw, call.body)
        except Invalid as problem:
            return self._answer(call, 400, {"error": str(problem)}, str(problem))
        if self._script:
            status, extra = self._script.pop(0)
            return self._answer(call, status, {"error": "scripted"}, headers=extra)
        if self.reject is not None and self.reject(call.body):
            return self._answer(call, 400, {"error": "user rejected by test"})
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
        if self.kind == "braze" and isinstance(body, dict):
            for name in ("attributes", "events"):
                self.users.update(item["external_id"] for item in body.get(name, []))
        elif self.kind == "customerio" and request.method == "PUT":
            self.users.add(_customer_id(request))

    def _scripted(self, call: Call) -> web.Response | None:
        if not self._script:
            return None
        status, extra = self._script.pop(0)
        return self._answer(call, status, {"error": "scripted"}, headers=extra)

    def _delete_braze_users(self, call: Call, request: web.Request, body: Any) -> web.Response:
        """POST /users/delete: one kind of identifier, at most 50 of them."""
        try:
            _check(request.method == "POST", "POST /users/delete")
            _check(isinstance(body, dict) and len(body) == 1, "exactly one kind of identifier")
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
        """Standard Webhooks: webhook-id / -timestamp / -signature over `{id}.{ts}.{body}`."""
        _check(request.method == "POST" and request.path == "/hooks/audiences", "POST the URL")
        _check(headers.get("content-type", "").startswith("application/json"), "content-type")
        msg_id, stamp = headers.get("webhook-id", ""), headers.get("webhook-timestamp", "")
        _check(bool(msg_id) and stamp.isdigit(), "webhook-id and webhook-timestamp required")
        _check(abs(int(stamp) - time.time()) < 300, "webhook-timestamp outside 5 minutes")
        key = base64.b64decode(WEBHOOK_SECRET.removeprefix("whsec_"))
        expected = base64.b64encode(
            hmac.new(key, f"{msg_id}.{stamp}.".encode() + raw, hashlib.sha256).digest()
        ).decode()
        signatures = [s.split(",", 1)[1] for s in headers.get("webhook-signature", "").split()]
        _check(any(hmac.compare_digest(expected, s) for s in signatures), "bad webhook-signature")
        first = body[0] if isinstance(body, list) else body
        _check(isinstance(first, dict) and first.get("messageId") == msg_id, "webhook-id")

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
            for item in items:
                _check(isinstance(item.get("external_id"), str), f"{name}: external_id")
        for event in body.get("events", []):
            _check(isinstance(event.get("name"), str), "events: name")
            _check(_iso(event.get("time")), "events: time must be ISO-8601")
            _check(isinstance(event.get("properties", {}), dict), "events: properties object")

    def _check_customerio(
        self, request: web.Request, headers: dict[str, str], raw: bytes, body: Any
    ) -> None:
        """Track API v1: PUT /api/v1/customers/{id}, POST .../{id}/events, Basic site:key."""
        _check(headers.get("authorization") == _basic(CIO_SITE, CIO_KEY), "Basic site_id:api_key")
        _check(isinstance(body, dict), "body must be an object")
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

    def _check_segment(
        self, request: web.Request, headers: dict[str, str], raw: bytes, body: Any
    ) -> None:
        """POST /v1/batch, Basic write_key:, <= 500 KB, <= 2500 messages of <= 32 KB."""
        _check(request.method == "POST" and request.path == "/v1/batch", "POST /v1/batch")
        _check(headers.get("authorization") == _basic(SEGMENT_WRITE_KEY, ""), "write key auth")
        _check(len(raw) <= 500 * 1024, "batch over 500 KB")
        _check(isinstance(body, dict) and isinstance(body.get("batch"), list), "{batch: [...]}")
        _check(0 < len(body["batch"]) <= 2500, "1..2500 messages")
        for message in body["batch"]:
            _check(len(orjson.dumps(message)) <= 32 * 1024, "message over 32 KB")
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
