"""The evaluator through the real Kafka protocol, with an injected wall clock."""

from __future__ import annotations

import shutil

import orjson
import pytest
from harness import T0, Engine, H, M, S, by_user, pure_outputs, track

from audiences.core.events import format_iso
from audiences.core.outputs import computation_id
from shared import SPEC_CART_ABANDONERS

pytestmark = pytest.mark.kafka

CART_ABANDONERS = SPEC_CART_ABANDONERS
FREQUENT = {
    "key": "frequent_viewers",
    "condition": {"performed": {"event": "Product Viewed", "times": {"gte": 3}, "within": "1h"}},
}
ENGAGED = {
    "key": "engaged",
    "condition": {"any": [{"in_audience": "cart_abandoners"}, {"in_audience": "frequent_viewers"}]},
}


def test_outputs_carry_context_personas_of_the_app_id_by_default(engine: Engine) -> None:
    """SPEC §5: `context.personas` with `space_id` = `namespace` = AUDIENCES_SPACE_ID, by
    default the app id; the messageId is the core's whatever the space."""
    engine.settings = engine.settings.replace(space_id="")
    engine.apply(FREQUENT)
    engine.start()
    views = [track("u1", "Product Viewed", T0 + n * M) for n in range(3)]
    engine.send(*views)
    [entered] = engine.outputs(1)
    app_id = engine.settings.app_id
    assert entered["context"]["personas"] == {
        "computation_class": "audience",
        "computation_key": "frequent_viewers",
        "computation_id": computation_id(app_id, "audience", "frequent_viewers"),
        "space_id": app_id,
        "namespace": app_id,
    }
    assert list(pure_outputs([FREQUENT], views, None)) == [entered["messageId"]]


def test_a_passed_deadline_is_swept_on_the_next_loop_turn_not_the_next_tick(
    engine: Engine,
) -> None:
    """With a 10-minute tick, a deadline in the index fires as soon as the clock passes
    it: the partition's earliest deadline says when the next sweep has work."""
    engine.settings = engine.settings.replace(tick_interval_ms=600_000)
    engine.apply(CART_ABANDONERS)
    engine.start()
    engine.send(track("idle", "Checkout Started", T0, cart_id="c1"))
    engine.settle()  # evaluated and durable: its deadline is in the index
    engine.clock.advance_to(T0 + 2 * H + 5 * S)
    entered = engine.outputs(1, timeout=20)[0]  # (the tick would come in 10 minutes)
    assert entered["userId"] == "idle" and entered["event"] == "Audience Entered"
    assert entered["timestamp"] == format_iso(T0 + 2 * H)


def test_abandoner_enters_at_deadline_while_idle_and_exits_on_late_order(engine: Engine) -> None:
    engine.apply(CART_ABANDONERS)
    engine.start()
    engine.send(
        track("idle", "Checkout Started", T0, cart_id="c1"),
        track("buyer", "Checkout Started", T0, cart_id="c2"),
        track("buyer", "Order Completed", T0 + 30 * M, cart_id="c2"),
    )
    engine.clock.advance_to(T0 + 2 * H + 5 * S)  # nobody sends anything: the deadline fires
    outputs = engine.outputs(1)
    assert len(outputs) == 1
    entered = outputs[0]
    assert entered["userId"] == "idle" and entered["event"] == "Audience Entered"
    assert entered["timestamp"] == format_iso(T0 + 2 * H)  # exact to the deadline, not the sweep
    assert entered["properties"]["cart_abandoners"] is True
    assert entered["properties"]["audience_version"] == 1
    personas = entered["context"]["personas"]
    assert personas["computation_key"] == "cart_abandoners"
    assert personas["space_id"] == personas["namespace"] == engine.settings.space_id

    engine.send(track("idle", "Order Completed", T0 + 3 * H, cart_id="c1"))
    outputs = engine.outputs(2)
    assert len(outputs) == 2
    assert outputs[1]["event"] == "Audience Exited"
    assert outputs[1]["timestamp"] == format_iso(T0 + 3 * H)
    assert outputs[1]["properties"]["cart_abandoners"] is False


def test_match_on_keeps_two_carts_apart(engine: Engine) -> None:
    engine.apply(CART_ABANDONERS)
    engine.start()
    engine.send(
        track("u", "Checkout Started", T0, cart_id="a"),
        track("u", "Checkout Started", T0 + 10 * M, cart_id="b"),
        track("u", "Order Completed", T0 + 20 * M, cart_id="a"),  # pays cart a only
    )
    engine.settle()  # evaluated before the clock passes cart a's deadline
    engine.clock.advance_to(T0 + 3 * H)
    outputs = engine.outputs(1)
    assert [(o["event"], o["timestamp"]) for o in outputs] == [
        ("Audience Entered", format_iso(T0 + 10 * M + 2 * H))  # cart b's deadline
    ]


def test_times_within_enters_and_exits_by_time_alone(engine: Engine) -> None:
    engine.apply(FREQUENT)
    engine.start()
    engine.send(*(track("v", "Product Viewed", T0 + i * 10 * M) for i in range(3)))
    outputs = engine.outputs(1)
    assert outputs[0]["event"] == "Audience Entered"
    assert outputs[0]["timestamp"] == format_iso(T0 + 20 * M)
    engine.clock.advance_to(T0 + 2 * H)  # the first view leaves the 1h window at T0 + 1h
    outputs = engine.outputs(2)
    assert len(outputs) == 2
    assert (outputs[1]["event"], outputs[1]["timestamp"]) == ("Audience Exited", format_iso(T0 + H))


def test_in_audience_composes(engine: Engine) -> None:
    engine.apply(CART_ABANDONERS, FREQUENT, ENGAGED)
    engine.start()
    engine.send(
        *(track("w", "Product Viewed", T0 + i * M) for i in range(3)),
        track("w", "Checkout Started", T0 + 5 * M, cart_id="c"),
    )
    engine.settle()
    engine.clock.advance_to(T0 + 2 * H + 5 * M)
    outputs = engine.outputs(6)
    assert len(outputs) == 6
    # engaged follows its parts, including their time-caused changes
    assert [(a, e, t) for a, e, t in by_user(outputs)["w"] if a == "engaged"] == [
        ("engaged", "Audience Entered", format_iso(T0 + 2 * M)),
        ("engaged", "Audience Exited", format_iso(T0 + H)),
        ("engaged", "Audience Entered", format_iso(T0 + 2 * H + 5 * M)),
    ]
    assert sorted(o["properties"]["audience_key"] for o in outputs) == [
        "cart_abandoners",
        "engaged",
        "engaged",
        "engaged",
        "frequent_viewers",
        "frequent_viewers",
    ]


def test_invalid_events_go_to_the_dlq_and_processing_continues(engine: Engine) -> None:
    engine.apply(FREQUENT)
    engine.start()
    engine.send(b"{not json", key=b"x")
    engine.send(orjson.dumps({"type": "track", "userId": "x"}), key=b"x")  # no event name
    engine.send(orjson.dumps({"type": "track", "event": "E"}), key=b"x")  # no user
    engine.send(b"{" + b'"a":' * 0 + b'"big": "' + b"x" * 40_000 + b'"}', key=b"x")
    engine.send(*(track("ok", "Product Viewed", T0 + i * S) for i in range(3)))
    letters = engine.dead_letters(4)
    assert len(letters) == 4
    reasons = [dict(m.headers())["error_reason"].decode() for m in letters]
    assert sorted(reasons) == ["missing_event", "missing_user", "oversized", "undecodable"]
    first = dict(letters[0].headers())
    assert first["source_topic"].decode() == engine.topics.events
    assert first["source_offset"].decode().isdigit() and "source_partition" in first
    assert letters[0].value() == b"{not json"  # original bytes kept
    outputs = engine.outputs(1)
    assert outputs[0]["userId"] == "ok" and outputs[0]["event"] == "Audience Entered"


def test_replay_into_a_fresh_app_gives_identical_transitions(engine: Engine) -> None:
    engine.apply(CART_ABANDONERS, FREQUENT)
    engine.start()
    for user in ("r1", "r2", "r3"):
        engine.send(
            track(user, "Checkout Started", T0, cart_id="c"),
            *(track(user, "Product Viewed", T0 + i * M) for i in range(4)),
        )
    engine.send(track("r2", "Order Completed", T0 + 3 * H, cart_id="c"))
    engine.clock.advance_to(T0 + 4 * H)
    first = engine.outputs(3 * 3 + 1)  # 3 viewers in+out, 3 abandoners in, r2 out
    assert len(first) == 10
    engine.stop()
    engine.start(app_id=engine.settings.app_id + "-replay")  # new group, changelog, state
    replayed = engine.outputs(20)[10:]
    assert len(replayed) == 10

    assert by_user_ids(replayed) == by_user_ids(first)  # same order per user, same ids


def by_user_ids(outputs: list[dict]) -> dict[str, list[tuple[str, str]]]:
    found: dict[str, list[tuple[str, str]]] = {}
    for out in outputs:
        found.setdefault(out["userId"], []).append((out["messageId"], out["event"]))
    return found


@pytest.mark.parametrize("wipe", [False, True], ids=["same-data-dir", "wiped-data-dir"])
def test_restart_continues_without_loss_or_duplicates(engine: Engine, wipe: bool) -> None:
    engine.apply(CART_ABANDONERS)
    engine.start()
    engine.send(track("k", "Checkout Started", T0, cart_id="c"))
    engine.send(track("probe", "Checkout Started", T0, cart_id="p"))
    engine.clock.advance_to(T0 + 2 * H)
    assert len(engine.outputs(2)) == 2
    engine.stop()
    if wipe:
        shutil.rmtree(engine.settings.data_dir)
    engine.start()
    # state survived: the order exits the member; nothing before is re-emitted
    engine.send(track("k", "Order Completed", T0 + 3 * H, cart_id="c"))
    outputs = engine.outputs(3)
    assert len(outputs) == 3
    assert by_user(outputs)["k"] == [
        ("cart_abandoners", "Audience Entered", format_iso(T0 + 2 * H)),
        ("cart_abandoners", "Audience Exited", format_iso(T0 + 3 * H)),
    ]


def test_an_evaluation_failure_parks_the_event_and_the_worker_goes_on(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from audiences.adapters.state import partition as runtime
    from audiences.core.evaluator import step as real_step

    def flaky_step(state, item, catalog, key):  # type: ignore[no-untyped-def]
        if getattr(item, "name", None) == "Boom":
            raise RuntimeError("simulated bug")
        return real_step(state, item, catalog, key)

    monkeypatch.setattr(runtime, "step_override", flaky_step)
    engine.apply(FREQUENT)
    engine.start()
    engine.send(
        track("x", "Boom", T0), *(track("x", "Product Viewed", T0 + i * S) for i in range(3))
    )
    (letter,) = engine.dead_letters(1)
    assert dict(letter.headers())["error_reason"] == b"evaluation_error"
    assert b"simulated bug" in dict(letter.headers())["error"]
    outputs = engine.outputs(1)
    assert outputs[0]["userId"] == "x" and outputs[0]["event"] == "Audience Entered"


def test_a_parser_failure_parks_the_record_and_the_worker_goes_on(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in `parse_event` (not an invalid event: those have their own reasons) costs
    that record only: `parse_error` in events-dlq, and the next records are evaluated."""
    from audiences.adapters.stream import evaluation

    real_parse = evaluation.parse_event

    def flaky_parse(data, received_at_ms):  # type: ignore[no-untyped-def]
        if b"Boom" in data:
            raise RuntimeError("simulated parser bug")
        return real_parse(data, received_at_ms)

    monkeypatch.setattr(evaluation, "parse_override", flaky_parse)
    engine.apply(FREQUENT)
    engine.start()
    engine.send(
        track("x", "Boom", T0), *(track("x", "Product Viewed", T0 + i * S) for i in range(3))
    )
    (letter,) = engine.dead_letters(1)
    assert dict(letter.headers())["error_reason"] == b"parse_error"
    assert b"simulated parser bug" in dict(letter.headers())["error"]
    outputs = engine.outputs(1)
    assert outputs[0]["userId"] == "x" and outputs[0]["event"] == "Audience Entered"


def test_a_hijacking_alias_and_a_2099_event_are_dead_lettered_and_the_worker_goes_on(
    engine: Engine,
) -> None:
    """SPEC §11 through Kafka: the merge request travels to the victim's partition, which
    refuses it; the future event never reaches the profile's clock."""
    engine.apply(FREQUENT)
    engine.start()
    engine.send(
        {
            "type": "identify",
            "userId": "victim",
            "traits": {"email": "victim@example.com"},
            "timestamp": format_iso(T0),
            "messageId": "victim-identify",
        },
        *(track("victim", "Product Viewed", T0 + i * M) for i in range(3)),
    )
    (entered,) = engine.outputs(1)
    assert (entered["userId"], entered["event"]) == ("victim", "Audience Entered")
    hijack = {
        "type": "alias",
        "userId": "attacker",
        "previousId": "victim",
        "timestamp": format_iso(T0 + 10 * M),
        "messageId": "hijack",
    }
    future = {**track("victim", "Product Viewed", 0), "timestamp": "2099-01-01T00:00:00.000Z"}
    engine.send(hijack, future)
    engine.send(*(track("other", "Product Viewed", T0 + i * M) for i in range(3)))
    letters = engine.dead_letters(2)
    found = {orjson.loads(m.value())["messageId"]: m for m in letters}
    assert set(found) == {"hijack", future["messageId"]}
    refused = found["hijack"]
    assert dict(refused.headers())["error_reason"] == b"merge_refused"
    assert refused.key() == b"attacker" and orjson.loads(refused.value()) == hijack
    assert dict(found[future["messageId"]].headers())["error_reason"] == b"future_timestamp"
    # the victim neither exited nor moved; the other transitions still arrive
    outputs = engine.outputs(2)
    assert [(o["userId"], o["event"]) for o in outputs] == [
        ("victim", "Audience Entered"),
        ("other", "Audience Entered"),
    ]
    assert outputs[0]["context"]["traits"]["email"] == "victim@example.com"
    # a genuine later event is not late: the window ends an hour after the first view
    engine.send(track("victim", "Product Viewed", T0 + 30 * M))
    engine.settle()  # evaluated before the clock moves on (else it is a late view: CI)
    engine.clock.advance_to(T0 + 2 * H)
    outputs = engine.outputs(4)
    assert sorted((o["userId"], o["event"], o["timestamp"]) for o in outputs[2:]) == [
        ("other", "Audience Exited", format_iso(T0 + H)),
        ("victim", "Audience Exited", format_iso(T0 + H + M)),  # views at M, 2M, 30M left
    ]


def test_deleting_a_user_deletes_its_linked_anonymous_profile_through_kafka(
    engine: Engine,
) -> None:
    visitors = {
        "key": "visitors",
        "condition": {"performed": {"event": "Product Viewed"}},
        "include_anonymous": True,
    }
    engine.apply(visitors)
    engine.start()
    anonymous = {**track("x", "Product Viewed", T0), "anonymousId": "a1"}
    del anonymous["userId"]
    engine.send(anonymous)
    engine.send({**track("u1", "Signed Up", T0 + M), "anonymousId": "a1"})
    outputs = engine.outputs(3)  # a1 entered, a1 exited (merged), u1 entered
    assert sorted((o.get("userId") or o["anonymousId"], o["event"]) for o in outputs) == [
        ("a1", "Audience Entered"),
        ("a1", "Audience Exited"),
        ("u1", "Audience Entered"),
    ]
    engine.send({"type": "delete", "userId": "u1", "timestamp": format_iso(T0 + 2 * M)})
    # u1 exits, then is deleted; the linked a1 is deleted too (its own `User Deleted`)
    outputs = engine.outputs(6)
    assert sorted(
        (o.get("userId") or o["anonymousId"], o["event"], o["properties"].get("linkedTo"))
        for o in outputs[3:]
    ) == [
        ("a1", "User Deleted", "u1"),
        ("u1", "Audience Exited", None),
        ("u1", "User Deleted", None),
    ]
    u1 = [o["event"] for o in outputs[3:] if o.get("userId") == "u1"]
    assert u1 == ["Audience Exited", "User Deleted"]
    # a later anonymous event neither forwards to the user nor recreates a profile
    engine.send({**anonymous, "timestamp": format_iso(T0 + 3 * M), "messageId": "later"})
    engine.send(track("probe", "Product Viewed", T0 + 4 * M))
    outputs = engine.outputs(7)
    assert (outputs[6]["userId"], outputs[6]["event"]) == ("probe", "Audience Entered")
    engine.settle()
    assert engine.evaluator is not None
    for partition in engine.evaluator.partitions.values():
        assert b"a1" not in partition.cache and b"u1" not in partition.cache


@pytest.mark.parametrize("wipe", [False, True], ids=["same-data-dir", "wiped-data-dir"])
def test_a_resent_batch_of_17_does_not_make_a_gte_audience_enter(
    engine: Engine, wipe: bool
) -> None:
    """SPEC §11 (issue 11's probe): the same messageIds re-sent, with other events
    between, count once — before and after a restart (the memory lives in the profile:
    RocksDB, or the changelog when the data dir is gone)."""
    from prometheus_client import REGISTRY

    def duplicates() -> float:
        return REGISTRY.get_sample_value("audiences_events_duplicate_total") or 0.0

    def orders(n: int) -> dict[str, object]:
        condition = {"performed": {"event": "Order Completed", "times": {"gte": n}}}
        return {"key": f"orders_{n}", "condition": condition}

    engine.apply(orders(17), orders(20))
    engine.start()
    before = duplicates()
    batch = [track("r", "Order Completed", T0 + i * S, revenue=i) for i in range(17)]
    engine.send(*batch)
    engine.send(*(track("r", "Product Viewed", T0 + M + i * S) for i in range(5)))
    engine.send(*batch)  # the client re-sends the whole batch
    engine.send(*(track("r", "Order Completed", T0 + H + i * S) for i in range(2)))  # 19
    engine.settle()
    assert [(o["properties"]["audience_key"], o["event"]) for o in engine.outputs(1)] == [
        ("orders_17", "Audience Entered")
    ]
    assert duplicates() - before == 17
    engine.stop()
    if wipe:
        shutil.rmtree(engine.settings.data_dir)
    engine.start()
    engine.send(*batch)  # again, after the restart
    engine.send(track("r", "Order Completed", T0 + 2 * H))  # the 20th order
    outputs = engine.outputs(2)
    assert [(o["properties"]["audience_key"], o["event"]) for o in outputs] == [
        ("orders_17", "Audience Entered"),
        ("orders_20", "Audience Entered"),
    ]
    assert outputs[1]["timestamp"] == format_iso(T0 + 2 * H)
    assert duplicates() - before == 34


def test_the_loop_freezes_the_profiles_it_holds_so_collections_never_rescan_them(
    engine: Engine,
) -> None:
    """README "Garbage collection": after a loop turn, what it left alive (the decoded
    profiles above all) is frozen out of the collector's generations."""
    import gc

    engine.apply(FREQUENT)
    engine.start()
    engine.send(*(track("frozen", "Product Viewed", T0 + n * M) for n in range(3)))
    [entered] = engine.outputs(1)
    assert entered["userId"] == "frozen"
    engine.settle()
    assert engine.evaluator is not None
    [profile] = [
        state
        for partition in engine.evaluator.partitions.values()
        for key, state in partition.cache.items()
        if key == b"frozen"
    ]
    assert all(obj is not profile for obj in gc.get_objects())


def test_a_backlog_is_checkpointed_catch_up_factor_commit_intervals_apart(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While every consume comes back full, the runtime asks for the stretched commit
    interval (`commit_interval_s(..., backlog=True)`: CATCH_UP_COMMIT_FACTOR times the
    setting), and for the setting itself once a consume drains the topic; the outputs
    are the same as ever."""
    from audiences.adapters.stream import runtime

    asked: list[tuple[float, bool]] = []
    original = runtime.commit_interval_s

    def recording(configured_s: float, *, backlog: bool) -> float:
        asked.append((configured_s, backlog))
        return original(configured_s, backlog=backlog)

    monkeypatch.setattr(runtime, "commit_interval_s", recording)
    engine.settings = engine.settings.replace(batch_size=5, commit_interval_ms=10)
    engine.apply(FREQUENT)
    views = [track(f"b{n % 400}", "Product Viewed", T0 + n * S) for n in range(2400)]
    engine.send(*views)  # a backlog before the worker starts
    engine.start()
    assert len(engine.outputs(400)) == 400  # every user viewed 6 times within the hour
    engine.settle()
    backlog_turns = [configured for configured, backlog in asked if backlog]
    assert backlog_turns and set(backlog_turns) == {0.01}
    assert asked[-1] == (0.01, False)  # drained: the setting itself
