"""Whole worker processes (`audiences worker`) against the test broker."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shared import isolated_settings

sys.path.insert(0, str(Path(__file__).parent))

from faults import settings_env

from audiences.adapters.kafka.topics import Topics, ensure_topics
from audiences.adapters.settings import Settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class WorkerProcess:
    """One `audiences worker` subprocess with its own web port and log file."""

    def __init__(
        self, settings: Settings, log_path: Path, extra_env: dict[str, str] | None = None
    ) -> None:
        self.settings = settings
        self.log_path = log_path
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.extra_env = extra_env or {}

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            **settings_env(self.settings),
            "AUDIENCES_WEB_PORT": str(self.port),
            "AUDIENCES_TICK_INTERVAL_MS": "20",
            **self.extra_env,
        }

    def start(self) -> WorkerProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "audiences", "worker"],
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        raise AssertionError(f"worker not ready after {timeout}s: {self.log_tail()}")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@pytest.fixture
def system_settings(
    kafka_bootstrap: str, unique_name: Callable[..., str], tmp_path: Path
) -> Settings:
    name = unique_name("s")
    settings = isolated_settings(kafka_bootstrap, name, str(tmp_path / "data"), partitions=3)
    ensure_topics(settings, Topics.from_settings(settings))
    return settings


@pytest.fixture
def workers(system_settings: Settings, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def make(
        data_dir: str | None = None, env: dict[str, str] | None = None, **changes: Any
    ) -> WorkerProcess:
        """A worker of the test's settings with `changes` (only those `settings_env` passes
        to the process); `env`: more environment (`AUDIENCES_BATCH_SIZE`,
        `faults.slow_worker_env`)."""
        carried = settings_env(system_settings)
        lost = [name for name in changes if f"AUDIENCES_{name.upper()}" not in carried]
        assert not lost, f"settings_env does not pass {lost} to the worker: use env="
        settings = system_settings.replace(**changes)
        if data_dir is not None:
            settings = settings.replace(data_dir=data_dir)
        worker = WorkerProcess(settings, tmp_path / f"worker-{len(started)}.log", env)
        started.append(worker)
        return worker

    yield make
    for worker in started:
        worker.stop()


@pytest.fixture
def fault_settings(
    kafka_bootstrap: str, unique_name: Callable[..., str], tmp_path: Path
) -> Settings:
    """A test's own topics (only those SPEC §1 names; the worker creates its internal
    ones) with 3 partitions, and state under tmp_path: for the black-box fault suite."""
    from faults import create_topics

    settings = isolated_settings(
        kafka_bootstrap, unique_name("f"), str(tmp_path / "data"), partitions=3
    )
    create_topics(settings)
    return settings


@pytest.fixture
def fault_workers(
    fault_settings: Settings, kafka_flavor: str, tmp_path: Path
) -> Iterator[Callable[..., Any]]:
    """`make(data_dir=None, **env)` -> a not yet started `faults.WorkerHandle` with its
    own port and log file. Every process still running at the end is killed."""
    from faults import WorkerHandle, session_timeout_ms

    started: list[Any] = []

    def make(data_dir: str | None = None, **env: str) -> Any:
        settings = fault_settings if data_dir is None else fault_settings.replace(data_dir=data_dir)
        worker = WorkerHandle(
            settings,
            tmp_path / f"worker-{len(started)}.log",
            free_port(),
            {"AUDIENCES_SESSION_TIMEOUT_MS": str(session_timeout_ms(kafka_flavor)), **env},
        )
        started.append(worker)
        return worker

    yield make
    for worker in started:
        if worker.alive():
            worker.proc.send_signal(signal.SIGKILL)
    for worker in started:
        if worker.proc is not None:
            worker.proc.wait(10)


@pytest.fixture
def outputs(fault_settings: Settings) -> Iterator[Any]:
    """`faults.OutputLog` of the test's `audience-events`, read from the beginning."""
    from faults import OutputLog

    log = OutputLog(fault_settings)
    yield log
    log.close()


@pytest.fixture
def dead_letters(fault_settings: Settings) -> Iterator[Any]:
    """`faults.DeadLetterLog` of the test's `events-dlq`, read from the beginning."""
    from faults import DeadLetterLog

    log = DeadLetterLog(fault_settings)
    yield log
    log.close()


@pytest.fixture
def announcements(fault_settings: Settings) -> Iterator[Callable[[], Any]]:
    """`announcements()` -> the test's `faults.Announcements` (made on first call: after a
    worker created the `{app_id}-workers` topic), closed at the end."""
    from faults import Announcements

    made: list[Any] = []

    def get() -> Any:
        if not made:
            made.append(Announcements(fault_settings))
        return made[0]

    yield get
    for reader in made:
        reader.close()
