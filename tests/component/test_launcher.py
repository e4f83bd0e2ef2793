"""`BrokerProcess`, the child-process machinery both broker launchers share, on a stand-in.

The stand-in runs a small Python script instead of a broker: it never listens
unless told to, so these tests cover failed starts, the log tail and the way
`stop` ends a child, not the metadata probe (the launchers' own tests do).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

import pytest

from audiences.adapters.kafka.launcher import BrokerProcess, _free_port
from audiences.errors import BrokerError
from shared import wait_for


class StandIn(BrokerProcess):
    """Runs `script` with Python; `ready=False` makes `start` return once it is spawned."""

    _name = "stand-in broker"
    _logger = logging.getLogger(__name__)
    _stop_signal = signal.SIGTERM
    _listen_poll = 0.02

    def __init__(
        self,
        script: str,
        log_path: Path,
        *,
        port: int | None = None,
        ready: bool = True,
        startup_timeout: float = 5.0,
        stop_timeout: float = 5.0,
    ) -> None:
        super().__init__(
            port,
            "127.0.0.1",
            str(log_path),
            startup_timeout=startup_timeout,
            stop_timeout=stop_timeout,
        )
        self.script = script
        self.ready = ready
        self.pids: list[int] = []

    @property
    def log_path(self) -> str | None:
        return self._log_path

    def start(self) -> str:
        with self._lock:
            if self.is_running():
                return self.bootstrap
            return self._start_retrying(self._start_once)

    def _start_once(self) -> str:
        self._open_log()
        self._spawn([sys.executable, "-c", self.script])
        assert self._proc is not None
        self.pids.append(self._proc.pid)
        self._port = self._requested_port or _free_port(self.host)
        return self._ready() if self.ready else self.bootstrap

    def _admin_client(self) -> object:
        raise AssertionError("the stand-in never listens: no metadata request")

    def _describe(self) -> str:
        return "stand-in broker"


def _gone(pid: int) -> bool:
    """True if `pid` has exited (a zombie nobody reaped counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" in status


@pytest.mark.parametrize(("port", "attempts"), [(None, 3), ("free", 1)])
def test_a_child_that_exits_fails_the_start_with_the_tail_of_its_log(
    tmp_path: Path, port: str | None, attempts: int
) -> None:
    script = "import sys; print('cannot start: no good', file=sys.stderr); sys.exit(3)"
    requested = _free_port("127.0.0.1") if port == "free" else None
    broker = StandIn(script, tmp_path / "broker.log", port=requested)

    with pytest.raises(BrokerError) as failed:
        broker.start()

    message = str(failed.value)
    assert "stand-in broker on 127.0.0.1:" in message
    assert "exited with code 3 during startup" in message
    assert f"--- tail of {tmp_path / 'broker.log'} ---" in message
    assert "cannot start: no good" in message
    # ports picked here are retried on fresh ones; a requested port is tried once
    assert len(broker.pids) == attempts
    assert not broker.is_running() and broker.port is None
    with pytest.raises(BrokerError, match="stand-in broker is not started"):
        _ = broker.bootstrap


def test_a_child_that_never_listens_is_stopped_after_the_startup_timeout(
    tmp_path: Path,
) -> None:
    broker = StandIn(
        "import time; time.sleep(60)",
        tmp_path / "broker.log",
        port=_free_port("127.0.0.1"),
        startup_timeout=0.5,
    )
    with pytest.raises(BrokerError, match=r"did not listen on 127\.0\.0\.1:"):
        broker.start()
    assert len(broker.pids) == 1
    wait_for(lambda: _gone(broker.pids[0]), 10, "the child is gone")


def test_stop_kills_the_process_group_of_a_child_that_ignores_the_stop_signal(
    tmp_path: Path,
) -> None:
    log = tmp_path / "broker.log"
    script = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: print('got SIGTERM', flush=True))\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print('grandchild', child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    broker = StandIn(script, log, ready=False, stop_timeout=0.5)
    broker.start()
    pid = broker.pid
    assert pid is not None and broker.is_running()
    wait_for(lambda: "grandchild" in log.read_text(), 10, "the grandchild started")
    grandchild = int(log.read_text().split()[1])

    broker.stop()

    assert "got SIGTERM" in log.read_text()  # asked to stop first, then killed
    assert not broker.is_running() and broker.pid is None
    assert _gone(pid)
    wait_for(lambda: _gone(grandchild), 10, "the grandchild is gone")
    broker.stop()  # idempotent


def test_leaving_the_with_block_stops_the_child(tmp_path: Path) -> None:
    with StandIn("import time; time.sleep(60)", tmp_path / "broker.log", ready=False) as broker:
        pid = broker.pid
        assert pid is not None and broker.is_running()
        assert broker.bootstrap == f"127.0.0.1:{broker.port}"
    assert not broker.is_running()
    assert _gone(pid)
