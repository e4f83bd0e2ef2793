"""Test data and helpers used across unit, component and system tests."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import orjson

from audiences.adapters.settings import Settings
from audiences.core.definitions import build_catalog, validate_definition
from audiences.core.evaluator import Tick, step
from audiences.core.events import parse_event
from audiences.core.outputs import render_output

# The definition example of SPEC §3, verbatim.
SPEC_CART_ABANDONERS: dict[str, Any] = {
    "key": "cart_abandoners",
    "name": "Cart abandoners",
    "description": "Started checkout, no order within 2 hours",
    "condition": {
        "sequence": {
            "steps": [{"event": "Checkout Started"}],
            "then_not": {"event": "Order Completed", "within": "2h"},
            "match_on": "properties.cart_id",
            "active_for": "7d",
        }
    },
    "include_anonymous": False,
    "backfill": True,
}


# The space of the outputs of every test engine (`isolated_settings`), so that the core's
# outputs (`pure_outputs`) are comparable whatever the app id.
TEST_SPACE_ID = "spa_test"


def isolated_settings(bootstrap: str, name: str, data_dir: str, **overrides: Any) -> Settings:
    """Settings whose topics, groups and state belong to one test only."""
    values: dict[str, Any] = {
        "kafka_bootstrap": bootstrap,
        "app_id": f"{name}-app",
        "space_id": TEST_SPACE_ID,
        "events_topic": f"{name}-events",
        "audience_events_topic": f"{name}-audience-events",
        "definitions_topic": f"{name}-defs",
        "events_dlq_topic": f"{name}-events-dlq",
        "audience_events_dlq_topic": f"{name}-ae-dlq",
        "data_dir": data_dir,
    }
    values.update(overrides)
    return Settings(**values)


def output_message(
    user: str,
    audience: str = "cart_abandoners",
    *,
    entered: bool = True,
    seq: int = 1,
    at_ms: int = 1_767_225_600_000,
    email: str | None = None,
    anonymous: bool = False,
    holdout: bool = False,
) -> dict[str, Any]:
    """An `audience-events` message (SPEC §5) as the evaluator renders it (`holdout`: of a
    member of the audience's holdout, SPEC §3)."""
    from audiences.core.evaluator import Transition
    from audiences.core.outputs import render_transition

    transition = Transition(
        audience_key=audience,
        audience_version=1,
        audience_name=audience.replace("_", " ").capitalize(),
        profile_key=user,
        entered=entered,
        at_ms=at_ms,
        seq=seq,
        effective_at_ms=at_ms,
        trigger="event",
        trigger_message_id=f"m-{user}-{seq}",
        holdout=holdout,
    )
    traits = {"email": email} if email else {}
    return render_transition(transition, traits, space_id=TEST_SPACE_ID, anonymous=anonymous)


def deleted_message(
    user: str,
    *,
    at_ms: int = 1_767_225_600_000,
    anonymous: bool = False,
    linked_to: str | None = None,
    delete_id: str = "api-delete-1",
) -> dict[str, Any]:
    """A `User Deleted` message of `audience-events` as the evaluator renders it."""
    from audiences.core.evaluator import Deletion
    from audiences.core.outputs import render_deletion

    return render_deletion(Deletion(user, anonymous, at_ms, f"{delete_id}-{user}", linked_to))


def wait_for(ready: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll `ready` until it holds (for something asynchronous to happen, not to time it);
    raises TimeoutError naming `what` if it never does."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.2)


def pure_outputs(
    definitions: list[dict[str, Any]],
    events: Iterable[dict[str, Any]],
    now_ms: int | None,
    *,
    received_ms: int | None = None,
) -> dict[str, dict[str, Any]]:
    """messageId -> output that the pure core implies for `events` in log order,
    followed by a `Tick(now_ms)` for every profile (None: no tick).

    Identity control records that `step` returns (SPEC §4 merges) are delivered at once
    to the profile they are keyed by, as Kafka delivers them; records of deleted
    profiles are dropped until unsuppressed, as SPEC §4 says."""
    catalog = build_catalog({d["key"]: (validate_definition(d), 1) for d in definitions})
    states: dict[str, Any] = {}
    suppressed: set[str] = set()
    outputs: dict[str, dict[str, Any]] = {}

    def record(result: Any) -> None:
        for t in result.transitions:
            rendered = render_output(
                t, result.state.traits, space_id=TEST_SPACE_ID, anonymous=result.state.anonymous
            )
            outputs[t.message_id] = orjson.loads(orjson.dumps(rendered))  # as on the topic

    for raw in events:
        queue: list[dict[str, Any]] = [raw]
        while queue:
            event = parse_event(orjson.dumps(queue.pop(0)), received_ms or now_ms or 0)
            key = event.key
            if key in suppressed and event.type != "unsuppress":
                continue
            suppressed.discard(key)
            result = step(states.get(key), event, catalog, key)
            record(result)
            if result.erase:
                states.pop(key, None)
                suppressed.add(key)
            else:
                states[key] = result.state
            queue += [control for _target, control in result.controls]
    if now_ms is not None:
        for key, state in states.items():
            record(step(state, Tick(now_ms), catalog, key))
    return outputs
