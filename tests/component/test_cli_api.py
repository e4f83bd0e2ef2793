"""`audiences get|members|explain|preview --url`: the CLI through a worker's API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from apiserver import ApiServer, free_port
from harness import T0, Engine, M, track

pytestmark = pytest.mark.kafka
BUYERS = {
    "key": "buyers",
    "name": "Buyers",
    "condition": {"performed": {"event": "Order Completed"}},
}
USERS = ["ann", "bob", "cy", "team/dee", "eve"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AUDIENCES_")}
    return subprocess.run(
        [sys.executable, "-m", "audiences", *args],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def api(engine: Engine) -> Iterator[ApiServer]:
    """One worker owning every partition, with its API, and five buyers."""
    engine.apply(BUYERS, {"key": "ltv", "kind": "count", "event": "Order Completed"})
    engine.start()
    assert engine.evaluator is not None
    server = ApiServer(
        engine.settings.replace(web_port=free_port()), engine.evaluator.queries, clock=engine.clock
    ).start()
    for i, user in enumerate(USERS):
        engine.send(track(user, "Order Completed", T0 + i * M))
    engine.outputs(2 * len(USERS))
    yield server
    server.stop()


def test_get_lists_and_shows_through_the_api(api: ApiServer) -> None:
    listing = run("get", "--url", api.url)
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.splitlines() == ["buyers\tv1\tBuyers", "ltv\tv1\tltv"]
    shown = json.loads(run("get", "buyers", env={"AUDIENCES_API_URL": api.url}).stdout)
    assert (shown["version"], shown["size"]) == (1, len(USERS))
    assert json.loads(run("get", "ltv", "--url", api.url).stdout)["kind"] == "count"
    missing = run("get", "nope", "--url", api.url)
    assert missing.returncode == 1 and "no audience 'nope'" in missing.stderr


def test_members_pages_through_every_partition(api: ApiServer) -> None:
    listed = run("members", "buyers", "--url", api.url)
    assert listed.returncode == 0, listed.stderr
    rows = [line.split("\t") for line in listed.stdout.splitlines()]
    assert sorted(user for user, _ in rows) == sorted(USERS)
    capped = run("members", "buyers", "--url", api.url, "--limit", "2")
    assert len(capped.stdout.splitlines()) == 2
    unknown = run("members", "nope", "--url", api.url)
    assert unknown.returncode == 1 and "no audience 'nope'" in unknown.stderr


def test_explain_through_the_api(api: ApiServer) -> None:
    shown = run("explain", "team/dee", "buyers", "--url", api.url)
    assert shown.returncode == 0, shown.stderr
    explained = json.loads(shown.stdout)
    assert explained["userId"] == "team/dee" and explained["member"] is True
    assert run("explain", "nobody", "buyers", "--url", api.url).returncode == 1


def test_members_and_explain_need_a_url() -> None:
    for args in (["members", "buyers"], ["explain", "ann", "buyers"]):
        result = run(*args)
        assert result.returncode != 0
        assert "--url" in result.stderr and "AUDIENCES_API_URL" in result.stderr


def test_preview_through_the_api(api: ApiServer, tmp_path: Path) -> None:
    path = tmp_path / "early.json"
    early = {"key": "early", "condition": {"computed": {"name": "ltv", "op": "gte", "value": 1}}}
    path.write_text(json.dumps(early))
    result = run("preview", "-f", str(path), "--url", api.url, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["key"], report["version"], report["size"]) == ("early", 1, len(USERS))
    assert sorted(report["would_enter"]) == sorted(USERS)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"key": "bad", "condition": {"performd": {}}}))
    rejected = run("preview", "-f", str(bad), "--url", api.url)
    assert rejected.returncode == 2 and "$.condition" in rejected.stderr
