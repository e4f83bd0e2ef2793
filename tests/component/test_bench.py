"""`audiences bench` end to end on a real broker: every contender runs, the JSON line adds up.

Speed is never asserted here (SPEC §12: targets are measured by the bench itself).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from audiences.tools.bench.counting import Counter
from audiences.tools.bench.quix_env import quix_python
from audiences.tools.bench.workload import (
    BASE_MS,
    counting_rules,
    generate,
    make_definitions,
    make_events,
    one_per_user,
)

HEADLINE = (
    "engine_events_per_s",
    "engine_events_per_cpu_s",
    "quix_events_per_s",
    "faust_table_events_per_s",
    "plain_loop_events_per_s",
    "ratio_vs_quix",
    "ratio",
    "p99_enter_ms",
    "p99_exit_lateness_ms",
)


def bench(kafka_bootstrap: str, *args: str) -> tuple[dict[str, Any], str]:
    env = {**os.environ, "AUDIENCES_KAFKA_BOOTSTRAP": kafka_bootstrap}
    done = subprocess.run(
        [sys.executable, "-m", "audiences", "bench", *args, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    assert sum(line.startswith("{") for line in lines) == 1
    return json.loads(lines[-1]), done.stdout


@pytest.fixture(scope="module")
def quix_available() -> str | None:
    """Why Quix Streams cannot run here, or None (creates the bench's Quix venv if needed)."""
    found = quix_python()
    return found if isinstance(found, str) else None


@pytest.mark.kafka
@pytest.mark.timeout(480)  # four contenders, a recovery and a latency phase, on a shared machine
def test_bench_runs_every_contender_and_reports_each_figure(
    kafka_bootstrap: str, kafka_flavor: str, quix_available: str | None
) -> None:
    data, out = bench(
        kafka_bootstrap,
        *("--events", "3000", "--users", "600", "--faust-events", "3000"),
        *("--latency-rate", "200", "--latency-seconds", "2", "--latency-warmup", "1"),
        *("--memory-profiles", "2500"),
    )
    for key in HEADLINE:
        assert key in data, key
    assert (data["events"], data["users"], data["audiences"], data["partitions"]) == (
        3000,
        600,
        20,
        4,
    )
    assert data["broker"] == "external"
    assert data["workload"]["name"] == "realistic"
    assert 0 < data["workload"]["active_users"] <= 600
    assert data["versions"]["audiences"] and data["versions"]["librdkafka"]

    contenders = ["engine", "faust_table", "plain_loop"]
    if quix_available is None:
        contenders.append("quix")
    else:
        assert data["quix_events_per_s"] is None
        assert data["unavailable"]["quix"].startswith("unavailable")
    for name in contenders:
        row = data["contenders"][name]
        assert row["events"] == 3000, name
        assert data[f"{name}_events_per_s"] > 0, name
        # CPU time of the worker process alone: never more than 2 cores' worth of its wall time
        assert 0 < row["cpu_s"] <= row["elapsed_s"] * (os.cpu_count() or 1) + 0.5, name
        assert data[f"{name}_events_per_cpu_s"] > 0, name
        assert data[f"{name}_transitions"] == row["transitions"] > 0, name
    engine, faust = data["engine_events_per_s"], data["faust_table_events_per_s"]
    assert data["ratio"] == pytest.approx(round(engine / faust, 2), abs=0.011)
    # the same work, the same transitions: the engine and Faust run the same `step`...
    assert data["engine_transitions"] == data["faust_table_transitions"]
    # ... Quix and the plain loop the same counting rules
    if quix_available is None:
        assert data["quix_transitions"] == data["plain_loop_transitions"]
        assert data["ratio_vs_quix"] == pytest.approx(
            round(engine / data["quix_events_per_s"], 2), abs=0.011
        )
    assert 0 < data["transitions_per_event"] < 2
    assert data["rss_mb_per_1m_profiles"] >= 0 and data["engine_peak_rss_mb"] > 0
    assert "rss_marginal_mb_per_1m_profiles" in data and "steal_pct" in data["machine"]
    assert data["engine_checkpoints"] > 0 and data["engine_checkpoint_mean_ms"] > 0
    # the memory phase's worker held every one of its users' profiles, measured, not scaled
    held = data["memory"]
    assert (held["profiles"], held["events"]) == (2500, 2500)
    assert held["peak_rss_mb"] >= held["rss_start_mb"] > 0
    assert data["rss_mb_at_1m_profiles"] == pytest.approx(
        (held["peak_rss_mb"] - held["rss_start_mb"]) * 400,
        abs=0.1 * 400,  # (rounded MB)
    )
    assert "profiles held" in out

    recovery = data["recovery"]
    assert recovery["keys"] >= data["workload"]["active_users"]  # every profile came back
    assert data["recovery_keys_per_s"] > 0

    latency = data["latency"]
    assert (latency["rate_events_per_s"], latency["events"], latency["probes"]) == (200.0, 400, 40)
    entered, exited = latency["event_to_entered"], latency["deadline_to_exited"]
    assert entered["count"] >= 40  # every probe entered at once (workload events add more)
    assert exited["count"] == 40  # every probe expired 2 s later
    assert 0 <= data["p50_enter_ms"] <= data["p99_enter_ms"] <= entered["max_ms"]
    assert data["p50_exit_lateness_ms"] <= data["p99_exit_lateness_ms"] <= exited["max_ms"]
    # the first second's traffic is the warm-up, reported apart
    warmup = latency["warmup"]
    assert (warmup["seconds"], warmup["events"]) == (1.0, 200)
    assert warmup["event_to_entered"]["count"] >= 20 and warmup["deadline_to_exited"]["count"] == 20
    # end to end (sent -> read back) covers the same transitions and adds the clients' legs
    assert latency["sent_to_entered_read"]["count"] == entered["count"]
    assert latency["deadline_to_exited_read"]["count"] == exited["count"]
    if kafka_flavor == "apache":  # the broker stamps append times: "on the topic", per SPEC
        assert latency["clock"] == "on the topic (append times)"
    else:
        assert latency["clock"] in ("on the topic (append times)", "sent -> read back")
    for label in ("this engine", "Quix Streams", "Faust agent + Table", "plain loop"):
        assert label in out
    assert "event -> Audience Entered" in out


@pytest.mark.kafka
def test_bench_skips_contenders_and_runs_the_heavy_workload(kafka_bootstrap: str) -> None:
    data, out = bench(
        kafka_bootstrap,
        *("--events", "2000", "--users", "200", "--workload", "heavy"),
        *("--skip-quix", "--skip-faust", "--skip-latency", "--skip-recovery", "--skip-memory"),
    )
    assert data["workload"]["name"] == "heavy"
    assert data["engine_events_per_s"] > 0 and data["plain_loop_events_per_s"] > 0
    assert data["plain_loop_transitions"] > 0
    for key in ("quix_events_per_s", "faust_table_events_per_s", "ratio", "ratio_vs_quix"):
        assert data[key] is None, key
    assert data["unavailable"] == {"quix": "skipped", "faust_table": "skipped"}
    assert data["latency"] is None and data["p99_enter_ms"] is None
    assert data["recovery"] is None
    assert data["memory"] is None and data["rss_mb_at_1m_profiles"] is None
    assert "skipped" in out


def test_workload_is_deterministic_and_valid() -> None:
    definitions = make_definitions(20)
    assert len({d["key"] for d in definitions}) == 20
    conditions = json.dumps([d["condition"] for d in definitions])
    for feature in ("performed", "times", "within", "then_not", "match_on", "trait"):
        assert f'"{feature}"' in conditions
    for feature in ("in_audience", "not", "all", "any", "sequence", "where"):
        assert f'"{feature}"' in conditions
    for workload in ("realistic", "heavy"):
        first, second = (
            make_events(500, 50, workload=workload),
            make_events(500, 50, workload=workload),
        )
        assert first == second and len(first) == 500
        stamps = [json.loads(value)["timestamp"] for _, value in first]
        assert stamps == sorted(stamps)
        assert len({key for key, _ in first}) <= 50
        sizes = [len(value) for _, value in first]
        assert 120 <= sum(sizes) / len(sizes) <= 300


def test_the_memory_workload_gives_every_event_its_own_user() -> None:
    rows = one_per_user(3000).rows
    assert sorted(row[1] for row in rows) == list(range(3000))
    assert [row[0] for row in rows] == sorted(row[0] for row in rows)
    kinds = {row[2] for row in rows}
    assert len(kinds) >= 4  # the workload's mix of identify, page and track events


def test_activity_is_zipf_distributed() -> None:
    rows = generate(20_000, 10_000).rows
    per_user: dict[int, int] = {}
    for row in rows:
        per_user[row[1]] = per_user.get(row[1], 0) + 1
    counts = sorted(per_user.values(), reverse=True)
    top = sum(counts[: len(counts) // 100])
    assert top > 0.1 * len(rows)  # the most active 1% of users send well over 1% of events
    assert per_user.get(0, 0) > per_user.get(9_999, 0)  # rank 1 is the busiest


def test_counting_rules_enter_and_exit_like_the_windows_say() -> None:
    rules = counting_rules(make_definitions(20))
    shoppers = next(r for r in rules if r["id"] == "window_shoppers_0")
    assert (shoppers["event"], shoppers["times"], shoppers["window_ms"]) == (
        "Product Viewed",
        3,
        3_600_000,
    )
    spenders = next(r for r in rules if r["id"] == "big_spenders_0")
    assert spenders["where"] == [["revenue", "gte", 50]]
    counter = Counter([shoppers, spenders])
    state = None
    changes = []
    for minute in (0, 10, 20):
        new, found = counter.apply(state, "Product Viewed", {}, BASE_MS + minute * 60_000)
        state = new or state
        changes += found
    assert changes == [("window_shoppers_0", True)]  # the third view within the hour
    new, found = counter.apply(state, "Order Completed", {"revenue": 10}, BASE_MS + 3_600_000)
    assert found == [("window_shoppers_0", False)]  # the first view left the window
    state = new or state
    _, found = counter.apply(state, "Order Completed", {"revenue": 60}, BASE_MS + 3_700_000)
    assert found == [("big_spenders_0", True)]  # where: revenue >= 50 only
