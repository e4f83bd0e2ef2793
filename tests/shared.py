"""Test data and helpers used across unit, component and system tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from audiences.adapters.settings import Settings

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


def isolated_settings(bootstrap: str, name: str, data_dir: str, **overrides: Any) -> Settings:
    """Settings whose topics, groups and state belong to one test only."""
    values: dict[str, Any] = {
        "kafka_bootstrap": bootstrap,
        "app_id": f"{name}-app",
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
) -> dict[str, Any]:
    """An `audience-events` message (SPEC §5) as the evaluator renders it."""
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
    )
    traits = {"email": email} if email else {}
    return render_transition(transition, traits, anonymous=anonymous)


def wait_for(ready: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll `ready` until it holds (for something asynchronous to happen, not to time it);
    raises TimeoutError naming `what` if it never does."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.2)
