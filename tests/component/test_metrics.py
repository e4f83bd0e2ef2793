"""Engine metrics observed by a running evaluator (SPEC §8 /metrics, DESIGN conventions)."""

from __future__ import annotations

import pytest
from harness import T0, Engine, track
from prometheus_client import REGISTRY

pytestmark = pytest.mark.kafka


def latency_count() -> float:
    return REGISTRY.get_sample_value("audiences_processing_latency_seconds_count") or 0.0


def test_processing_latency_is_observed_per_batch(engine: Engine) -> None:
    engine.apply({"key": "buyers", "condition": {"performed": {"event": "Order Completed"}}})
    engine.start()
    before = latency_count()
    engine.send(track("u1", "Order Completed", T0))
    engine.outputs(1)
    assert latency_count() > before
    # event -> durable output, measured from the record's Kafka timestamp (wall clock):
    # seconds at most here, never the years between the fake clock and now
    total = REGISTRY.get_sample_value("audiences_processing_latency_seconds_sum") or 0.0
    assert 0 <= total < 60 * latency_count()
