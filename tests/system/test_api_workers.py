"""The management API and operations endpoints of real `audiences worker` processes:
readiness during recovery, reads routed between two workers, a parsed /metrics scrape,
JSON logs."""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Producer
from prometheus_client.parser import text_string_to_metric_families

from audiences.adapters.kafka.topics import Topics
from audiences.adapters.settings import Settings
from audiences.adapters.stream.definitions import apply_definitions
from audiences.core.events import format_iso
from shared import wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.system]
TEXT_LOG = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ ")  # the text format
SERVED_BY = "X-Audiences-Worker"
ENGINE_METRICS = {
    "audiences_events_in",
    "audiences_events_invalid",
    "audiences_transitions",
    "audiences_audience_size",
    "audiences_deadline_lateness_seconds",
    "audiences_batch_duration_seconds",
    "audiences_processing_latency_seconds",
    "audiences_consumer_lag",
    "audiences_state_users",
    "audiences_build_info",
}


def get(url: str) -> tuple[int, bytes, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def readiness_until_ready(port: int, timeout: float = 60) -> list[int]:
    """Statuses of /readyz from the moment the server answers until it says 200."""
    statuses: list[int] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status, _, _ = get(f"http://127.0.0.1:{port}/readyz")
        except OSError:  # not listening yet
            time.sleep(0.02)
            continue
        statuses.append(status)
        if status == 200:
            return statuses
        time.sleep(0.02)
    raise AssertionError(f"not ready after {timeout}s: {statuses[-5:]}")


def test_two_worker_processes_route_reads_and_expose_metrics(
    system_settings: Settings,
    workers: Callable[..., Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AUDIENCES_LOG_FORMAT", "json")  # the workers inherit it
    settings = system_settings
    topics = Topics.from_settings(settings)
    apply_definitions(
        settings,
        topics,
        [{"key": "buyers", "condition": {"performed": {"event": "Order Completed"}}}],
    )
    producer = Producer(settings.producer_config())
    users = [f"shopper-{i}" for i in range(12)]
    now = int(time.time() * 1000)
    for i, user in enumerate(users):
        event = {
            "type": "track",
            "userId": user,
            "event": "Order Completed",
            "timestamp": format_iso(now + i),
            "messageId": f"m-{user}",
        }
        producer.produce(topics.events, key=user.encode(), value=orjson.dumps(event))
    producer.flush(10)

    first = workers().start()
    statuses = readiness_until_ready(first.port)
    assert statuses[0] == 503 and statuses[-1] == 200  # not ready until recovered
    second = workers(data_dir=str(tmp_path / "second")).start()
    second.wait_ready(90)
    urls = {f"http://127.0.0.1:{w.port}" for w in (first, second)}

    # every user answers from either worker, served by its partition's owner; once the
    # second worker took its share, both owners appear
    def all_answer() -> set[str]:
        served = set()
        for user in users:
            for worker in (first, second):
                status, body, headers = get(f"http://127.0.0.1:{worker.port}/v1/users/{user}")
                if status != 200 or [a["key"] for a in orjson.loads(body)["audiences"]] != [
                    "buyers"
                ]:
                    return set()
                served.add(headers[SERVED_BY])
        return served

    wait_for(lambda: all_answer() == urls, 90, "reads were not routed to both workers")

    status, body, _ = get(f"http://127.0.0.1:{second.port}/v1/users/{users[0]}/explain/buyers")
    assert status == 200 and orjson.loads(body)["member"] is True

    seen: list[str] = []
    cursor = ""
    while True:
        status, body, _ = get(
            f"http://127.0.0.1:{first.port}/v1/audiences/buyers/members?limit=5{cursor}"
        )
        assert status == 200, body
        page = orjson.loads(body)
        seen += [m["id"] for m in page["members"]]
        if page["next_cursor"] is None:
            break
        cursor = f"&cursor={page['next_cursor']}"
    assert sorted(seen) == sorted(users)

    for worker in (first, second):
        status, body, _ = get(f"http://127.0.0.1:{worker.port}/metrics")
        assert status == 200
        families = {f.name: f for f in text_string_to_metric_families(body.decode())}
        assert set(families) >= ENGINE_METRICS, ENGINE_METRICS - set(families)
    # the worker that evaluated the first batch has samples, not just declarations
    samples = [
        s
        for worker in (first, second)
        for f in text_string_to_metric_families(
            get(f"http://127.0.0.1:{worker.port}/metrics")[1].decode()
        )
        for s in f.samples
    ]
    events_in = sum(s.value for s in samples if s.name == "audiences_events_in_total")
    assert events_in >= len(users)
    assert any(s.name == "audiences_processing_latency_seconds_count" and s.value for s in samples)

    # AUDIENCES_LOG_FORMAT=json: the workers' Python logs are JSON lines, none is text
    lines = first.log_tail(2000).splitlines()
    records = [orjson.loads(line) for line in lines if line.startswith("{")]
    assert any(
        r["logger"] == "audiences.adapters.stream.runtime"
        and "assigned partitions" in r["message"]
        and r["level"] == "INFO"
        for r in records
    )
    assert not [line for line in lines if TEXT_LOG.match(line)]
