"""Start a real Apache Kafka 4.x broker (KRaft, one node) from Maven Central jars.

`ApacheKafka` has the shape of `EmbeddedBroker` (the Tansu broker) but runs
Apache Kafka itself, for what Tansu cannot do: DeleteRecords, a log cleaner
that really compacts, transactions and ``read_committed``::

    with ApacheKafka() as kafka:
        bootstrap = kafka.bootstrap        # "127.0.0.1:PORT"

No Kafka download, no Docker: the jars are ``org.apache.kafka:kafka_2.13`` and
its dependencies from Maven Central, resolved by ``mvn`` from the small pom
kept beside this module (``apache-kafka/pom.xml``) into the local Maven
repository (``~/.m2/repository``). The resolved classpath is cached in
``$XDG_CACHE_HOME/audiences/apache-kafka/`` (default ``~/.cache/...``), one
file per pom and Kafka version, so only the first start runs Maven (again if a
listed jar has gone). Needs Java >= 17 (``$JAVA_HOME/bin/java``, else ``java``
on the PATH) and ``mvn`` when the cache is cold; without them `start` raises
`ApacheKafkaUnavailable`, a `BrokerError` that says what is missing.
``AUDIENCES_APACHE_KAFKA_VERSION`` (or ``kafka_version=``) picks another
Kafka release than the pom's.

Each start formats a fresh KRaft storage directory in a temporary directory
(``kafka.tools.StorageTool format --standalone``: this node is the only
controller voter), then runs ``kafka.Kafka server.properties`` as one
combined broker+controller process on two free loopback ports (clients use
the broker's; the controller listener is internal). Everything is gone after
`stop`. The broker is tuned for tests, not throughput: small heap and serial
GC, one partition per new topic unless told otherwise, replication factor 1
for the internal topics, no auto-created topics, no initial rebalance delay,
and a log cleaner that looks for work every half second, so a topic created
with ``segment.ms``, ``min.cleanable.dirty.ratio=0``,
``delete.retention.ms=0`` and ``min.compaction.lag.ms=0`` is compacted within
seconds.

Apache Kafka 4.x notes
----------------------
- There is no ZooKeeper mode any more and storage is never formatted on the
  fly: a ``log.dirs`` without ``meta.properties`` is an error. ``format``
  needs a cluster id (22 characters of URL-safe base64 of 16 random bytes)
  and, for a dynamic quorum (KIP-853), ``--standalone`` with
  ``controller.quorum.bootstrap.servers``; it writes the controller's
  address into the storage, so a formatted directory is bound to its port.
- Formatting is a JVM start of its own (~3 s); the broker answers ~3 s later.
- The internal topics (``__consumer_offsets``, ``__transaction_state``, 50
  partitions each) are created on first use: the first group or
  transactional producer waits a second or two (librdkafka logs "Coordinator
  load in progress: retrying").
- A producer fenced by a newer one with its ``transactional.id`` gets the
  broker's ``PRODUCER_FENCED``; librdkafka raises it as its fatal ``_FENCED``.
- The broker logs through SLF4J; the pom adds log4j2 and its SLF4J 2 binding
  (without one SLF4J warns on stderr and the log is lost). Log lines go to
  stdout, which is the broker's log file here.

Process hygiene as for `EmbeddedBroker`: the JVM leads its own process group
(a Ctrl-C at the terminal does not reach it; `stop` does), is stopped by
`stop`, by leaving the ``with`` block, at interpreter exit (``atexit``) and,
on Linux, when the Python process dies (``PR_SET_PDEATHSIG`` with SIGTERM,
when started from the main thread). `stop` sends SIGTERM (a clean shutdown takes ~2 s),
then SIGKILL. A temporary directory left by a killed run is removed by the
next start once its processes are gone.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from audiences.adapters.kafka.launcher import BrokerProcess, _free_port, _port_free
from audiences.errors import BrokerError

if TYPE_CHECKING:
    pass

__all__ = [
    "ApacheKafka",
    "ApacheKafkaUnavailable",
    "check_java",
    "check_maven",
    "classpath_cache_file",
    "default_kafka_version",
    "resolve_classpath",
]

logger = logging.getLogger(__name__)

MIN_JAVA = 17
VERSION_ENV = "AUDIENCES_APACHE_KAFKA_VERSION"
_TMP_PREFIX = "audiences-kafka-"
_NODE_ID = 1
_DEPENDENCY_PLUGIN = "3.8.1"

# Written as server.properties; the listeners, log.dirs and the quorum are added per start.
BROKER_CONFIG: dict[str, str] = {
    "process.roles": "broker,controller",
    "node.id": str(_NODE_ID),
    "controller.listener.names": "CONTROLLER",
    "inter.broker.listener.name": "PLAINTEXT",
    "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
    "auto.create.topics.enable": "false",
    "num.partitions": "1",
    "default.replication.factor": "1",
    "min.insync.replicas": "1",
    "group.initial.rebalance.delay.ms": "0",
    # A development broker: consumers may ask for sessions down to 1 s (the default floor
    # is 6 s), so a test that kills workers waits that long for the group to notice.
    "group.min.session.timeout.ms": "1000",
    "offsets.topic.replication.factor": "1",
    "transaction.state.log.replication.factor": "1",
    "transaction.state.log.min.isr": "1",
    "share.coordinator.state.topic.replication.factor": "1",
    "share.coordinator.state.topic.min.isr": "1",
    # The cleaner sleeps log.cleaner.backoff.ms (default 15 s) when it finds
    # nothing to clean; its default 128 MiB dedupe buffer would take a quarter
    # of the small heap.
    "log.cleaner.enable": "true",
    "log.cleaner.threads": "1",
    "log.cleaner.backoff.ms": "500",
    "log.cleaner.dedupe.buffer.size": str(16 * 1024 * 1024),
    # Retention (and segment deletion after DeleteRecords) checked every second.
    "log.retention.check.interval.ms": "1000",
    "log.initial.task.delay.ms": "0",
}

_LOG4J2 = """\
status = warn
appender.out.type = Console
appender.out.name = out
appender.out.target = SYSTEM_OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.out.ref = out
# every config object logs all its values at INFO: hundreds of lines per client
logger.config.name = org.apache.kafka.common.config.AbstractConfig
logger.config.level = warn
"""


class ApacheKafkaUnavailable(BrokerError):
    """Apache Kafka cannot be started here: Java >= 17 or Maven is missing, or
    Maven cannot resolve the broker's jars (e.g. Maven Central is unreachable)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retriable=False)


# -- prerequisites ----------------------------------------------------------------------


def java_command() -> str | None:
    """``$JAVA_HOME/bin/java`` if it exists, else ``java`` on the PATH, else None."""
    home = os.environ.get("JAVA_HOME")
    if home:
        candidate = Path(home) / "bin" / "java"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("java")


def java_major_version(java: str) -> int:
    """The feature version of `java` (8 for "1.8.0_x", 17 for "17.0.15")."""
    try:
        out = subprocess.run(
            [java, "-version"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ApacheKafkaUnavailable(f"cannot run {java} -version: {exc}") from exc
    found = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if found is None:
        raise ApacheKafkaUnavailable(
            f"cannot tell the version of {java}: {(out.stderr or out.stdout).strip()[:200]}"
        )
    major = int(found.group(1))
    return int(found.group(2) or 0) if major == 1 else major


def check_java() -> str:
    """The java command to run the broker with; `ApacheKafkaUnavailable` if none is >= 17."""
    java = java_command()
    if java is None:
        raise ApacheKafkaUnavailable(
            f"Apache Kafka needs Java >= {MIN_JAVA}: no `java` on the PATH and no JAVA_HOME "
            "(Debian/Ubuntu: apt-get install openjdk-17-jdk-headless)"
        )
    major = java_major_version(java)
    if major < MIN_JAVA:
        raise ApacheKafkaUnavailable(
            f"Apache Kafka 4.x needs Java >= {MIN_JAVA}; {java} is Java {major} "
            "(set JAVA_HOME to a newer JDK)"
        )
    return java


def check_maven() -> str:
    """The mvn command; `ApacheKafkaUnavailable` if there is none."""
    mvn = shutil.which("mvn")
    if mvn is None:
        raise ApacheKafkaUnavailable(
            "Apache Kafka's jars are fetched from Maven Central with Maven: no `mvn` on the "
            "PATH (Debian/Ubuntu: apt-get install maven)"
        )
    return mvn


# -- classpath --------------------------------------------------------------------------


def _pom_bytes() -> bytes:
    return (resources.files("audiences.adapters.kafka") / "apache-kafka" / "pom.xml").read_bytes()


def default_kafka_version() -> str:
    """``AUDIENCES_APACHE_KAFKA_VERSION`` if set, else the pom's ``kafka.version``."""
    override = os.environ.get(VERSION_ENV)
    if override:
        return override
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    node = ET.fromstring(_pom_bytes()).find("m:properties/m:kafka.version", ns)
    if node is None or not node.text:
        raise BrokerError("apache-kafka/pom.xml has no kafka.version property", retriable=False)
    return node.text.strip()


def cache_dir() -> Path:
    """Where resolved classpaths are kept: ``$XDG_CACHE_HOME/audiences/apache-kafka``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "audiences" / "apache-kafka"


def classpath_cache_file(kafka_version: str) -> Path:
    """The cached classpath of `kafka_version`, keyed by the pom's content."""
    key = hashlib.sha256(_pom_bytes() + b"\0" + kafka_version.encode()).hexdigest()[:16]
    return cache_dir() / f"kafka-{kafka_version}-{key}" / "classpath.txt"


def _read_classpath(path: Path) -> list[str] | None:
    try:
        entries = [e for e in path.read_text().strip().split(os.pathsep) if e]
    except OSError:
        return None
    if not entries or not all(os.path.isfile(e) for e in entries):
        return None  # e.g. ~/.m2 was cleaned: resolve again
    return entries


def _maven_errors(output: str) -> str:
    """Maven's own error lines, without its boilerplate about -e, -X and wiki pages."""
    lines = []
    for line in re.sub(r"\x1b\[[0-9;]*m", "", output).splitlines():
        if "To see the full stack trace" in line:
            break
        if line.strip() and line.strip() != "[ERROR]":
            lines.append(line.rstrip())
    return "\n".join(lines[:20])[-3000:] or output[-3000:]


def resolve_classpath(
    kafka_version: str | None = None, *, timeout: float = 600.0, refresh: bool = False
) -> list[str]:
    """The broker's classpath (jar paths in ``~/.m2``), resolved with Maven once and cached.

    Raises `ApacheKafkaUnavailable` when Maven is missing, fails (unreachable
    repository, unknown version) or takes longer than `timeout` seconds.
    """
    version = kafka_version or default_kafka_version()
    pom = _pom_bytes()
    cached = classpath_cache_file(version)
    work = cached.parent
    if not refresh and (entries := _read_classpath(cached)) is not None:
        return entries

    mvn = check_maven()
    work.mkdir(parents=True, exist_ok=True)
    (work / "pom.xml").write_bytes(pom)
    fd, partial = tempfile.mkstemp(prefix="classpath-", suffix=".part", dir=work)
    os.close(fd)
    cmd = [
        mvn,
        "--batch-mode",
        "--quiet",
        # retry downloads that failed before: Maven otherwise remembers a failure
        # (*.lastUpdated in ~/.m2) and reports "Could not find artifact" without asking
        "--update-snapshots",
        "--file",
        str(work / "pom.xml"),
        "-Dstyle.color=never",
        # full coordinates: a prefix ("dependency:") needs plugin metadata from the network
        f"org.apache.maven.plugins:maven-dependency-plugin:{_DEPENDENCY_PLUGIN}:build-classpath",
        f"-Dmdep.outputFile={partial}",
        f"-Dkafka.version={version}",
    ]
    logger.info("resolving Apache Kafka %s jars: %s", version, " ".join(cmd))
    started = time.monotonic()
    try:
        try:
            done = subprocess.run(
                cmd,
                cwd=work,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise ApacheKafkaUnavailable(
                f"Maven did not resolve Apache Kafka {version}'s jars within {timeout:.0f}s "
                "(is Maven Central reachable?)"
            ) from exc
        if done.returncode != 0:
            raise ApacheKafkaUnavailable(
                f"Maven could not resolve Apache Kafka {version}'s jars (exit code "
                f"{done.returncode}; is Maven Central reachable?):\n"
                f"{_maven_errors(done.stdout + done.stderr)}"
            )
        entries = _read_classpath(Path(partial))
        if entries is None:
            raise ApacheKafkaUnavailable(
                f"Maven wrote no usable classpath for Apache Kafka {version}"
            )
        os.replace(partial, cached)  # atomic: a concurrent start reads all or nothing
    finally:
        with contextlib.suppress(OSError):
            os.unlink(partial)
    logger.info(
        "Apache Kafka %s classpath (%d jars) resolved in %.1fs, cached in %s",
        version,
        len(entries),
        time.monotonic() - started,
        cached,
    )
    return entries


# -- the broker -------------------------------------------------------------------------


def _cluster_id() -> str:
    """A KRaft cluster id as ``kafka-storage random-uuid`` makes it (Kafka's Uuid.toString)."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):  # Kafka never makes these (they read as CLI options)
            return text


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_stale_dirs() -> None:
    """Remove temporary directories of runs whose Python and JVM processes are both gone."""
    for path in Path(tempfile.gettempdir()).glob(f"{_TMP_PREFIX}*"):
        try:
            pids = [int(p) for p in (path / "pids").read_text().split()]
        except (OSError, ValueError):
            continue  # not ours, or being created right now
        if pids and not any(_alive(pid) for pid in pids):
            shutil.rmtree(path, ignore_errors=True)


class ApacheKafka(BrokerProcess):
    """An Apache Kafka broker+controller JVM on loopback ports, with temporary storage.

    `port=None` picks a free port at `start`. `log_path` receives the broker's
    log (and the storage format's); without it a file in the temporary
    directory is used, removed by `stop`. `config` adds to or overrides the
    broker's ``server.properties``; `jvm_options` are added to the JVM's.
    """

    _name = "Apache Kafka"
    _logger = logger
    # SIGTERM, not SIGINT: a shell starts background jobs with SIGINT ignored,
    # and the JVM then never reacts to it.
    _stop_signal = signal.SIGTERM

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        log_path: str | None = None,
        *,
        kafka_version: str | None = None,
        config: Mapping[str, str] | None = None,
        heap: str = "512m",
        jvm_options: Sequence[str] = (),
        startup_timeout: float = 90.0,
        stop_timeout: float = 15.0,
        resolve_timeout: float = 600.0,
    ) -> None:
        super().__init__(
            port, host, log_path, startup_timeout=startup_timeout, stop_timeout=stop_timeout
        )
        self.kafka_version = kafka_version or default_kafka_version()
        self._controller_port: int | None = None
        self._config = dict(config or {})
        self._heap = heap
        self._jvm_options = list(jvm_options)
        self._resolve_timeout = resolve_timeout
        self._dir: Path | None = None

    # -- public surface ---------------------------------------------------

    @property
    def controller_port(self) -> int | None:
        return self._controller_port

    @property
    def log_path(self) -> str | None:
        if self._log_path is not None:
            return self._log_path
        return str(self._dir / "broker.log") if self._dir is not None else None

    def start(self) -> str:
        """Resolve the jars (first time), format storage, start the JVM, wait until it answers.

        Returns the bootstrap string. Idempotent while running. Raises
        `ApacheKafkaUnavailable` when Java >= 17 or Maven is missing or the jars
        cannot be resolved, `BrokerError` (with the tail of the broker log) when
        the broker exits or does not answer within `startup_timeout`.
        """
        with self._lock:
            if self.is_running():
                return self.bootstrap
            java = check_java()
            classpath = resolve_classpath(self.kafka_version, timeout=self._resolve_timeout)
            _sweep_stale_dirs()
            try:
                return self._start_retrying(lambda: self._start_once(java, classpath))
            except BrokerError:
                raise  # stopped already
            except BaseException:  # Ctrl-C or SIGTERM while starting: leave nothing behind
                self._stop_locked()
                raise

    def stop(self) -> None:
        """Stop the broker (SIGTERM, SIGKILL after `stop_timeout`) and remove its storage."""
        super().stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<ApacheKafka {self.kafka_version} {self.host}:{self._port} {state} pid={self.pid}>"

    # -- internals --------------------------------------------------------

    def _server_properties(self, data_dir: Path) -> dict[str, str]:
        assert self._port is not None and self._controller_port is not None
        broker = f"{self.host}:{self._port}"
        controller = f"{self.host}:{self._controller_port}"
        return {
            **BROKER_CONFIG,
            "listeners": f"PLAINTEXT://{broker},CONTROLLER://{controller}",
            "advertised.listeners": f"PLAINTEXT://{broker}",
            "controller.quorum.bootstrap.servers": controller,
            "log.dirs": str(data_dir),
            **self._config,
        }

    def _start_once(self, java: str, classpath: list[str]) -> str:
        self._dir = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX))
        (self._dir / "pids").write_text(f"{os.getpid()}\n")
        port = self._requested_port or _free_port(self.host)
        controller_port = _free_port(self.host)
        while controller_port == port:
            controller_port = _free_port(self.host)
        self._port, self._controller_port = port, controller_port
        if not _port_free(self.host, port):
            raise BrokerError(
                f"cannot start Apache Kafka: {self.host}:{port} is already in use",
                retriable=False,
            )
        self._open_log()

        props = self._dir / "server.properties"
        config = self._server_properties(self._dir / "data")
        props.write_text("".join(f"{k}={v}\n" for k, v in config.items()))
        log4j = self._dir / "log4j2.properties"
        log4j.write_text(_LOG4J2)
        cp = os.pathsep.join(classpath)
        jvm = [
            java,
            "-Xms64m",
            f"-Xmx{self._heap}",
            "-XX:+UseSerialGC",
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={log4j}",
            *self._jvm_options,
            "-cp",
            cp,
        ]

        # 1. KRaft storage: this node is the only voter of its metadata quorum.
        fmt = [
            *jvm,
            "kafka.tools.StorageTool",
            "format",
            "--standalone",
            "--cluster-id",
            _cluster_id(),
            "--config",
            str(props),
        ]
        logger.info("formatting Apache Kafka storage in %s", self._dir)
        try:
            done = subprocess.run(
                fmt,
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                timeout=self._startup_timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            self._fail(f"did not format its storage within {self._startup_timeout:.0f}s")
        if done.returncode != 0:
            self._fail(f"could not format its storage (exit code {done.returncode})")

        # 2. The broker+controller.
        cmd = [*jvm, "kafka.Kafka", str(props)]
        logger.info("starting Apache Kafka %s on %s", self.kafka_version, f"{self.host}:{port}")
        self._spawn(cmd)
        assert self._proc is not None
        (self._dir / "pids").write_text(f"{os.getpid()}\n{self._proc.pid}\n")
        return self._ready()

    def _describe(self) -> str:
        return f"Apache Kafka {self.kafka_version}"

    def _cleanup(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        self._controller_port = None


def main(argv: list[str] | None = None) -> int:
    """``python -m audiences.adapters.kafka.apache``: resolve and cache the classpath now.

    CI runs it before the tests so that a Maven failure shows as a failure
    rather than as skipped tests. Prints the classpath file's jar count.
    """
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m audiences.adapters.kafka.apache",
        description="Check Java and resolve (and cache) Apache Kafka's classpath with Maven.",
    )
    parser.add_argument("--kafka-version", default=None, help="default: the pom's")
    parser.add_argument("--refresh", action="store_true", help="run Maven even if cached")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        java = check_java()
        version = args.kafka_version or default_kafka_version()
        entries = resolve_classpath(version, refresh=args.refresh)
    except BrokerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"Apache Kafka {version}: {len(entries)} jars, Java {java_major_version(java)} ({java})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
