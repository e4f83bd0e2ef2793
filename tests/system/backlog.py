"""A shop backlog for system tests: events, the outputs the pure core implies, readers."""

from __future__ import annotations

import random
import time
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from audiences.adapters.kafka.topics import Topics
from audiences.adapters.settings import Settings
from audiences.core.events import format_iso
from shared import SPEC_CART_ABANDONERS, pure_outputs

S, M, H = 1_000, 60_000, 3_600_000
DEFINITIONS = [
    SPEC_CART_ABANDONERS,
    {
        "key": "frequent_viewers",
        "condition": {
            "performed": {"event": "Product Viewed", "times": {"gte": 3}, "within": "1h"}
        },
    },
]


def history(users: int, base_ms: int) -> list[dict[str, Any]]:
    rng = random.Random(42)
    events = []
    for u in range(users):
        user, t = f"user-{u:04d}", base_ms + rng.randint(0, 30) * M
        for _ in range(rng.randint(1, 5)):
            t += rng.randint(1, 30) * M
            events.append(
                {
                    "type": "track",
                    "userId": user,
                    "event": "Product Viewed",
                    "timestamp": format_iso(t),
                    "messageId": f"{user}-{t}-v",
                }
            )
        t += rng.randint(1, 20) * M
        events.append(
            {
                "type": "track",
                "userId": user,
                "event": "Checkout Started",
                "timestamp": format_iso(t),
                "messageId": f"{user}-{t}-c",
                "properties": {"cart_id": f"c-{user}"},
            }
        )
        if rng.random() < 0.6:
            t += rng.choice([20 * M, 3 * H])  # in time, or too late (exits)
            events.append(
                {
                    "type": "track",
                    "userId": user,
                    "event": "Order Completed",
                    "timestamp": format_iso(t),
                    "messageId": f"{user}-{t}-o",
                    "properties": {"cart_id": f"c-{user}"},
                }
            )
    return sorted(events, key=lambda e: e["timestamp"])  # a live stream is in time order


def expected_outputs(events: list[dict[str, Any]], now_ms: int) -> dict[str, dict[str, Any]]:
    """messageId -> output, computed with the pure core alone."""
    return pure_outputs(DEFINITIONS, events, now_ms)


def read_all(
    settings: Settings, topic: str, want: set[str], timeout: float, min_count: int = 0
) -> list[dict[str, Any]]:
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": "check",
            "enable.auto.commit": False,
        }
    )
    parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + (timeout if not min_count else 60)
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        batch = [m for m in consumer.consume(500, 0.2) if m.error() is None]
        seen.extend(orjson.loads(m.value()) for m in batch)
        if batch:
            quiet_since = time.monotonic()
        if min_count and len(seen) >= min_count:
            break
        if want and want <= {o["messageId"] for o in seen} and time.monotonic() - quiet_since > 2:
            break
    consumer.close()
    return seen


def produce_backlog(settings: Settings, topics: Topics, events: list[dict[str, Any]]) -> None:
    """All events on `events` before any worker runs, as after an outage: the worker
    catches up on stream time, so the result is fully determined by the log."""
    producer = Producer({**settings.producer_config(), "linger.ms": 20})
    for raw in events:
        producer.produce(topics.events, key=raw["userId"].encode(), value=orjson.dumps(raw))
        producer.poll(0)
    producer.flush(60)
