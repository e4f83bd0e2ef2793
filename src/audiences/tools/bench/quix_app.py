"""The Quix Streams contender of `audiences bench`: an idiomatic Quix Streams 3.x application.

A `StreamingDataFrame` over the pre-filled input topic (JSON values), one
stateful `apply` per event that does the per-user counting of the workload's
`performed … times … within` rules (`counting.Counter`, the same code as the
plain loop) with the user's state in Quix's RocksDB state store (with its
changelog topic, Quix's default), `expand=True` to turn the transitions into
records, and `to_topic` to produce them ("Audience Entered"/"Exited", keyed by
user). Settings are Quix's defaults (at-least-once, 5 s commit interval)
except: read from the earliest offset, warnings-only logging.

Timed from the first event processed until `Application.run()` returns after
the last one: the app is stopped from inside the processing of the last
event, and returns once its final checkpoint is done (outputs flushed, state
and changelog written, offsets committed).

quixstreams pins confluent-kafka below the version this project needs, so
`audiences bench` runs this module with the interpreter of a virtual
environment of its own (see `quix_env.py`), importing only the stdlib,
quixstreams and the stdlib-only `counting` and `contender` modules.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from audiences.tools.bench.contender import Reporter, load_config
from audiences.tools.bench.counting import Counter, output, parse_time_ms


def run(config: dict[str, Any]) -> None:
    from quixstreams import Application

    reporter = Reporter(config)
    counter = Counter(config["rules"])
    expected = int(config["expected"])
    app = Application(
        broker_address=config["bootstrap"],
        consumer_group=config["app_id"],
        auto_offset_reset="earliest",
        state_dir=config["data_dir"],
        loglevel="WARNING",
        consumer_extra_config={"fetch.wait.max.ms": 10},
    )
    events = app.topic(config["input_topic"], value_deserializer="json")
    outputs = app.topic(config["output_topic"], value_serializer="json")
    counts = {"events": 0, "transitions": 0}

    def count(value: dict[str, Any], state: Any) -> list[dict[str, Any]]:
        if counts["events"] == 0:
            reporter.started()
        at = value["timestamp"]
        current = state.get("s")
        new, changes = counter.apply(
            current, value.get("event"), value.get("properties") or {}, parse_time_ms(at)
        )
        if new is not None:
            state.set("s", new)
        counts["events"] += 1
        counts["transitions"] += len(changes)
        done = counts["events"]
        if done == expected:
            app.stop()  # run() returns after the final checkpoint
        elif done % 1000 == 0:
            reporter.progress(done)
        user, message_id = value.get("userId") or "", value.get("messageId")
        return [output(user, change, message_id, at) for change in changes]

    sdf = app.dataframe(events)
    sdf = sdf.apply(count, stateful=True, expand=True)
    sdf.to_topic(outputs)
    app.run()
    if counts["events"] < expected:
        raise RuntimeError(f"Quix stopped after {counts['events']}/{expected} events")
    reporter.finish(counts["events"], counts["transitions"])


def main() -> int:
    logging.basicConfig(level=logging.WARNING)
    config = load_config()
    try:
        run(config)
    except BaseException:
        Reporter(config).fail()
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
