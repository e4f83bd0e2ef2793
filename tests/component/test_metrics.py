"""Engine metrics observed by a running evaluator (SPEC §8 /metrics, DESIGN conventions)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

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


# -- per-partition series follow ownership -----------------------------------------------

# A second worker of the same group, in a process of its own (as in production: each
# worker has its own /metrics); settings come from the environment.
SECOND_WORKER = """
import signal
from audiences.adapters.kafka.clients import KafkaClients
from audiences.adapters.kafka.topics import Topics
from audiences.adapters.settings import Settings
from audiences.adapters.stream.runtime import Runtime

settings = Settings.from_env()
runtime = Runtime(settings, Topics.from_settings(settings), KafkaClients(settings))
signal.signal(signal.SIGTERM, lambda *_: runtime.stop())
runtime.run()
"""
SHARED_SETTINGS = (
    "kafka_bootstrap",
    "app_id",
    "events_topic",
    "audience_events_topic",
    "definitions_topic",
    "events_dlq_topic",
    "audience_events_dlq_topic",
    "partitions",
    "session_timeout_ms",
)


def series(name: str, label: str) -> set[str]:
    """The `label` values of the samples of metric `name` in this process's registry."""
    return {
        sample.labels[label]
        for family in REGISTRY.collect()
        if family.name == name
        for sample in family.samples
    }


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def owned(engine: Engine) -> set[str]:
    assert engine.evaluator is not None
    return {str(number) for number in list(engine.evaluator.partitions)}


def partition_series() -> tuple[set[str], set[str]]:
    return (
        series("audiences_consumer_lag", "partition"),
        series("audiences_state_users", "partition"),
    )


def test_partition_series_are_removed_when_the_partition_leaves_the_worker(
    engine: Engine, tmp_path: Path
) -> None:
    engine.apply({"key": "buyers", "condition": {"performed": {"event": "Order Completed"}}})
    engine.start()
    engine.send(*(track(f"u{i}", "Order Completed", T0) for i in range(8)))
    engine.outputs(8)
    wait_until(
        lambda: partition_series() == ({"0", "1"}, {"0", "1"}),
        30,
        f"per-partition series of both partitions: {partition_series()}",
    )
    wait_until(lambda: "buyers" in series("audiences_audience_size", "audience"), 10, "size")

    env = dict(os.environ)
    for name in SHARED_SETTINGS:
        env[f"AUDIENCES_{name.upper()}"] = str(getattr(engine.settings, name))
    env["AUDIENCES_DATA_DIR"] = str(tmp_path / "second")
    second = subprocess.Popen([sys.executable, "-c", SECOND_WORKER], env=env)
    try:
        # the group gives the newcomer one partition: revoked here
        wait_until(lambda: len(owned(engine)) == 1, 90, "no partition moved to the second worker")
        wait_until(
            lambda: partition_series() == (owned(engine), owned(engine)),
            10,
            f"series {partition_series()} for partitions {owned(engine)}",
        )
    finally:
        second.terminate()
        assert second.wait(60) == 0
    # the partition comes back: its series are published again
    wait_until(
        lambda: partition_series() == ({"0", "1"}, {"0", "1"}),
        60,
        f"series after the partition came back: {partition_series()}",
    )
    engine.stop()  # gives every partition up: nothing of this worker is left to report
    assert partition_series() == (set(), set())
    assert "buyers" not in series("audiences_audience_size", "audience")
