"""The practical limit of `audiences bench`: a plain confluent-kafka + orjson + rocksdict loop.

No framework: one consumer on every partition of the input topic
(`consume(1000)` batches), `orjson.loads` per event, the user's counting
state (`counting.Counter`, the `performed … times … within` rules of the
workload) from a batch-local cache in front of one rocksdict store, outputs
(`Audience Entered`/`Exited`) produced to a topic as they happen, and per batch
one `WriteBatch` of the changed states. Every 100 ms the producer is flushed
and the input offsets committed (after the state is written). No changelog,
no rebalance handling, no deadlines without events, no condition language:
the cost of reading, parsing, a state read-modify-write and producing in
Python, which no engine written in Python can beat.

Timed from the first event processed until every end offset is reached and
the final flush and commit are done. Run by `audiences bench` (protocol in
`contender.py`) as::

    AUDIENCES_BENCH_CONFIG=config.json python -m audiences.tools.bench.plain_loop
"""

from __future__ import annotations

import sys
import time
from typing import Any

import orjson
from confluent_kafka import Consumer, Producer, TopicPartition
from rocksdict import Options, Rdict, WriteBatch

from audiences.tools.bench.contender import Reporter, load_config
from audiences.tools.bench.counting import Counter, State, output, parse_time_ms

COMMIT_INTERVAL_S = 0.1


def run(config: dict[str, Any]) -> None:
    reporter = Reporter(config)
    counter = Counter(config["rules"])
    topic, output_topic = config["input_topic"], config["output_topic"]
    ends = {int(number): int(end) for number, end in config["ends"].items()}
    consumer = Consumer(
        {
            **config["kafka"],
            "group.id": config["app_id"],
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": 10,
        }
    )
    producer = Producer({**config["kafka"], "linger.ms": 5})
    db = Rdict(config["data_dir"], Options(raw_mode=True))
    consumer.assign([TopicPartition(topic, number, 0) for number in ends])
    positions: dict[int, int] = {}
    events = transitions = 0
    last_commit = time.monotonic()
    try:
        while any(positions.get(number, 0) < end for number, end in ends.items()):
            messages = consumer.consume(1000, 0.1)
            if not messages:
                continue
            reporter.started()
            cache: dict[bytes, State | None] = {}
            dirty: set[bytes] = set()
            for msg in messages:
                if msg.error() is not None:
                    continue
                key = msg.key()
                body = orjson.loads(msg.value())
                if key not in cache:
                    raw = db.get(key)
                    cache[key] = orjson.loads(raw) if raw is not None else None
                at = body["timestamp"]
                state, changes = counter.apply(
                    cache[key],
                    body.get("event"),
                    body.get("properties") or {},
                    parse_time_ms(at),
                )
                if state is not None:
                    cache[key] = state
                    dirty.add(key)
                for change in changes:
                    user = body.get("userId") or ""
                    record = output(user, change, body.get("messageId"), at)
                    producer.produce(output_topic, key=key, value=orjson.dumps(record))
                transitions += len(changes)
                positions[msg.partition()] = msg.offset() + 1
            events += len(messages)
            producer.poll(0)
            if dirty:
                batch = WriteBatch(raw_mode=True)
                for key in dirty:
                    batch.put(key, orjson.dumps(cache[key]))
                db.write(batch)
            if time.monotonic() - last_commit >= COMMIT_INTERVAL_S:
                _commit(producer, consumer, topic, positions)
                last_commit = time.monotonic()
            reporter.progress(events)
        _commit(producer, consumer, topic, positions)
        reporter.finish(events, transitions)
    finally:
        consumer.close()
        db.close()


def _commit(producer: Producer, consumer: Consumer, topic: str, positions: dict[int, int]) -> None:
    producer.flush(30)
    if positions:
        consumer.commit(
            offsets=[TopicPartition(topic, n, at) for n, at in positions.items()],
            asynchronous=False,
        )


def main() -> int:
    config = load_config()
    try:
        run(config)
    except BaseException:
        Reporter(config).fail()
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
