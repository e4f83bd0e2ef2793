"""The management API and operations endpoints of real `audiences worker` processes:
readiness during recovery, reads routed between two workers with API tokens (the
workers authenticate to each other), the bind address with and without tokens, a parsed
/metrics scrape, JSON logs."""

from __future__ import annotations

import re
import socket
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


READ_TOKEN, ADMIN_TOKEN = "sys-read-5f2a", "sys-admin-9c1e"


def get(url: str, token: str | None = None) -> tuple[int, bytes, dict[str, str]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=10
        ) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def listening(port: int) -> set[str]:
    """The local addresses with a TCP socket listening on `port` (Linux /proc/net)."""
    found = set()
    for table in ("tcp", "tcp6"):
        path = Path("/proc/net") / table
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.rpartition(":")
            if state != "0A" or int(hex_port, 16) != port:  # 0A = LISTEN
                continue
            raw = bytes.fromhex(address)
            if len(raw) == 4:
                found.add(socket.inet_ntop(socket.AF_INET, raw[::-1]))
            else:  # four little-endian 32-bit words
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                found.add(socket.inet_ntop(socket.AF_INET6, words))
    return found


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

    # with tokens, on every interface: the workers forward to each other with a token
    secured = {"api_tokens": f"{READ_TOKEN}:read,{ADMIN_TOKEN}:admin", "web_host": "0.0.0.0"}
    first = workers(**secured).start()
    statuses = readiness_until_ready(first.port)  # /readyz needs no token
    assert statuses[0] == 503 and statuses[-1] == 200  # not ready until recovered
    second = workers(data_dir=str(tmp_path / "second"), **secured).start()
    second.wait_ready(90)
    urls = {f"http://127.0.0.1:{w.port}" for w in (first, second)}
    assert listening(first.port) == listening(second.port) == {"0.0.0.0"}

    # every user answers from either worker, served by its partition's owner; once the
    # second worker took its share, both owners appear
    def all_answer() -> set[str]:
        served = set()
        for user in users:
            for worker in (first, second):
                status, body, headers = get(
                    f"http://127.0.0.1:{worker.port}/v1/users/{user}", READ_TOKEN
                )
                if status != 200 or [a["key"] for a in orjson.loads(body)["audiences"]] != [
                    "buyers"
                ]:
                    return set()
                served.add(headers[SERVED_BY])
        return served

    wait_for(lambda: all_answer() == urls, 90, "reads were not routed to both workers")

    explain = f"http://127.0.0.1:{second.port}/v1/users/{users[0]}/explain/buyers"
    status, body, _ = get(explain, READ_TOKEN)
    assert status == 200 and orjson.loads(body)["member"] is True
    for token in (None, "sys-read-5f2b"):
        status, body, headers = get(explain, token)
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer"), body

    seen: list[str] = []
    cursor = ""
    while True:
        status, body, _ = get(
            f"http://127.0.0.1:{first.port}/v1/audiences/buyers/members?limit=5{cursor}",
            READ_TOKEN,
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

    # the audience size sums both workers' partitions (an internal call with a token)
    status, body, _ = get(f"http://127.0.0.1:{second.port}/v1/audiences/buyers", READ_TOKEN)
    assert status == 200 and orjson.loads(body)["size"] == len(users)


def test_without_tokens_a_worker_listens_on_loopback_only_and_says_so(
    workers: Callable[..., Any],
) -> None:
    worker = workers(web_host="0.0.0.0").start()  # asked for every interface
    worker.wait_ready(90)
    assert listening(worker.port) == {"127.0.0.1"}
    assert "no API tokens configured" in worker.log_tail(2000)
    status, body, _ = get(f"http://127.0.0.1:{worker.port}/v1/audiences")  # open, locally
    assert status == 200, body
