"""Audience size history (SPEC §8) on the test broker: `GET /v1/audiences/{key}/history`
after known transitions, its parameter errors, the CLI sparkline, the per-audience
metrics, every worker answering for every partition, and the same history after a
restart on a wiped disk (restored from the changelog)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from apiserver import ApiServer, Worker, call, free_port, wait_for
from harness import T0, Engine, M, S, track
from prometheus_client import REGISTRY

pytestmark = pytest.mark.kafka
KEY = "recent_buyers"
RECENT = {
    "key": KEY,
    "name": "Recent buyers",
    "condition": {"performed": {"event": "Order Completed", "within": "5m"}},
}
LTV = {"key": "ltv", "kind": "count", "event": "Order Completed"}
# Entered: ann, bob in minute 0, cy in minute 2; each exits 5 minutes after its order
# (ann, bob in minute 5, cy in minute 7).
ORDERS = [("ann", T0 + 10 * S), ("bob", T0 + 20 * S), ("cy", T0 + 2 * M + 5 * S)]
BY_MINUTE = [  # (size at the end, entered, exited) of minutes 0..9
    (2, 2, 0),
    (2, 0, 0),
    (3, 1, 0),
    (3, 0, 0),
    (3, 0, 0),
    (1, 0, 2),
    (1, 0, 0),
    (0, 0, 1),
    (0, 0, 0),
    (0, 0, 0),
]


def play(engine: Engine) -> None:
    """The three orders, then the clock past every exit; waits for the six transitions."""
    for user, at in ORDERS:
        engine.send(track(user, "Order Completed", at))
    entered = [o for o in engine.outputs(6, timeout=60) if o["event"] == "Audience Entered"]
    assert sorted(o["userId"] for o in entered) == ["ann", "bob", "cy"]
    engine.clock.advance_to(T0 + 10 * M)
    exited = [o for o in engine.outputs(3, timeout=60) if o["event"] == "Audience Exited"]
    assert sorted(o["userId"] for o in exited) == ["ann", "bob", "cy"]


def history(url: str, **params: Any) -> Any:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return call("GET", f"{url}/v1/audiences/{KEY}/history?{query}")


def by_minute(url: str) -> list[tuple[int, int, int]]:
    answer = history(url, **{"from": T0, "to": T0 + 10 * M, "step": "1m"})
    assert answer.status == 200, answer.body
    return [(p["size"], p["entered"], p["exited"]) for p in answer.json()]


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
def worker(engine: Engine, tmp_path: Path) -> Iterator[Worker]:
    engine.apply(RECENT, LTV)
    started = Worker(engine.settings, tmp_path / "worker", engine.clock).start().wait_ready()
    yield started
    started.stop()


def test_history_after_known_transitions(worker: Worker, engine: Engine) -> None:
    before = {
        d: sample("audiences_transitions_total", audience=KEY, direction=d)
        for d in ("entered", "exited")
    }
    play(engine)
    wait_for(lambda: by_minute(worker.url) == BY_MINUTE, 30, "the exits in the history")

    points = history(worker.url, **{"from": T0, "to": T0 + 10 * M, "step": "1m"}).json()
    assert [p["t"] for p in points[:2]] == ["2026-01-01T00:00:00.000Z", "2026-01-01T00:01:00.000Z"]
    # ISO-8601 parameters, steps of 5 minutes and of an hour
    five = history(
        worker.url, **{"from": "2026-01-01T00:00:00Z", "to": "2026-01-01T00:10:00Z", "step": "5m"}
    ).json()
    assert five == [
        {"t": "2026-01-01T00:00:00.000Z", "size": 3, "entered": 3, "exited": 0},
        {"t": "2026-01-01T00:05:00.000Z", "size": 0, "entered": 0, "exited": 3},
    ]
    hourly = history(worker.url, **{"from": T0 - 90 * M, "to": T0 + 10 * M, "step": "1h"}).json()
    assert hourly == [
        {"t": "2025-12-31T22:00:00.000Z", "size": 0, "entered": 0, "exited": 0},
        {"t": "2025-12-31T23:00:00.000Z", "size": 0, "entered": 0, "exited": 0},
        {"t": "2026-01-01T00:00:00.000Z", "size": 0, "entered": 3, "exited": 3},
    ]
    # without parameters: the last hour (on the worker's clock, now T0 + 10m) by minute
    default = history(worker.url).json()
    assert len(default) == 60 and default[-1]["t"] == "2026-01-01T00:09:00.000Z"
    assert sum(p["entered"] for p in default) == sum(p["exited"] for p in default) == 3
    # the size of the last step is the audience's size
    assert call("GET", f"{worker.url}/v1/audiences/{KEY}").json()["size"] == default[-1]["size"]

    # the metrics: transitions per audience and direction, the size gauge
    for direction, expected in (("entered", 3), ("exited", 3)):
        seen = sample("audiences_transitions_total", audience=KEY, direction=direction)
        assert seen - before[direction] == expected
    assert sample("audiences_audience_size", audience=KEY) == 0

    # parameter errors, unknown audiences
    for params, message in [
        ({"from": T0 + M, "to": T0}, "after `to`"),
        ({"step": "30s"}, "at least 1m"),
        ({"step": "often"}, "`step`"),
        ({"from": "yesterday"}, "`from`"),
        ({"from": 0, "to": T0}, "at most 10000"),
    ]:
        answer = history(worker.url, **params)
        assert answer.status == 400, (params, answer.body)
        assert message in answer.json()["error"]
    for key in ("nope", "ltv"):  # no such audience; a computed trait
        missing = call("GET", f"{worker.url}/v1/audiences/{key}/history")
        assert missing.status == 404 and "no " in missing.json()["error"]

    # the CLI draws it
    shown = run_cli(
        "history",
        KEY,
        "--url",
        worker.url,
        "--from",
        "2026-01-01T00:00:00Z",
        "--to",
        str(T0 + 10 * M),
    )
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines() == [
        f"{KEY}  2026-01-01T00:00:00.000Z .. 2026-01-01T00:09:00.000Z  (10 steps)",
        "▆▆███▃▃▁▁▁",
        "size: min 0  max 3  current 0",
        "entered 3  exited 3",
    ]
    bad = run_cli("history", KEY, "--url", worker.url, "--step", "10s")
    assert bad.returncode != 0 and "at least 1m" in bad.stderr


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AUDIENCES_")}
    return subprocess.run(
        [sys.executable, "-m", "audiences", *args],
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_history_spans_workers(
    kafka_bootstrap: str, unique_name: Callable[..., str], tmp_path: Path
) -> None:
    engine = Engine(kafka_bootstrap, unique_name("hist"), tmp_path / "engine", partitions=4)
    engine.apply(RECENT, LTV)
    first = Worker(engine.settings, tmp_path / "w1", engine.clock).start()
    second = Worker(engine.settings, tmp_path / "w2", engine.clock).start()
    workers = (first, second)
    try:

        def split_and_known() -> bool:
            owned = [w.owned() for w in workers]
            if not all(owned) or owned[0] | owned[1] != {0, 1, 2, 3} or owned[0] & owned[1]:
                return False
            truth = {p: w.url for w in workers for p in w.owned()}
            return all(w.registry.owners() == truth for w in workers)

        wait_for(split_and_known, 90, "both workers to own partitions and know each other")
        play(engine)
        for asked in workers:  # either worker answers for every partition
            url = asked.url
            wait_for(lambda url=url: by_minute(url) == BY_MINUTE, 30, "the whole history")
    finally:
        for running in workers:
            running.evaluator.stop()
        for running in workers:
            running.stop()
        engine.close()


def test_history_survives_a_restart_with_a_wiped_disk(engine: Engine) -> None:
    """The buckets come back from the changelog into an empty store (as on a new owner
    after a rebalance): the same history, and nothing re-evaluated."""
    engine.apply(RECENT, LTV)
    engine.start()
    play(engine)
    server = api_over(engine)
    try:
        wait_for(lambda: by_minute(server.url) == BY_MINUTE, 30, "the exits in the history")
    finally:
        server.stop()
    engine.stop()
    shutil.rmtree(engine.settings.data_dir)
    engine.start()
    server = api_over(engine)
    try:
        assert by_minute(server.url) == BY_MINUTE
        # restored, not re-evaluated: no transition was emitted again
        assert len(engine.outputs(9)) == 9
    finally:
        server.stop()


def api_over(engine: Engine) -> ApiServer:
    assert engine.evaluator is not None
    settings = engine.settings.replace(web_port=free_port())
    return ApiServer(settings, engine.evaluator.queries, clock=engine.clock).start()
