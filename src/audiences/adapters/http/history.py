"""Audience size history over HTTP (SPEC §8, `GET /v1/audiences/{key}/history`): the
query parameters, the series built from the partitions' minute buckets, and the terminal
sparkline `audiences history` prints.

Buckets (state/history.py) hold entered/exited per audience-minute; the size at the end
of a step is the current size minus what entered/exited after it.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from audiences.adapters.state.history import MINUTE_MS, Bucket
from audiences.core.events import format_iso, parse_iso_ms
from audiences.errors import ApiError

MAX_POINTS = 10_000  # steps one answer may hold
DEFAULT_SPAN_MS = 3_600_000  # without `from`: the hour before `to`
MAX_TIME_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z
MAX_STEP_MS = 3650 * 86_400_000
_UNITS = {"s": 1000, "m": MINUTE_MS, "min": MINUTE_MS, "h": 3_600_000, "d": 86_400_000}
_STEP = re.compile(r"^\s*(\d{1,12})\s*(s|m|min|h|d)\s*$")
_EPOCH_MS = re.compile(r"^\s*-?\d{1,16}\s*$")
SPARKS = "▁▂▃▄▅▆▇█"


@dataclass(frozen=True)
class HistoryQuery:
    """Steps of `step_ms` from `start_ms` (aligned on a multiple of the step since the
    epoch: hours on the hour, days at UTC midnight), `points` of them."""

    start_ms: int
    step_ms: int
    points: int

    def starts(self) -> range:
        return range(self.start_ms, self.start_ms + self.points * self.step_ms, self.step_ms)


def parse_step(text: str) -> int:
    """Milliseconds of a step such as `1m`, `5m`, `1h`, `1d` (at least one minute, whole
    minutes)."""
    match = _STEP.match(text)
    if match is None:
        raise ApiError(400, f"`step` must be a duration such as 1m, 5m, 1h or 1d, got {text!r}")
    step = int(match.group(1)) * _UNITS[match.group(2)]
    if step < MINUTE_MS:
        raise ApiError(
            400, f"`step` must be at least 1m (history is kept per minute), got {text!r}"
        )
    if step % MINUTE_MS:
        raise ApiError(400, f"`step` must be a whole number of minutes, got {text!r}")
    if step > MAX_STEP_MS:
        raise ApiError(400, f"`step` must be at most 3650d, got {text!r}")
    return step


def parse_time(text: str, name: str) -> int:
    """Epoch ms of an ISO-8601 time (UTC unless it says otherwise) or of epoch ms."""
    ms = int(text) if _EPOCH_MS.match(text) else parse_iso_ms(text.strip())
    if ms is None:
        raise ApiError(
            400, f"`{name}` must be an ISO-8601 time or epoch milliseconds, got {text!r}"
        )
    if not 0 <= ms <= MAX_TIME_MS:
        raise ApiError(400, f"`{name}` must be between 1970 and 9999, got {text!r}")
    return ms


def parse_query(params: Mapping[str, str], now_ms: int) -> HistoryQuery:
    """`from`, `to` (default: the last hour) and `step` (default 1m) of a request; 400 for
    anything unreadable, `from` after `to`, or more than MAX_POINTS steps."""
    step = parse_step(params["step"]) if "step" in params else MINUTE_MS
    to = parse_time(params["to"], "to") if "to" in params else now_ms
    start = parse_time(params["from"], "from") if "from" in params else to - DEFAULT_SPAN_MS
    start = max(0, start)
    if start > to:
        raise ApiError(400, f"`from` ({format_iso(start)}) is after `to` ({format_iso(to)})")
    aligned = start // step * step
    points = max(1, -(-(to - aligned) // step))
    if points > MAX_POINTS:
        raise ApiError(
            400,
            f"{points} steps of {params.get('step', '1m')} between `from` and `to`: at most "
            f"{MAX_POINTS}; use a longer step or a shorter span",
        )
    return HistoryQuery(aligned, step, points)


def series(
    size_now: int, buckets: Mapping[int, Bucket], query: HistoryQuery
) -> list[dict[str, Any]]:
    """The answer: per step, its start, the size at its end and what entered and exited
    in it. `buckets` (minute -> (entered, exited)) must hold every minute from the
    query's start on (later ones included: the size is derived back from `size_now`)."""
    minutes = sorted(m for m in buckets if m >= query.start_ms)
    # net[i]: entered - exited of minutes[i:]
    net = [0] * (len(minutes) + 1)
    entered_sum = [0] * (len(minutes) + 1)  # prefix sums: of minutes[:i]
    exited_sum = [0] * (len(minutes) + 1)
    for i, minute in enumerate(minutes):
        entered, exited = buckets[minute]
        entered_sum[i + 1] = entered_sum[i] + entered
        exited_sum[i + 1] = exited_sum[i] + exited
    for i in range(len(minutes) - 1, -1, -1):
        entered, exited = buckets[minutes[i]]
        net[i] = net[i + 1] + entered - exited
    out: list[dict[str, Any]] = []
    for t in query.starts():
        low = bisect_left(minutes, t)
        high = bisect_left(minutes, t + query.step_ms)
        out.append(
            {
                "t": format_iso(t),
                "size": size_now - net[high],
                "entered": entered_sum[high] - entered_sum[low],
                "exited": exited_sum[high] - exited_sum[low],
            }
        )
    return out


# -- the terminal view (`audiences history`) -------------------------------------------------


def sparkline(values: list[int]) -> str:
    """One block character per value, scaled between the smallest and the largest."""
    if not values:
        return ""
    low, high = min(values), max(values)
    if high == low:
        return SPARKS[0 if high == 0 else len(SPARKS) // 2] * len(values)
    scale = (len(SPARKS) - 1) / (high - low)
    return "".join(SPARKS[round((v - low) * scale)] for v in values)


def render(key: str, points: list[dict[str, Any]]) -> str:
    """The lines `audiences history KEY` prints."""
    if not points:
        return f"{key}: no history in this range"
    sizes = [int(p["size"]) for p in points]
    entered = sum(int(p["entered"]) for p in points)
    exited = sum(int(p["exited"]) for p in points)
    return "\n".join(
        [
            f"{key}  {points[0]['t']} .. {points[-1]['t']}  ({len(points)} steps)",
            sparkline(sizes),
            f"size: min {min(sizes)}  max {max(sizes)}  current {sizes[-1]}",
            f"entered {entered}  exited {exited}",
        ]
    )
