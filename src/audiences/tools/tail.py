"""`audiences tail`: live transitions, one line each."""

from __future__ import annotations

from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, TopicPartition

from audiences.adapters.kafka.topics import Topics
from audiences.adapters.settings import Settings


def describe(output: dict[str, Any]) -> str:
    props = output.get("properties", {})
    user = output.get("userId") or output.get("anonymousId")
    arrow = "+" if output.get("event") == "Audience Entered" else "-"
    if output.get("event") == "User Deleted":
        return f"{output.get('timestamp')}  {user:<16} x deleted"
    if output.get("event") == "Trait Computed":
        key = props.get("trait_key")
        return f"{output.get('timestamp')}  {user:<16} = {key}: {props.get(key)!r}"
    return f"{output.get('timestamp')}  {user:<16} {arrow} {props.get('audience_key')}"


def tail(
    settings: Settings,
    *,
    from_beginning: bool = False,
    limit: int | None = None,
    as_json: bool = False,
) -> None:
    topic = Topics.from_settings(settings).audience_events
    consumer = Consumer(
        {
            **settings.kafka_config(),
            "group.id": f"{settings.app_id}-tail",
            "enable.auto.commit": False,
        }
    )
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    start = OFFSET_BEGINNING if from_beginning else OFFSET_END
    consumer.assign([TopicPartition(topic, p, start) for p in partitions])
    seen = 0
    try:
        while limit is None or seen < limit:
            for msg in consumer.consume(100, 0.5):
                if msg.error() is not None or msg.value() is None:
                    continue
                text = msg.value().decode() if as_json else describe(orjson.loads(msg.value()))
                print(text, flush=True)
                seen += 1
                if limit is not None and seen >= limit:
                    break
    finally:
        consumer.close()
