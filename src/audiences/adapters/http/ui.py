"""The console (`/ui`) and the two read-only routes it adds to the management API.

The console is static files shipped in this package (`console/`: HTML, CSS and ES
modules, no build step): every address under `/ui` answers the same HTML shell, and
the page then renders from its address (client-side routing), so reloads and shared
links work. The shell and its assets hold no data and need no token; everything the
console shows comes from the JSON API, called by the browser with the person's token
(same tokens and scopes as any client, SPEC §8).

Routes added to the API:

- `GET /v1/transitions/stream?audience=KEY`: server-sent events, one `transition` event
  per output record of audience-events from the moment of the request on (a `ready`
  event first, once the stream's consumer is positioned at the end of every partition),
  optionally only those of one audience or computed trait. Each stream has its own
  consumer (assigned, no group, no commits), closed when the client goes away.
- `GET /v1/destinations?audience=KEY`: the destinations this worker delivers to and
  what its sinks counted since the process started (delivered, dead-lettered,
  skipped, retries, queue depth, paused) — the sink metrics, per destination.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from importlib import resources
from typing import Any

import orjson
from aiohttp import web
from confluent_kafka import Consumer, KafkaException, TopicPartition
from prometheus_client import REGISTRY

from audiences.adapters.kafka.topics import Topics
from audiences.adapters.settings import Settings
from audiences.errors import AudiencesError

ASSET_TYPES = {
    ".js": "text/javascript",
    ".css": "text/css",
    ".html": "text/html",
    ".svg": "image/svg+xml",
}
HEARTBEAT_S = 15.0  # an SSE comment this often: proxies keep the stream, dead clients show
MAX_STREAMS = 32  # open live streams per worker (each holds a consumer and a thread)
CLIENT_CHECK_S = 1.0  # how soon a stream whose client went away ends
STREAM_POLL_S = 0.25  # one consume call at most this long (how soon a closed stream stops)
SINK_SAMPLES = {
    "audiences_sink_deliveries_total": "outcome",
    "audiences_sink_retries_total": "retries",
    "audiences_sink_queue_depth": "queue_depth",
    "audiences_destination_paused": "paused",
    "audiences_sink_dlq_total": "dlq",
}


def _assets() -> dict[str, bytes]:
    """The console's files, read once (they are small)."""
    root = resources.files("audiences.adapters.http") / "console"
    return {entry.name: entry.read_bytes() for entry in root.iterdir() if entry.is_file()}


def register_console(
    app: web.Application, settings: Settings, topics: Topics, reader: Callable[[], Consumer]
) -> None:
    """`reader()`: a new consumer used by assignment only (`KafkaClients.reader`)."""
    assets = _assets()
    shell = assets["index.html"]

    async def page(request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=shell,
            content_type="text/html",
            charset="utf-8",
            headers={"Cache-Control": "no-cache"},
        )

    async def asset(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        body = assets.get(name)
        if body is None:
            raise web.HTTPNotFound()
        kind = ASSET_TYPES.get(os.path.splitext(name)[1], "application/octet-stream")
        return web.Response(
            body=body, content_type=kind, charset="utf-8", headers={"Cache-Control": "no-cache"}
        )

    router = app.router
    router.add_get("/ui", page)
    router.add_get("/ui/assets/{name}", asset)
    router.add_get("/ui/{tail:.*}", page)
    streams: set[_Tail] = set()

    async def end_streams(_app: web.Application) -> None:
        for tail in list(streams):  # before the server waits for its handlers to finish
            tail.end()

    app.on_shutdown.append(end_streams)
    router.add_get(
        "/v1/transitions/stream",
        lambda request: transitions_stream(request, topics, reader, streams),
    )
    router.add_get("/v1/destinations", lambda request: destinations(request, settings))


# -- live transitions ---------------------------------------------------------------------------


def _matches(output: dict[str, Any], audience: str | None) -> bool:
    if not audience:
        return True
    props = output.get("properties")
    if not isinstance(props, dict):
        return False
    return audience in (props.get("audience_key"), props.get("trait_key"))


class _Tail:
    """One consumer of audience-events on a thread of its own, from the end of every
    partition on; records go to an asyncio queue. `stop()` ends the thread, which closes
    the consumer (a consumer is only ever used by that thread)."""

    def __init__(
        self, topic: str, reader: Callable[[], Consumer], loop: asyncio.AbstractEventLoop
    ) -> None:
        self.topic = topic
        self.reader = reader
        self.loop = loop
        self.queue: asyncio.Queue[bytes | Exception | None] = asyncio.Queue(maxsize=1000)
        self.ready: asyncio.Future[None] = loop.create_future()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="console-tail")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def end(self) -> None:
        """Ends the stream (the worker shuts down): its handler returns."""
        self.stop()
        if not self.queue.full():
            self.queue.put_nowait(None)

    def _deliver(self, item: bytes | Exception | None) -> None:
        def put() -> None:
            if not self.queue.full():  # a slow client loses records, never the worker memory
                self.queue.put_nowait(item)

        self.loop.call_soon_threadsafe(put)

    def _set_ready(self, error: Exception | None) -> None:
        def done() -> None:
            if not self.ready.done():
                if error is None:
                    self.ready.set_result(None)
                else:
                    self.ready.set_exception(error)

        self.loop.call_soon_threadsafe(done)

    def _run(self) -> None:
        try:
            consumer = self.reader()
        except KafkaException as exc:
            self._set_ready(exc)
            return
        try:
            metadata = consumer.list_topics(self.topic, timeout=10).topics[self.topic]
            if metadata.error is not None:
                raise KafkaException(metadata.error)
            assignment = []
            for number in sorted(metadata.partitions):
                _low, high = consumer.get_watermark_offsets(
                    TopicPartition(self.topic, number), timeout=10
                )
                assignment.append(TopicPartition(self.topic, number, high))
            consumer.assign(assignment)
            self._set_ready(None)
            while not self._stop.is_set():
                for msg in consumer.consume(100, STREAM_POLL_S):
                    if msg.error() is None and msg.value() is not None:
                        self._deliver(msg.value())
        except (KafkaException, KeyError) as exc:
            self._set_ready(exc)
            self._deliver(exc)
        finally:
            consumer.close()


async def transitions_stream(
    request: web.Request, topics: Topics, reader: Callable[[], Consumer], streams: set[_Tail]
) -> web.StreamResponse:
    audience = request.query.get("audience") or None
    if len(streams) >= MAX_STREAMS:
        body = {"error": f"{MAX_STREAMS} live streams are open on this worker already; retry"}
        return web.json_response(body, status=503, headers={"Retry-After": "5"})
    tail = _Tail(topics.audience_events, reader, asyncio.get_running_loop())
    tail.start()
    streams.add(tail)
    try:
        try:
            await asyncio.wait_for(tail.ready, 20)
        except (KafkaException, KeyError, TimeoutError) as exc:
            body = {"error": f"cannot read {tail.topic}: {exc}; retry"}
            return web.json_response(body, status=503, headers={"Retry-After": "1"})
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        await response.write(b"event: ready\ndata: {}\n\n")
        quiet_s = 0.0
        while True:
            transport = request.transport
            if transport is None or transport.is_closing():
                break  # the client went away
            try:
                item = await asyncio.wait_for(tail.queue.get(), CLIENT_CHECK_S)
            except TimeoutError:
                quiet_s += CLIENT_CHECK_S
                if quiet_s >= HEARTBEAT_S:
                    await response.write(b": heartbeat\n\n")
                    quiet_s = 0.0
                continue
            if item is None:
                break  # the worker shuts down
            if isinstance(item, Exception):
                message = orjson.dumps({"error": f"the stream stopped: {item}"})
                await response.write(b"event: failure\ndata: " + message + b"\n\n")
                break
            try:
                output = orjson.loads(item)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(output, dict) or not _matches(output, audience):
                continue
            await response.write(b"event: transition\ndata: " + orjson.dumps(output) + b"\n\n")
        return response
    finally:
        streams.discard(tail)
        tail.stop()


# -- destinations -------------------------------------------------------------------------------


def _sink_counts() -> dict[str, dict[str, float]]:
    """The sink metrics of this process, per destination name."""
    counts: dict[str, dict[str, float]] = {}
    for metric in REGISTRY.collect():
        for sample in metric.samples:
            field = SINK_SAMPLES.get(sample.name)
            name = sample.labels.get("destination")
            if field is None or name is None:
                continue
            entry = counts.setdefault(name, {})
            if field == "outcome":
                field = sample.labels.get("outcome", "other")
            entry[field] = entry.get(field, 0.0) + sample.value
    return counts


async def destinations(request: web.Request, settings: Settings) -> web.StreamResponse:
    audience = request.query.get("audience") or None
    configured: list[dict[str, Any]] = []
    if settings.destinations:
        from audiences.adapters.sinks.config import load_destinations

        try:
            loaded = load_destinations(settings.destinations, os.environ)
        except (AudiencesError, OSError, ValueError) as exc:  # the worker refused it at start
            unreadable = {"error": f"the destinations file cannot be read: {exc}"}
            return web.json_response(unreadable, status=503)
        configured = [
            {
                "name": d.name,
                "type": d.type,
                "audiences": sorted(d.audiences) if d.audiences is not None else None,
            }
            for d in loaded
        ]
    counts = _sink_counts()
    known = {d["name"] for d in configured}
    configured += [
        {"name": name, "type": None, "audiences": None}
        for name in sorted(counts)
        if name not in known
    ]
    items = []
    for entry in configured:
        if audience and entry["audiences"] is not None and audience not in entry["audiences"]:
            continue
        seen = counts.get(entry["name"], {})
        items.append(
            {
                **entry,
                "delivered": int(seen.get("delivered", 0)),
                "dead_lettered": int(seen.get("dead_lettered", 0)),
                "skipped": int(seen.get("skipped", 0)),
                "retries": int(seen.get("retries", 0)),
                "queue_depth": int(seen.get("queue_depth", 0)),
                "paused": bool(seen.get("paused", 0)),
            }
        )
    return web.json_response({"destinations": items, "since": "worker start"})
