"""The runtime's loop without Kafka: for profiling the per-event path deterministically.

`python -m audiences.tools.bench.loop EVENTS [EVALUATED]` generates the bench's
workload (EVENTS records, 1M users, 20 audiences), then feeds the first EVALUATED of
them (default: all) in batches of 1,000 to `Evaluation.partition_batch` over one
partition in RocksDB, with a checkpoint's ENCODE, store write and landing every 2,500
events; outputs go to a producer that only counts them. The garbage collector runs
under the runtime's policy (`heap.FrozenHeap`). It prints events per CPU-second of the
loop.

Under `valgrind --tool=callgrind` (instructions, which this host's CPU steal does not
change), run it twice with the same EVENTS, once with EVALUATED = 0: the difference is
the loop's instructions (see the README's development section).
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path
from typing import Any

from audiences.adapters.kafka.topics import Topics
from audiences.adapters.settings import Settings
from audiences.adapters.state.partition import PartitionState
from audiences.adapters.state.store import RocksDictStore
from audiences.adapters.stream.emitter import Emitter
from audiences.adapters.stream.evaluation import Evaluation
from audiences.adapters.stream.heap import FrozenHeap
from audiences.core.definitions import build_catalog
from audiences.tools.bench.workload import make_definitions, make_events

BATCH = 1000
CHECKPOINT_EVERY = 2500
RECORD_MS = 1_767_225_600_000 + 30 * 86_400_000  # (after every event of the workload)


class Record:
    """What the loop reads of a Kafka message."""

    __slots__ = ("_offset", "_value")

    def __init__(self, offset: int, value: bytes) -> None:
        self._offset = offset
        self._value = value

    def offset(self) -> int:
        return self._offset

    def timestamp(self) -> tuple[int, int]:
        return (1, RECORD_MS)

    def value(self) -> bytes:
        return self._value

    def topic(self) -> str:
        return "events"

    def partition(self) -> int:
        return 0


class CountingProducer:
    def __init__(self) -> None:
        self.produced = 0

    def produce(self, topic: str, **kwargs: Any) -> None:
        self.produced += 1

    def poll(self, timeout: float = 0) -> int:
        return 0


def run(events: int, evaluated: int | None = None) -> dict[str, float]:
    """Events, outputs and events per CPU-second of the loop over the first `evaluated`."""
    catalog = build_catalog({doc["key"]: (doc, 1) for doc in make_definitions(20)})
    records = [Record(i, value) for i, (_key, value) in enumerate(make_events(events, 1_000_000))]
    count = len(records) if evaluated is None else min(evaluated, len(records))
    producer = CountingProducer()
    emitter = Emitter(producer, Topics.from_settings(Settings()), _owner, space_id="bench")
    evaluation = Evaluation(emitter, _owner, _misrouted, {})
    with tempfile.TemporaryDirectory(prefix="audiences-loop-") as data:
        store = RocksDictStore(Path(data) / "p0")
        partition = PartitionState(
            0, store, position=0, stream_time_ms=0, catalog=catalog, cache_limit=12_500
        )
        thresholds = gc.get_threshold()
        heap = FrozenHeap()
        heap.start()  # the workload is frozen too: never scanned, as the runtime's state
        started = time.process_time()
        since = 0
        for at in range(0, count, BATCH):
            evaluation.partition_batch(partition, records[at : at + BATCH], _clock)
            heap.turn()
            since += BATCH
            if since >= CHECKPOINT_EVERY:
                since = 0
                _records, batch, profiles = partition.encode_interval()
                partition.seal(profiles)
                store.write(batch)
                partition.landed()
        cpu_s = time.process_time() - started
        gc.set_threshold(*thresholds)
        store.close()
    return {
        "events": count,
        "outputs": producer.produced,
        "cpu_s": round(cpu_s, 3),
        "events_per_cpu_s": round(count / cpu_s, 1) if cpu_s > 0 else 0.0,
    }


def _owner(key: bytes) -> int:
    return 0


def _misrouted(found: int, owner: int) -> None:
    raise AssertionError("one partition owns every key here")


def _clock() -> int:
    return RECORD_MS


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("events", type=int, help="records generated")
    parser.add_argument("evaluated", type=int, nargs="?", help="records fed to the loop")
    args = parser.parse_args(argv)
    result = run(args.events, args.evaluated)
    print(
        f"{result['events']:,} events, {result['outputs']:,} outputs: "
        f"{result['events_per_cpu_s']:,.0f} events per CPU-second ({result['cpu_s']} s)"
    )


if __name__ == "__main__":
    main()
