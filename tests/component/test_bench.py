"""`audiences bench` end to end on a real broker: both contenders run, the JSON line adds up.

Speed is never asserted here (SPEC §11: targets are measured by the bench itself).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from audiences.tools.bench.runner import make_definitions, make_events


@pytest.mark.kafka
def test_bench_runs_both_contenders_and_reports_the_ratio(kafka_bootstrap: str) -> None:
    env = {**os.environ, "AUDIENCES_KAFKA_BOOTSTRAP": kafka_bootstrap}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "audiences",
            "bench",
            "--events",
            "3000",
            "--users",
            "300",
            "--json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    data = json.loads(lines[-1])
    assert sum(line.startswith("{") for line in lines) == 1
    assert "Faust agent + Table" in done.stdout
    engine, faust = data["engine_events_per_s"], data["faust_table_events_per_s"]
    assert engine > 0 and faust > 0
    assert data["ratio"] == pytest.approx(round(engine / faust, 2), abs=0.011)
    assert (data["events"], data["users"], data["audiences"], data["partitions"]) == (
        3000,
        300,
        20,
        4,
    )
    assert data["broker"] == "external"
    # the same work on both sides: the same transitions from the same events and definitions
    assert data["engine_transitions"] == data["faust_table_transitions"] > 0


def test_workload_is_deterministic_and_valid() -> None:
    definitions = make_definitions(20)
    assert len({d["key"] for d in definitions}) == 20
    conditions = json.dumps([d["condition"] for d in definitions])
    for feature in ("performed", "times", "within", "then_not", "match_on", "trait"):
        assert f'"{feature}"' in conditions
    for feature in ("in_audience", "not", "all", "any", "sequence", "where"):
        assert f'"{feature}"' in conditions
    first, second = make_events(500, 50), make_events(500, 50)
    assert first == second and len(first) == 500
    stamps = [json.loads(value)["timestamp"] for _, value in first]
    assert stamps == sorted(stamps)
    assert len({key for key, _ in first}) <= 50
    sizes = [len(value) for _, value in first]
    assert 120 <= sum(sizes) / len(sizes) <= 300


@pytest.mark.kafka
def test_bench_latency_reports_both_latencies(kafka_bootstrap: str) -> None:
    env = {**os.environ, "AUDIENCES_KAFKA_BOOTSTRAP": kafka_bootstrap}
    done = subprocess.run(
        [
            *(sys.executable, "-m", "audiences", "bench", "--events", "1000", "--users", "100"),
            *("--skip-faust", "--latency", "--latency-rate", "200", "--latency-seconds", "2"),
            "--json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    latency = json.loads(done.stdout.strip().splitlines()[-1])["latency"]
    assert (latency["rate_events_per_s"], latency["events"]) == (200.0, 400)
    entered, exited = latency["event_to_entered"], latency["deadline_to_exited"]
    assert entered["count"] == 400  # every event entered a new user; each one measured
    assert exited["count"] == 40  # every tenth event was a probe that expired 2 s later
    assert 0 < entered["p50_ms"] <= entered["p99_ms"] <= entered["max_ms"]
    assert exited["p50_ms"] <= exited["p99_ms"] <= exited["max_ms"]
    assert "event -> Audience Entered" in done.stdout
