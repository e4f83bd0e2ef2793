"""200,000 deadlines due at once in one partition: they fire in bounded chunks, every one
of them, while live events keep flowing between the chunks (SPEC §11, issue: bounded,
fair work)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from harness import T0, Engine, H, track

from audiences.adapters.settings import EVENTS_PARTITIONER
from audiences.core.events import format_iso
from shared import wait_for

pytestmark = pytest.mark.kafka
USERS = 200_000
RECENT = {"key": "recent", "condition": {"performed": {"event": "Ping", "within": "1h"}}}


class Counter:
    """Reads the outputs topic in a thread, keeping only (user, event, timestamp)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.seen: list[tuple[str, str, str]] = []
        self._stop = threading.Event()
        self._consumer = Consumer(
            {"bootstrap.servers": bootstrap, "group.id": "flood-reader", "fetch.wait.max.ms": 50}
        )
        self._consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for msg in self._consumer.consume(10_000, 0.2):
                if msg.error() is None:
                    out = orjson.loads(msg.value())
                    self.seen.append((out["userId"], out["event"], out["timestamp"]))

    def count(self, event: str) -> int:
        return sum(1 for _, name, _ in list(self.seen) if name == event)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._consumer.close()


def test_200k_deadlines_due_at_once_fire_in_chunks_while_live_events_flow(
    kafka_bootstrap: str, unique_name: Callable[..., str], tmp_path: Path
) -> None:
    engine = Engine(kafka_bootstrap, unique_name("flood"), tmp_path / "data", partitions=1)
    counter = Counter(kafka_bootstrap, engine.topics.audience_events)
    try:
        engine.apply(RECENT)
        producer = Producer(
            {
                "bootstrap.servers": kafka_bootstrap,
                "linger.ms": 50,
                "partitioner": EVENTS_PARTITIONER,
            }
        )
        for n in range(USERS):
            user = f"u{n:06d}"
            event = {
                "type": "track",
                "userId": user,
                "event": "Ping",
                "timestamp": format_iso(T0),
                "messageId": f"ping-{n}",
            }
            while True:
                try:
                    producer.produce(
                        engine.topics.events, key=user.encode(), value=orjson.dumps(event)
                    )
                    break
                except BufferError:
                    producer.poll(0.1)
        producer.flush(120)
        engine.start()
        wait_for(lambda: counter.count("Audience Entered") >= USERS, 300, "everyone to enter")
        # One hour later all 200,000 windows close at once (nobody sends anything)...
        engine.clock.advance_to(T0 + 2 * H)
        # ... and a live event arrives meanwhile: it must not wait for all of them.
        engine.send(track("live", "Ping", T0 + 2 * H))
        wait_for(
            lambda: (
                counter.count("Audience Exited") >= USERS
                and ("live", "Audience Entered", format_iso(T0 + 2 * H)) in counter.seen
            ),
            300,
            "every deadline and the live event",
        )
        after_clock = [
            row for row in counter.seen if row[1] == "Audience Exited" or row[0] == "live"
        ]
        exits = [row for row in after_clock if row[1] == "Audience Exited"]
        assert len(exits) == USERS and len({user for user, _, _ in exits}) == USERS
        assert {timestamp for _, _, timestamp in exits} == {format_iso(T0 + H)}  # exact
        live_at = next(i for i, row in enumerate(after_clock) if row[0] == "live")
        # Fired in chunks (AUDIENCES_SWEEP_CHUNK per turn): the live event got through
        # long before the last deadline.
        assert live_at < USERS // 4, f"the live event came after {live_at} deadlines"
    finally:
        counter.close()
        engine.close()
