"""Durations of the definition language: `<int><unit>` with units s m h d w."""

from __future__ import annotations

import re

_UNIT_MS = {"s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
_DURATION = re.compile(r"^([0-9]+)([smhdw])$")


def parse_duration_ms(text: object) -> int | None:
    """Milliseconds of a duration string, or None when it is not one."""
    if not isinstance(text, str):
        return None
    match = _DURATION.match(text)
    if match is None:
        return None
    return int(match.group(1)) * _UNIT_MS[match.group(2)]
