"""The Faust baseline of `audiences bench`: a stock agent + `Table` doing the engine's work.

One `@app.agent` over the benchmark's input topic and one RocksDB-backed
`app.Table` (rocksdict driver, with its changelog) of encoded profiles. Per
event it does exactly what the engine does per event: `parse_event`, load the
user's state from the table (`UserState.decode`), `step` with the same catalog,
write the state back (`table[key] = state.encode()`, one changelog record per
event as Faust does it) and send each transition to an output topic. This is
the idiomatic Faust design the engine is compared with (DESIGN.md, "the hot
path"); only the broker settings the embedded broker needs are changed.

Run by `audiences bench` as a subprocess worker (protocol in `contender.py`)::

    AUDIENCES_BENCH_CONFIG=/tmp/x/config.json python -m audiences.tools.bench.faust_table worker

The config file (JSON) holds `bootstrap`, `app_id`, `input_topic`,
`output_topic`, `partitions`, `data_dir`, `definitions` (validated documents,
all at version 1), `expected` (events to process: the first `expected` events
it receives), `progress_path` and `result_path`. Timed from the first event
processed to the `expected`-th one (Faust's own commit and table flush follow
later, untimed: this favours Faust). It then keeps running until it is stopped
(SIGTERM).
"""

from __future__ import annotations

import sys
from typing import Any

import orjson

from audiences.tools.bench.contender import Reporter, load_config

PROGRESS_EVERY = 500


def create_app(config: dict[str, Any]) -> Any:
    """The Faust app of the baseline (returned untyped: faust has no type stubs)."""
    import faust

    from audiences.core.definitions import build_catalog, validate_definition
    from audiences.core.evaluator import step
    from audiences.core.events import parse_event
    from audiences.core.outputs import render_output
    from audiences.core.state import UserState
    from audiences.errors import InvalidEventError

    definitions = {
        doc["key"]: (validate_definition(doc), int(doc.get("version", 1)))
        for doc in config["definitions"]
    }
    catalog = build_catalog(definitions)
    partitions = int(config["partitions"])
    expected = int(config["expected"])
    reporter = Reporter(config)

    app = faust.App(
        config["app_id"],
        broker=f"kafka://{config['bootstrap']}",
        store="rocksdb://",
        datadir=config["data_dir"],
        topic_partitions=partitions,
        topic_replication_factor=1,
        # The embedded (Tansu) broker completes a group join after about half of
        # the session timeout: Kafka's 45 s default would stall startup ~20 s.
        broker_session_timeout=6.0,
        broker_heartbeat_interval=1.0,
        consumer_auto_offset_reset="earliest",
        table_standby_replicas=0,
        web_enabled=False,
        autodiscover=False,
    )
    events = app.topic(
        config["input_topic"],
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
    )
    outputs = app.topic(
        config["output_topic"],
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
    )
    profiles = app.Table(
        "profiles",
        default=None,
        partitions=partitions,
        key_type=bytes,  # bytes key and value: the "raw" codec, no serialization layer
        value_type=bytes,
        options={"driver": "rocksdict"},
    )

    @app.agent(events)
    async def evaluate(stream: Any) -> None:
        try:
            await _evaluate(stream)
        except BaseException:
            reporter.fail()
            raise

    async def _evaluate(stream: Any) -> None:
        count = transitions = 0
        async for event in stream.events():
            if count == 0:
                reporter.started()
            count += 1
            message = event.message
            try:
                parsed = parse_event(event.value or b"", int(message.timestamp * 1000))
            except InvalidEventError:
                parsed = None  # the engine dead-letters these; the bench produces none
            if parsed is not None:
                key = parsed.key.encode()
                data = profiles.get(key)
                state = UserState.decode(data) if data is not None else None
                result = step(state, parsed, catalog, parsed.key)
                profiles[key] = result.state.encode()
                for transition in result.transitions:
                    output = render_output(
                        transition,
                        result.state.traits,
                        space_id=config["app_id"],
                        anonymous=result.state.anonymous,
                    )
                    await outputs.send(
                        key=transition.profile_key.encode(), value=orjson.dumps(output)
                    )
                transitions += len(result.transitions)
            if count == expected:
                reporter.finish(count, transitions)
            elif count % PROGRESS_EVERY == 0:
                reporter.progress(count)

    return app


def run_worker(config: dict[str, Any]) -> None:
    """Run the baseline worker until SIGTERM/SIGINT (blocks)."""
    import faust

    app = create_app(config)
    worker = faust.Worker(app, loglevel="warning", quiet=True)
    worker.execute_from_commandline()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args != ["worker"]:
        print(
            "usage: AUDIENCES_BENCH_CONFIG=config.json python -m audiences.tools.bench.faust_table worker"
        )
        return 2
    run_worker(load_config())
    return 0


if __name__ == "__main__":
    sys.exit(main())
