"""What the console needs from a worker's web server, without a browser: the `/ui` shell
at every console address (no token: it holds no data), its assets (small, no external
requests), and the two read-only routes it added to the API — the destinations' delivery
counts and the live transitions stream."""

from __future__ import annotations

import http.client
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from apiserver import ApiServer, Worker, call, free_port
from harness import T0, Engine, track

from audiences.adapters.http import ui
from audiences.adapters.metrics import SINK_DELIVERIES, SINK_DLQ, SINK_QUEUE_DEPTH, SINK_RETRIES
from audiences.adapters.settings import Settings

ADMIN = "console-api-admin"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
CONSOLE = Path(__file__).parents[2] / "src/audiences/adapters/http/console"


@pytest.fixture
def offline(tmp_path: Path) -> Iterator[ApiServer]:
    """The API of a worker whose broker is down (routes that need no Kafka still answer)."""
    destinations = tmp_path / "destinations.yaml"
    destinations.write_text(
        "- name: hooks\n  type: webhook\n  url: http://127.0.0.1:9/hook\n"
        "  secret: whsec_Y29uc29sZS10ZXN0LXNlY3JldC1vZi0zMi1ieXRlcyE=\n  audiences: [buyers]\n"
    )
    settings = Settings(
        kafka_bootstrap=f"127.0.0.1:{free_port()}",
        data_dir=str(tmp_path),
        api_tokens=f"{ADMIN}:admin",
        web_port=free_port(),
        destinations=str(destinations),
    )
    server = ApiServer(settings).start()
    yield server
    server.stop()


def test_every_console_address_answers_the_same_shell_without_a_token(
    offline: ApiServer,
) -> None:
    shell = call("GET", offline.url + "/ui")
    assert shell.status == 200 and shell.headers["Content-Type"].startswith("text/html")
    assert b'<script type="module" src="/ui/assets/app.js">' in shell.body
    for path in ("/ui/", "/ui/audiences/buyers", "/ui/users/a%20b", "/ui/live", "/ui/new?key=x"):
        answer = call("GET", offline.url + path)
        assert (answer.status, answer.body) == (200, shell.body), path
    # the data is not open: the API behind it still wants a token
    assert call("GET", offline.url + "/v1/audiences").status == 401
    assert call("GET", offline.url + "/v1/destinations").status == 401
    assert call("GET", offline.url + "/v1/transitions/stream").status == 401


def test_the_assets_are_served_small_and_make_no_external_request(offline: ApiServer) -> None:
    files = sorted(CONSOLE.iterdir())
    assert {f.name for f in files} >= {"index.html", "app.js", "api.js", "charts.js", "console.css"}
    total = 0
    for file in files:
        answer = call("GET", f"{offline.url}/ui/assets/{file.name}")
        assert answer.status == 200 and answer.body == file.read_bytes(), file.name
        expected = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}
        assert answer.headers["Content-Type"].startswith(expected[file.suffix]), file.name
        text = file.read_text()
        external = set(re.findall(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text)) - {
            "http://www.w3.org"  # the SVG namespace name, never fetched
        }
        assert not external, (file.name, external)
        total += len(answer.body)
    assert total < 80_000, f"the console weighs {total} bytes: keep the first paint fast"
    assert call("GET", offline.url + "/ui/assets/nope.js").status == 404
    assert call("GET", offline.url + "/ui/assets/..%2Fapi.py").status == 404


def test_destinations_report_what_the_sinks_counted(offline: ApiServer) -> None:
    stray = f"stray-{uuid.uuid4().hex[:8]}"  # counted but not in the file (another worker's)
    before = orjson.loads(call("GET", offline.url + "/v1/destinations", headers=AUTH).body)
    hooks_before = next(d for d in before["destinations"] if d["name"] == "hooks")
    SINK_DELIVERIES.labels("hooks", "delivered").inc(3)
    SINK_DELIVERIES.labels("hooks", "dead_lettered").inc(1)
    SINK_RETRIES.labels("hooks").inc(2)
    SINK_QUEUE_DEPTH.labels("hooks").set(5)
    SINK_DLQ.labels("hooks", "rejected").inc(1)
    SINK_DELIVERIES.labels(stray, "delivered").inc(1)
    answer = call("GET", offline.url + "/v1/destinations", headers=AUTH)
    assert answer.status == 200
    found = {d["name"]: d for d in orjson.loads(answer.body)["destinations"]}
    hooks = found["hooks"]
    assert (hooks["type"], hooks["audiences"], hooks["paused"]) == ("webhook", ["buyers"], False)
    assert hooks["delivered"] - hooks_before["delivered"] == 3
    assert hooks["dead_lettered"] - hooks_before["dead_lettered"] == 1
    assert hooks["retries"] - hooks_before["retries"] == 2
    assert hooks["queue_depth"] == 5
    assert found[stray]["delivered"] == 1 and found[stray]["type"] is None
    # ?audience= keeps the destinations that receive it (unknown lists: kept)
    others = call("GET", offline.url + "/v1/destinations?audience=browsers", headers=AUTH)
    names = {d["name"] for d in orjson.loads(others.body)["destinations"]}
    assert "hooks" not in names and stray in names
    buyers = call("GET", offline.url + "/v1/destinations?audience=buyers", headers=AUTH)
    assert "hooks" in {d["name"] for d in orjson.loads(buyers.body)["destinations"]}


def test_live_streams_are_capped_per_worker(
    offline: ApiServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ui, "MAX_STREAMS", 0)
    answer = call("GET", offline.url + "/v1/transitions/stream", headers=AUTH)
    assert answer.status == 503 and "live streams are open" in orjson.loads(answer.body)["error"]


def read_event(response: http.client.HTTPResponse) -> tuple[str, object]:
    """The next server-sent event (heartbeat comments skipped)."""
    name, data = "message", b""
    while True:
        line = response.readline()
        assert line, "the stream ended"
        line = line.rstrip(b"\n")
        if not line:
            if data:
                return name, orjson.loads(data)
            continue
        if line.startswith(b"event:"):
            name = line[6:].strip().decode()
        elif line.startswith(b"data:"):
            data += line[5:].strip()


@pytest.mark.kafka
def test_the_transitions_stream_sends_new_transitions_of_one_audience(
    engine: Engine, tmp_path: Path
) -> None:
    engine.apply(
        {"key": "buyers", "condition": {"performed": {"event": "Order Completed"}}},
        {"key": "browsers", "condition": {"performed": {"event": "Product Viewed"}}},
    )
    settings = engine.settings.replace(api_tokens=f"{ADMIN}:read")
    worker = Worker(settings, tmp_path / "w", engine.clock).start().wait_ready()
    try:
        engine.send(track("old", "Product Viewed", T0 - 5000))  # before the stream: not sent
        engine.outputs(1)
        port = int(worker.url.rsplit(":", 1)[1])
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("GET", "/v1/transitions/stream?audience=browsers", headers=AUTH)
        response = connection.getresponse()
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        assert read_event(response) == ("ready", {})
        engine.send(
            track("ann", "Order Completed", T0 + 1000),  # buyers: filtered out
            track("bob", "Product Viewed", T0 + 2000),
        )
        name, data = read_event(response)
        assert name == "transition" and isinstance(data, dict)
        assert (data["userId"], data["event"]) == ("bob", "Audience Entered")
        assert data["properties"]["audience_key"] == "browsers"
        connection.close()
    finally:
        worker.stop()
