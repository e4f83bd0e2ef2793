"""Black-box helpers of the fault suite (test_faults.py, test_poison.py, test_routing.py;
`slow_worker_env` also for test_worker_crash.py and test_rebalance.py).

They drive whole `audiences worker` processes and look at them only from outside:
Kafka topics (what is produced to `events`, what comes out on `audience-events`,
`events-dlq` and the state changelog `{app_id}-users-changelog`), the worker's HTTP
endpoints (`/healthz`, `/readyz`, `/metrics`), its log file and the CLI. Nothing here
imports the runtime (`audiences.adapters.stream`, `audiences.adapters.state`): what a
run should produce is computed with the pure core (`audiences.core`) alone, so these
tests hold whatever shape the runtime takes.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from prometheus_client.parser import text_string_to_metric_families

from audiences.adapters.settings import Settings
from shared import pure_outputs, wait_for

ENTERED, EXITED = "Audience Entered", "Audience Exited"


SLOW_WORKER = Path(__file__).parent / "slow_worker"  # sitecustomize: slower batches


def slow_worker_env(pause_ms: int, while_exists: Path | None = None) -> dict[str, str]:
    """Environment of a worker whose every batch takes `pause_ms` longer (`slow_worker/`,
    a test-only sitecustomize: the product has no such setting); with `while_exists`,
    only while that file exists. A test whose fault must land mid-stream bounds the
    worker's speed this way instead of racing it."""
    env = {
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(SLOW_WORKER), os.environ.get("PYTHONPATH")])
        ),
        "AUDIENCES_TEST_BATCH_PAUSE_MS": str(pause_ms),
    }
    if while_exists is not None:
        env["AUDIENCES_TEST_BATCH_PAUSE_WHILE"] = str(while_exists)
    return env


def session_timeout_ms(kafka_flavor: str) -> int:
    """Consumer-group session of the workers under test. Every restart waits for the
    dead member's session to expire and for a join (~half a session on the embedded
    broker): 2 s sessions keep 20 restarts affordable there. Apache Kafka refuses
    sessions under its `group.min.session.timeout.ms`: 6 s by default, 1 s on the
    `ApacheKafka` the tests start."""
    return 2000 if kafka_flavor in ("embedded", "apache") else 6000


# -- topics -------------------------------------------------------------------------------


def create_topics(settings: Settings) -> None:
    """The topics SPEC §1 names, with `settings.partitions` partitions (definitions: one,
    compacted), created before anything refers to them (the embedded broker would
    auto-create them with 4). Internal topics are the worker's business."""
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    n = settings.partitions
    wanted = [
        NewTopic(settings.events_topic, n, 1),
        NewTopic(settings.audience_events_topic, n, 1),
        NewTopic(settings.events_dlq_topic, n, 1),
        NewTopic(settings.audience_events_dlq_topic, n, 1),
        NewTopic(settings.definitions_topic, 1, 1, config={"cleanup.policy": "compact"}),
    ]
    for future in admin.create_topics(wanted, operation_timeout=10).values():
        future.result()


def apply_definitions_cli(settings: Settings, docs: list[dict[str, Any]], work: Path) -> None:
    """`audiences apply -f FILE`, as a user does it."""
    path = work / f"definitions-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(docs))
    result = subprocess.run(
        [sys.executable, "-m", "audiences", "apply", "-f", str(path)],
        env={**os.environ, **settings_env(settings)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"audiences apply failed: {result.stdout}{result.stderr}"


def settings_env(settings: Settings) -> dict[str, str]:
    """The `AUDIENCES_*` variables (SPEC §10) naming this test's broker, topics and state."""
    s = settings
    return {
        "AUDIENCES_KAFKA_BOOTSTRAP": s.kafka_bootstrap,
        "AUDIENCES_APP_ID": s.app_id,
        "AUDIENCES_EVENTS_TOPIC": s.events_topic,
        "AUDIENCES_AUDIENCE_EVENTS_TOPIC": s.audience_events_topic,
        "AUDIENCES_DEFINITIONS_TOPIC": s.definitions_topic,
        "AUDIENCES_EVENTS_DLQ_TOPIC": s.events_dlq_topic,
        "AUDIENCES_AUDIENCE_EVENTS_DLQ_TOPIC": s.audience_events_dlq_topic,
        "AUDIENCES_PARTITIONS": str(s.partitions),
        "AUDIENCES_DATA_DIR": s.data_dir,
        "AUDIENCES_SPACE_ID": s.space_id,  # outputs' context.personas, as the pure core's
        # the management API: tokens (none = open, on loopback only) and the bind address
        "AUDIENCES_API_TOKENS": s.api_tokens,
        "AUDIENCES_WEB_HOST": s.web_host,
    }


def changelog_topic(settings: Settings) -> str:
    """The state changelog, named by the README ("How it works")."""
    return f"{settings.app_id}-users-changelog"


# -- producing ----------------------------------------------------------------------------


@dataclass
class Sent:
    """One record produced to `events`, with where it landed."""

    key: bytes | None
    value: bytes
    event: dict[str, Any] | None  # None for raw bytes that are not a JSON object
    partition: int = -1
    offset: int = -1


class EventProducer:
    """Produces to `events`. `partitioner=None` keeps librdkafka's default
    (`consistent_random`: CRC32 of the key); the default here is `murmur2_random`, the
    Java client's partitioner that the README asks producers to use."""

    def __init__(self, settings: Settings, partitioner: str | None = "murmur2_random") -> None:
        config: dict[str, Any] = {"bootstrap.servers": settings.kafka_bootstrap, "linger.ms": 20}
        if partitioner is not None:
            config["partitioner"] = partitioner
        self.topic = settings.events_topic
        self._producer = Producer(config)
        self._pending: list[Sent] = []
        self._errors: list[str] = []

    def send(
        self,
        event: dict[str, Any] | bytes,
        key: bytes | None = None,
        *,
        partition: int | None = None,
    ) -> Sent:
        """Queue one record; its key is userId else anonymousId unless given."""
        if isinstance(event, bytes):
            sent = Sent(key, event, None)
        else:
            if key is None:
                key = str(event.get("userId") or event.get("anonymousId")).encode()
            sent = Sent(key, json.dumps(event).encode(), event)

        def delivered(err: Any, msg: Message) -> None:
            if err is not None:
                self._errors.append(str(err))
            else:
                sent.partition, sent.offset = msg.partition(), msg.offset()

        extra = {} if partition is None else {"partition": partition}
        self._producer.produce(
            self.topic, key=sent.key, value=sent.value, on_delivery=delivered, **extra
        )
        self._producer.poll(0)
        self._pending.append(sent)
        return sent

    def send_all(self, events: Iterable[dict[str, Any]]) -> list[Sent]:
        sent = [self.send(event) for event in events]
        self.flush()
        return sent

    def flush(self) -> list[Sent]:
        """Wait until every queued record is acknowledged; returns them."""
        assert self._producer.flush(60) == 0, "events not acknowledged by Kafka"
        assert not self._errors, self._errors
        done, self._pending = self._pending, []
        assert all(s.offset >= 0 for s in done)
        return done


# -- reading ------------------------------------------------------------------------------


class TopicReader:
    """Every partition of a topic from the beginning, without a consumer group
    (`assign`); `poll` returns what arrived since the last call."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.topic = topic
        self.records: list[Message] = []
        self._consumer = Consumer(
            {
                "bootstrap.servers": settings.kafka_bootstrap,
                "group.id": f"fault-suite-reader-{topic}",
                "enable.auto.commit": False,
                "enable.partition.eof": False,
                # the embedded broker answers a fetch only when this expires
                "fetch.wait.max.ms": 20,
            }
        )
        partitions = self._consumer.list_topics(topic, timeout=10).topics[topic].partitions
        self._consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])

    def poll(self, timeout: float = 0.1) -> list[Message]:
        fresh = [m for m in self._consumer.consume(1000, timeout) if m.error() is None]
        self.records.extend(fresh)
        self._received(fresh)
        return fresh

    def _received(self, messages: list[Message]) -> None:
        pass

    def settle(
        self,
        quiet_s: float = 1.0,
        timeout: float = 30.0,
        where: Callable[[Message], bool] | None = None,
    ) -> None:
        """Read until nothing new (that satisfies `where`) arrived for `quiet_s`: what was
        already written, e.g. by a process just stopped, is then in."""
        deadline = time.monotonic() + timeout
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < quiet_s and time.monotonic() < deadline:
            fresh = self.poll(0.1)
            if any(where is None or where(m) for m in fresh):
                quiet_since = time.monotonic()

    def close(self) -> None:
        self._consumer.close()


class OutputLog(TopicReader):
    """`audience-events` as a list of decoded outputs, in the order read (per
    partition: topic order, so per user: emission order)."""

    def __init__(self, settings: Settings) -> None:
        self.outputs: list[dict[str, Any]] = []
        self.ids: set[str] = set()
        self.undecodable: list[bytes] = []
        super().__init__(settings, settings.audience_events_topic)

    def _received(self, messages: list[Message]) -> None:
        for msg in messages:
            try:
                out = orjson.loads(msg.value())
            except orjson.JSONDecodeError:  # SPEC §5: outputs are Segment JSON messages
                self.undecodable.append(msg.value())
                continue
            self.outputs.append(out)
            self.ids.add(out["messageId"])

    def wait_for_ids(
        self,
        want: set[str],
        timeout: float,
        quiet_s: float = 2.0,
        alive: Callable[[], bool] | None = None,
    ) -> None:
        """Read until every id in `want` arrived and then nothing for `quiet_s` (so that
        outputs that should not exist have their chance to show up); returns at the
        timeout, or once `alive` says the writer died, without failing: the caller's
        checks say what is missing and why."""
        deadline = time.monotonic() + timeout
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            if self.poll(0.1):
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= quiet_s and (
                want <= self.ids or (alive is not None and not alive())
            ):
                return

    def wait_for_growth(
        self,
        count: int,
        timeout: float,
        alive: Callable[[], bool],
        where: Callable[[dict[str, Any]], bool] | None = None,
    ) -> None:
        """Read until `count` more outputs (that satisfy `where`) arrived, or the writer died."""

        def counted() -> int:
            return sum(1 for o in self.outputs if where is None or where(o))

        target = counted() + count
        deadline = time.monotonic() + timeout
        while counted() < target:
            if time.monotonic() > deadline:  # a wait that gives up, as shared.wait_for does
                raise TimeoutError(f"outputs did not grow by {count} within {timeout}s")
            if not alive():
                return
            self.poll(0.02)

    def of(self, profile: str) -> list[dict[str, Any]]:
        return [o for o in self.outputs if profile_of(o) == profile]


@dataclass
class DeadLetter:
    key: bytes | None
    value: bytes | None
    headers: dict[str, str]

    @property
    def source(self) -> tuple[int, int]:
        """(source_partition, source_offset) of the dead-lettered `events` record."""
        return int(self.headers["source_partition"]), int(self.headers["source_offset"])


class DeadLetterLog(TopicReader):
    def __init__(self, settings: Settings) -> None:
        self.letters: list[DeadLetter] = []
        super().__init__(settings, settings.events_dlq_topic)

    def _received(self, messages: list[Message]) -> None:
        for msg in messages:
            headers = {
                name: (value or b"").decode("utf-8", "replace")
                for name, value in (msg.headers() or [])
            }
            self.letters.append(DeadLetter(msg.key(), msg.value(), headers))

    def by_source(self) -> dict[tuple[int, int], DeadLetter]:
        return {letter.source: letter for letter in self.letters}


class Announcements(TopicReader):
    """README "HTTP API": every worker announces its URL and partitions on the compacted
    `{app_id}-workers` topic after every rebalance (a tombstone when it stops cleanly).
    Create it once a worker has created the topic (the embedded broker would auto-create
    it with 4 partitions)."""

    def __init__(self, settings: Settings) -> None:
        self.latest: dict[bytes, dict[str, Any]] = {}  # announcer -> its last announcement
        super().__init__(settings, f"{settings.app_id}-workers")

    def _received(self, messages: list[Message]) -> None:
        for msg in messages:
            key, value = msg.key() or b"", msg.value()
            if value is None:
                self.latest.pop(key, None)
            else:
                self.latest[key] = orjson.loads(value)

    def partitions_of(self, worker: WorkerHandle) -> set[int]:
        """What `worker` (known by its web port) last announced."""
        self.poll(0.05)
        held: set[int] = set()
        for record in self.latest.values():
            if str(record.get("url", "")).endswith(f":{worker.port}"):
                held |= set(record.get("partitions") or ())
        return held


def two_workers_sharing(
    make: Callable[..., WorkerHandle],
    announcements: Callable[[], Announcements],
    second_data_dir: Path,
    **env: str,
) -> tuple[list[WorkerHandle], Announcements]:
    """Two started workers (the second with its own data dir), both ready and both holding
    partitions, busiest first; and the announcements they were read from."""
    workers = [make(**env).start(), make(str(second_data_dir), **env).start()]
    for worker in workers:
        worker.wait_ready()
    owners = announcements()
    wait_for(
        lambda: all(owners.partitions_of(w) for w in workers), 60, "both workers hold partitions"
    )
    return sorted(workers, key=lambda w: -len(owners.partitions_of(w))), owners


def read_whole_topic(settings: Settings, topic: str, timeout: float = 30.0) -> list[Message]:
    """Every record of `topic` currently written (read until quiet, never trusting the
    embedded broker's high watermark)."""
    reader = TopicReader(settings, topic)
    try:
        reader.settle(quiet_s=1.5, timeout=timeout)
        return list(reader.records)
    finally:
        reader.close()


# -- the pure core's answer -----------------------------------------------------------------


def profile_of(out: dict[str, Any]) -> str:
    return str(out.get("userId") or out.get("anonymousId"))


expected_outputs = pure_outputs  # the pure core's answer (tests/shared.py)


def _comparable(out: dict[str, Any]) -> dict[str, Any]:
    """An output without the parts the runtime may add (e.g. `context.personas`):
    everything but `context`, plus `context.traits` (email/phone, SPEC §4)."""
    return {
        **{k: v for k, v in out.items() if k != "context"},
        "context.traits": (out.get("context") or {}).get("traits"),
    }


def _brief(out: dict[str, Any]) -> str:
    props = out.get("properties") or {}
    what = props.get("audience_key") or props.get("trait_key")
    return f"{profile_of(out)[:40]!r} {what} {out.get('event')} {out.get('timestamp')}"


def check_transitions(
    seen: list[dict[str, Any]],
    expected: dict[str, dict[str, Any]],
    *,
    exactly_once: bool = False,
) -> dict[str, dict[str, Any]]:
    """The outcome check of the fault suite (the one of test_worker_crash.py):
    - a messageId seen twice carries identical content (no id reused for other content);
    - with `exactly_once`, no messageId is seen twice;
    - the distinct messageIds are exactly the expected ones, with the expected content;
    - per profile and audience, the first occurrences alternate Entered/Exited,
      starting with Entered (SPEC §5: delivered in order).
    Returns messageId -> output."""
    by_id: dict[str, dict[str, Any]] = {}
    for out in seen:
        first = by_id.setdefault(out["messageId"], out)
        assert out == first, f"messageId reused for other content:\n{first}\n{out}"
    if exactly_once:
        repeated = {m: n for m, n in Counter(o["messageId"] for o in seen).items() if n > 1}
        assert not repeated, (
            f"{len(repeated)} outputs emitted more than once, e.g. "
            f"{[(_brief(by_id[m]), n) for m, n in list(repeated.items())[:5]]}"
        )
    missing = sorted(set(expected) - set(by_id))
    unexpected = sorted(set(by_id) - set(expected))
    assert not missing and not unexpected, (
        f"{len(missing)} expected outputs missing, e.g. {[_brief(expected[m]) for m in missing[:8]]}; "
        f"{len(unexpected)} unexpected, e.g. {[_brief(by_id[m]) for m in unexpected[:8]]} "
        f"({len(expected)} expected, {len(by_id)} distinct seen)"
    )
    for message_id, out in expected.items():
        assert _comparable(by_id[message_id]) == _comparable(out), (
            f"content differs from the pure core's:\n{by_id[message_id]}\n{out}"
        )
    check_alternation(seen)
    return by_id


@contextlib.contextmanager
def diagnosed(*workers: WorkerHandle, note: str = "") -> Iterator[None]:
    """Append `note` and what the workers say about themselves to an assertion failing
    (or a wait giving up) inside."""
    try:
        yield
    except (AssertionError, TimeoutError) as exc:
        notes = "\n".join(w.diagnosis() for w in workers)
        raise AssertionError(f"{exc}\n{note}\n--- workers:\n{notes}") from None


def check_alternation(seen: list[dict[str, Any]]) -> None:
    """Per profile and audience, first occurrences alternate Entered/Exited from Entered."""
    firsts: dict[str, dict[str, Any]] = {}
    for out in seen:
        firsts.setdefault(out["messageId"], out)
    order: dict[tuple[str, str], list[bool]] = {}
    for out in firsts.values():
        if out["event"] in (ENTERED, EXITED):
            key = (profile_of(out), out["properties"]["audience_key"])
            order.setdefault(key, []).append(out["event"] == ENTERED)
    for (profile, audience), flags in order.items():
        assert flags[0] and all(a != b for a, b in itertools.pairwise(flags)), (
            f"{profile!r} in {audience}: transitions do not alternate from Entered: {flags}"
        )


# -- the worker process from outside ----------------------------------------------------------


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, str]:
    """(status, body) of GET http://127.0.0.1:port/path; (0, error) if nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        return 0, str(exc)


def metric_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample called `name` (e.g. `audiences_events_in_total`)."""
    return [
        (dict(sample.labels), float(sample.value))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


@dataclass
class WorkerHandle:
    """One `audiences worker` process: its environment, web port and log file."""

    settings: Settings
    log_path: Path
    port: int
    extra_env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerHandle:
        env = {
            **os.environ,
            **settings_env(self.settings),
            "AUDIENCES_WEB_PORT": str(self.port),
            "AUDIENCES_TICK_INTERVAL_MS": "20",
            **self.extra_env,
        }
        with open(self.log_path, "ab") as log:
            log.write(f"--- fault suite: worker started {time.time():.3f}\n".encode())
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "audiences", "worker"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Until `/readyz` answers 200 (SPEC §8: partitions assigned, tables recovered)."""

        def ready() -> bool:
            assert self.alive(), f"worker exited ({self.exit_code()}):\n{self.log_tail()}"
            return http_get(self.port, "/readyz", timeout=1)[0] == 200

        try:
            wait_for(ready, timeout, "worker ready")
        except TimeoutError:
            raise AssertionError(f"worker not ready after {timeout}s:\n{self.log_tail()}") from None

    def healthz(self) -> int:
        return http_get(self.port, "/healthz")[0]

    def metrics(self) -> str:
        status, body = http_get(self.port, "/metrics")
        assert status == 200, f"/metrics answered {status}: {body[:200]}"
        return body

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples `name` whose labels include `labels`."""
        return sum(
            value
            for sample_labels, value in metric_samples(self.metrics(), name)
            if labels.items() <= sample_labels.items()
        )

    def diagnosis(self) -> str:
        """What the worker says about itself (for failure messages): alive, consumer lag and
        events evaluated per /metrics (README), the first error of its log."""
        if not self.alive():
            return f"worker :{self.port} exited ({self.exit_code()}):\n{self.log_tail()}"
        try:
            text = self.metrics()
        except AssertionError as exc:
            return f"worker :{self.port}: {exc}"
        lag = {
            labels.get("partition"): value
            for labels, value in metric_samples(text, "audiences_consumer_lag")
        }
        evaluated = sum(v for _, v in metric_samples(text, "audiences_events_in_total"))
        return (
            f"worker :{self.port} alive, consumer lag {lag}, {evaluated:.0f} events evaluated; "
            f"log:\n{self.log_tail(12)}"
        )

    def assert_healthy(self, when: str) -> None:
        assert self.alive(), f"worker died {when} ({self.exit_code()}):\n{self.log_tail()}"
        assert self.healthz() == 200, f"/healthz not 200 {when}:\n{self.log_tail()}"

    def kill(self) -> None:
        """kill -9."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 30.0) -> int | None:
        """SIGTERM; the exit code, or None if it had to be killed after `timeout`."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 25) -> str:
        """The first error the log reports (with what follows), else its last lines."""
        text = self.log_text().splitlines()
        for n, line in enumerate(text):
            if " ERROR " in line or " CRITICAL " in line:
                return "\n".join(text[n : n + lines])
        return "\n".join(text[-lines:])
