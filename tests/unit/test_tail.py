"""`audiences tail` lines for every kind of output."""

from __future__ import annotations

from audiences.tools.tail import describe
from shared import deleted_message, output_message


def test_tail_describes_transitions_and_deletions() -> None:
    entered = describe(output_message("u1"))
    assert entered.endswith("u1               + cart_abandoners")
    exited = describe(output_message("u1", entered=False, seq=2))
    assert exited.endswith("- cart_abandoners")
    deleted = describe(deleted_message("a1", anonymous=True, linked_to="u1"))
    assert deleted == "2026-01-01T00:00:00.000Z  a1               x deleted"
