"""`audiences broker` and `audiences up` on a fresh machine: no Kafka installed by hand."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient

from conftest import free_port

pytestmark = pytest.mark.system


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUDIENCES_")}
    return {**env, **extra}


def test_broker_prints_a_bootstrap_that_answers_and_stops_on_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "audiences", "broker"],
        env=_clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        bootstrap = proc.stdout.readline().strip()
        assert re.fullmatch(r"127\.0\.0\.1:\d+", bootstrap), bootstrap
        metadata = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10)
        assert metadata.brokers
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_up_runs_a_ready_worker_and_the_collector_on_the_embedded_broker() -> None:
    port, collector_port = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "audiences", "up"],
        env=_clean_env(AUDIENCES_WEB_PORT=str(port), AUDIENCES_COLLECTOR_PORT=str(collector_port)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        banner: list[str] = []  # log lines come first; the banner before the worker starts
        found = None
        while found is None and len(banner) < 50:
            banner.append(proc.stdout.readline())
            found = re.search(r"Collector: (http://\S+)  write key: (\S+)", banner[-1])
        assert found, banner
        collector_url, write_key = found.groups()
        assert collector_url == f"http://127.0.0.1:{collector_port}"
        deadline = time.monotonic() + 60
        ready = False
        while time.monotonic() < deadline and not ready:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                    ready = r.status == 200
            except OSError:
                time.sleep(0.3)
        assert ready, "the worker never became ready"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            assert b"audiences_build_info" in r.read()
        # the collector takes Segment calls with the generated write key
        status = _post_when_up(
            f"{collector_url}/v1/track",
            {"userId": "u1", "event": "Signed Up", "writeKey": write_key},
            deadline=time.monotonic() + 30,
        )
        assert status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0


def _post_when_up(url: str, body: dict[str, Any], deadline: float) -> int:
    """POST `body` as analytics.js does (text/plain JSON), retrying until the server listens."""
    data = json.dumps(body).encode()
    while True:
        request = urllib.request.Request(url, data=data, headers={"Content-Type": "text/plain"})
        try:
            with urllib.request.urlopen(request, timeout=15) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
