"""Priority lists (SPEC §3, §8) through the management API of a running worker: apply,
422 with the JSON path, listing with the audiences and the union size, explain of a
listed audience (its own value and who took the profile), preview, members refused."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from apiserver import Worker
from harness import T0, Engine, S, track

pytestmark = pytest.mark.kafka

VIP = {"key": "vip", "condition": {"performed": {"event": "Order Completed"}}}
BROWSERS = {"key": "browsers", "condition": {"performed": {"event": "Product Viewed"}}}
PRIORITY = {"key": "winback_priority", "kind": "priority_list", "audiences": ["vip", "browsers"]}


@pytest.fixture
def api(engine: Engine, tmp_path: Path) -> Iterator[Worker]:
    worker = Worker(engine.settings, tmp_path / "worker", engine.clock).start().wait_ready()
    yield worker
    worker.stop()


def test_a_priority_list_through_the_api(api: Worker, engine: Engine) -> None:
    assert api("PUT", "/v1/audiences/vip", VIP).status == 201
    assert api("PUT", "/v1/audiences/browsers", BROWSERS).status == 201
    unknown = api(
        "PUT", "/v1/audiences/winback_priority", {**PRIORITY, "audiences": ["vip", "browser"]}
    )
    assert unknown.status == 422
    assert (unknown.json()["path"], unknown.json()["suggestion"]) == ("$.audiences[1]", "browsers")
    created = api("PUT", "/v1/audiences/winback_priority", PRIORITY)
    assert (created.status, created.json()["version"]) == (201, 1)
    taken = api("PUT", "/v1/audiences/other", {**PRIORITY, "key": "other"})
    assert taken.status == 422 and taken.json()["path"] == "$.audiences[0]"

    engine.send(
        track("both", "Product Viewed", T0),
        track("both", "Order Completed", T0 + S),
        track("browser", "Product Viewed", T0),
    )
    outputs = engine.outputs(4)
    assert [
        (o["userId"], o["properties"]["audience_key"], o["event"])
        for o in outputs
        if o["userId"] == "both"
    ] == [
        ("both", "browsers", "Audience Entered"),
        ("both", "browsers", "Audience Exited"),
        ("both", "vip", "Audience Entered"),
    ]

    listed = {a["key"]: a for a in api("GET", "/v1/audiences").json()["audiences"]}
    assert listed["winback_priority"]["kind"] == "priority_list"
    assert listed["winback_priority"]["audiences"] == ["vip", "browsers"]
    assert (listed["vip"]["size"], listed["browsers"]["size"]) == (1, 1)
    assert listed["winback_priority"]["size"] == 2  # the union: each member once
    assert api("GET", "/v1/audiences/winback_priority").json()["size"] == 2

    why = api("GET", "/v1/users/both/explain/browsers").json()
    assert (why["member"], why["value"]) == (False, False)
    assert why["condition"]["taken_by"] == "vip"
    assert why["condition"]["own"]["value"] is True

    # previewing the list as it is changes nothing; reversed, `both` moves (one exit
    # of vip, one entry into browsers)
    same = api("POST", "/v1/audiences/preview", PRIORITY).json()
    assert (same["size"], same["entering"], same["exiting"]) == (2, 0, 0)
    reversed_ = {**PRIORITY, "audiences": ["browsers", "vip"]}
    moved = api("POST", "/v1/audiences/preview", reversed_).json()
    assert (moved["size"], moved["entering"], moved["exiting"]) == (2, 1, 1)
    assert moved["would_enter"] == moved["would_exit"] == ["both"]

    members = api("GET", "/v1/audiences/winback_priority/members")
    assert members.status == 422 and "priority list" in members.json()["error"]
