"""Priority lists (SPEC §3) through the real Kafka protocol, with an injected wall clock:
a move between listed audiences reaches the outputs topic in order (the Exited of the
old before the Entered of the new, same timestamp, the core's messageIds); an edit of
the list moves only the profiles whose audience changes; deleting the list makes its
audiences non-exclusive again."""

from __future__ import annotations

import pytest
from harness import T0, Engine, H, M, S, by_user, track

from audiences.adapters.stream.definitions import delete_definition
from audiences.core.events import format_iso
from shared import pure_outputs

pytestmark = pytest.mark.kafka

RECENT = {
    "key": "recent_buyers",
    "condition": {"performed": {"event": "Order Completed", "within": "1h"}},
}
BROWSERS = {"key": "browsers", "condition": {"performed": {"event": "Product Viewed"}}}
PRIORITY = {
    "key": "winback_priority",
    "kind": "priority_list",
    "audiences": ["recent_buyers", "browsers"],
}


def test_a_priority_move_reaches_the_topic_in_order(engine: Engine) -> None:
    engine.apply(RECENT, BROWSERS, PRIORITY)
    engine.start()
    sent = [
        track("u1", "Product Viewed", T0),
        track("u1", "Order Completed", T0 + M),
        track("u2", "Product Viewed", T0),
    ]
    engine.send(*sent)
    engine.settle()
    engine.clock.advance_to(T0 + M + H + 5 * S)  # the order leaves the window: a move
    outputs = engine.outputs(5)
    assert by_user(outputs) == {
        "u1": [
            ("browsers", "Audience Entered", format_iso(T0)),
            ("browsers", "Audience Exited", format_iso(T0 + M)),
            ("recent_buyers", "Audience Entered", format_iso(T0 + M)),
            ("recent_buyers", "Audience Exited", format_iso(T0 + M + H)),
            ("browsers", "Audience Entered", format_iso(T0 + M + H)),
        ],
        "u2": [("browsers", "Audience Entered", format_iso(T0))],
    }
    # the same messageIds as the pure core, in the same order per user
    expected = pure_outputs([RECENT, BROWSERS, PRIORITY], sent, T0 + M + H + 5 * S)
    for user in ("u1", "u2"):
        assert [o["messageId"] for o in outputs if o["userId"] == user] == [
            m for m, o in expected.items() if o["userId"] == user
        ]


def test_editing_and_deleting_the_list_move_only_real_differences(engine: Engine) -> None:
    engine.apply(RECENT, BROWSERS, PRIORITY)
    engine.start()
    engine.send(
        track("both", "Product Viewed", T0),
        track("both", "Order Completed", T0 + S),
        track("buyer", "Order Completed", T0),
        track("browser", "Product Viewed", T0),
    )
    first = engine.outputs(5)
    assert [
        (o["userId"], o["properties"]["audience_key"], o["event"])
        for o in first
        if o["userId"] == "both"
    ] == [
        ("both", "browsers", "Audience Entered"),
        ("both", "browsers", "Audience Exited"),
        ("both", "recent_buyers", "Audience Entered"),
    ]
    engine.apply({**PRIORITY, "audiences": ["browsers", "recent_buyers"]})  # reordered
    moved = engine.outputs(7)[5:]  # exactly two more: `both` moves, nobody else hears
    assert [(o["userId"], o["properties"]["audience_key"], o["event"]) for o in moved] == [
        ("both", "recent_buyers", "Audience Exited"),
        ("both", "browsers", "Audience Entered"),
    ]
    assert moved[0]["timestamp"] == moved[1]["timestamp"]
    assert delete_definition(engine.settings, engine.topics, "winback_priority")
    freed = engine.outputs(8)[7:]  # `both` is in both audiences again: one entry
    assert [(o["userId"], o["properties"]["audience_key"], o["event"]) for o in freed] == [
        ("both", "recent_buyers", "Audience Entered")
    ]
