"""`audiences collector` as a process: Segment calls in, records on `events`, clean stop."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from backlog import read_all

from audiences.adapters.settings import Settings
from conftest import WorkerProcess, free_port
from shared import wait_for

pytestmark = pytest.mark.system


def _env(settings: Settings, port: int, **extra: str) -> dict[str, str]:
    worker_env = WorkerProcess(settings, Path("unused.log")).env()  # its AUDIENCES_* settings
    worker_env.pop("AUDIENCES_WEB_PORT")
    return {**worker_env, "AUDIENCES_COLLECTOR_PORT": str(port), **extra}


def test_collector_command_takes_segment_calls_and_stops_cleanly(
    system_settings: Settings,
) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "audiences", "collector"],
        env=_env(system_settings, port, AUDIENCES_WRITE_KEYS="k-live"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/batch",
            data=json.dumps({"batch": [{"type": "identify", "userId": "p-1"}]}).encode(),
            headers={"Authorization": "Basic " + base64.b64encode(b"k-live:").decode()},
        )
        answers: list[Any] = []

        def answered() -> bool:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else b""
            try:
                with urllib.request.urlopen(request, timeout=15) as response:
                    answers.append(json.load(response))
                    return True
            except urllib.error.URLError:
                return False  # not listening yet

        wait_for(answered, 30, "the collector never listened")
        assert answers == [{"success": True}]
        [event] = read_all(system_settings, system_settings.events_topic, set(), 30, min_count=1)
        assert event["userId"] == "p-1" and event["type"] == "identify"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_collector_command_refuses_to_start_without_write_keys(
    system_settings: Settings,
) -> None:
    env = {
        k: v for k, v in _env(system_settings, free_port()).items() if k != "AUDIENCES_WRITE_KEYS"
    }
    done = subprocess.run(
        [sys.executable, "-m", "audiences", "collector"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "AUDIENCES_WRITE_KEYS is not set" in done.stderr
