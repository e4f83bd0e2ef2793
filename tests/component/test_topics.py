"""Topics the engine creates: the DLQs' retention (they hold events and traits, PII
included, so they must not keep them forever), on Apache Kafka and on the embedded broker."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient, ConfigResource

from audiences.adapters.kafka.topics import Topics, ensure_topics
from shared import isolated_settings

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

    # A shorter retention set later reaches the topics created before.
    shorter = settings.replace(dlq_retention_hours=1)
    ensure_topics(shorter, topics)
    for dlq in (topics.events_dlq, topics.audience_events_dlq):
        assert _retention_ms(apache_kafka_bootstrap, dlq) == str(3_600_000)


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
