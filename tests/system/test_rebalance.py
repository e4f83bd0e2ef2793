"""A second worker joins mid-stream: partitions move, state follows via the changelog."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from backlog import DEFINITIONS, H, expected_outputs, history, produce_backlog, read_all
from faults import slow_worker_env

from audiences.adapters.kafka.topics import Topics
from audiences.adapters.settings import Settings
from audiences.adapters.stream.definitions import apply_definitions

pytestmark = [pytest.mark.kafka, pytest.mark.system]


def test_second_worker_takes_over_partitions_without_loss_or_strangers(
    system_settings: Settings, workers: Callable[..., Any], tmp_path: Path
) -> None:
    """The first worker evaluates 10 events per batch, each batch 40 ms slower
    (`slow_worker/`), until the second one is ready: at most 250 events/s whatever the
    host, so the 11.6k-event backlog lasts through the join (at full speed a fast host
    could finish it first, and nothing would move mid-stream). Then both run at full
    speed."""
    settings = system_settings
    topics = Topics.from_settings(settings)
    apply_definitions(settings, topics, DEFINITIONS)
    events = history(2500, int(time.time() * 1000) - 12 * H)
    produce_backlog(settings, topics, events)
    expected = expected_outputs(events, int(time.time() * 1000))

    paced = tmp_path / "paced"
    paced.touch()
    first = workers(
        env={"AUDIENCES_BATCH_SIZE": "10", **slow_worker_env(40, while_exists=paced)}
    ).start()
    first.wait_ready()
    read_all(settings, topics.audience_events, set(), timeout=0.05, min_count=1)
    second = workers(data_dir=str(tmp_path / "second-worker-data")).start()
    second.wait_ready(90)
    written = read_all(settings, topics.audience_events, set(), timeout=3)
    done = len({out["messageId"] for out in written} & set(expected))
    assert 0 < done < len(expected), f"the second worker should join mid-stream: {done} seen"
    paced.unlink()

    seen = read_all(settings, topics.audience_events, set(expected), timeout=90)
    by_id: dict[str, dict[str, Any]] = {}
    for out in seen:
        assert out == by_id.setdefault(out["messageId"], out)
    assert set(by_id) == set(expected)
    assert "assigned partitions" in second.log_tail(400)
