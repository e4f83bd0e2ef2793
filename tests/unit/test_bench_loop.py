"""`python -m audiences.tools.bench.loop`: the runtime's per-event path without Kafka
(for callgrind), over the bench's workload. It must drive the real path: the outputs it
counts are the transitions the core gives for the same events."""

from __future__ import annotations

from typing import Any

import pytest

from audiences.core.definitions import build_catalog
from audiences.core.evaluator import step
from audiences.core.events import parse_event
from audiences.core.state import UserState
from audiences.tools.bench import loop
from audiences.tools.bench.workload import make_definitions, make_events


def core_outputs(events: int) -> int:
    catalog = build_catalog({doc["key"]: (doc, 1) for doc in make_definitions(20)})
    states: dict[str, UserState] = {}
    outputs = 0
    for _key, value in make_events(events, 1_000_000):
        event = parse_event(value, loop.RECORD_MS)
        result = step(states.get(event.key), event, catalog, event.key)
        states[event.key] = result.state
        outputs += len(result.transitions)
    return outputs


def test_the_loop_emits_what_the_core_emits_for_the_same_events() -> None:
    result = loop.run(6000)
    assert result["events"] == 6000
    assert result["outputs"] == core_outputs(6000) > 0
    assert result["events_per_cpu_s"] > 0


def test_evaluated_zero_runs_the_set_up_only(capsys: pytest.CaptureFixture[Any]) -> None:
    loop.main(["2000", "0"])
    assert "0 events, 0 outputs" in capsys.readouterr().out
