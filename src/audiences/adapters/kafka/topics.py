"""Every topic name, and their creation. Names come from settings (SPEC §1, §10)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from audiences.adapters.settings import Settings
from audiences.errors import BrokerError

log = logging.getLogger(__name__)
COMPACT = {"cleanup.policy": "compact"}


@dataclass(frozen=True)
class Topics:
    events: str
    audience_events: str
    definitions: str
    events_dlq: str
    audience_events_dlq: str
    changelog: str  # per-user state, one partition per `events` partition
    progress: str  # backfill progress per partition (compacted), read by `apply --wait`
    workers: str  # each worker's web address and partitions (compacted), for API routing

    @classmethod
    def from_settings(cls, settings: Settings) -> Topics:
        return cls(
            events=settings.events_topic,
            audience_events=settings.audience_events_topic,
            definitions=settings.definitions_topic,
            events_dlq=settings.events_dlq_topic,
            audience_events_dlq=settings.audience_events_dlq_topic,
            changelog=f"{settings.app_id}-users-changelog",
            progress=f"{settings.app_id}-progress",
            workers=f"{settings.app_id}-workers",
        )


def partition_count(admin: AdminClient, topic: str, timeout: float = 10.0) -> int | None:
    metadata = admin.list_topics(topic=topic, timeout=timeout).topics.get(topic)
    if metadata is None or metadata.error is not None or not metadata.partitions:
        return None
    return len(metadata.partitions)


def ensure_topics(settings: Settings, topics: Topics) -> int:
    """Create missing topics; returns the partition count of `events`.

    The changelog must have exactly as many partitions as `events` (state of
    events partition N lives in changelog partition N); definitions use one
    partition so every worker reads them in one order.
    """
    admin = AdminClient(settings.kafka_config())
    try:
        existing = set(admin.list_topics(timeout=10).topics)
    except KafkaException as exc:
        raise BrokerError(
            f"cannot reach Kafka at {settings.kafka_bootstrap}: {exc}", retriable=True
        ) from exc
    wanted = [
        NewTopic(topics.events, settings.partitions, 1),
        NewTopic(topics.audience_events, settings.partitions, 1),
        NewTopic(topics.events_dlq, settings.partitions, 1),
        NewTopic(topics.audience_events_dlq, settings.partitions, 1),
        NewTopic(topics.definitions, 1, 1, config=COMPACT),
        NewTopic(topics.progress, 1, 1, config=COMPACT),
        NewTopic(topics.workers, 1, 1, config=COMPACT),
    ]
    _create(admin, [t for t in wanted if t.topic not in existing])
    events_partitions = partition_count(admin, topics.events) or settings.partitions
    if topics.changelog not in existing:
        _create(admin, [NewTopic(topics.changelog, events_partitions, 1, config=COMPACT)])
    return events_partitions


def ensure_topic(config: dict[str, object], topic: str, partitions: int) -> None:
    """Create one topic (e.g. a kafka destination's) when missing: never leave it to
    auto-creation, which makes a topic with the broker's default partition count."""
    admin = AdminClient(config)
    try:
        existing = set(admin.list_topics(timeout=10).topics)
    except KafkaException as exc:
        raise BrokerError(f"cannot reach Kafka for topic {topic}: {exc}", retriable=True) from exc
    if topic not in existing:
        _create(admin, [NewTopic(topic, partitions, 1)])


def _create(admin: AdminClient, new: list[NewTopic]) -> None:
    if not new:
        return
    for topic, future in admin.create_topics(new, operation_timeout=10).items():
        try:
            future.result()
            log.info("created topic %s", topic)
        except KafkaException as exc:
            if exc.args and exc.args[0].name() == "TOPIC_ALREADY_EXISTS":
                continue
            raise BrokerError(f"cannot create topic {topic}: {exc}", retriable=True) from exc
