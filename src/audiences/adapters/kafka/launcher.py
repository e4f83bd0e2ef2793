"""What the broker launchers share: a Kafka-compatible broker as a child process.

`BrokerProcess` is the base of `EmbeddedBroker` (Tansu, ``embedded.py``) and
`ApacheKafka` (``apache.py``); each of those modules documents its broker's
quirks. A launcher builds its command and calls `BrokerProcess._spawn` then
`BrokerProcess._ready`; this module does the rest, the same for both:

- **Start.** `_start_retrying` tries a few times on fresh ports when the
  port was picked here (another process may take it between picking and
  binding); a requested port is tried once. The child gets stdin from
  ``/dev/null``, its stdout and stderr go to the log file, and it leads its
  own process group, so a Ctrl-C at the terminal does not reach it.
- **Readiness.** `_wait_ready` waits for the TCP listener first (librdkafka
  would log connection refusals to stderr meanwhile), then for a metadata
  answer that lists a broker, all within ``startup_timeout``; it fails early
  when the process exits. A failed start raises `BrokerError` with the tail
  of the broker's log.
- **Stop.** `stop` signals the process group with the launcher's
  ``_stop_signal``, then SIGKILL after ``stop_timeout``, and closes the log
  file. The broker is stopped by `stop`, by leaving the ``with`` block, at
  interpreter exit (``atexit``) and, on Linux, when the Python process dies
  (``PR_SET_PDEATHSIG`` with the same signal; set only when started from the
  main thread, as Linux ties it to the thread).
"""

from __future__ import annotations

import abc
import atexit
import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, ClassVar, NoReturn, Self

from audiences.errors import BrokerError

if TYPE_CHECKING:
    from confluent_kafka.admin import AdminClient

__all__ = ["BrokerProcess"]

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


class BrokerProcess(abc.ABC):
    """A broker child process on a loopback port: start, readiness, stop, log tail.

    A launcher sets the class attributes, builds its command in `_start_once`
    and provides `log_path` and `_describe`; it may override
    `_check_log` (a failed start the process survives) and `_cleanup` (what
    `stop` removes besides the process and the log file).
    """

    _name: ClassVar[str]
    """What log lines call the broker ("embedded broker")."""
    _logger: ClassVar[logging.Logger]
    """The launcher module's logger."""
    _stop_signal: ClassVar[signal.Signals]
    """What `stop` sends first, and what the child gets when its parent dies."""
    _listen_poll: ClassVar[float] = 0.1
    """Seconds between two looks for the listener during startup."""

    def __init__(
        self,
        port: int | None,
        host: str,
        log_path: str | None,
        *,
        startup_timeout: float,
        stop_timeout: float,
    ) -> None:
        self.host = host
        self._requested_port = port
        self._port: int | None = None
        self._log_path = log_path
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
            raise BrokerError(f"{self._name} is not started", retriable=False)
        return f"{self.host}:{self._port}"

    @property
    def port(self) -> int | None:
        return self._port

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    @abc.abstractmethod
    def log_path(self) -> str | None:
        """Where the broker's output goes (None before a temporary log exists)."""

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        """Stop the broker (the stop signal, then SIGKILL after `stop_timeout`). Idempotent."""
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

    @abc.abstractmethod
    def start(self) -> str:
        """Start the broker (idempotent while running); its bootstrap string."""

    # -- for the launchers --------------------------------------------------

    def _start_retrying(self, start_once: Callable[[], str]) -> str:
        """`start_once()`, again on fresh ports if it fails on ports picked here.

        Call with the lock held. A failed attempt is stopped before the next.
        """
        # A port we picked ourselves may be taken between picking and binding;
        # retry with a fresh one. A requested port is tried once.
        attempts = 1 if self._requested_port is not None else 3
        for attempt in range(1, attempts + 1):
            try:
                return start_once()
            except BrokerError:
                self._stop_locked()
                if attempt == attempts:
                    raise
                self._logger.warning("%s failed to start, retrying on other ports", self._name)
        raise AssertionError("unreachable")  # pragma: no cover

    def _open_log(self) -> None:
        log_path = self.log_path
        assert log_path is not None
        self._log_file = open(log_path, "ab")  # noqa: SIM115 - lives as long as the process

    def _spawn(self, cmd: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        """Start `cmd` as the broker: its own process group, output to the log file."""
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            env=env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent(self._stop_signal),
            close_fds=True,
        )
        atexit.register(self.stop)

    def _ready(self) -> str:
        """Wait until the spawned broker answers; its bootstrap string."""
        assert self._proc is not None
        self._wait_ready()
        self._logger.info("%s ready at %s (pid %d)", self._name, self.bootstrap, self._proc.pid)
        return self.bootstrap

    def _admin_client(self) -> AdminClient:
        """A client for the metadata requests of `_wait_ready` (the broker launchers and
        `KafkaClients` are the only makers of Kafka clients: tests/unit/test_architecture.py)."""
        from confluent_kafka.admin import AdminClient

        return AdminClient({"bootstrap.servers": f"{self.host}:{self._port}"})

    @abc.abstractmethod
    def _describe(self) -> str:
        """What `_fail` calls the broker ("embedded Tansu broker")."""

    def _check_log(self) -> None:  # noqa: B027 - a hook, empty by default
        """Fail the start on what the log shows; by default the log is not read."""

    def _cleanup(self) -> None:  # noqa: B027 - a hook, empty by default
        """Remove what `stop` leaves besides the process and the open log file."""

    # -- internals --------------------------------------------------------

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
            time.sleep(self._listen_poll)

        from confluent_kafka import KafkaException

        admin = self._admin_client()
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

    def _fail(self, what: str) -> NoReturn:
        raise BrokerError(
            f"{self._describe()} on {self.host}:{self._port} {what}.\n"
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
                sig = self._stop_signal
                self._signal(proc, sig)
                try:
                    proc.wait(timeout=self._stop_timeout)
                except subprocess.TimeoutExpired:
                    self._logger.warning(
                        "%s pid %d ignored %s; killing", self._name, proc.pid, sig.name
                    )
                    self._signal(proc, signal.SIGKILL)
                    proc.wait(timeout=self._stop_timeout)
            self._logger.info("%s pid %d stopped (code %s)", self._name, proc.pid, proc.returncode)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        self._cleanup()
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
