"""Calendar-day windows through the real Kafka protocol, with an injected wall clock:
the window closes at a local midnight (after the 25-hour day that ends summer time
in Berlin) and the Audience Exited / Trait Computed carry that midnight, in UTC;
a replay into a fresh app gives the same messageIds."""

from __future__ import annotations

from typing import Any

import pytest
from harness import Engine, M, S, track

from audiences.core.events import format_iso, parse_iso_ms

pytestmark = pytest.mark.kafka

BERLIN_TODAY = {"calendar_days": 1, "timezone": "Europe/Berlin"}
CHECKED_OUT_TODAY = {
    "key": "checked_out_today",
    "condition": {"performed": {"event": "Checkout Started", "within": BERLIN_TODAY}},
}
CHECKOUTS_TODAY = {
    "key": "checkouts_today",
    "kind": "count",
    "event": "Checkout Started",
    "within": BERLIN_TODAY,
}


def utc(text: str) -> int:
    ms = parse_iso_ms(text)
    assert ms is not None
    return ms


EVENING = utc("2026-10-25T21:30:00Z")  # 22:30 CET on 25 Oct, a 25-hour day in Berlin
MIDNIGHT = utc("2026-10-25T23:00:00Z")  # 00:00 CET on 26 Oct


def rows(outputs: list[dict[str, Any]]) -> list[tuple[str, str, Any]]:
    return [
        (
            o["event"],
            o["timestamp"],
            o["properties"].get("checked_out_today", o["properties"].get("checkouts_today")),
        )
        for o in outputs
    ]


def test_a_calendar_window_closes_at_local_midnight_and_replays_alike(engine: Engine) -> None:
    engine.apply(CHECKED_OUT_TODAY, CHECKOUTS_TODAY)
    engine.clock.advance_to(EVENING + S)
    engine.start()
    engine.send(track("cal", "Checkout Started", EVENING))
    entered = engine.outputs(2)
    assert sorted(rows(entered)) == [
        ("Audience Entered", format_iso(EVENING), True),
        ("Trait Computed", format_iso(EVENING), 1),
    ]
    engine.settle()
    engine.clock.advance_to(MIDNIGHT - S)  # still 25 Oct in Berlin: nothing happens
    engine.settle()
    engine.clock.advance_to(MIDNIGHT + 5 * M)  # nobody sends anything: the window moves
    first = engine.outputs(4)
    assert sorted(rows(first[2:])) == [
        ("Audience Exited", "2026-10-25T23:00:00.000Z", False),
        ("Trait Computed", "2026-10-25T23:00:00.000Z", 0),
    ]
    assert format_iso(MIDNIGHT) == "2026-10-25T23:00:00.000Z"

    engine.stop()
    engine.start(app_id=engine.settings.app_id + "-replay")  # new group, changelog, state
    replayed = engine.outputs(8)[4:]
    assert sorted((o["messageId"], o["event"], o["timestamp"]) for o in replayed) == sorted(
        (o["messageId"], o["event"], o["timestamp"]) for o in first
    )
