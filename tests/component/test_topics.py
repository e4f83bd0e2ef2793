"""Topics the engine creates: the DLQs' retention (they hold events and traits, PII
included, so they must not keep them forever) and the replication factor, on Apache Kafka
and on the embedded broker."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient, ConfigResource

from audiences.adapters.kafka.topics import (
    TopicMismatch,
    Topics,
    broker_replication_factor,
    ensure_topics,
    faust_replication_factor,
    replica_counts,
)
from shared import isolated_settings, wait_for

pytestmark = pytest.mark.kafka


def _retention_ms(bootstrap: str, topic: str) -> str:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
    configs = admin.describe_configs([resource])[resource].result(timeout=10)
    return str(configs["retention.ms"].value)


@pytest.mark.apache
def test_dlqs_keep_records_as_long_as_configured_and_follow_a_later_change(
    apache_kafka_bootstrap: str, unique_name: Callable[..., str], tmp_path: Path
) -> None:
    settings = isolated_settings(
        apache_kafka_bootstrap, unique_name("dlq"), str(tmp_path), dlq_retention_hours=2
    )
    topics = Topics.from_settings(settings)
    ensure_topics(settings, topics)
    for dlq in (topics.events_dlq, topics.audience_events_dlq):
        assert _retention_ms(apache_kafka_bootstrap, dlq) == str(2 * 3_600_000)
    assert _retention_ms(apache_kafka_bootstrap, topics.events) != str(2 * 3_600_000)

    # A shorter retention set later reaches the topics created before (Apache Kafka applies
    # an altered config a moment after acknowledging it: DescribeConfigs may still show the
    # old value, so the check reads until it changes)
    shorter = settings.replace(dlq_retention_hours=1)
    ensure_topics(shorter, topics)
    for dlq in (topics.events_dlq, topics.audience_events_dlq):
        wait_for(
            lambda dlq=dlq: _retention_ms(apache_kafka_bootstrap, dlq) == str(3_600_000),
            30,
            f"{dlq}: retention.ms 3600000",
        )


def test_dlq_retention_on_the_embedded_broker_does_not_stop_a_start(
    kafka_bootstrap: str, unique_name: Callable[..., str], tmp_path: Path
) -> None:
    settings = isolated_settings(
        kafka_bootstrap, unique_name("dlq"), str(tmp_path), dlq_retention_hours=3
    )
    topics = Topics.from_settings(settings)
    ensure_topics(settings, topics)
    ensure_topics(settings.replace(dlq_retention_hours=4), topics)  # altered, or logged
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    assert {topics.events_dlq, topics.audience_events_dlq} <= set(
        admin.list_topics(timeout=10).topics
    )


def _replicas(bootstrap: str, names: list[str]) -> dict[str, int]:
    """Replica counts once the broker's metadata lists every topic (Apache Kafka lists a
    topic just created a moment later: its metadata propagates)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    deadline = time.monotonic() + 30
    counts = replica_counts(admin, names)
    while len(counts) < len(names) and time.monotonic() < deadline:
        time.sleep(0.05)
        counts = replica_counts(admin, names)
    return counts


def test_replication_factor_on_the_embedded_broker(
    kafka_bootstrap: str, kafka_flavor: str, unique_name: Callable[..., str], tmp_path: Path
) -> None:
    """-1 = the broker's default (one replica on a one-node broker); an existing topic with
    fewer replicas than an explicit AUDIENCES_REPLICATION_FACTOR stops the start.

    The embedded broker (Tansu) creates a topic with any replication factor on its single
    node and lists the node as many times as replicas were asked ([111, 111, 111] for 3),
    and reports no broker configs (no default.replication.factor: Faust's topics get 1)."""
    settings = isolated_settings(kafka_bootstrap, unique_name("rf"), str(tmp_path))
    topics = Topics.from_settings(settings)
    ensure_topics(settings, topics)
    names = [getattr(topics, f.name) for f in dataclasses.fields(topics)]
    assert _replicas(kafka_bootstrap, names) == dict.fromkeys(names, 1)
    ensure_topics(settings.replace(replication_factor=1), topics)  # as many as asked: fine
    with pytest.raises(TopicMismatch, match="has replication factor 1 but AUDIENCES_REPLICATION"):
        ensure_topics(settings.replace(replication_factor=2), topics)
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    if kafka_flavor == "embedded":
        assert broker_replication_factor(admin) is None
        assert faust_replication_factor(settings, admin) == 1


@pytest.mark.apache
def test_replication_factor_on_apache_kafka(
    apache_kafka_bootstrap: str, unique_name: Callable[..., str], tmp_path: Path
) -> None:
    """The one-node test broker says default.replication.factor=1: what -1 gives and what
    Faust's own topics get; asking for 2 replicas stops the start with the setting named,
    whether the topics are missing (the broker refuses) or exist (the engine refuses)."""
    admin = AdminClient({"bootstrap.servers": apache_kafka_bootstrap})
    assert broker_replication_factor(admin) == 1
    fresh = isolated_settings(
        apache_kafka_bootstrap, unique_name("rf2"), str(tmp_path), replication_factor=2
    )
    with pytest.raises(
        TopicMismatch,
        match=r"cannot create topic .*only 1 broker.*AUDIENCES_REPLICATION_FACTOR to at most",
    ):
        ensure_topics(fresh, Topics.from_settings(fresh))

    settings = isolated_settings(apache_kafka_bootstrap, unique_name("rf"), str(tmp_path))
    topics = Topics.from_settings(settings)
    ensure_topics(settings, topics)
    names = [getattr(topics, f.name) for f in dataclasses.fields(topics)]
    assert _replicas(apache_kafka_bootstrap, names) == dict.fromkeys(names, 1)
    assert faust_replication_factor(settings, admin) == 1
    with pytest.raises(TopicMismatch, match="has replication factor 1 but AUDIENCES_REPLICATION"):
        ensure_topics(settings.replace(replication_factor=2), topics)
