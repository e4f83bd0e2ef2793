"""`audiences bench`: events/s of this engine and of a stock Faust agent + Table, in one run.

Both process the same pre-produced input topic on the same broker and the same
machine, with the same audience definitions (SPEC §11, DESIGN.md "the hot
path"):

1. Broker: `AUDIENCES_KAFKA_BOOTSTRAP` if set, else an embedded broker for the run.
2. Workload: `audiences` definitions generated from templates (performed with
   times/within and where, sequence with then_not/then + match_on, trait,
   in_audience, not/all/any; windows of hours and days) and `events` Segment
   events (~200 bytes of JSON: identify with plan/email, Product Viewed,
   Product Added and Checkout Started with a cart_id, Order Completed with
   revenue) of `users` shoppers, in shopping sessions spread over a week from a
   fixed base time, from a fixed seed. They are produced to a fresh topic
   keyed by user before anything is timed; the producer's delivery reports
   give each partition's end offset (the embedded broker's high watermark is
   wrong after multi-record batches, see `adapters/kafka/embedded.py`).
3. Engine: the real `Evaluator` loop in a thread, with fresh topics, app id and
   data directory; timed from the first batch consumed until every
   partition's position reaches its end offset. Its clock is pinned to the
   workload's base time, so deadline sweeps find nothing due: both contenders
   do exactly the event-driven work and must emit the same transitions.
4. Faust: `audiences.tools.bench.faust_table` as a worker subprocess (own app id, consumer
   group and table changelog), timed inside the worker from the first event
   processed to the last.

Production time is never part of a measurement. Nothing here asserts speed.
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Message, Producer

from audiences import core_build
from audiences.adapters.kafka.clients import KafkaClients
from audiences.adapters.kafka.topics import Topics, ensure_topics
from audiences.adapters.settings import Settings
from audiences.adapters.stream.emitter import Rendered
from audiences.adapters.stream.runtime import Runtime
from audiences.core.definitions import build_catalog, check_references, validate_definition
from audiences.core.evaluator import Output
from audiences.core.events import format_iso
from audiences.errors import AudiencesError, BrokerError
from audiences.tools.bench.isolation import isolated_settings

BASE_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z: events start here
SEED = 20_260_101
SECOND, MINUTE, HOUR, DAY = 1_000, 60_000, 3_600_000, 86_400_000
SPAN_MS = 7 * DAY  # sessions start within a week
STALL_S = 90.0  # no progress for this long = the contender is stuck
STARTUP_S = 180.0  # Faust worker: start, join the group, recover tables

PRODUCTS = [f"sku-{n:04d}" for n in range(500)]
CATEGORIES = ["shoes", "outerwear", "bags", "watches", "audio", "home", "kitchen", "outdoor"]
PRICES = [9, 19, 29, 49, 79, 99, 149, 199, 299, 499]
CONTEXT = {"library": {"name": "analytics.js", "version": "5.2.0"}}

# -- workload -----------------------------------------------------------------------------

TEMPLATES = (
    "window_shoppers",
    "cart_abandoners",
    "big_spenders",
    "pro_plan",
    "loyal_pros",
    "browsing_not_buying",
    "checkout_funnel",
    "engaged",
)


def _condition(kind: str, r: int) -> dict[str, Any]:
    """Condition of template `kind` in round `r` (rounds vary thresholds and windows).

    Templates that use `in_audience` refer to audiences of the same round that
    come earlier in TEMPLATES, so they always exist.
    """
    if kind == "window_shoppers":
        return {
            "performed": {
                "event": "Product Viewed",
                "times": {"gte": (3, 6, 10)[r % 3]},
                "within": ("1h", "1d", "7d")[r % 3],
            }
        }
    if kind == "cart_abandoners":
        return {
            "sequence": {
                "steps": [{"event": "Checkout Started"}],
                "then_not": {"event": "Order Completed", "within": f"{2 + r}h"},
                "match_on": "properties.cart_id",
                "active_for": "7d",
            }
        }
    if kind == "big_spenders":
        return {
            "performed": {
                "event": "Order Completed",
                "where": [{"property": "revenue", "op": "gte", "value": 50 * (1 + r)}],
                "within": f"{7 * (1 + r)}d",
            }
        }
    if kind == "pro_plan":
        if r == 0:
            return {"trait": {"name": "plan", "op": "eq", "value": "pro"}}
        return {
            "all": [
                {"trait": {"name": "plan", "op": "in", "value": ["pro", "team"]}},
                {"trait": {"name": "email", "op": "exists"}},
            ]
        }
    if kind == "loyal_pros":
        return {"all": [{"in_audience": f"big_spenders_{r}"}, {"in_audience": f"pro_plan_{r}"}]}
    if kind == "browsing_not_buying":
        return {
            "all": [
                {
                    "performed": {
                        "event": "Product Viewed",
                        "times": {"gte": 4},
                        "within": f"{3 * (1 + r)}d",
                    }
                },
                {"not": {"performed": {"event": "Order Completed", "within": f"{14 * (1 + r)}d"}}},
            ]
        }
    if kind == "checkout_funnel":
        return {
            "sequence": {
                "steps": [
                    {"event": "Product Added"},
                    {"event": "Checkout Started", "within": "1h"},
                ],
                "then": {"event": "Order Completed", "within": f"{2 + r}h"},
                "match_on": "properties.cart_id",
                "active_for": "3d",
            }
        }
    if kind == "engaged":
        return {
            "any": [
                {
                    "performed": {
                        "event": "Product Added",
                        "times": {"gte": 2},
                        "within": f"{7 * (1 + r)}d",
                    }
                },
                {"in_audience": f"big_spenders_{r}"},
                {
                    "all": [
                        {"trait": {"name": "plan", "op": "eq", "value": "free"}},
                        {"performed": {"event": "Checkout Started", "within": f"{1 + r}d"}},
                    ]
                },
            ]
        }
    raise ValueError(kind)


def make_definitions(count: int) -> list[dict[str, Any]]:
    """`count` validated definitions, cycling through TEMPLATES with growing windows."""
    docs: list[dict[str, Any]] = []
    for index in range(count):
        kind = TEMPLATES[index % len(TEMPLATES)]
        r = index // len(TEMPLATES)
        key = f"{kind}_{r}"
        doc = validate_definition(
            {
                "key": key,
                "name": f"{kind.replace('_', ' ').capitalize()} #{r}",
                "condition": _condition(kind, r),
            }
        )
        check_references(doc, {d["key"]: d for d in docs})
        docs.append(doc)
    catalog = build_catalog({d["key"]: (d, 1) for d in docs})
    if catalog.skipped:
        raise AudiencesError(f"bench definitions not evaluable: {catalog.skipped}")
    return docs


def make_events(count: int, users: int, seed: int = SEED) -> list[tuple[bytes, bytes]]:
    """(key, JSON value) of `count` Segment events of `users` shoppers, in time order."""
    rng = random.Random(seed)
    carts: dict[int, str] = {}
    rows: list[tuple[int, int, str, dict[str, Any]]] = []  # (ms, user, kind, fields)

    def add(at: int, user: int, kind: str, fields: dict[str, Any]) -> None:
        rows.append((at, user, kind, fields))

    while len(rows) < count:
        user = rng.randrange(users)
        t = BASE_MS + rng.randrange(SPAN_MS)
        if rng.random() < 0.25:
            traits = {
                "plan": rng.choice(("free", "free", "free", "pro", "team")),
                "email": f"user{user}@example.com",
            }
            add(t, user, "identify", {"traits": traits})
        for _ in range(rng.randint(1, 5)):
            t += rng.randint(10, 300) * SECOND
            product = rng.choice(PRODUCTS)
            add(
                t,
                user,
                "Product Viewed",
                {"product_id": product, "category": rng.choice(CATEGORIES)},
            )
        if rng.random() < 0.5:
            cart = carts.get(user)
            if cart is None:
                cart = carts[user] = f"cart-{user}-{rng.randrange(1_000_000)}"
            price = rng.choice(PRICES)
            t += rng.randint(10, 600) * SECOND
            add(t, user, "Product Added", {"cart_id": cart, "product_id": rng.choice(PRODUCTS)})
            if rng.random() < 0.6:
                t += rng.randint(1, 30) * MINUTE
                add(t, user, "Checkout Started", {"cart_id": cart, "revenue": price})
                if rng.random() < 0.55:
                    t += rng.randint(2, 240) * MINUTE  # some orders come after the window
                    add(t, user, "Order Completed", {"cart_id": cart, "revenue": price})
                    del carts[user]
    del rows[count:]
    rows.sort(key=lambda row: row[0])
    out: list[tuple[bytes, bytes]] = []
    for seq, (at, user, kind, fields) in enumerate(rows):
        user_id = f"user-{user:07d}"
        body: dict[str, Any]
        if kind == "identify":
            body = {"type": "identify", "userId": user_id, **fields}
        else:
            body = {"type": "track", "event": kind, "userId": user_id, "properties": fields}
        body["messageId"] = f"bench-{seq:09d}"
        body["timestamp"] = format_iso(at)
        body["context"] = CONTEXT
        out.append((user_id.encode(), orjson.dumps(body)))
    return out


# -- progress -----------------------------------------------------------------------------


class _Progress:
    """A one-line progress bar on stderr (\\r-updated, at most ~10 times a second)."""

    def __init__(self, label: str, total: int) -> None:
        self.label = label
        self.total = max(1, total)
        self._shown = -1.0
        self._done = -1
        self._live = sys.stderr.isatty()  # redirected: only the final line

    def update(self, done: int, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and (not self._live or done == self._done or now - self._shown < 0.1):
            return
        self._shown, self._done = now, done
        share = min(1.0, done / self.total)
        bar = "#" * int(share * 30)
        sys.stderr.write(f"\r  {self.label:<24} [{bar:<30}] {share:6.1%} {done:>10,}")
        sys.stderr.flush()

    def finish(self, note: str = "") -> None:
        self.update(self.total, force=True)
        sys.stderr.write(f"  {note}\n")
        sys.stderr.flush()


# -- broker -------------------------------------------------------------------------------


def _create_topics(settings: Settings, names: list[str], partitions: int) -> None:
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.cimpl import NewTopic

    admin = AdminClient(settings.kafka_config())
    futures = admin.create_topics(
        [NewTopic(name, partitions, 1) for name in names], operation_timeout=10
    )
    for name, future in futures.items():
        try:
            future.result()
        except Exception as exc:
            raise BrokerError(f"cannot create topic {name}: {exc}", retriable=True) from exc


def _delete_topics(settings: Settings, prefix: str) -> None:
    """Best effort: remove this run's topics from an external broker."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(settings.kafka_config())
    with contextlib.suppress(Exception):
        names = [t for t in admin.list_topics(timeout=10).topics if t.startswith(prefix)]
        if names:
            for future in admin.delete_topics(names, operation_timeout=10).values():
                with contextlib.suppress(Exception):
                    future.result()


def produce_events(
    settings: Settings, topic: str, records: list[tuple[bytes, bytes]]
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

    progress = _Progress("producing events", len(records))
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
    if errors or acked != len(records):
        raise BrokerError(
            f"producing the workload failed: {errors[:3] or f'{acked}/{len(records)} acked'}",
            retriable=True,
        )
    progress.finish()
    return ends


# -- contenders ---------------------------------------------------------------------------


@dataclass
class Measurement:
    events: int
    elapsed_s: float
    transitions: int
    rss_mb: float | None  # engine: peak RSS growth of this process; Faust: worker peak RSS
    checkpoints: int | None = None  # engine only
    checkpoint_mean_ms: float | None = None

    @property
    def events_per_s(self) -> float:
        return self.events / self.elapsed_s if self.elapsed_s > 0 else 0.0


class _TimedRuntime(Runtime):
    """The real runtime, with a stopwatch: first batch consumed -> every end offset reached
    and checkpointed (outputs acknowledged, state durable)."""

    def __init__(
        self, settings: Settings, topics: Topics, clock: Callable[[], int], ends: dict[int, int]
    ) -> None:
        super().__init__(settings, topics, KafkaClients(settings), clock=clock)
        self.ends = ends
        self.first_s: float | None = None
        self.done_s: float | None = None
        self.done = threading.Event()
        self.transitions = 0
        self.checkpoints = 0
        self.checkpoint_s = 0.0
        send = self.emitter.send

        def counting_send(rendered: Rendered, outputs: list[Output]) -> None:
            self.transitions += len(outputs)
            send(rendered, outputs)

        self.emitter.send = counting_send  # type: ignore[method-assign]

    def _process(self, messages: list[Message]) -> None:
        if self.first_s is None:
            self.first_s = time.perf_counter()
        super()._process(messages)

    def _checkpoint(self) -> None:
        started = time.perf_counter()
        super()._checkpoint()
        if self.first_s is not None and self.done_s is None:
            self.checkpoints += 1
            self.checkpoint_s += time.perf_counter() - started
        if self.done_s is None and self.first_s is not None and self.reached_end():
            self.done_s = time.perf_counter()
            self.done.set()

    def position_total(self) -> int:
        return sum(p.position for p in list(self.partitions.values()))

    def reached_end(self) -> bool:
        partitions = self.partitions
        return all(
            (p := partitions.get(number)) is not None and p.position >= end
            for number, end in self.ends.items()
        )


def measure_engine(
    base: Settings,
    run: str,
    input_topic: str,
    ends: dict[int, int],
    definitions: list[dict[str, Any]],
    data_dir: Path,
) -> Measurement:
    from audiences.adapters.stream.definitions import apply_definitions

    settings = isolated_settings(base, f"{run}-engine", input_topic, len(ends), data_dir)
    topics = Topics.from_settings(settings)
    ensure_topics(settings, topics)
    apply_definitions(settings, topics, definitions)
    total = sum(ends.values())
    rss_before = _maxrss_mb()
    evaluator = _TimedRuntime(settings, topics, lambda: BASE_MS, ends)
    thread = threading.Thread(target=evaluator.run, name="bench-evaluator", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + STARTUP_S
        while not evaluator.ready.wait(0.1):
            if not thread.is_alive() or time.monotonic() > deadline:
                raise AudiencesError(f"the evaluator did not start: {evaluator.failed!r}")
        progress = _Progress("this engine", total)
        last, last_change = -1, time.monotonic()
        while not evaluator.done.wait(0.1):
            if not thread.is_alive():
                raise AudiencesError(f"the evaluator stopped: {evaluator.failed!r}")
            done = evaluator.position_total()
            progress.update(done)
            if done != last:
                last, last_change = done, time.monotonic()
            elif time.monotonic() - last_change > STALL_S:
                raise AudiencesError(f"the evaluator made no progress at {done}/{total} events")
        assert evaluator.first_s is not None and evaluator.done_s is not None
        elapsed = evaluator.done_s - evaluator.first_s
        progress.finish(f"{elapsed:.2f}s")
        return Measurement(
            events=total,
            elapsed_s=elapsed,
            transitions=evaluator.transitions,
            rss_mb=max(0.0, _maxrss_mb() - rss_before),
            checkpoints=evaluator.checkpoints,
            checkpoint_mean_ms=round(
                1000 * evaluator.checkpoint_s / max(1, evaluator.checkpoints), 3
            ),
        )
    finally:
        evaluator.stop()
        thread.join(60)


def measure_recovery(
    base: Settings, run: str, input_topic: str, partitions: int, data_dir: Path
) -> dict[str, Any]:
    """Restore the engine's changelog into empty stores, as a worker that lost its disk
    does: keys/s of `recovery.restore` (after a fence and an owner record per partition)."""
    from audiences.adapters.kafka.fence import read_until
    from audiences.adapters.state.checkpoint import ChangelogWriter, owner_record
    from audiences.adapters.state.recovery import restore
    from audiences.adapters.state.store import RocksDictStore

    settings = isolated_settings(base, f"{run}-engine", input_topic, partitions, data_dir)
    topics = Topics.from_settings(settings)
    clients = KafkaClients(settings)
    reader = clients.changelog_reader()
    keys = records = 0
    seconds = 0.0
    try:
        for number in range(partitions):
            writer = ChangelogWriter(
                clients.changelog_producer(number), topics.changelog, number, 30.0
            )
            fence = writer.claim(b"bench", owner_record("bench", "bench", BASE_MS))
            writer.close()
            store = RocksDictStore(data_dir / f"p{number}")
            started = time.perf_counter()
            restored = restore(
                store,
                read_until(reader, topics.changelog, number, fence, 60.0),
                partition=number,
                fence=fence,
                session="bench",
                topic_id=None,
            )
            seconds += time.perf_counter() - started
            keys += restored.keys
            records += restored.records
            store.close()
    finally:
        reader.close()
    return {
        "keys": keys,
        "records": records,
        "seconds": round(seconds, 3),
        "keys_per_s": round(keys / seconds, 1) if seconds > 0 else None,
    }


def measure_faust(
    settings: Settings,
    run: str,
    input_topic: str,
    partitions: int,
    events: int,
    definitions: list[dict[str, Any]],
    work_dir: Path,
) -> Measurement:
    from audiences.tools.bench.faust_table import CONFIG_ENV

    output_topic = f"{run}-faust-audience-events"
    _create_topics(settings, [output_topic], partitions)
    config_path = work_dir / "faust-config.json"
    result_path = work_dir / "faust-result.json"
    progress_path = work_dir / "faust-progress.json"
    log_path = work_dir / "faust-worker.log"
    config = {
        "bootstrap": settings.kafka_bootstrap,
        "app_id": f"{run}-faust",
        "input_topic": input_topic,
        "output_topic": output_topic,
        "partitions": partitions,
        "data_dir": str(work_dir / "faust-data"),
        "definitions": [{**doc, "version": 1} for doc in definitions],
        "expected": events,
        "progress_path": str(progress_path),
        "result_path": str(result_path),
    }
    config_path.write_bytes(orjson.dumps(config))
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "audiences.tools.bench.faust_table", "worker"],
            env={**os.environ, CONFIG_ENV: str(config_path)},
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=work_dir,
        )
        try:
            return _await_faust(proc, events, progress_path, result_path, log_path)
        finally:
            _stop(proc)


def _await_faust(
    proc: subprocess.Popen[bytes], events: int, progress_path: Path, result_path: Path, log: Path
) -> Measurement:
    progress = _Progress("Faust agent + Table", events)
    started = time.monotonic()
    last, last_change = -1, started
    while True:
        if result_path.exists():
            result = orjson.loads(result_path.read_bytes())
            if "error" in result:
                raise AudiencesError(f"the Faust agent failed:\n{result['error']}")
            progress.finish(f"{result['elapsed_s']:.2f}s")
            return Measurement(
                events=int(result["events"]),
                elapsed_s=float(result["elapsed_s"]),
                transitions=int(result["transitions"]),
                rss_mb=float(result["maxrss_kb"]) / 1024,
            )
        if proc.poll() is not None:
            raise AudiencesError(
                f"the Faust worker exited with code {proc.returncode}:\n{_tail(log)}"
            )
        done = -1
        with contextlib.suppress(OSError, orjson.JSONDecodeError):
            done = int(orjson.loads(progress_path.read_bytes())["events"])
        if done >= 0:
            progress.update(done)
        now = time.monotonic()
        if done != last:
            last, last_change = done, now
        limit = STARTUP_S if done < 0 else STALL_S
        if now - last_change > limit:
            what = "did not start processing" if done < 0 else f"stalled at {done}/{events}"
            raise AudiencesError(f"the Faust worker {what}:\n{_tail(log)}")
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


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# -- report -------------------------------------------------------------------------------


def _rate(measurement: Measurement | None) -> float | None:
    return None if measurement is None else round(measurement.events_per_s, 1)


def results(
    params: dict[str, Any], engine: Measurement, faust: Measurement | None
) -> dict[str, Any]:
    engine_rate = _rate(engine)
    faust_rate = _rate(faust)
    ratio = round(engine_rate / faust_rate, 2) if engine_rate and faust_rate else None
    return {
        "engine_events_per_s": engine_rate,
        "faust_table_events_per_s": faust_rate,
        "ratio": ratio,
        **params,
        "engine_elapsed_s": round(engine.elapsed_s, 3),
        "faust_table_elapsed_s": None if faust is None else round(faust.elapsed_s, 3),
        "transitions_per_event": round(engine.transitions / max(1, engine.events), 3),
        "engine_transitions": engine.transitions,
        "faust_table_transitions": None if faust is None else faust.transitions,
        "engine_peak_rss_growth_mb": None if engine.rss_mb is None else round(engine.rss_mb, 1),
        "faust_table_peak_rss_mb": None
        if faust is None or faust.rss_mb is None
        else round(faust.rss_mb, 1),
    }


def render_table(data: dict[str, Any], faust_error: str | None) -> str:
    def num(value: Any, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    lines = [
        f"audiences bench: {data['events']:,} events, {data['users']:,} users, "
        f"{data['audiences']} audiences, {data['partitions']} partitions, "
        f"{data['broker']} broker (produced in {data['produce_s']:.1f}s, not timed), "
        f"core: {core_build().describe()}",
        "",
        f"{'':<24}{'events/s':>12}{'elapsed s':>12}{'transitions':>14}{'RSS MB':>10}",
        f"{'this engine':<24}{num(data['engine_events_per_s'], ',.0f'):>12}"
        f"{num(data['engine_elapsed_s'], '.2f'):>12}{num(data['engine_transitions'], ','):>14}"
        f"{num(data['engine_peak_rss_growth_mb'], '+.0f'):>10}",
        f"{'Faust agent + Table':<24}{num(data['faust_table_events_per_s'], ',.0f'):>12}"
        f"{num(data['faust_table_elapsed_s'], '.2f'):>12}"
        f"{num(data['faust_table_transitions'], ','):>14}"
        f"{num(data['faust_table_peak_rss_mb'], '.0f'):>10}",
        f"{'ratio (engine / Faust)':<24}{num(data['ratio'], '.2f'):>11}x",
        "",
        f"transitions per event: {data['transitions_per_event']:.2f}; RSS: engine = peak "
        "growth of this process, Faust = the worker's peak",
    ]
    recovery = data.get("recovery")
    if recovery is not None:
        lines += [
            f"checkpoints: {num(data.get('engine_checkpoints'), ',')} "
            f"(mean {num(data.get('engine_checkpoint_mean_ms'), '.2f')} ms: outputs acknowledged, "
            "changelog transaction per partition, RocksDB write)",
            f"recovery: {recovery['keys']:,} state keys ({recovery['records']:,} changelog "
            f"records) restored into empty stores in {recovery['seconds']:.2f}s = "
            f"{num(recovery['keys_per_s'], ',.0f')} keys/s",
        ]
    latency = data.get("latency")
    if latency is not None:
        entered, exited = latency["event_to_entered"], latency["deadline_to_exited"]
        lines += [
            "",
            f"latency at {latency['rate_events_per_s']:,.0f} events/s for {latency['seconds']:g} s "
            f"({latency['events']:,} events), read back from audience-events:",
            f"  event -> Audience Entered    p50 {num(entered['p50_ms'], '.1f')} ms   "
            f"p99 {num(entered['p99_ms'], '.1f')} ms   max {num(entered['max_ms'], '.1f')} ms "
            f"({entered['count']:,})",
            f"  deadline -> Audience Exited  p50 {num(exited['p50_ms'], '.1f')} ms   "
            f"p99 {num(exited['p99_ms'], '.1f')} ms   max {num(exited['max_ms'], '.1f')} ms "
            f"({exited['count']:,})",
        ]
    if faust_error is not None:
        lines.append(f"Faust baseline failed: {faust_error.splitlines()[0]}")
    elif (
        data["faust_table_transitions"] is not None
        and data["faust_table_transitions"] != data["engine_transitions"]
    ):
        lines.append("WARNING: the contenders emitted different numbers of transitions")
    return "\n".join(lines)


def run_bench(
    events: int,
    users: int,
    audiences: int,
    partitions: int,
    as_json: bool,
    skip_faust: bool,
    latency: bool = False,
    latency_rate: float | None = None,
    latency_seconds: float = 10.0,
) -> int:
    """Run the benchmark, print the table (and the JSON line); returns the exit code."""
    from audiences.bootstrap import broker_for

    if events < 1 or users < 1 or audiences < 1 or partitions < 1:
        raise SystemExit("error: --events, --users, --audiences and --partitions must be >= 1")
    run = f"bench-{uuid.uuid4().hex[:8]}"
    definitions = make_definitions(audiences)
    print(f"generating {events:,} events of {users:,} users ...", file=sys.stderr)
    records = make_events(events, users)
    configured = Settings.from_env()
    with (
        broker_for(configured) as settings,
        tempfile.TemporaryDirectory(prefix="audiences-bench-") as tmp,
    ):
        work_dir = Path(tmp)
        input_topic = f"{run}-events"
        _create_topics(settings, [input_topic], partitions)
        started = time.monotonic()
        ends = produce_events(settings, input_topic, records)
        produce_s = time.monotonic() - started
        del records
        gc.collect()
        for number in range(partitions):
            ends.setdefault(number, 0)

        engine = measure_engine(
            settings, run, input_topic, ends, definitions, work_dir / "engine-data"
        )
        gc.collect()  # close the runtime's Kafka clients now, not at broker shutdown
        recovery = measure_recovery(
            settings, run, input_topic, partitions, work_dir / "recovery-data"
        )
        gc.collect()
        latencies: dict[str, Any] | None = None
        if latency:
            from audiences.tools.bench.latency import measure_latency

            rate = latency_rate or engine.events_per_s / 2  # half load
            latencies = measure_latency(
                settings, run, partitions, rate, latency_seconds, work_dir / "latency-data"
            )
            gc.collect()
        faust: Measurement | None = None
        faust_error: str | None = None
        if not skip_faust:
            try:
                faust = measure_faust(
                    settings, run, input_topic, partitions, events, definitions, work_dir
                )
            except AudiencesError as exc:
                faust_error = str(exc)
                print(f"\nerror: {faust_error}", file=sys.stderr)
        if configured.kafka_bootstrap:
            _delete_topics(settings, run)

    params = {
        "events": events,
        "users": users,
        "audiences": audiences,
        "partitions": partitions,
        "broker": "external" if configured.kafka_bootstrap else "embedded",
        "produce_s": round(produce_s, 2),
        "batch_size": settings.batch_size,
        "cpus": os.cpu_count(),
        "core": core_build().kind,  # "compiled" (mypyc) | "pure"
    }
    data = results(params, engine, faust)
    data["recovery"] = recovery
    data["engine_checkpoints"] = engine.checkpoints
    data["engine_checkpoint_mean_ms"] = engine.checkpoint_mean_ms
    if latencies is not None:
        data["latency"] = latencies
    print(render_table(data, faust_error))
    if as_json:
        print(orjson.dumps(data).decode())
    sys.stdout.flush()
    return 1 if faust_error is not None else 0
