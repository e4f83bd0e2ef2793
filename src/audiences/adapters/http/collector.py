"""The Segment-compatible HTTP collector (SPEC §7), on aiohttp.

`POST /v1/{track,identify,page,screen,group,alias,batch}` and analytics.js's
`/v1/{t,i,p,s,g,a,b}`: check the write key (from HTTP Basic before the body is read;
a key inside the body only for an uncompressed body) and the key's rate limit (token
bucket, 429 + `Retry-After`), decode, validate and enrich the events
(`intake`), produce them to `events` keyed by user, dead-letter each invalid item to
`events-dlq` with its reason (as the evaluator does), and answer 200
`{"success": true}` only once Kafka acknowledged every one of both (`AckedProducer`).
Refusals are JSON `{"success": false, "code", "message"}` (Segment's client
libraries read `code` and `message`): 400 for a body that is not JSON, over 500 KB or
not an object (or a `batch` that is not a list), 401 bad or missing key, 404
unknown path, 429 + `Retry-After` over the key's rate limit, 503 + `Retry-After`
when Kafka is slow, down or the in-flight budget is full. `/healthz` and `/metrics` are served too. Browsers (analytics.js) get CORS
headers, and the source settings analytics.js would fetch from Segment's CDN
(`GET /v1/projects/{writeKey}/settings`), pointing it back at this collector.

    collector = Collector(settings, clients)   # clients: the process's KafkaClients
    await collector.start()            # serves on settings.collector_host:collector_port
    ...
    await collector.stop()             # stops accepting, waits for Kafka's acks
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from audiences.adapters import metrics
from audiences.adapters.http import intake
from audiences.adapters.kafka.acked import AckedProducer
from audiences.adapters.kafka.clients import KafkaClients
from audiences.adapters.kafka.deadletter import dead_letter_headers
from audiences.adapters.settings import Settings
from audiences.errors import AudiencesError, DeliveryError, RejectedRequest

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type, Content-Encoding",
    "Access-Control-Max-Age": "86400",
}


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def _new_message_id() -> str:
    return str(uuid.uuid4())


def _error(status: int, code: str, message: str, **headers: str) -> web.Response:
    return web.json_response(
        {"success": False, "code": code, "message": message}, status=status, headers=headers
    )


class Collector:
    """One collector: an aiohttp application and the producer behind it (made by
    `clients` when the collector starts)."""

    def __init__(
        self,
        settings: Settings,
        clients: KafkaClients,
        *,
        producer_config: Mapping[str, Any] | None = None,
        clock: Callable[[], int] = wall_clock_ms,
        rate_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        keys = settings.write_key_list()
        if not keys:
            raise AudiencesError(
                "the collector needs write keys: set AUDIENCES_WRITE_KEYS (comma-separated)"
            )
        self.settings = settings
        self._clients = clients
        self._keys = [key.encode() for key in keys]
        self._clock = clock
        self._limiter = intake.RateLimiter(
            settings.collector_rate_limit, settings.collector_rate_burst, rate_clock
        )
        self._topic = settings.events_topic
        self._dlq_topic = settings.events_dlq_topic
        self._ack_timeout_s = settings.collector_ack_timeout_ms / 1000
        self._producer_overrides = dict(producer_config or {})
        self.producer: AckedProducer | None = None
        self._runner: web.AppRunner | None = None
        self.port: int | None = None
        self.app = web.Application(middlewares=[self._middleware])
        self.app.router.add_post("/v1/{endpoint}", self._ingest)
        self.app.router.add_route("OPTIONS", "/v1/{endpoint}", self._preflight)
        self.app.router.add_get("/v1/projects/{write_key}/settings", self._source_settings)
        self.app.router.add_get("/healthz", self._healthz)
        self.app.router.add_get("/metrics", self._metrics)

    @property
    def url(self) -> str:
        return f"http://{self.settings.collector_host}:{self.port}"

    async def start(self, port: int | None = None) -> str:
        """Start the producer and listen (port 0 = any free port); returns the URL."""
        settings = self.settings
        self.producer = self._clients.collector_producer(
            max_inflight_records=settings.collector_max_inflight_events,
            max_inflight_bytes=settings.collector_max_inflight_bytes,
            delivery_timeout_ms=max(30_000, 2 * settings.collector_ack_timeout_ms),
            overrides=self._producer_overrides,
        )
        # auto_decompress=False: `intake.decode_body` gunzips within the size limits
        self._runner = web.AppRunner(self.app, auto_decompress=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner,
            settings.collector_host,
            settings.collector_port if port is None else port,
        )
        await site.start()
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else settings.collector_port
        log.info("collector listening on %s, producing to %s", self.url, self._topic)
        return self.url

    async def stop(self) -> None:
        """Stop accepting requests, let running ones finish, then wait for Kafka's acks."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.producer is not None:
            producer, self.producer = self.producer, None
            await asyncio.get_running_loop().run_in_executor(None, producer.close)

    # -- handlers -------------------------------------------------------------------------

    async def _ingest(self, request: web.Request) -> web.Response:
        kind = intake.ENDPOINTS.get(request.match_info["endpoint"])
        if kind is None:
            raise RejectedRequest(404, "not_found", f"no such endpoint: POST {request.path}")
        authorization = request.headers.get("Authorization")
        encoding = request.headers.get("Content-Encoding")
        if authorization is not None:  # a bad key or a spent limit: refused before reading
            key = intake.key_from_authorization(authorization)
            intake.check_write_key(key, self._keys)
            self._limiter.admit(key)
        elif (encoding or "identity").strip().lower() not in ("", "identity"):
            # the key would be inside the compressed body: nothing is inflated for an
            # unauthenticated caller (Segment's libraries that gzip all use HTTP Basic)
            raise intake.unauthorized(
                "a compressed body needs the write key in HTTP Basic auth, not in the body"
            )
        raw = await self._read(request)
        body = intake.parse_body(intake.decode_body(raw, encoding))
        if authorization is None:
            key = intake.key_from_body(body)
            intake.check_write_key(key, self._keys)
            self._limiter.admit(key)
        taken = intake.events(kind, body, self._clock(), _new_message_id)
        records, rejected = taken.records, taken.rejected
        self._limiter.charge(key, len(records) + len(rejected))
        if self.producer is None:
            raise DeliveryError("the collector is stopping", retry_after_s=1)
        await self._produce(records, rejected, request.path)
        for record in records:
            metrics.COLLECTOR_EVENTS.labels(record.type).inc()
        for item in rejected:
            metrics.COLLECTOR_INVALID.labels(item.reason).inc()
            metrics.EVENTS_INVALID.labels(item.reason).inc()
        return web.json_response({"success": True})

    async def _produce(
        self, records: list[intake.Record], rejected: list[intake.Rejected], path: str
    ) -> None:
        """Valid records to `events`, invalid items to `events-dlq` (with their reason and
        the path of the request), both acknowledged before returning."""
        assert self.producer is not None
        sends = [
            self.producer.send(
                self._topic, [(r.key, r.value) for r in records], self._ack_timeout_s
            )
        ]
        if rejected:
            source = [("source", b"collector"), ("request_path", path.encode())]
            sends.append(
                self.producer.send(
                    self._dlq_topic,
                    [(item.key, item.value) for item in rejected],
                    self._ack_timeout_s,
                    [
                        [*dead_letter_headers(item.reason, item.detail), *source]
                        for item in rejected
                    ],
                )
            )
        results = await asyncio.gather(*sends, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    @staticmethod
    async def _read(request: web.Request) -> bytes:
        """The raw body, refused as soon as it is certainly over the limit."""
        cap = intake.MAX_BODY_BYTES + intake.GZIP_SLACK_BYTES
        if request.content_length is not None and request.content_length > cap:
            raise intake.too_large()
        data = bytearray()
        async for chunk in request.content.iter_any():
            data += chunk
            if len(data) > cap:
                raise intake.too_large()
        return bytes(data)

    async def _source_settings(self, request: web.Request) -> web.Response:
        """What analytics.js fetches from Segment's CDN before sending anything
        (`{cdnURL}/v1/projects/{writeKey}/settings`): with `cdnURL` set to the collector,
        its Segment.io integration sends every call here. The key in the path is not
        checked: every key gets the same answer (echoing it back), so this public route
        cannot tell a caller whether a key is valid; the calls themselves are checked."""
        scheme = request.headers.get("X-Forwarded-Proto", request.scheme)
        return web.json_response(
            {
                "integrations": {
                    "Segment.io": {
                        "apiKey": request.match_info["write_key"],
                        "apiHost": f"{request.host}/v1",
                        "protocol": scheme,
                    }
                },
                "plan": {"track": {"__default": {"enabled": True}}},
            }
        )

    async def _preflight(self, request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def _healthz(self, request: web.Request) -> web.Response:
        failure = self.producer.failure if self.producer is not None else "not started"
        if failure is not None:
            return web.json_response({"status": "failing", "reason": failure}, status=503)
        return web.json_response({"status": "ok"})

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """JSON errors for every refusal, CORS headers, request metrics; an unexpected
        error is logged and answered 500, never allowed to stop the server."""
        started = time.perf_counter()
        endpoint = "other"
        if request.path.startswith("/v1/projects/"):
            endpoint = "settings"
        elif request.path.startswith("/v1/"):
            endpoint = intake.ENDPOINTS.get(request.path[4:], "unknown")
        response: web.StreamResponse
        try:
            response = await handler(request)
        except RejectedRequest as exc:
            headers: dict[str, str] = {}
            if exc.retry_after_s is not None:
                headers["Retry-After"] = str(exc.retry_after_s)
            if exc.status == 429:
                metrics.COLLECTOR_RATE_LIMITED.inc()
            response = _error(exc.status, exc.code, exc.message, **headers)
        except DeliveryError as exc:
            response = _error(
                503, "unavailable", str(exc), **{"Retry-After": str(exc.retry_after_s)}
            )
        except web.HTTPException as exc:  # aiohttp's own 404/405
            code = "not_found" if exc.status == 404 else "invalid_request"
            response = _error(exc.status, code, f"{exc.reason}: {request.method} {request.path}")
        except Exception:
            log.exception("collector error on %s %s", request.method, request.path)
            response = _error(500, "internal", "internal error")
        response.headers.update(CORS_HEADERS)
        if not request.content.is_eof():
            # refused before its body was read (a bad key, a spent rate limit, too large):
            # close instead of draining the rest of the body for aiohttp's lingering time
            response.force_close()
        if endpoint != "other":
            metrics.COLLECTOR_REQUESTS.labels(endpoint, str(response.status)).inc()
            metrics.COLLECTOR_REQUEST_DURATION.labels(endpoint).observe(
                time.perf_counter() - started
            )
        return response


async def serve(collector: Collector, stop: asyncio.Event) -> None:
    """Run `collector` until `stop` is set."""
    await collector.start()
    try:
        await stop.wait()
    finally:
        await collector.stop()


def serve_until_signalled(collector: Collector) -> None:
    """Serve `collector` until SIGINT/SIGTERM (blocks; `audiences collector`)."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(collector, stop)

    asyncio.run(main())
