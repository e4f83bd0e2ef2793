"""The management API over HTTP against real servers and the test broker: definitions
CRUD on the definitions topic, errors, and reads routed across two workers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from apiserver import ApiServer, Worker, call, free_port, wait_for
from harness import T0, Engine, M, track
from orjson import loads as json_loads

from audiences.adapters.http.api import SERVED_BY
from audiences.adapters.stream.definitions import read_definitions
from audiences.core.events import format_iso
from audiences.core.partitioning import partition_for
from shared import SPEC_CART_ABANDONERS, isolated_settings

pytestmark = pytest.mark.kafka
BUYERS = {
    "key": "buyers",
    "name": "Buyers",
    "condition": {"performed": {"event": "Order Completed"}},
}
LTV = {"key": "ltv", "kind": "sum", "event": "Order Completed", "property": "revenue"}


@pytest.fixture
def api(engine: Engine, tmp_path: Path) -> Iterator[Worker]:
    """One worker (runtime, registry, API): definitions are read from its catalog."""
    worker = Worker(engine.settings, tmp_path / "worker", engine.clock).start().wait_ready()
    yield worker
    worker.stop()


def stored(engine: Engine) -> dict[str, tuple[dict[str, Any], int]]:
    return read_definitions(engine.settings, engine.topics)


def test_definitions_round_trip_through_the_definitions_topic(api: Worker, engine: Engine) -> None:
    created = api("PUT", "/v1/audiences/buyers", BUYERS)
    assert (created.status, created.json()) == (
        201,
        {"key": "buyers", "version": 1, "changed": True},
    )
    assert stored(engine)["buyers"][1] == 1

    same = api("PUT", "/v1/audiences/buyers", BUYERS)
    assert (same.status, same.json()) == (200, {"key": "buyers", "version": 1, "changed": False})

    edited = api("PUT", "/v1/audiences/buyers", {**BUYERS, "name": "All buyers"})
    assert edited.json() == {"key": "buyers", "version": 2, "changed": True}
    doc, version = stored(engine)["buyers"]
    assert (doc["name"], version) == ("All buyers", 2)

    # the key may come from the URL alone; computed traits live under /v1/traits
    without_key = {k: v for k, v in LTV.items() if k != "key"}
    assert api("PUT", "/v1/traits/ltv", without_key).status == 201

    shown = api("GET", "/v1/audiences/buyers")
    assert shown.status == 200
    body = shown.json()
    assert (body["name"], body["version"], body["condition"]) == (
        "All buyers",
        2,
        BUYERS["condition"],
    )
    assert "size" in body and body["created_at"]
    listed = api("GET", "/v1/audiences").json()["audiences"]
    assert [(a["key"], a["version"], a["name"]) for a in listed] == [("buyers", 2, "All buyers")]
    traits = api("GET", "/v1/traits").json()["traits"]
    assert [(t["key"], t["kind"], t["version"]) for t in traits] == [("ltv", "sum", 1)]
    assert api("GET", "/v1/traits/ltv").json()["property"] == "revenue"

    deleted = api("DELETE", "/v1/audiences/buyers")
    assert (deleted.status, deleted.json()) == (
        200,
        {"key": "buyers", "deleted": True, "version": 2},
    )
    assert "buyers" not in stored(engine)
    assert api("GET", "/v1/audiences/buyers").status == 404
    assert api("DELETE", "/v1/traits/ltv").status == 200
    assert stored(engine) == {}


def test_invalid_definitions_are_422_with_the_json_path(api: Worker, engine: Engine) -> None:
    bad = {
        "key": "bad",
        "condition": {
            "sequence": {"steps": [{"event": "A"}], "then_not": {"event": "B", "wihtin": "2h"}}
        },
    }
    answer = api("PUT", "/v1/audiences/bad", bad)
    assert answer.status == 422
    body = answer.json()
    assert body["path"] == "$.condition.sequence.then_not.wihtin"
    assert body["suggestion"] == "within"
    assert "unknown field" in body["error"]

    mismatch = api("PUT", "/v1/audiences/other", BUYERS)
    assert (mismatch.status, mismatch.json()["path"]) == (422, "$.key")
    # an audience sent to /v1/traits, a trait sent to /v1/audiences
    assert api("PUT", "/v1/traits/buyers", BUYERS).json()["path"] == "$.kind"
    wrong = api("PUT", "/v1/audiences/ltv", LTV)
    assert (wrong.status, wrong.json()["path"]) == (422, "$.kind")
    assert api("PUT", "/v1/audiences/x", [1, 2]).status == 422
    assert api("POST", "/v1/audiences/preview", bad).status == 422

    not_json = api("PUT", "/v1/audiences/buyers", raw=b"{nope")
    assert not_json.status == 400 and "not JSON" in not_json.json()["error"]
    assert stored(engine) == {}  # nothing was written

    # one key, one kind: an audience cannot silently replace a computed trait
    assert api("PUT", "/v1/traits/ltv", LTV).status == 201
    taken = api("PUT", "/v1/audiences/ltv", {**BUYERS, "key": "ltv"})
    assert taken.status == 409 and "computed trait" in taken.json()["error"]


def _not_chain(levels: int) -> str:
    """A condition `levels` deep as JSON text (orjson writes at most 255 levels)."""
    text = '{"performed": {"event": "A"}}'
    for _ in range(levels - 1):
        text = '{"not": ' + text + "}"
    return text


def test_definitions_over_the_limits_are_422_with_the_path(api: Worker, engine: Engine) -> None:
    """SPEC §11: compiled at apply time, at most 32 levels, 1,000 nodes, 1 KB patterns,
    regexes RE2 can run; hostile bodies are 4xx, never a 500 or a stuck worker."""
    leaf = {"performed": {"event": "A"}}
    for method, path, raw, where in [
        ("PUT", "/v1/audiences/deep", _not_chain(33), "$.condition" + ".not" * 32),
        ("POST", "/v1/audiences/preview", _not_chain(33), "$.condition" + ".not" * 32),
        ("POST", "/v1/internal/partitions/0/preview", _not_chain(33), "$.condition" + ".not" * 32),
        ("PUT", "/v1/audiences/deep", _not_chain(1000), "$.condition" + ".not" * 32),
    ]:
        answer = api(method, path, raw=b'{"key": "deep", "condition": ' + raw.encode() + b"}")
        assert answer.status == 422, (method, path, answer.body)
        assert answer.json()["path"] == where
        assert "deeper than 32 levels" in answer.json()["error"]

    wide = api("PUT", "/v1/audiences/wide", {"key": "wide", "condition": {"any": [leaf] * 1000}})
    assert (wide.status, wide.json()["path"]) == (422, "$.condition.any[999]")
    assert "more than 1000 nodes" in wide.json()["error"]
    filters = [{"property": "p", "op": "exists"}] * 1001
    trait = api("PUT", "/v1/traits/t", {"kind": "count", "event": "A", "where": filters})
    assert (trait.status, trait.json()["path"]) == (422, "$.where[1000]")

    def matching(pattern: str) -> dict[str, Any]:
        return {
            "key": "re",
            "condition": {"trait": {"name": "e", "op": "matches", "value": pattern}},
        }

    long = api("PUT", "/v1/audiences/re", matching("a" * 1025))
    assert (long.status, long.json()["path"]) == (422, "$.condition.trait.value")
    assert "1025 bytes" in long.json()["error"]
    for pattern in (r"(a)\1", "(?=a)"):
        refused = api("PUT", "/v1/audiences/re", matching(pattern))
        assert (refused.status, refused.json()["path"]) == (422, "$.condition.trait.value")
        assert "RE2" in refused.json()["error"]
    url = {"key": "u", "condition": {"page_viewed": {"url": "*" * 1025}}}
    refused = api("POST", "/v1/audiences/preview", url)
    assert (refused.status, refused.json()["path"]) == (422, "$.condition.page_viewed.url")

    # Deeper than the JSON parser goes (1,024 levels): refused as unreadable, not a 500.
    for raw in (_not_chain(100_000), "[" * 100_000 + "]" * 100_000):
        body = b'{"key": "deep", "condition": ' + raw.encode() + b"}"
        answer = api("PUT", "/v1/audiences/deep", raw=body)
        assert answer.status == 400 and "not JSON" in answer.json()["error"]
    assert stored(engine) == {}  # nothing was written

    # the limits themselves are allowed, and the worker compiled and serves them
    fits = {"key": "fits", "condition": json_loads(_not_chain(32))}
    assert api("PUT", "/v1/audiences/fits", fits).status == 201
    assert api("GET", "/v1/audiences/fits").json()["version"] == 1
    assert stored(engine)["fits"][1] == 1


def test_unknown_things_are_404(api: Worker, engine: Engine) -> None:
    assert api("PUT", "/v1/traits/ltv", LTV).status == 201
    for method, path in [
        ("GET", "/v1/audiences/nope"),
        ("DELETE", "/v1/audiences/nope"),
        ("GET", "/v1/audiences/ltv"),  # a trait, not an audience
        ("DELETE", "/v1/audiences/ltv"),
        ("GET", "/v1/traits/nope"),
        ("GET", "/v1/audiences/nope/members"),
    ]:
        answer = api(method, path)
        assert answer.status == 404, (method, path)
        assert "no " in answer.json()["error"]
    assert stored(engine)["ltv"][1] == 1


def test_kafka_unavailable_is_503(tmp_path: Path) -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there: the runtime never starts
    server = ApiServer(isolated_settings(dead, "dead", str(tmp_path), web_port=free_port()))
    server.start()
    try:
        for method, path in [
            ("DELETE", "/v1/users/u1"),
            ("GET", "/v1/users/u1"),
            ("GET", "/v1/audiences"),
            ("PUT", "/v1/audiences/buyers"),
        ]:
            answer = server(method, path, BUYERS if method == "PUT" else None)
            assert answer.status == 503, (method, path, answer.body)
            assert "retry" in answer.json()["error"] and answer.headers["Retry-After"] == "1"
    finally:
        server.stop()


# -- two workers ---------------------------------------------------------------------------


@pytest.fixture
def two_workers(
    kafka_bootstrap: str, unique_name: Callable[..., str], tmp_path: Path
) -> Iterator[tuple[Engine, Worker, Worker]]:
    engine = Engine(kafka_bootstrap, unique_name("api"), tmp_path / "engine", partitions=4)
    engine.apply(BUYERS, SPEC_CART_ABANDONERS, LTV)
    first = Worker(engine.settings, tmp_path / "w1", engine.clock).start()
    second = Worker(engine.settings, tmp_path / "w2", engine.clock).start()
    workers = (first, second)
    try:

        def split_and_known() -> bool:
            owned = [w.owned() for w in workers]
            if not all(owned) or owned[0] | owned[1] != {0, 1, 2, 3} or owned[0] & owned[1]:
                return False
            truth = {p: w.url for w in workers for p in w.owned()}
            return all(w.registry.owners() == truth for w in workers)

        wait_for(split_and_known, 90, "both workers to own partitions and know each other")
        yield engine, first, second
    finally:
        # Stop both loops at once: stopping one after the other hands the first one's
        # partitions to the second while it shuts down (a rebalance nobody waits for).
        for worker in workers:
            worker.evaluator.stop()
        for worker in workers:
            worker.stop()
        engine.close()


def test_reads_are_routed_to_the_owner_across_two_workers(
    two_workers: tuple[Engine, Worker, Worker],
) -> None:
    engine, first, second = two_workers
    users = [f"user-{i:02d}" for i in range(24)]
    buyers = users[::2]
    for i, user in enumerate(users):
        engine.send(
            {
                "type": "identify",
                "userId": user,
                "timestamp": format_iso(T0 + i),
                "messageId": f"id-{user}",
                "traits": {"email": f"{user}@example.com"},
            }
        )
    for user in buyers:
        engine.send(track(user, "Order Completed", T0 + M, revenue=10))
    outputs = engine.outputs(len(buyers) * 2)  # Audience Entered + Trait Computed each
    assert sorted(o["userId"] for o in outputs if o["event"] == "Audience Entered") == buyers
    owner = {p: w for w in (first, second) for p in w.owned()}
    served = set()
    for user in users:
        home = owner[partition_for(user.encode(), 4)]
        for asked in (first, second):
            answer = call("GET", f"{asked.url}/v1/users/{user}")
            assert answer.status == 200, answer.body
            assert answer.headers[SERVED_BY] == home.url
            served.add((asked is home, home.url))
            body = answer.json()
            assert body["traits"] == {"email": f"{user}@example.com"}
            in_audiences = [a["key"] for a in body["audiences"]]
            if user in buyers:
                assert in_audiences == ["buyers"]
                assert body["audiences"][0]["entered_at"] == format_iso(T0 + M)
                assert body["computed_traits"] == {"ltv": 10}
            else:
                assert in_audiences == [] and body["computed_traits"] == {}

            why = call("GET", f"{asked.url}/v1/users/{user}/explain/buyers")
            assert why.status == 200 and why.headers[SERVED_BY] == home.url
            explained = why.json()
            assert explained["member"] is explained["value"] is (user in buyers)
            assert explained["condition"]["value"] is (user in buyers)
    # both workers answered locally and forwarded
    assert {local for local, _ in served} == {True, False}
    assert {url for _, url in served} == {first.url, second.url}

    for asked in (first, second):
        missing = call("GET", f"{asked.url}/v1/users/nobody")
        assert missing.status == 404 and "nobody" in missing.json()["error"]
        no_audience = call("GET", f"{asked.url}/v1/users/{users[0]}/explain/nope")
        assert no_audience.status == 404 and "nope" in no_audience.json()["error"]

    # members: several pages across the four partitions, each member exactly once
    for asked in (first, second):
        seen: list[str] = []
        pages = 0
        cursor: str | None = None
        while True:
            query = "?limit=3" + (f"&cursor={cursor}" if cursor else "")
            page = call("GET", f"{asked.url}/v1/audiences/buyers/members{query}")
            assert page.status == 200, page.body
            body = page.json()
            assert len(body["members"]) <= 3
            seen += [m["id"] for m in body["members"]]
            pages += 1
            cursor = body["next_cursor"]
            if cursor is None:
                break
        assert sorted(seen) == buyers and len(seen) == len(set(seen))
        assert pages >= 4
    assert call("GET", f"{first.url}/v1/audiences/buyers/members?cursor=zzz").status == 400

    # sizes count every partition, whichever worker is asked
    for asked in (first, second):
        assert call("GET", f"{asked.url}/v1/audiences/buyers").json()["size"] == len(buyers)

    report = call("POST", f"{first.url}/v1/audiences/preview", {**BUYERS, "name": "B"})
    assert report.status == 200
    assert report.json()["size"] == len(buyers) and report.json()["current_version"] == 1


def test_deleting_a_user_exits_their_audiences_then_tells_destinations(
    two_workers: tuple[Engine, Worker, Worker],
) -> None:
    engine, first, second = two_workers
    engine.send(track("gone", "Order Completed", T0, revenue=5))
    entered = engine.outputs(2)
    assert {o["event"] for o in entered} == {"Audience Entered", "Trait Computed"}
    assert call("GET", f"{first.url}/v1/users/gone").status == 200

    for asked in (first, second):  # either worker accepts it; the record is keyed by user
        answer = call("DELETE", f"{asked.url}/v1/users/gone")
        assert (answer.status, answer.json()) == (202, {"userId": "gone", "accepted": True})
    # the exit, then one `User Deleted` per request (the second found no state: it is
    # honoured all the same, for destinations that hold what the engine no longer has)
    outputs = engine.outputs(5)[2:]
    assert [(o["userId"], o["event"]) for o in outputs] == [
        ("gone", "Audience Exited"),
        ("gone", "User Deleted"),
        ("gone", "User Deleted"),
    ]
    exit_, *deletions = outputs
    assert exit_["properties"]["reason"]["trigger"] == "deleted"
    requests = [d["properties"]["reason"]["messageId"] for d in deletions]
    assert exit_["properties"]["reason"]["messageId"] == requests[0]
    assert all(r.startswith("api-delete-") for r in requests) and len(set(requests)) == 2
    assert len({d["messageId"] for d in deletions}) == 2
    assert all(d["context"] == {"traits": {}} for d in deletions)
    # an id the engine never saw: the request is honoured, destinations hear of it
    answer = call("DELETE", f"{second.url}/v1/users/never%20seen")
    assert (answer.status, answer.json()) == (202, {"userId": "never seen", "accepted": True})
    [unknown] = engine.outputs(6)[5:]
    assert (unknown["userId"], unknown["event"]) == ("never seen", "User Deleted")
    wait_for(
        lambda: call("GET", f"{second.url}/v1/users/gone").status == 404, 10, "the profile to go"
    )
