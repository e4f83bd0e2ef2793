"""Every topic name, and their creation. Names come from settings (SPEC §1, §10)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from confluent_kafka import KafkaException, TopicCollection
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewTopic,
)

from audiences.adapters.kafka.clients import KafkaClients
from audiences.adapters.settings import Settings
from audiences.errors import AudiencesError, BrokerError

log = logging.getLogger(__name__)
COMPACT = {"cleanup.policy": "compact"}
HOUR_MS = 3_600_000


class TopicMismatch(AudiencesError):
    """An existing topic contradicts what the engine needs; the message says what to do."""


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


def ensure_topics(settings: Settings, topics: Topics, admin: AdminClient | None = None) -> int:
    """Create missing topics; returns the partition count of `events`.

    The changelog must have exactly as many partitions as `events` (state of
    events partition N lives in changelog partition N); definitions use one
    partition so every worker reads them in one order. `admin` defaults to
    `KafkaClients(settings).admin()`.
    """
    if admin is None:
        admin = KafkaClients(settings).admin()
    try:
        existing = set(admin.list_topics(timeout=10).topics)
    except KafkaException as exc:
        raise BrokerError(
            f"cannot reach Kafka at {settings.kafka_bootstrap}: {exc}", retriable=True
        ) from exc
    dlq_config = {"retention.ms": str(settings.dlq_retention_hours * HOUR_MS)}
    wanted = [
        NewTopic(topics.events, settings.partitions, 1),
        NewTopic(topics.audience_events, settings.partitions, 1),
        NewTopic(topics.events_dlq, settings.partitions, 1, config=dlq_config),
        NewTopic(topics.audience_events_dlq, settings.partitions, 1, config=dlq_config),
        NewTopic(topics.definitions, 1, 1, config=COMPACT),
        NewTopic(topics.progress, 1, 1, config=COMPACT),
        NewTopic(topics.workers, 1, 1, config=COMPACT),
    ]
    _create(admin, [t for t in wanted if t.topic not in existing])
    for dlq in (topics.events_dlq, topics.audience_events_dlq):
        if dlq in existing:
            _set_retention(admin, dlq, dlq_config["retention.ms"])
    events_partitions = partition_count(admin, topics.events) or settings.partitions
    if topics.changelog not in existing:
        _create(admin, [NewTopic(topics.changelog, events_partitions, 1, config=COMPACT)])
    check_topics(admin, topics, events_partitions)
    return events_partitions


def check_topics(admin: AdminClient, topics: Topics, events_partitions: int) -> None:
    """Refuse topics that contradict the engine: the state of `events` partition N lives
    in changelog partition N, so both need the same count, and the changelog must be
    compacted (a deleting changelog loses state once retention passes)."""
    changelog = partition_count(admin, topics.changelog)
    if changelog is not None and changelog != events_partitions:
        raise TopicMismatch(
            f"topic {topics.changelog} has {changelog} partitions but {topics.events} has "
            f"{events_partitions}: the state of events partition N lives in changelog "
            f"partition N. Give {topics.events} {changelog} partitions again, or start a new "
            "app (AUDIENCES_APP_ID) that rebuilds its state by replaying the retained events"
        )
    policy = _config(admin, topics.changelog, "cleanup.policy")
    if policy is not None and "compact" not in policy:
        raise TopicMismatch(
            f"topic {topics.changelog} has cleanup.policy={policy}: it must be compacted "
            f"(kafka-configs --alter --entity-type topics --entity-name {topics.changelog} "
            "--add-config cleanup.policy=compact)"
        )


def _set_retention(admin: AdminClient, topic: str, retention_ms: str) -> None:
    """Keep an existing DLQ's retention as configured (DLQs hold PII: a shorter retention
    set later must reach topics created before). A broker that refuses is logged, not
    fatal: the DLQ still works, with the retention it had."""
    if _config(admin, topic, "retention.ms") == retention_ms:
        return
    resource = ConfigResource(
        ConfigResource.Type.TOPIC,
        topic,
        incremental_configs=[
            ConfigEntry(
                "retention.ms",
                retention_ms,
                incremental_operation=AlterConfigOpType.SET,
            )
        ],
    )
    try:
        admin.incremental_alter_configs([resource])[resource].result(timeout=10)
        log.info("topic %s: retention.ms set to %s", topic, retention_ms)
    except Exception as exc:
        log.warning("topic %s: cannot set retention.ms=%s: %s", topic, retention_ms, exc)


def _config(admin: AdminClient, topic: str, name: str) -> str | None:
    """A topic config's value; None when the broker does not report it (the embedded
    broker reports only configs set explicitly)."""
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
    try:
        configs = admin.describe_configs([resource])[resource].result(timeout=10)
    except Exception:  # unknown is not a contradiction
        return None
    entry = configs.get(name)
    return None if entry is None or entry.value is None else str(entry.value)


def topic_ids(admin: AdminClient, names: list[str]) -> dict[str, str | None]:
    """Kafka's topic id of each topic (None when the broker does not say): a recreated
    topic has a new one, so state checkpointed against the old one is not trusted."""
    ids: dict[str, str | None] = dict.fromkeys(names)
    try:
        futures = admin.describe_topics(TopicCollection(names))
        for name, future in futures.items():
            topic_id = future.result(timeout=10).topic_id
            ids[name] = str(topic_id) if topic_id is not None else None
    except Exception as exc:  # old brokers: no ids, no check
        log.warning("topic ids of %s unknown: %s", names, exc)
    return ids


def ensure_topic(cluster: AdminClient | Mapping[str, object], topic: str, partitions: int) -> None:
    """Create one topic (e.g. a kafka destination's) when missing: never leave it to
    auto-creation, which makes a topic with the broker's default partition count.
    `cluster` is an admin client of the cluster, or its configuration."""
    admin = cluster if isinstance(cluster, AdminClient) else KafkaClients.admin_for(cluster)
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
