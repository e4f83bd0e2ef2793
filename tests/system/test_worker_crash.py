"""kill -9 and restart: no transition lost, none re-emitted except with the same messageId."""

from __future__ import annotations

import itertools
import shutil
import time
from collections.abc import Callable
from typing import Any

import pytest
from backlog import DEFINITIONS, H, expected_outputs, history, produce_backlog, read_all
from faults import slow_worker_env

from audiences.adapters.kafka.topics import Topics
from audiences.adapters.settings import Settings
from audiences.adapters.stream.definitions import apply_definitions

pytestmark = [pytest.mark.kafka, pytest.mark.system]


def _brief(out: dict[str, Any]) -> tuple[str, str, str, str]:
    return (out["userId"], out["properties"]["audience_key"], out["event"], out["timestamp"])


@pytest.mark.parametrize("wipe", [False, True], ids=["same-data-dir", "wiped-data-dir"])
def test_kill_9_loses_nothing_and_duplicates_only_same_ids(
    system_settings: Settings, workers: Callable[..., Any], wipe: bool
) -> None:
    """The first worker is killed once its first output is on the topic. It evaluates
    20 events per batch, each batch 5 ms slower (`slow_worker/`): at most 4,000 events/s
    whatever the host, so the kill lands well within the 11.6k-event backlog (at full
    speed a fast host could finish it before the kill). The restarted one runs at full
    speed."""
    settings = system_settings
    topics = Topics.from_settings(settings)
    apply_definitions(settings, topics, DEFINITIONS)
    now = int(time.time() * 1000)
    events = history(2500, now - 12 * H)
    produce_backlog(settings, topics, events)
    expected = expected_outputs(events, int(time.time() * 1000))

    worker = workers(env={"AUDIENCES_BATCH_SIZE": "20", **slow_worker_env(5)}).start()
    worker.wait_ready()
    read_all(settings, topics.audience_events, set(), timeout=0.05, min_count=1)
    worker.kill()
    written = read_all(settings, topics.audience_events, set(), timeout=3)
    done = len({out["messageId"] for out in written} & set(expected))
    assert 0 < done < len(expected), f"the kill should land mid-stream: {done} outputs seen"
    if wipe:
        shutil.rmtree(settings.data_dir)
    restarted = workers().start()
    restarted.wait_ready(90)
    seen = read_all(settings, topics.audience_events, set(expected), timeout=90)
    by_id: dict[str, dict[str, Any]] = {}
    for out in seen:
        assert out == by_id.setdefault(out["messageId"], out), (
            "a messageId was reused for other content"
        )
    assert set(by_id) == set(expected), (
        f"missing {[_brief(expected[m]) for m in set(expected) - set(by_id)]}, "
        f"unexpected {[_brief(by_id[m]) for m in set(by_id) - set(expected)]}"
    )
    for message_id, out in expected.items():
        assert by_id[message_id] == out
    # per user and audience, transitions alternate in topic order (first occurrence of each id)
    order: dict[tuple[str, str], list[bool]] = {}
    firsts: dict[str, dict[str, Any]] = {}
    for out in seen:
        firsts.setdefault(out["messageId"], out)
    for out in firsts.values():
        order.setdefault((out["userId"], out["properties"]["audience_key"]), []).append(
            out["event"] == "Audience Entered"
        )
    for flags in order.values():
        assert flags[0] is True and all(a != b for a, b in itertools.pairwise(flags))
