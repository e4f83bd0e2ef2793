"""Every topic name, and their creation. Names come from settings (SPEC §1, §10)."""

from __future__ import annotations

import dataclasses
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
    replicas = settings.replication_factor  # -1: the broker's default.replication.factor
    wanted = [
        NewTopic(topics.events, settings.partitions, replicas),
        NewTopic(topics.audience_events, settings.partitions, replicas),
        NewTopic(topics.events_dlq, settings.partitions, replicas, config=dlq_config),
        NewTopic(topics.audience_events_dlq, settings.partitions, replicas, config=dlq_config),
        NewTopic(topics.definitions, 1, replicas, config=COMPACT),
        NewTopic(topics.progress, 1, replicas, config=COMPACT),
        NewTopic(topics.workers, 1, replicas, config=COMPACT),
    ]
    _create(admin, [t for t in wanted if t.topic not in existing])
    for dlq in (topics.events_dlq, topics.audience_events_dlq):
        if dlq in existing:
            _set_retention(admin, dlq, dlq_config["retention.ms"])
    events_partitions = partition_count(admin, topics.events) or settings.partitions
    if topics.changelog not in existing:
        _create(admin, [NewTopic(topics.changelog, events_partitions, replicas, config=COMPACT)])
    check_topics(admin, topics, events_partitions, replicas)
    return events_partitions


def check_topics(
    admin: AdminClient, topics: Topics, events_partitions: int, replication_factor: int = -1
) -> None:
    """Refuse topics that contradict the engine: the state of `events` partition N lives
    in changelog partition N, so both need the same count, and the changelog must be
    compacted (a deleting changelog loses state once retention passes). With an explicit
    `replication_factor` (AUDIENCES_REPLICATION_FACTOR > 0), a topic with fewer replicas
    is refused too: it would lose data sooner than the operator asked for."""
    if replication_factor > 0:
        check_replication(admin, _names(topics), replication_factor)
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


def _names(topics: Topics) -> list[str]:
    return [getattr(topics, f.name) for f in dataclasses.fields(topics)]


def replica_counts(admin: AdminClient, names: list[str]) -> dict[str, int]:
    """The replication factor of each existing topic of `names` (the fewest replicas any
    of its partitions has, as the broker's metadata lists them)."""
    try:
        metadata = admin.list_topics(timeout=10).topics
    except KafkaException as exc:
        raise BrokerError(f"cannot read topic metadata: {exc}", retriable=True) from exc
    counts: dict[str, int] = {}
    for name in names:
        topic = metadata.get(name)
        if topic is None or topic.error is not None or not topic.partitions:
            continue
        counts[name] = min(len(p.replicas) for p in topic.partitions.values())
    return counts


def check_replication(admin: AdminClient, names: list[str], replication_factor: int) -> None:
    """Refuse an existing topic with fewer replicas than AUDIENCES_REPLICATION_FACTOR asks."""
    for name, count in replica_counts(admin, names).items():
        if count < replication_factor:
            raise TopicMismatch(
                f"topic {name} has replication factor {count} but "
                f"AUDIENCES_REPLICATION_FACTOR={replication_factor}: add replicas "
                "(kafka-reassign-partitions --execute with a plan listing "
                f"{replication_factor} brokers per partition), or set "
                f"AUDIENCES_REPLICATION_FACTOR={count} (or -1, the broker's default)"
            )


def broker_replication_factor(admin: AdminClient) -> int | None:
    """The cluster's `default.replication.factor` (as a broker reports it), None when no
    broker says (the embedded broker reports no broker configs)."""
    try:
        brokers = admin.list_topics(timeout=10).brokers
        for broker_id in sorted(brokers):
            resource = ConfigResource(ConfigResource.Type.BROKER, str(broker_id))
            configs = admin.describe_configs([resource])[resource].result(timeout=10)
            entry = configs.get("default.replication.factor")
            if entry is not None and entry.value is not None:
                return int(entry.value)
    except Exception as exc:  # unknown: the caller decides
        log.warning("cannot read the brokers' default.replication.factor: %s", exc)
    return None


def faust_replication_factor(settings: Settings, admin: AdminClient) -> int:
    """The replication factor for the topics Faust creates itself (its assignor's leader
    topic). Faust cannot ask for the broker's default: its setting is unsigned, and its
    CreateTopics request (version 1-3) predates -1 (KIP-464, version 4). So -1 becomes the
    broker's `default.replication.factor`, read here; 1 when the broker does not say."""
    if settings.replication_factor > 0:
        return settings.replication_factor
    default = broker_replication_factor(admin)
    if default is None or default < 1:
        log.info("the broker does not report default.replication.factor: Faust's topics get 1")
        return 1
    return default


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


def ensure_topic(
    cluster: AdminClient | Mapping[str, object],
    topic: str,
    partitions: int,
    replication_factor: int = -1,
) -> None:
    """Create one topic (e.g. a kafka destination's) when missing: never leave it to
    auto-creation, which makes a topic with the broker's default partition count.
    `cluster` is an admin client of the cluster, or its configuration;
    `replication_factor` -1 is the broker's default."""
    admin = cluster if isinstance(cluster, AdminClient) else KafkaClients.admin_for(cluster)
    try:
        existing = set(admin.list_topics(timeout=10).topics)
    except KafkaException as exc:
        raise BrokerError(f"cannot reach Kafka for topic {topic}: {exc}", retriable=True) from exc
    if topic not in existing:
        _create(admin, [NewTopic(topic, partitions, replication_factor)])


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
            if exc.args and exc.args[0].name() == "INVALID_REPLICATION_FACTOR":
                raise TopicMismatch(
                    f"cannot create topic {topic}: {exc.args[0].str()}; set "
                    "AUDIENCES_REPLICATION_FACTOR to at most the number of brokers "
                    "(or -1, the broker's default)"
                ) from None
            raise BrokerError(f"cannot create topic {topic}: {exc}", retriable=True) from exc
