"""This engine as a bench contender: the real `Runtime` in a worker process of its own.

Run by `audiences bench` (see `contender.py` for the protocol) in one of three
modes, `config["mode"]`:

- `catchup`: the runtime on the pre-filled input topic, with its clock pinned
  to the workload's base time (deadline sweeps find nothing due, so every
  transition is caused by an event and the run is repeatable). Timed from the
  first batch consumed until every partition's position has reached its end
  offset and been checkpointed (outputs acknowledged, changelog and state
  durable, offsets committed). The result adds the transitions emitted, the
  checkpoints and their mean duration, and the profiles held. The worker then
  idles until it is killed (the runner kills it with SIGKILL to measure
  recovery).
- `recover`: the same app id with an empty data directory, as a worker that
  lost its disk: the runtime restores every partition from its changelog when
  the group assigns it. The result holds the keys and records restored, the
  time spent in `restore` (reading the changelog and writing the store; partitions
  restore side by side, so the time their restores cover together) and
  the time from start to ready (group join included), then the worker exits.
- `serve`: the runtime on the wall clock (real deadlines) for the latency
  phase: writes progress 0 once it is ready and runs until SIGTERM.

The bench drives the runtime; it never changes it: the stopwatch is a
subclass that wraps `_process` and `_landed`, and recovery is timed by
wrapping the `restore` function the runtime calls.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from confluent_kafka import Message

from audiences.adapters.kafka.clients import KafkaClients
from audiences.adapters.kafka.topics import Topics
from audiences.adapters.settings import Settings, settings_or_exit
from audiences.adapters.state.checkpoint import Flight
from audiences.adapters.stream import runtime as runtime_module
from audiences.adapters.stream.runtime import Runtime
from audiences.tools.bench.contender import Reporter, cpu_s, load_config, rss_mb, write_json
from audiences.tools.bench.isolation import isolated_settings
from audiences.tools.bench.workload import BASE_MS

STARTUP_S = 180.0


class TimedRuntime(Runtime):
    """The real runtime, with a stopwatch and a transition counter."""

    def __init__(
        self,
        settings: Settings,
        topics: Topics,
        clock: Callable[[], int],
        ends: dict[int, int],
        reporter: Reporter,
    ) -> None:
        super().__init__(settings, topics, KafkaClients(settings), clock=clock)
        self.ends = ends
        self.reporter = reporter
        self.done = threading.Event()
        self.checkpoints = 0
        self.checkpoint_s = 0.0

    def _process(self, messages: list[Message]) -> None:
        if self.reporter.first_s is None:
            self.reporter.started()
        super()._process(messages)

    def _landed(self, flight: Flight) -> None:
        if self.reporter.first_s is not None and not self.done.is_set():
            self.checkpoints += 1
            self.checkpoint_s += time.perf_counter() - flight.started
            if self.reached_end():
                self.done.set()

    def position_total(self) -> int:
        return sum(p.position for p in list(self.partitions.values()))

    def reached_end(self) -> bool:
        partitions = self.partitions
        return all(
            (p := partitions.get(number)) is not None and p.committed >= end
            for number, end in self.ends.items()
        )

    def profiles(self) -> int | None:
        """Profiles held (the partitions' user counts), if the partitions keep them."""
        try:
            return sum(int(p.counts.users) for p in list(self.partitions.values()))
        except AttributeError:
            return None


def settings_of(config: dict[str, Any]) -> Settings:
    base = settings_or_exit().replace(kafka_bootstrap=config["bootstrap"])
    return isolated_settings(
        base,
        config["app_id"],
        config["input_topic"],
        int(config["partitions"]),
        Path(config["data_dir"]),
    )


def _start(runtime: Runtime, name: str) -> threading.Thread:
    thread = threading.Thread(target=runtime.run, name=name, daemon=True)
    thread.start()
    deadline = time.monotonic() + STARTUP_S
    while not runtime.ready.wait(0.1):
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the runtime did not start: {runtime.failed!r}")
    return thread


def catch_up(config: dict[str, Any], stop: threading.Event) -> None:
    settings = settings_of(config)
    reporter = Reporter(config)
    ends = {int(number): int(end) for number, end in config["ends"].items()}
    runtime = TimedRuntime(
        settings, Topics.from_settings(settings), lambda: BASE_MS, ends, reporter
    )
    thread = _start(runtime, "bench-engine")
    memory: list[tuple[int, float]] = []  # (profiles held, RSS MiB), every 0.5 s
    sampled = 0.0
    while not runtime.done.wait(0.1):
        if not thread.is_alive():
            raise RuntimeError(f"the runtime stopped: {runtime.failed!r}")
        if stop.is_set():
            return
        if reporter.first_s is not None:
            reporter.progress(runtime.position_total())
            if time.monotonic() - sampled >= 0.5:
                sampled = time.monotonic()
                memory.append((runtime.profiles() or 0, rss_mb()))
    reporter.finish(
        runtime.position_total(),
        runtime.emitter.outputs_sent,  # (counted by the emitter: no wrapper to time)
        checkpoints=runtime.checkpoints,
        checkpoint_mean_ms=1000 * runtime.checkpoint_s / max(1, runtime.checkpoints),
        profiles=runtime.profiles(),
        memory=memory,
    )
    stop.wait()  # until killed (recovery) or stopped
    runtime.stop()
    thread.join(30)


def covered(spans: list[tuple[float, float]]) -> float:
    """The time covered by the union of `spans` ((start, end) pairs)."""
    total, reached = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reached:
            total += end - max(start, reached)
            reached = end
    return total


def recover(config: dict[str, Any], stop: threading.Event) -> None:
    settings = settings_of(config)
    partitions = int(config["partitions"])
    totals = {"keys": 0, "records": 0, "seconds": 0.0}
    restore = runtime_module.restore  # type: ignore[attr-defined]
    spans: list[tuple[float, float]] = []  # partitions restore side by side: their union
    lock = threading.Lock()

    def timed_restore(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        restored = restore(*args, **kwargs)
        with lock:
            spans.append((started, time.perf_counter()))
            totals["seconds"] = covered(spans)
            totals["keys"] += restored.keys
            totals["records"] += restored.records
        return restored

    runtime_module.restore = timed_restore  # type: ignore[attr-defined]
    started, cpu_started = time.perf_counter(), cpu_s()
    runtime = Runtime(settings, Topics.from_settings(settings), KafkaClients(settings))
    runtime.clock = lambda: BASE_MS
    thread = _start(runtime, "bench-recovery")
    deadline = time.monotonic() + STARTUP_S
    while len(runtime.partitions) < partitions and not stop.is_set():
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the runtime did not take every partition: {runtime.failed!r}")
        runtime.ready.wait(0.05)
    ready_s = time.perf_counter() - started
    write_json(
        str(config["result_path"]),
        {
            **totals,
            "ready_s": ready_s,
            "cpu_s": cpu_s() - cpu_started,
            "keys_per_s": totals["keys"] / totals["seconds"] if totals["seconds"] else None,
        },
    )
    runtime.stop()
    thread.join(30)


def serve(config: dict[str, Any], stop: threading.Event) -> None:
    settings = settings_of(config)
    runtime = Runtime(settings, Topics.from_settings(settings), KafkaClients(settings))
    thread = _start(runtime, "bench-latency")
    write_json(str(config["progress_path"]), {"events": 0})
    while not stop.wait(0.2):
        if not thread.is_alive():
            raise RuntimeError(f"the runtime stopped: {runtime.failed!r}")
    runtime.stop()
    thread.join(30)


MODES = {"catchup": catch_up, "recover": recover, "serve": serve}


def main() -> int:
    config = load_config()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        MODES[config["mode"]](config, stop)
    except BaseException:
        Reporter(config).fail()
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
