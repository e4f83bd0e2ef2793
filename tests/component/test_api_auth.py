"""API tokens (SPEC §8) on a worker's real web server: the aiohttp application of a worker
app (Faust's pages, the management API and the token check, as `audiences worker` builds
it) served on a loopback port. No broker is needed: the token check answers before any
handler, and a handler that gets through answers (503: Kafka is unreachable here) with
something other than 401/403."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
from aiohttp import web
from apiserver import ApiServer, Response, call, free_port

from audiences.adapters.http.openapi import OPENAPI
from audiences.adapters.kafka.clients import KafkaClients
from audiences.adapters.settings import Settings
from audiences.adapters.stream.app import create_app
from audiences.adapters.stream.queries import DefinitionsSnapshot, QueryPort
from audiences.adapters.stream.registry import WorkerRegistry
from audiences.bootstrap import management_api

READ, WRITE, ADMIN = "r-0Kx8", "w-9Qz1", "a-7Lm3"
TOKENS = f"{READ}:read,{WRITE}:write,{ADMIN}:admin"
DEFINITION = {"key": "buyers", "condition": {"performed": {"event": "Order Completed"}}}
# one request of each class of route
READS = [
    ("GET", "/v1/audiences"),
    ("GET", "/v1/audiences/buyers"),
    ("GET", "/v1/traits"),
    ("GET", "/v1/audiences/buyers/members"),
    ("GET", "/v1/audiences/buyers/history"),
    ("GET", "/v1/users/u1"),
    ("GET", "/v1/users/u1/explain/buyers"),
    ("POST", "/v1/audiences/preview"),
    ("GET", "/v1/internal/sizes"),
    ("GET", "/v1/internal/history/buyers"),
    ("GET", "/v1/internal/partitions/0/members/buyers"),
    ("POST", "/v1/internal/partitions/0/preview"),
    ("GET", "/openapi.json"),
    ("GET", "/router/"),  # Faust's own routes are behind the tokens too
]
WRITES = [
    ("PUT", "/v1/audiences/buyers"),
    ("DELETE", "/v1/audiences/buyers"),
    ("PUT", "/v1/traits/buyers"),
    ("DELETE", "/v1/traits/buyers"),
]
ADMINS = [("DELETE", "/v1/users/u1")]
OPEN = [("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics")]


class WorkerWeb:
    """The web application of a worker's Faust app with the management API, wired as
    `bootstrap.worker_app` wires it, served on loopback (the app is not started: no
    runtime, no Kafka)."""

    def __init__(self, settings: Settings) -> None:
        app = create_app(settings, lambda: False)
        api = management_api(settings, KafkaClients(settings), QueryPort(), None)
        app.web_routes.append(api.register)
        web_server = app.web
        web_server.init_server()  # what a worker does before it listens
        self.app: web.Application = web_server.web_app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner = web.AppRunner(self.app)

    def start(self) -> WorkerWeb:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(30)
        return self

    async def _serve(self) -> None:
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __call__(self, method: str, path: str, token: str | None = None, **kw: Any) -> Response:
        body = DEFINITION if method in ("PUT", "POST") else None
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        headers.update(kw.pop("headers", {}))
        return call(method, self.url + path, body, headers=headers)


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[WorkerWeb]:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens: handlers answer 503
    settings = Settings(
        kafka_bootstrap=dead, data_dir=str(tmp_path), api_tokens=TOKENS, web_port=free_port()
    )
    server = WorkerWeb(settings).start()
    yield server
    server.stop()


def assert_refused(answer: Response, status: int, what: Any) -> None:
    assert answer.status == status, (what, answer.status, answer.body)
    assert answer.headers["Content-Type"].startswith("application/json"), what
    assert set(answer.json()) == {"error"} and answer.json()["error"], what


def assert_let_through(answer: Response, what: Any) -> None:
    assert answer.status not in (401, 403), (what, answer.status, answer.body)


def test_every_route_but_the_open_ones_needs_a_valid_bearer_token(secured: WorkerWeb) -> None:
    for method, path in READS + WRITES + ADMINS:
        for token, headers in [
            (None, {}),
            ("not-a-token", {}),
            (READ + "x", {}),  # a prefix match is no match
            (READ[:-1], {}),
            (None, {"Authorization": f"Basic {READ}"}),  # only Bearer
            (None, {"Authorization": READ}),
        ]:
            answer = secured(method, path, token, headers=headers)
            assert_refused(answer, 401, (method, path, token, headers))
            assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    for method, path in OPEN:
        answer = secured(method, path)  # no token at all
        assert answer.status in (200, 503), (path, answer.status)  # /readyz: not ready
        assert "WWW-Authenticate" not in answer.headers
    assert b"audiences_" in secured("GET", "/metrics").body


def test_a_weaker_scope_is_403_on_each_class_of_route(secured: WorkerWeb) -> None:
    allowed = {READ: READS, WRITE: READS + WRITES, ADMIN: READS + WRITES + ADMINS}
    for token, routes in allowed.items():
        for method, path in READS + WRITES + ADMINS:
            answer = secured(method, path, token)
            if (method, path) in routes:
                assert_let_through(answer, (token, method, path))
            else:
                assert_refused(answer, 403, (token, method, path))
                assert "needs" in answer.json()["error"]
    # what got through reached the handler: Kafka is unreachable here
    answer = secured("DELETE", "/v1/users/u1", ADMIN)
    assert answer.status == 503 and "retry" in answer.json()["error"]


def test_the_served_openapi_document_declares_the_bearer_scheme(secured: WorkerWeb) -> None:
    served = secured("GET", "/openapi.json", READ).json()
    assert served == orjson.loads(orjson.dumps(OPENAPI))
    assert served["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def test_without_tokens_the_api_is_open(tmp_path: Path) -> None:
    """No tokens: nothing is refused (and the worker listens on loopback only, see
    tests/unit/test_security_settings.py and tests/system/test_api_workers.py)."""
    settings = Settings(
        kafka_bootstrap=f"127.0.0.1:{free_port()}", data_dir=str(tmp_path), web_port=free_port()
    )
    server = WorkerWeb(settings).start()
    try:
        for method, path in READS + WRITES + ADMINS:
            assert_let_through(server(method, path), (method, path))
    finally:
        server.stop()


class OwnedElsewhere:
    """A worker registry whose every partition is owned by another worker at `owner`."""

    def __init__(self, url: str, owner: str) -> None:
        self.url = url
        self._owner = owner

    def owner(self, partition: int) -> str:
        return self._owner


def test_workers_call_each_other_with_the_first_token(tmp_path: Path) -> None:
    """A read the first worker cannot answer goes to the owner with the first configured
    token: accepted by a worker with the same tokens, refused (a clear 503, not the
    caller's fault) by one whose tokens differ. Two workers with a runtime each:
    tests/system/test_api_workers.py."""
    dead = f"127.0.0.1:{free_port()}"

    def server(tokens: str, owner: str | None = None) -> ApiServer:
        settings = Settings(
            kafka_bootstrap=dead, data_dir=str(tmp_path), api_tokens=tokens, web_port=free_port()
        )
        queries = QueryPort()
        queries.publish(DefinitionsSnapshot())  # no definitions read
        queries.partitions = 2  # known, none owned here
        registry = OwnedElsewhere(settings.advertised_url, owner) if owner else None
        return ApiServer(settings, queries, cast(WorkerRegistry, registry)).start()

    same, other = server(TOKENS), server(f"{READ}x:read,{ADMIN}:admin")
    try:
        # the owner with the same tokens got through its token check: it answers that it
        # does not own the partition either (forwarded as is, or as a failed page)
        accepted = {
            "/v1/users/u1": "does not own partition",
            "/v1/audiences/preview": "answered 503",
        }
        refused = dict.fromkeys(accepted, "AUDIENCES_API_TOKENS differ")
        for owner, expected in [(same, accepted), (other, refused)]:
            asking = server(TOKENS, owner.url)
            try:
                for path, message in expected.items():
                    method, body = ("POST", DEFINITION) if "preview" in path else ("GET", None)
                    answer = asking(method, path, body, headers={"Authorization": f"Bearer {READ}"})
                    assert answer.status == 503, (path, answer.body)
                    assert message in answer.json()["error"], (path, answer.json())
            finally:
                asking.stop()
    finally:
        same.stop()
        other.stop()
