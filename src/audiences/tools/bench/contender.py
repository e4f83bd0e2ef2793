"""The worker side of a bench contender: its config, its progress, its measurements.

Every contender of `audiences bench` runs in a process of its own, started by
the runner with the path of a JSON config in `AUDIENCES_BENCH_CONFIG`. It
rewrites `progress_path` with the events processed now and then and writes
`result_path` once, when done (or `{"error": ...}`), both atomically. The
figures are the worker's own, from its own process only (the broker and the
runner are other processes):

- `elapsed_s`: wall time from the first event processed to the end of the
  contender's work (see each contender for what "the end" includes);
- `cpu_s`: user + system CPU time of the whole process (every thread,
  librdkafka's included: `getrusage(RUSAGE_SELF)`) over the same span;
- `rss_start_mb`: resident memory when the first event arrived (interpreter,
  libraries, clients: what holds no profile); `peak_rss_mb`: the process's
  peak resident memory (VmHWM).

Stdlib only: the Quix contender imports this in its own virtual environment.
"""

from __future__ import annotations

import json
import os
import resource
import time
import traceback
from pathlib import Path
from typing import Any

CONFIG_ENV = "AUDIENCES_BENCH_CONFIG"
PROGRESS_EVERY_S = 0.2


def load_config() -> dict[str, Any]:
    path = os.environ.get(CONFIG_ENV)
    if not path:
        raise SystemExit(f"{CONFIG_ENV} must name the contender's JSON config")
    config: dict[str, Any] = json.loads(Path(path).read_bytes())
    return config


def write_json(path: str, body: dict[str, Any]) -> None:
    """Replace `path` atomically, so the runner never reads half a file."""
    tmp = f"{path}.tmp"
    Path(tmp).write_text(json.dumps(body))
    os.replace(tmp, path)


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rss_mb() -> float:
    """Resident memory now (/proc/self/statm), MiB."""
    try:
        resident = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return resident * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """Peak resident memory of this process image, MiB: VmHWM of /proc/self/status.

    Not `ru_maxrss`: Linux carries it across fork and exec, so a worker would report
    the runner's peak (the workload it generated) when that is higher than its own."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Reporter:
    """Progress and result files of one contender run."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.progress_path = str(config["progress_path"])
        self.result_path = str(config["result_path"])
        self.expected = int(config.get("expected", 0))
        self.first_s: float | None = None
        self.first_cpu_s = 0.0
        self.rss_start_mb = 0.0
        self._shown = 0.0

    def started(self) -> None:
        """The first event is about to be processed: the clocks start."""
        if self.first_s is None:
            self.rss_start_mb = rss_mb()
            self.first_cpu_s = cpu_s()
            self.first_s = time.perf_counter()
            write_json(self.progress_path, {"events": 0})

    def progress(self, done: int) -> None:
        now = time.perf_counter()
        if now - self._shown >= PROGRESS_EVERY_S:
            self._shown = now
            write_json(self.progress_path, {"events": done})

    def finish(self, events: int, transitions: int, **extra: Any) -> dict[str, Any]:
        """Stop the clocks and write the result."""
        ended, cpu = time.perf_counter(), cpu_s()
        first = self.first_s if self.first_s is not None else ended
        result = {
            "events": events,
            "transitions": transitions,
            "elapsed_s": ended - first,
            "cpu_s": cpu - self.first_cpu_s,
            "rss_start_mb": self.rss_start_mb,
            "peak_rss_mb": peak_rss_mb(),
            **extra,
        }
        write_json(self.result_path, result)
        return result

    def fail(self) -> None:
        """Report the exception being handled."""
        write_json(self.result_path, {"error": traceback.format_exc()})
