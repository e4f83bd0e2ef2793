"""Account audiences through the real Kafka protocol: users and their account live on
different partitions; the users' predicate values reach the account as records on the
events topic (SPEC §3, §5)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from apiserver import Worker, call, wait_for
from harness import T0, Engine, M, track

from audiences.core.events import format_iso
from audiences.core.partitioning import partition_for

pytestmark = pytest.mark.kafka

D = 24 * 60 * M
ACTIVE_SHOPS = {
    "key": "active_shops",
    "name": "Shops where any user ordered in the last 30 days",
    "subject": "account",
    "condition": {"account": {"any": {"performed": {"event": "Order Completed", "within": "30d"}}}},
}


def group(user: str, group_id: str, at_ms: int, **traits: Any) -> dict[str, Any]:
    return {
        "type": "group",
        "userId": user,
        "groupId": group_id,
        "traits": traits,
        "timestamp": format_iso(at_ms),
        "messageId": f"{user}-group-{group_id}-{at_ms}-{uuid.uuid4().hex[:6]}",
    }


def _apart(partitions: int) -> tuple[str, str, str]:
    """Two users on one partition and an account (group:{id}) on another."""
    users = [f"user{n}" for n in range(100)]
    first = users[0]
    home = partition_for(first.encode(), partitions)
    second = next(u for u in users[1:] if partition_for(u.encode(), partitions) == home)
    shop = next(
        f"shop{n}"
        for n in range(100)
        if partition_for(f"group:shop{n}".encode(), partitions) != home
    )
    return first, second, shop


def test_an_account_on_another_partition_follows_its_users_and_replays_alike(
    engine: Engine,
) -> None:
    u1, u2, shop = _apart(engine.settings.partitions)
    engine.apply(ACTIVE_SHOPS)
    engine.start()
    engine.send(group(u1, shop, T0, name="The shop"), group(u2, shop, T0))
    engine.send(track(u1, "Order Completed", T0 + M))
    (entered,) = engine.outputs(1)  # the first user to qualify: the account enters
    assert entered["event"] == "Audience Entered" and entered["groupId"] == shop
    assert "userId" not in entered
    assert entered["timestamp"] == format_iso(T0 + M)
    assert entered["properties"]["active_shops"] is True
    assert entered["context"]["personas"]["computation_class"] == "account_audience"

    engine.send(track(u2, "Order Completed", T0 + 2 * M))
    engine.settle()  # evaluated before the clock moves past u1's window
    engine.clock.advance_to(T0 + M + 30 * D + M)  # u1 no longer qualifies; u2 still does
    engine.settle()
    engine.clock.advance_to(T0 + 2 * M + 30 * D + M)  # the last one stops: it exits
    first = engine.outputs(2)
    exited = first[1]
    assert (exited["event"], exited["groupId"]) == ("Audience Exited", shop)
    assert exited["timestamp"] == format_iso(T0 + 2 * M + 30 * D)
    assert exited["properties"]["active_shops"] is False

    engine.stop()
    engine.start(app_id=engine.settings.app_id + "-replay")  # new group, changelog, state
    replayed = engine.outputs(4)[2:]
    assert [(o["messageId"], o["event"]) for o in replayed] == [
        (o["messageId"], o["event"]) for o in first
    ]


def test_explain_an_account_over_http_names_the_users_that_decided_it(
    engine: Engine, tmp_path: Path
) -> None:
    """GET /v1/users/group:{groupId}/explain/{key}: the account's profile (its own
    partition), with each linked user's value and the group traits."""
    engine.apply(ACTIVE_SHOPS)
    worker = Worker(engine.settings, tmp_path / "worker", engine.clock).start().wait_ready()
    try:
        engine.send(group("ann", "shop9", T0, plan="pro"), group("bob", "shop9", T0))
        engine.send(track("bob", "Order Completed", T0 + M))
        (entered,) = engine.outputs(1)
        assert entered["properties"]["linked_users"] == ["ann", "bob"]
        answer = call("GET", f"{worker.url}/v1/users/{quote('group:shop9')}/explain/active_shops")
        assert answer.status == 200
        explained = answer.json()
        assert explained["member"] is explained["value"] is True
        tree = explained["condition"]
        assert tree["users"] == {"ann": False, "bob": True}
        assert tree["account"]["group_traits"] == {"plan": "pro"}
        user = call("GET", f"{worker.url}/v1/users/bob/explain/active_shops").json()
        assert user["value"] is False and user["condition"]["account"] is None
        inner = call("GET", f"{worker.url}/v1/users/bob/explain/active_shops.0").json()
        assert inner["value"] is True  # bob's own value of the inner condition
    finally:
        worker.stop()


def test_an_account_owned_by_another_worker_follows_its_users(
    kafka_bootstrap: str, unique_name: Callable[..., str], tmp_path: Path
) -> None:
    """Two workers of one group: the users' partition is owned by one, the account's by
    the other. The users' values travel as records through Kafka (no shared memory): the
    account enters with its first qualifying user and exits when the last stops, at the
    deadline, on the other worker."""
    engine = Engine(kafka_bootstrap, unique_name("acct2"), tmp_path / "engine", partitions=4)
    engine.apply(ACTIVE_SHOPS)
    workers = (
        Worker(engine.settings, tmp_path / "w1", engine.clock).start(),
        Worker(engine.settings, tmp_path / "w2", engine.clock).start(),
    )
    try:

        def split() -> bool:
            owned = [w.owned() for w in workers]
            return all(owned) and owned[0] | owned[1] == {0, 1, 2, 3} and not owned[0] & owned[1]

        wait_for(split, 90, "both workers to own partitions")
        mine, theirs = workers[0].owned(), workers[1].owned()
        # both users on one partition of the first worker: their records reach the account
        # in the order they were made (from two partitions they could arrive either way)
        home = min(mine)
        users = [
            u for u in (f"user{n}" for n in range(500)) if partition_for(u.encode(), 4) == home
        ]
        shop = next(
            f"shop{n}" for n in range(500) if partition_for(f"group:shop{n}".encode(), 4) in theirs
        )
        u1, u2 = users[:2]
        engine.send(group(u1, shop, T0), group(u2, shop, T0))
        engine.send(track(u1, "Order Completed", T0 + M), track(u2, "Order Completed", T0 + 2 * M))
        (entered,) = engine.outputs(1)
        assert (entered["event"], entered["groupId"]) == ("Audience Entered", shop)
        assert entered["timestamp"] == format_iso(T0 + M)
        assert entered["properties"]["linked_users"] == sorted([u1, u2])
        explain = f"{workers[0].url}/v1/users/{quote('group:' + shop)}/explain/active_shops"

        def account_sees(expected: dict[str, bool]) -> Callable[[], bool]:
            # (asked of the users' worker: it routes the read to the account's owner)
            def check() -> bool:  # (404 until the account exists; 503 until routes are known)
                answer = call("GET", explain)
                return answer.status == 200 and answer.json()["condition"].get("users") == expected

            return check

        wait_for(account_sees({u1: True, u2: True}), 30, "the account to hear from both users")
        engine.clock.advance_to(T0 + M + 30 * D + M // 2)  # u1's order left the window, u2's not
        wait_for(account_sees({u1: False, u2: True}), 30, "the account to hear u1 dropped out")
        engine.clock.advance_to(T0 + 2 * M + 30 * D + M)  # the last one: the account exits
        exited = engine.outputs(2)[1]
        assert (exited["event"], exited["groupId"]) == ("Audience Exited", shop)
        assert exited["timestamp"] == format_iso(T0 + 2 * M + 30 * D)
        assert exited["messageId"] != entered["messageId"]
    finally:
        for running in workers:
            running.evaluator.stop()
        for running in workers:
            running.stop()
        engine.close()
