"""An evaluator on a real broker, with an injected clock, for component tests."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from audiences.adapters.kafka.clients import KafkaClients
from audiences.adapters.kafka.topics import Topics, ensure_topics
from audiences.adapters.settings import EVENTS_PARTITIONER
from audiences.adapters.stream.definitions import apply_definitions
from audiences.adapters.stream.runtime import Runtime
from audiences.core.events import format_iso
from shared import isolated_settings, pure_outputs  # noqa: F401 - re-exported for tests

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
S, M, H = 1_000, 60_000, 3_600_000


class FakeClock:
    """The wall clock as the evaluator sees it; tests move it instead of sleeping."""

    def __init__(self, now_ms: int = T0) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms

    def advance_to(self, ms: int) -> None:
        self.now_ms = max(self.now_ms, ms)


def track(user: str, event: str, at_ms: int, **properties: Any) -> dict[str, Any]:
    return {
        "type": "track",
        "userId": user,
        "event": event,
        "timestamp": format_iso(at_ms),
        "messageId": f"{user}-{event}-{at_ms}-{uuid.uuid4().hex[:6]}",
        "properties": properties,
    }


class Engine:
    """Topics + definitions + one evaluator thread (restartable on the same data dir)."""

    def __init__(self, bootstrap: str, name: str, data_dir: Path, partitions: int = 2) -> None:
        self.settings = isolated_settings(
            bootstrap, name, str(data_dir), partitions=partitions, tick_interval_ms=20
        )
        self.topics = Topics.from_settings(self.settings)
        ensure_topics(self.settings, self.topics)
        self.clock = FakeClock()
        self.evaluator: Runtime | None = None
        self._thread: threading.Thread | None = None
        self._producer = Producer(
            {"bootstrap.servers": bootstrap, "linger.ms": 1, "partitioner": EVENTS_PARTITIONER}
        )
        self._outputs = _TopicReader(bootstrap, self.topics.audience_events)
        self._dlq = _TopicReader(bootstrap, self.topics.events_dlq)

    def apply(self, *definitions: dict[str, Any]) -> None:
        apply_definitions(self.settings, self.topics, list(definitions))

    def start(self, app_id: str | None = None) -> Engine:
        settings = self.settings if app_id is None else self.settings.replace(app_id=app_id)
        topics = Topics.from_settings(settings)
        if app_id is not None:  # its own changelog and internal topics, as a worker makes them
            ensure_topics(settings, topics)
        self.evaluator = Runtime(settings, topics, KafkaClients(settings), clock=self.clock)
        self._thread = threading.Thread(target=self.evaluator.run, daemon=True)
        self._thread.start()
        if not self.evaluator.ready.wait(60):
            raise TimeoutError("evaluator did not get its partitions")
        return self

    def stop(self) -> None:
        if self.evaluator and self._thread:
            self.evaluator.stop()
            self._thread.join(30)
            assert self.evaluator.failed is None, self.evaluator.failed

    def send(self, *events: dict[str, Any] | bytes, key: bytes | None = None) -> None:
        for event in events:
            if isinstance(event, bytes):
                self._producer.produce(self.topics.events, key=key or b"raw", value=event)
            else:
                user = event.get("userId") or event.get("anonymousId")
                self._producer.produce(
                    self.topics.events, key=str(user).encode(), value=orjson.dumps(event)
                )
        self._producer.flush(10)

    def outputs(self, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Exactly the first `count` outputs (waits for them; then checks nothing more came)."""
        return [orjson.loads(m.value()) for m in self._outputs.read(count, timeout)]

    def dead_letters(self, count: int, timeout: float = 30.0) -> list[Any]:
        return self._dlq.read(count, timeout)

    def settle(self, until: Callable[[], bool] | None = None, timeout: float = 10.0) -> None:
        """Wait until the runtime has evaluated everything produced so far and made it
        durable (a checkpoint covers it)."""
        deadline = time.monotonic() + timeout
        assert self.evaluator is not None
        while time.monotonic() < deadline:
            partitions = self.evaluator.partitions
            if (
                partitions
                and all(p.committed >= self._end(n) for n, p in list(partitions.items()))
                and (until is None or until())
            ):
                return
            time.sleep(0.02)
        raise TimeoutError("evaluator did not catch up")

    def _end(self, partition: int) -> int:
        # Only for single-record batches the high watermark is exact on Tansu:
        # the test producer flushes per call, and settle() is a best-effort wait.
        return self._outputs.high_watermark(self.topics.events, partition)

    def close(self) -> None:
        self.stop()
        self._outputs.close()
        self._dlq.close()


class _TopicReader:
    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self.consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"reader-{uuid.uuid4().hex}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
        # assign, not subscribe: no group join (which takes session.timeout/2 on Tansu)
        partitions = self.consumer.list_topics(topic, timeout=10).topics[topic].partitions
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        self.seen: list[Any] = []

    def read(self, count: int, timeout: float) -> list[Any]:
        deadline = time.monotonic() + timeout
        while len(self.seen) < count and time.monotonic() < deadline:
            for msg in self.consumer.consume(100, 0.1):
                if msg.error() is None:
                    self.seen.append(msg)
        if len(self.seen) < count:
            raise AssertionError(f"expected {count} records on {self.topic}, got {len(self.seen)}")
        # nothing beyond `count` may arrive shortly after
        for msg in self.consumer.consume(100, 0.3):
            if msg.error() is None:
                self.seen.append(msg)
        return list(self.seen)

    def high_watermark(self, topic: str, partition: int) -> int:
        return int(self.consumer.get_watermark_offsets(TopicPartition(topic, partition), 5)[1])

    def close(self) -> None:
        self.consumer.close()


def by_user(outputs: Iterable[dict[str, Any]]) -> dict[str, list[tuple[str, str, str]]]:
    """user -> [(audience, event, timestamp)] in topic order."""
    found: dict[str, list[tuple[str, str, str]]] = {}
    for out in outputs:
        found.setdefault(out["userId"], []).append(
            (out["properties"]["audience_key"], out["event"], out["timestamp"])
        )
    return found


def assert_same_as_core(seen: list[dict[str, Any]], expected: dict[str, dict[str, Any]]) -> None:
    """Exactly the core's outputs; a duplicate only with the same messageId and content."""
    by_id: dict[str, dict[str, Any]] = {}
    for out in seen:
        assert out == by_id.setdefault(out["messageId"], out), "a messageId with two contents"
    missing = set(expected) - set(by_id)
    extra = set(by_id) - set(expected)
    assert not missing and not extra, (
        f"missing {[_brief(expected[m]) for m in missing]}, "
        f"unexpected {[_brief(by_id[m]) for m in extra]}"
    )
    for message_id, out in expected.items():
        assert by_id[message_id] == out


def _brief(out: dict[str, Any]) -> tuple[str, str, str]:
    return (out.get("userId") or out.get("anonymousId"), out["event"], out["timestamp"])
