"""The management API (SPEC §8), served by every worker on its Faust web server.

It talks to the runtime only through the query port (`stream/queries.py`):
definitions come from the worker's in-memory catalog, profiles are read by the
runtime thread between two loop turns, and nothing here builds a Kafka client per
request. Writes go to the definitions topic (one long-lived producer) and a PUT
or DELETE answers once this worker has read its own write back, so the next read
on this worker sees it. Profiles live in the worker that owns their partition: a
request about a user is answered by that worker, forwarded there over HTTP when
it arrives elsewhere (`WorkerRegistry` knows who owns what). A forwarded request
carries the `X-Audiences-Forwarded` header and is never forwarded again: a worker
that no longer owns the partition answers 503 (retry). Audience members and
previews are computed partition by partition on their owners, members paged with
an opaque cursor.

Every route except `/healthz`, `/readyz` and `/metrics` (those of the Faust web server
included) needs `Authorization: Bearer TOKEN` with a token of AUDIENCES_API_TOKENS whose
scope suffices (`auth.required_scope`): 401 + `WWW-Authenticate: Bearer` without a valid
token, 403 for a weaker scope. Tokens are compared in constant time, each one, so the
timing of a request tells neither a token nor which one matched. Worker-to-worker calls
(forwarded reads, internal partition queries) send the first configured token; internal
routes need only `read`. With no tokens configured the API is open, and the worker binds
to loopback only (`Settings.web_bind_host`).

Errors are JSON `{"error": message}`: 400 unreadable request, 401/403 above, 404 unknown
audience, trait or user, 409 key used by the other kind of definition, 422
invalid definition (with `path` and `suggestion`), 503 Kafka or the owning
worker unavailable (retry).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp
import orjson
from aiohttp import web
from confluent_kafka import KafkaException, Producer
from yarl import URL

from audiences.adapters.http.auth import auth_middleware
from audiences.adapters.http.history import parse_query, series
from audiences.adapters.http.openapi import OPENAPI
from audiences.adapters.http.ui import register_console
from audiences.adapters.kafka.clients import KafkaClients
from audiences.adapters.kafka.topics import Topics
from audiences.adapters.settings import Settings
from audiences.adapters.state.history import merge_buckets
from audiences.adapters.stream.definitions import Definitions, DefinitionsWriter
from audiences.adapters.stream.queries import PartitionHistory, QueryPort, StateView
from audiences.adapters.stream.registry import WorkerRegistry
from audiences.core.definitions import (
    Catalog,
    check_references,
    compile_definition,
    validate_definition,
)
from audiences.core.definitions.accounts import ACCOUNT_PREFIX, user_groups
from audiences.core.definitions.conditions import DEVICE_TRACKER_ID
from audiences.core.definitions.language import is_priority_list
from audiences.core.definitions.validate import is_trait_definition
from audiences.core.events import format_iso
from audiences.core.explain import explain
from audiences.core.partitioning import partition_for
from audiences.core.preview import Preview, preview
from audiences.core.state import NEVER, UserState
from audiences.errors import ApiError, BrokerError, DefinitionError

log = logging.getLogger(__name__)
FORWARDED = "X-Audiences-Forwarded"  # set on requests one worker forwards to another
SERVED_BY = "X-Audiences-Worker"  # the URL of the worker whose state answered
DEFAULT_PAGE = 100
MAX_PAGE = 1000
SCAN_BUDGET = 1000  # profiles one query reads for one members page at most
PREVIEW_CHUNK = 2000  # profiles judged per query (the runtime thread answers between turns)
T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Clock = Callable[[], int]


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(body, option=orjson.OPT_NON_STR_KEYS),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def _errors_as_json(handler: Handler) -> Handler:
    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            headers = {"Retry-After": "1"} if exc.status == 503 else None
            return _json(exc.body, exc.status, headers)
        except DefinitionError as exc:
            body = {"error": str(exc), "path": exc.path, "suggestion": exc.suggestion}
            return _json(body, 422)

    return wrapped


def _kind(doc: Mapping[str, Any]) -> str:
    return "traits" if is_trait_definition(doc) else "audiences"


class ManagementApi:
    """Handlers of one worker, over its query port."""

    def __init__(
        self,
        settings: Settings,
        topics: Topics,
        queries: QueryPort,
        registry: WorkerRegistry | None,
        writer: DefinitionsWriter,
        producer: Producer,
        clock: Clock,
    ) -> None:
        self.settings = settings
        self.topics = topics
        self.queries = queries
        self.registry = registry
        self.writer = writer
        self.producer = producer  # control records (user deletion)
        self.clock = clock
        self.url = registry.url if registry is not None else settings.advertised_url
        self._session: aiohttp.ClientSession | None = None
        self._tokens = settings.api_token_list()
        internal = settings.internal_token
        self._internal_auth = {"Authorization": f"Bearer {internal}"} if internal else {}

    def register(self, app: web.Application) -> None:
        """Add every route of the API to an aiohttp application, and the token check in
        front of every route of that application (SPEC §8)."""
        app.middlewares.append(auth_middleware(self._tokens))
        router = app.router
        for kind in ("audiences", "traits"):
            router.add_get(f"/v1/{kind}", self._list(kind))
            if kind == "audiences":  # before /{key}: a fixed path wins over the pattern
                router.add_post("/v1/audiences/preview", _errors_as_json(self.preview))
            router.add_get(f"/v1/{kind}/{{key}}", self._get(kind))
            router.add_put(f"/v1/{kind}/{{key}}", self._put(kind))
            router.add_delete(f"/v1/{kind}/{{key}}", self._delete(kind))
        router.add_get("/v1/audiences/{key}/members", _errors_as_json(self.members))
        router.add_get("/v1/audiences/{key}/history", _errors_as_json(self.history))
        router.add_get("/v1/internal/history/{key}", _errors_as_json(self.internal_history))
        router.add_get("/v1/users/{id}", _errors_as_json(self.user))
        router.add_delete("/v1/users/{id}", _errors_as_json(self.delete_user))
        router.add_get("/v1/users/{id}/explain/{key}", _errors_as_json(self.explain))
        router.add_get("/v1/internal/sizes", _errors_as_json(self.internal_sizes))
        router.add_get(
            "/v1/internal/partitions/{partition}/members/{key}",
            _errors_as_json(self.internal_members),
        )
        router.add_post(
            "/v1/internal/partitions/{partition}/preview", _errors_as_json(self.internal_preview)
        )
        router.add_get("/openapi.json", _errors_as_json(self.openapi))
        clients = KafkaClients(self.settings)  # /ui, and the live stream and destinations it reads
        register_console(app, self.settings, self.topics, lambda: clients.reader("console"))
        app.on_cleanup.append(self._close)

    async def _close(self, _app: web.Application) -> None:
        if self._session is not None:
            await self._session.close()
        await asyncio.get_running_loop().run_in_executor(None, self.producer.flush, 5)

    # -- definitions --------------------------------------------------------------------------

    def _documents(self) -> Definitions:
        return dict(self.queries.definitions.documents)

    def _list(self, kind: str) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            definitions = self._documents()
            sizes = await self._sizes() if kind == "audiences" else None
            items = [
                _summary(doc, version, sizes)
                for key, (doc, version) in sorted(definitions.items())
                if _kind(doc) == kind
            ]
            return _json({kind: items})

        return _errors_as_json(handler)

    def _get(self, kind: str) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            key = request.match_info["key"]
            doc, version = _existing(self._documents(), key, kind)
            body = {**doc, "version": version}
            if kind == "audiences":
                sizes = await self._sizes()
                body["size"] = _size(doc, sizes)
            return _json(body)

        return _errors_as_json(handler)

    def _put(self, kind: str) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            key = request.match_info["key"]
            doc = await _definition_body(request)
            doc.setdefault("key", key)
            if doc["key"] != key:
                raise ApiError(
                    422,
                    f"the body's key {doc['key']!r} differs from the URL's {key!r}",
                    path="$.key",
                )
            if _kind(doc) != kind:
                raise _wrong_kind(kind, key)
            current = self._documents()
            if key in current and _kind(current[key][0]) != kind:
                other = "an audience" if kind == "traits" else "a computed trait"
                raise ApiError(409, f"{key!r} is {other}; delete it first or use another key")
            results, offset = await self._blocking(self.writer.put, [doc], current, self.clock())
            [(_, version)] = results
            if version is None:
                return _json({"key": key, "version": current[key][1], "changed": False})
            await self.queries.wait_for_definitions(offset)
            body = {"key": key, "version": version, "changed": True}
            return _json(body, 201 if key not in current else 200)

        return _errors_as_json(handler)

    def _delete(self, kind: str) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            key = request.match_info["key"]
            _doc, version = _existing(self._documents(), key, kind)
            offset = await self._blocking(self.writer.delete, key)
            await self.queries.wait_for_definitions(offset)
            return _json({"key": key, "deleted": True, "version": version})

        return _errors_as_json(handler)

    async def preview(self, request: web.Request) -> web.StreamResponse:
        doc = validate_definition(await _definition_body(request))
        sample = _int_param(request, "sample", 10, 0, MAX_PAGE)
        definitions = self._documents()
        check_references(doc, {k: d for k, (d, _) in definitions.items() if k != doc["key"]})
        compile_definition(doc, definitions)  # as the workers will (preview() does too)
        current = definitions.get(doc["key"])
        total = Preview(doc["key"], current[1] + 1 if current else 1)
        for number in range(await self._partition_count()):
            start: bytes | None = b""
            while start is not None:
                part, start = await self._partition_preview(number, doc, sample, start)
                _merge(total, part, sample)
        return _json({**total.as_json(), "current_version": current[1] if current else None})

    async def _partition_preview(
        self, number: int, doc: dict[str, Any], sample: int, start: bytes
    ) -> tuple[Preview, bytes | None]:
        """One chunk of a preview on partition `number`'s owner."""
        if await self._owns(number):
            definitions = self._documents()

            def judge(view: StateView) -> tuple[Preview, bytes | None]:
                profiles, resume = view.profiles(number, start, PREVIEW_CHUNK)
                decoded = ((key.decode(), state) for key, state in profiles)
                return preview(doc, definitions, decoded, sample), resume

            return await self._ask(number, judge)
        url = self._owner(number)
        data = await self._request(
            "POST",
            url,
            f"/v1/internal/partitions/{number}/preview",
            {"from": start.hex(), "sample": str(sample)},
            doc,
        )
        resume = data.pop("next")
        part = Preview.from_json(data)
        return part, bytes.fromhex(resume) if resume is not None else None

    async def internal_preview(self, request: web.Request) -> web.StreamResponse:
        number = _int_path(request, "partition")
        doc = validate_definition(await _definition_body(request))
        sample = _int_param(request, "sample", 10, 0, MAX_PAGE)
        start = _hex_param(request, "from")
        if not await self._owns(number):
            raise _not_owner(number)
        part, resume = await self._partition_preview(number, doc, sample, start)
        body = {**part.as_json(), "next": resume.hex() if resume is not None else None}
        return _json(body, headers={SERVED_BY: self.url})

    # -- members ------------------------------------------------------------------------------

    async def members(self, request: web.Request) -> web.StreamResponse:
        key = request.match_info["key"]
        limit = _int_param(request, "limit", DEFAULT_PAGE, 1, MAX_PAGE)
        number, start = _decode_cursor(request.query.get("cursor"), key)
        doc, _version = _existing(self._documents(), key, "audiences")
        if is_priority_list(doc):
            raise ApiError(
                422,
                f"{key!r} is a priority list: it has no members of its own; ask for those "
                f"of its audiences ({', '.join(doc['audiences'])})",
            )
        partitions = await self._partition_count()
        found: list[dict[str, Any]] = []
        resume: bytes | None = None
        while number < partitions and len(found) < limit:
            page, resume = await self._partition_members(number, key, start, limit - len(found))
            found.extend(page)
            if resume is not None:
                break  # page full, or the scan budget spent: continue from here next time
            number, start = number + 1, b""
        cursor = None if number >= partitions else _encode_cursor(key, number, resume or start)
        return _json({"audience": key, "members": found, "next_cursor": cursor})

    async def _partition_members(
        self, number: int, key: str, start: bytes, limit: int
    ) -> tuple[list[dict[str, Any]], bytes | None]:
        if await self._owns(number):
            return await self._ask(
                number, lambda view: _scan_members(view, number, key, start, limit)
            )
        url = self._owner(number)
        path = f"/v1/internal/partitions/{number}/members/{quote(key, safe='')}"
        data = await self._request("GET", url, path, {"from": start.hex(), "limit": str(limit)})
        resume = data.get("next")
        return list(data["members"]), bytes.fromhex(resume) if resume is not None else None

    async def internal_members(self, request: web.Request) -> web.StreamResponse:
        number = _int_path(request, "partition")
        key = request.match_info["key"]
        limit = _int_param(request, "limit", DEFAULT_PAGE, 1, MAX_PAGE)
        start = _hex_param(request, "from")
        if not await self._owns(number):
            raise _not_owner(number)
        found, resume = await self._ask(
            number, lambda view: _scan_members(view, number, key, start, limit)
        )
        body = {"partition": number, "members": found, "next": resume.hex() if resume else None}
        return _json(body, headers={SERVED_BY: self.url})

    # -- sizes --------------------------------------------------------------------------------

    async def _sizes(self) -> dict[str, int] | None:
        """Members per audience over all partitions; None if some partition's owner
        could not be asked (a rebalance, a worker down)."""
        partitions = await self._partition_count()
        per_partition = await self._local_sizes()
        missing = set(range(partitions)) - set(per_partition)
        owners = {self.registry.owner(p) for p in missing} if self.registry else set()
        for url in sorted(u for u in owners if u is not None and u != self.url):
            try:
                data = await self._request("GET", url, "/v1/internal/sizes", {})
            except ApiError:
                continue
            for number, sizes in data["partitions"].items():
                if int(number) in missing:
                    per_partition[int(number)] = sizes
        if set(range(partitions)) - set(per_partition):
            return None
        totals: dict[str, int] = {}
        for sizes in per_partition.values():
            for audience, size in sizes.items():
                totals[audience] = totals.get(audience, 0) + size
        return totals

    async def _local_sizes(self) -> dict[int, dict[str, int]]:
        if not self.queries.serving:
            return {}
        return await self.queries.ask(lambda view: view.sizes())

    async def internal_sizes(self, request: web.Request) -> web.StreamResponse:
        body = {"partitions": await self._local_sizes()}
        return _json(body, headers={SERVED_BY: self.url})

    # -- size history -------------------------------------------------------------------------

    async def history(self, request: web.Request) -> web.StreamResponse:
        """Size, entered and exited per step (adapters/http/history.py), over every
        partition: this worker's, and the others' through their internal route."""
        key = request.match_info["key"]
        _existing(self._documents(), key, "audiences")
        query = parse_query(request.query, self.clock())
        partitions = await self._partition_count()
        parts = await self._local_history(key, query.start_ms)
        missing = set(range(partitions)) - set(parts)
        owners = {self.registry.owner(p) for p in missing} if self.registry else set()
        for url in sorted(u for u in owners if u is not None and u != self.url):
            path = f"/v1/internal/history/{quote(key, safe='')}"
            data = await self._request("GET", url, path, {"from": str(query.start_ms)})
            for number, part in data["partitions"].items():
                if int(number) in missing:
                    parts[int(number)] = _history_from_json(part)
        if set(range(partitions)) - set(parts):
            raise ApiError(
                503, "the history of some partitions is not available (a rebalance?); retry"
            )
        size = sum(part.size for part in parts.values())
        buckets = merge_buckets(part.buckets for part in parts.values())
        return _json(series(size, buckets, query))

    async def _local_history(self, key: str, from_ms: int) -> dict[int, PartitionHistory]:
        if not self.queries.serving:
            return {}
        return await self.queries.ask(lambda view: view.history(key, from_ms))

    async def internal_history(self, request: web.Request) -> web.StreamResponse:
        key = request.match_info["key"]
        from_ms = _int_param(request, "from", 0, 0, 1 << 62)
        parts = await self._local_history(key, from_ms)
        body = {
            "partitions": {
                number: {
                    "size": part.size,
                    "buckets": [[m, e, x] for m, (e, x) in sorted(part.buckets.items())],
                }
                for number, part in parts.items()
            }
        }
        return _json(body, headers={SERVED_BY: self.url})

    # -- users --------------------------------------------------------------------------------

    async def user(self, request: web.Request) -> web.StreamResponse:
        user = request.match_info["id"]
        catalog = self.queries.definitions.catalog

        def view(number: int, state: UserState) -> dict[str, Any]:
            return _user_view(user, number, state, catalog)

        return await self._on_owner(request, user, view)

    async def explain(self, request: web.Request) -> web.StreamResponse:
        user, key = request.match_info["id"], request.match_info["key"]
        catalog = self.queries.definitions.catalog
        if catalog.audience(key) is None:
            raise ApiError(404, f"no audience {key!r}")
        now = self.clock()

        def view(number: int, state: UserState) -> dict[str, Any]:
            return {"userId": user, **explain(state, catalog, key, now, user)}

        return await self._on_owner(request, user, view)

    async def delete_user(self, request: web.Request) -> web.StreamResponse:
        user = request.match_info["id"]
        record = {
            "type": "delete",
            "userId": user,
            "timestamp": format_iso(self.clock()),
            "messageId": f"api-delete-{uuid.uuid4().hex}",
        }
        number = await self._partition_of(user)
        await self._blocking(self._produce, user.encode(), orjson.dumps(record), number)
        return _json({"userId": user, "accepted": True}, 202)

    def _produce(self, key: bytes, value: bytes, partition: int) -> None:
        errors: list[str] = []

        def delivered(err: object, _msg: object) -> None:
            if err is not None:
                errors.append(str(err))

        self.producer.produce(
            self.topics.events, key=key, value=value, partition=partition, on_delivery=delivered
        )
        if self.producer.flush(10) or errors:
            raise BrokerError(
                f"Kafka did not take the record: {errors or 'timed out'}", retriable=True
            )

    async def _on_owner(
        self,
        request: web.Request,
        user: str,
        render: Callable[[int, UserState], dict[str, Any]],
    ) -> web.StreamResponse:
        """Answer from the state of the worker owning `user`'s partition: here, or by
        forwarding the request there (once)."""
        number = await self._partition_of(user)
        if await self._owns(number):
            status, state = await self._ask(
                number, lambda view: view.profile(number, user.encode())
            )
            if status == "suppressed":
                raise ApiError(404, f"user {user!r} was deleted")
            if status == "quarantined":
                raise ApiError(
                    409, f"the profile of {user!r} is quarantined (see the worker's log)"
                )
            if state is None:
                raise ApiError(404, f"no profile for user {user!r}")
            return _json(render(number, state), headers={SERVED_BY: self.url})
        if request.headers.get(FORWARDED):
            raise _not_owner(number)
        return await self._forward(request, self._owner(number))

    # -- plumbing -----------------------------------------------------------------------------

    async def openapi(self, request: web.Request) -> web.StreamResponse:
        return _json(OPENAPI)

    async def _ask(self, number: int, query: Callable[[StateView], T]) -> T:
        """A query about a partition this worker owns (503 if it moved meanwhile)."""
        try:
            return await self.queries.ask(query)
        except KeyError:
            raise _not_owner(number) from None

    async def _owns(self, number: int) -> bool:
        """Whether this worker owns `number` now (a query that finds it moved is a 503)."""
        return self.queries.serving and number in self.queries.owned

    async def _partition_of(self, user: str) -> int:
        """The partition owning a user's profile (murmur2 of the id, the engine's rule)."""
        return partition_for(user.encode(), await self._partition_count())

    async def _partition_count(self) -> int:
        count: int = self.queries.partitions
        if not count:
            raise ApiError(
                503,
                f"partitions of {self.topics.events} not known yet (the worker is starting, or "
                "Kafka is unreachable); retry",
            )
        return count

    def _owner(self, number: int) -> str:
        url = self.registry.owner(number) if self.registry is not None else None
        if url is None or url == self.url:
            raise ApiError(503, f"partition {number} has no known owner yet; retry")
        return url

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        return self._session

    async def _forward(self, request: web.Request, url: str) -> web.StreamResponse:
        headers = {FORWARDED: self.url, **self._internal_auth}
        if request.content_type:
            headers["Content-Type"] = request.content_type
        try:
            async with self._client().request(
                request.method,
                URL(url + request.raw_path, encoded=True),
                data=await request.read(),
                headers=headers,
            ) as response:
                body = await response.read()
                if response.status in (401, 403):
                    raise self._refused(url, response.status)
                forward_headers = {
                    k: v for k, v in response.headers.items() if k in (SERVED_BY, "Retry-After")
                }
                return web.Response(
                    body=body,
                    status=response.status,
                    content_type=response.content_type,
                    headers=forward_headers,
                )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ApiError(503, f"the worker at {url} is unreachable ({exc}); retry") from exc

    async def _request(
        self, method: str, url: str, path: str, params: dict[str, str], body: Any = None
    ) -> dict[str, Any]:
        try:
            async with self._client().request(
                method,
                url + path,
                params=params,
                data=orjson.dumps(body) if body is not None else None,
                headers={
                    FORWARDED: self.url,
                    "Content-Type": "application/json",
                    **self._internal_auth,
                },
            ) as response:
                raw = await response.read()
                if response.status in (401, 403):
                    raise self._refused(url, response.status)
                if response.status != 200:
                    raise ApiError(503, f"the worker at {url} answered {response.status}; retry")
                data: dict[str, Any] = orjson.loads(raw)
                return data
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
            raise ApiError(503, f"the worker at {url} is unreachable ({exc}); retry") from exc

    def _refused(self, url: str, status: int) -> ApiError:
        """Another worker refused this one's token: a deployment whose workers do not
        share AUDIENCES_API_TOKENS (the caller's own token was fine here)."""
        log.error(
            "the worker at %s refused this worker's token (%d): every worker needs the same "
            "AUDIENCES_API_TOKENS (the first one authenticates worker-to-worker calls)",
            url,
            status,
        )
        return ApiError(
            503,
            f"the worker at {url} refused this worker's token ({status}); the workers' "
            "AUDIENCES_API_TOKENS differ",
        )

    async def _blocking(self, func: Callable[..., T], *args: Any) -> T:
        """Run blocking Kafka work off the event loop."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(None, functools.partial(func, *args))
        except (BrokerError, KafkaException) as exc:
            raise ApiError(503, f"Kafka is unavailable: {exc}") from exc


# -- helpers ------------------------------------------------------------------------------------


async def _definition_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"the body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ApiError(422, "expected a definition object", path="$")
    return doc


def _wrong_kind(kind: str, key: str) -> ApiError:
    if kind == "traits":
        return ApiError(
            422,
            f"a computed trait needs `kind`; this is an audience (PUT /v1/audiences/{key})",
            path="$.kind",
            suggestion=None,
        )
    return ApiError(
        422,
        f"`kind` makes this a computed trait (PUT /v1/traits/{key}); audiences have `condition`",
        path="$.kind",
        suggestion=None,
    )


def _existing(definitions: Definitions, key: str, kind: str) -> tuple[dict[str, Any], int]:
    entry = definitions.get(key)
    if entry is None or _kind(entry[0]) != kind:
        raise ApiError(404, f"no {'audience' if kind == 'audiences' else 'computed trait'} {key!r}")
    return entry


def _summary(doc: dict[str, Any], version: int, sizes: dict[str, int] | None) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "key": doc["key"],
        "name": doc.get("name") or doc["key"],
        "version": version,
        "created_at": doc.get("created_at"),
    }
    if is_trait_definition(doc):
        summary["kind"] = doc["kind"]
        return summary
    if is_priority_list(doc):
        summary["kind"] = doc["kind"]
        summary["audiences"] = list(doc["audiences"])
    summary["size"] = _size(doc, sizes)
    return summary


def _size(doc: Mapping[str, Any], sizes: dict[str, int] | None) -> int | None:
    """An audience's size; a priority list's is the size of the union of its audiences
    (they are disjoint: the sum of their sizes)."""
    if sizes is None:
        return None
    if is_priority_list(doc):
        return sum(sizes.get(key, 0) for key in doc["audiences"])
    return sizes.get(doc["key"], 0)


def _user_view(user: str, number: int, state: UserState, catalog: Catalog) -> dict[str, Any]:
    audiences = []
    hidden = catalog.account_hidden  # an account audience's per-user predicates: not audiences
    for key, membership in sorted(state.members.items()):
        if membership.member and key not in hidden:
            audience = catalog.audience(key)
            audiences.append(
                {
                    "key": key,
                    "name": audience.name if audience is not None else key,
                    "entered_at": format_iso(membership.since_ms),
                    "next_check": format_iso(membership.wake_ms)
                    if membership.wake_ms < NEVER
                    else None,
                }
            )
    devices = [
        {
            "id": device_id,
            "type": entry[0],
            "push_enabled": bool(entry[1]),
            "last_seen": format_iso(entry[3]),
        }
        for device_id, entry in sorted((state.trackers.get(DEVICE_TRACKER_ID) or {}).items())
    ]
    return {
        "userId": user,
        "partition": number,
        "anonymous": state.anonymous,
        "merged_into": state.merged_into,
        "anonymous_ids": [
            {"id": alias, "merged": bool(done)} for alias, done in sorted(state.aliases.items())
        ],
        "traits": state.traits,
        "computed_traits": {key: entry[0] for key, entry in sorted(state.computed.items())},
        "audiences": audiences,
        "devices": devices,
        # the accounts (`group` calls) it is linked to, kept while an account audience exists;
        # each account's own profile is `group:{groupId}`
        "accounts": [
            {"groupId": group_id, "profile": ACCOUNT_PREFIX + group_id}
            for group_id in sorted(user_groups(state).get("g", {}))
        ],
        "updated_at": format_iso(state.clock_ms) if state.clock_ms else None,
    }


def _scan_members(
    view: StateView, number: int, audience: str, start: bytes, limit: int
) -> tuple[list[dict[str, Any]], bytes | None]:
    """Members of `audience` in partition `number` in key order from `start` on; also the
    key to resume from (None = the partition is done). Reads at most SCAN_BUDGET profiles."""
    profiles, resume = view.profiles(number, start, SCAN_BUDGET)
    found: list[dict[str, Any]] = []
    for key, state in profiles:
        if len(found) == limit:
            return found, key
        membership = state.members.get(audience)
        if membership is not None and membership.member:
            found.append(
                {
                    "id": key.decode(),
                    "anonymous": state.anonymous,
                    "entered_at": format_iso(membership.since_ms),
                }
            )
    return found, resume


def _merge(total: Preview, part: Preview, sample: int) -> None:
    """Fold one partition chunk's preview into the total."""
    total.profiles += part.profiles
    total.size += part.size
    total.entering += part.entering
    total.exiting += part.exiting
    for mine, theirs in (
        (total.sample, part.sample),
        (total.would_enter, part.would_enter),
        (total.would_exit, part.would_exit),
    ):
        mine.extend(theirs[: max(0, sample - len(mine))])


def _hex_param(request: web.Request, name: str) -> bytes:
    try:
        return bytes.fromhex(request.query.get(name, ""))
    except ValueError:
        raise ApiError(400, f"`{name}` must be hex") from None


def _encode_cursor(audience: str, partition: int, start: bytes) -> str:
    raw = orjson.dumps({"a": audience, "p": partition, "k": start.hex()})
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str | None, audience: str) -> tuple[int, bytes]:
    if not cursor:
        return 0, b""
    try:
        data = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if data["a"] != audience:
            raise ValueError("a cursor of another audience")
        return int(data["p"]), bytes.fromhex(data["k"])
    except (binascii.Error, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        raise ApiError(400, "invalid cursor (use next_cursor of the previous page)") from None


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"`{name}` must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise ApiError(400, f"`{name}` must be between {low} and {high}, got {value}")
    return value


def _int_path(request: web.Request, name: str) -> int:
    try:
        return int(request.match_info[name])
    except ValueError:
        raise ApiError(400, f"{name} must be an integer") from None


def _history_from_json(part: dict[str, Any]) -> PartitionHistory:
    buckets = {int(m): (int(e), int(x)) for m, e, x in part["buckets"]}
    return PartitionHistory(int(part["size"]), buckets)


def _not_owner(number: int) -> ApiError:
    return ApiError(503, f"this worker does not own partition {number} (any more); retry")
