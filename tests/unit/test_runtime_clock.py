"""Which clock a partition's deadlines fire on: the wall clock once it is caught up — no
records waiting, or only live traffic — else its stream time (a backlog replays exactly).
"""

from __future__ import annotations

from typing import Any

import pytest

from audiences.adapters.kafka.topics import Topics
from audiences.adapters.settings import Settings
from audiences.adapters.stream.runtime import (
    CATCH_UP_COMMIT_FACTOR,
    LIVE_LAG_RECORDS,
    LIVE_RECORD_AGE_MS,
    Runtime,
    commit_interval_s,
)

NOW = 1_796_000_000_000


class Partition:
    def __init__(self, position: int) -> None:
        self.number = 0
        self.position = position


class Watermarks:
    def __init__(self, high: int) -> None:
        self.high = high

    def get_watermark_offsets(self, tp: Any, cached: bool = False) -> tuple[int, int]:
        return 0, self.high


def runtime(high: int, drained: bool, newest_ms: int | None) -> Runtime:
    """The runtime's own `_caught_up`, over a consumer that only knows watermarks."""
    loop = Runtime.__new__(Runtime)
    loop.topics = Topics.from_settings(Settings())
    loop._consumer = Watermarks(high)  # type: ignore[assignment]
    loop._drained = drained
    loop._newest_record_ms = {} if newest_ms is None else {0: newest_ms}
    loop.clock = lambda: NOW
    return loop


@pytest.mark.parametrize(
    ("lag", "drained", "age_ms", "caught_up"),
    [
        (0, True, None, True),  # nothing waiting
        (0, False, 0, False),  # the last consume was full: more is queued
        (5, True, 200, True),  # live: a few records in flight, appended just now
        (LIVE_LAG_RECORDS, True, LIVE_RECORD_AGE_MS, True),
        (LIVE_LAG_RECORDS + 1, True, 0, False),  # too much waiting
        (5, True, LIVE_RECORD_AGE_MS + 1, False),  # a backlog's tail: appended a while ago
        (5, True, -(LIVE_RECORD_AGE_MS + 1), False),  # a clock far from the records' times
        (5, True, None, False),  # nothing evaluated yet
    ],
)
def test_a_partition_is_caught_up_when_nothing_or_only_live_traffic_waits(
    lag: int, drained: bool, age_ms: int | None, caught_up: bool
) -> None:
    loop = runtime(100 + lag, drained, None if age_ms is None else NOW - age_ms)
    assert loop._caught_up(Partition(100)) is caught_up  # type: ignore[arg-type]


def test_checkpoints_are_catch_up_factor_commit_intervals_apart_only_in_a_backlog() -> None:
    assert CATCH_UP_COMMIT_FACTOR == 5
    assert commit_interval_s(0.1, backlog=False) == 0.1
    assert commit_interval_s(0.1, backlog=True) == 0.1 * CATCH_UP_COMMIT_FACTOR
    assert commit_interval_s(0.0, backlog=True) == 0.0  # "every turn" stays every turn
