"""`audiences get|members|explain|preview|users delete --url`: the CLI through a worker's API."""

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

from audiences.adapters.http.client import ApiClient
from audiences.errors import ApiError

pytestmark = pytest.mark.kafka
BUYERS = {
    "key": "buyers",
    "name": "Buyers",
    "condition": {"performed": {"event": "Order Completed"}},
}
USERS = ["ann", "bob", "cy", "team/dee", "eve"]


def run(
    *args: str, env: dict[str, str] | None = None, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AUDIENCES_")}
    return subprocess.run(
        [sys.executable, "-m", "audiences", *args],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        input=stdin,
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


def test_users_delete_asks_then_deletes_through_the_api(api: ApiServer, engine: Engine) -> None:
    declined = run("users", "delete", "ann", "--url", api.url, stdin="n\n")
    assert declined.returncode == 1 and "ann: not deleted" in declined.stderr
    assert "Delete user 'ann'" in declined.stdout  # the question
    no_answer = run("users", "delete", "ann", "--url", api.url)  # stdin closed: no
    assert no_answer.returncode == 1 and "not deleted" in no_answer.stderr
    confirmed = run("users", "delete", "team/dee", "--url", api.url, stdin="y\n")
    assert confirmed.returncode == 0, confirmed.stderr
    assert "team/dee: deletion accepted" in confirmed.stdout
    outputs = engine.outputs(2 * len(USERS) + 2)[2 * len(USERS) :]  # nothing for ann
    assert [(o["userId"], o["event"]) for o in outputs] == [
        ("team/dee", "Audience Exited"),
        ("team/dee", "User Deleted"),
    ]
    quiet = run("users", "delete", "never-seen", "--yes", env={"AUDIENCES_API_URL": api.url})
    assert quiet.returncode == 0 and "Delete user" not in quiet.stdout
    [unknown] = engine.outputs(2 * len(USERS) + 3)[-1:]
    assert (unknown["userId"], unknown["event"]) == ("never-seen", "User Deleted")


def test_members_and_explain_need_a_url() -> None:
    for args in (["members", "buyers"], ["explain", "ann", "buyers"], ["users", "delete", "x"]):
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


def test_the_cli_sends_its_token_and_says_what_to_do_when_refused(
    api: ApiServer, engine: Engine, tmp_path: Path
) -> None:
    """A worker with tokens (SPEC §8): --token or AUDIENCES_API_TOKEN on every command
    that calls the API; a 401/403 is a clear message and a non-zero exit."""
    assert engine.evaluator is not None
    secured = ApiServer(
        engine.settings.replace(web_port=free_port(), api_tokens="cli-read:read,cli-admin:admin"),
        engine.evaluator.queries,
        clock=engine.clock,
    ).start()
    try:
        listing = run("get", "--url", secured.url, "--token", "cli-read")
        assert listing.returncode == 0, listing.stderr
        assert listing.stdout.splitlines() == ["buyers\tv1\tBuyers", "ltv\tv1\tltv"]
        from_env = {"AUDIENCES_API_URL": secured.url, "AUDIENCES_API_TOKEN": "cli-read"}
        members = run("members", "buyers", env=from_env)
        assert members.returncode == 0, members.stderr
        assert len(members.stdout.splitlines()) == len(USERS)
        explained = run("explain", "ann", "buyers", "--url", secured.url, "--token", "cli-read")
        assert explained.returncode == 0 and json.loads(explained.stdout)["member"] is True
        path = tmp_path / "early.json"
        path.write_text(json.dumps({"key": "early", "condition": BUYERS["condition"]}))
        previewed = run("preview", "-f", str(path), "--json", env=from_env)
        assert previewed.returncode == 0, previewed.stderr
        # --token wins over the environment
        overridden = run("get", "--token", "nope", env=from_env)
        assert overridden.returncode == 1 and "the token was refused" in overridden.stderr

        for args, env in [
            (["get", "--url", secured.url], {}),
            (["members", "buyers", "--url", secured.url], {}),
            (["explain", "ann", "buyers"], {"AUDIENCES_API_URL": secured.url}),
            (["preview", "-f", str(path), "--url", secured.url], {}),
        ]:
            refused = run(*args, env=env)
            assert refused.returncode == 1, (args, refused.stdout)
            assert "needs a valid token (no token was given" in refused.stderr, refused.stderr
            assert "--token" in refused.stderr and "AUDIENCES_API_TOKEN" in refused.stderr
            assert "Traceback" not in refused.stderr
            wrong = run(*args, "--token", "cli-reed", env=env)
            assert wrong.returncode == 1 and "the token was refused" in wrong.stderr

        # a weaker scope: deleting a user needs `admin`
        client = ApiClient(secured.url, token="cli-read")
        with pytest.raises(ApiError) as refused_scope:
            client.request("DELETE", "/v1/users/ann")
        assert refused_scope.value.status == 403
        assert "refused this token's scope" in str(refused_scope.value)
        assert "needs 'admin'" in str(refused_scope.value)
        delete = ["users", "delete", "ann", "--yes", "--url", secured.url]
        weak = run(*delete, "--token", "cli-read")
        assert weak.returncode == 1 and "refused this token's scope" in weak.stderr
        assert "needs 'admin'" in weak.stderr
        anonymous = run(*delete)
        assert anonymous.returncode == 1 and "no token was given" in anonymous.stderr
        admin = run(*delete, env={"AUDIENCES_API_TOKEN": "cli-admin"})
        assert admin.returncode == 0 and "ann: deletion accepted" in admin.stdout
        outputs = engine.outputs(2 * len(USERS) + 2)[2 * len(USERS) :]
        assert [(o["userId"], o["event"]) for o in outputs] == [
            ("ann", "Audience Exited"),
            ("ann", "User Deleted"),
        ]
    finally:
        secured.stop()
