"""Management API servers for component tests: real aiohttp servers on loopback ports,
each in an event loop of its own, over a runtime's query port and a worker registry
(one "worker" = runtime + registry + API, several of them in one process)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from audiences.adapters.kafka.clients import KafkaClients
from audiences.adapters.settings import Settings
from audiences.adapters.stream.queries import QueryPort
from audiences.adapters.stream.registry import WorkerRegistry
from audiences.adapters.stream.runtime import Clock, wall_clock_ms
from audiences.bootstrap import Worker as BootstrapWorker
from audiences.bootstrap import management_api


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Response:
    def __init__(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.status = status
        self.body = body
        self.headers = headers

    def json(self) -> Any:
        return orjson.loads(self.body)


def call(
    method: str,
    url: str,
    body: Any = None,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """One HTTP request; any status is returned, not raised."""
    data = raw if raw is not None else (orjson.dumps(body) if body is not None else None)
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return Response(response.status, response.read(), dict(response.headers))
    except urllib.error.HTTPError as exc:
        return Response(exc.code, exc.read(), dict(exc.headers))


class ApiServer:
    """A ManagementApi on its own aiohttp server and event loop thread, over a query port
    (a runtime's, or one nobody serves: a worker whose runtime is not running)."""

    def __init__(
        self,
        settings: Settings,
        queries: QueryPort | None = None,
        registry: WorkerRegistry | None = None,
        clock: Clock = wall_clock_ms,
    ) -> None:
        self.settings = settings
        self.api = management_api(
            settings, KafkaClients(settings), queries or QueryPort(), registry, clock
        )
        self.url = settings.advertised_url
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> ApiServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(30)
        return self

    async def _serve(self) -> None:
        app = web.Application()
        self.api.register(app)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.settings.web_port).start()

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __call__(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Response:
        return call(method, self.url + path, body, **kwargs)


class Worker:
    """A runtime thread + worker registry + API server, wired as `bootstrap.Worker` wires
    one worker process."""

    def __init__(self, settings: Settings, data_dir: Path, clock: Clock) -> None:
        self.settings = settings.replace(data_dir=str(data_dir), web_port=free_port())
        parts = BootstrapWorker(self.settings, clock)
        self.evaluator = parts.runtime
        self.registry = parts.registry
        self.evaluator.on_partitions = self.registry.publish
        self.server = ApiServer(self.settings, parts.queries, self.registry, clock)
        self.url = self.server.url
        self._thread = threading.Thread(target=self.evaluator.run, daemon=True)

    def start(self) -> Worker:
        self.registry.start()
        self.server.start()
        self._thread.start()
        return self

    def wait_ready(self, timeout: float = 60) -> Worker:
        wait_for(self.evaluator.ready.is_set, timeout, "the worker to own partitions")
        return self

    def owned(self) -> set[int]:
        return set(self.evaluator.partitions) if self.evaluator.ready.is_set() else set()

    def __call__(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Response:
        return self.server(method, path, body, **kwargs)

    def stop(self) -> None:
        self.evaluator.stop()
        self._thread.join(60)
        self.server.stop()
        self.registry.stop()
        if self.evaluator.failed is not None:
            raise AssertionError(f"runtime failed: {self.evaluator.failed!r}")


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")
