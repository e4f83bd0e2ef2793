"""AUDIENCES_REPLICATION_FACTOR (SPEC §10): every topic the engine creates gets it (-1 = the
broker's default), Faust's own topics too, and an existing topic with fewer replicas than an
explicit value is refused. Against an in-memory admin client that answers as confluent's
AdminClient does; tests/component/test_topics.py runs the same on real brokers."""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import ConfigResource, NewTopic

from audiences.adapters.kafka.clients import KafkaClients
from audiences.adapters.kafka.topics import (
    TopicMismatch,
    Topics,
    ensure_topic,
    ensure_topics,
    faust_replication_factor,
)
from audiences.adapters.settings import Settings
from audiences.adapters.stream.app import create_app


def _done(value: Any = None, error: BaseException | None = None) -> Future[Any]:
    future: Future[Any] = Future()
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
    return future


class FakeAdmin:
    """Topics as {name: [replica count per partition]}; broker configs as a dict."""

    def __init__(
        self,
        topics: dict[str, list[int]] | None = None,
        broker_configs: dict[str, str] | None = None,
        brokers: int = 1,
    ) -> None:
        self.topics = dict(topics or {})
        self.broker_configs = broker_configs or {}
        self.brokers = brokers
        self.created: list[NewTopic] = []

    def list_topics(self, topic: str | None = None, timeout: float = 0) -> Any:
        def meta(replicas: list[int]) -> Any:
            partitions = {
                n: SimpleNamespace(replicas=list(range(count))) for n, count in enumerate(replicas)
            }
            return SimpleNamespace(error=None, partitions=partitions)

        return SimpleNamespace(
            topics={name: meta(r) for name, r in self.topics.items()},
            brokers={b: object() for b in range(1, self.brokers + 1)},
        )

    def create_topics(self, new: list[NewTopic], operation_timeout: float = 0) -> Any:
        futures = {}
        for topic in new:
            self.created.append(topic)
            count = topic.replication_factor
            if count > self.brokers:
                error = KafkaError(
                    KafkaError.INVALID_REPLICATION_FACTOR,
                    f"Replication factor: {count} larger than available brokers: {self.brokers}.",
                )
                futures[topic.topic] = _done(error=KafkaException(error))
                continue
            replicas = count if count > 0 else int(self.broker_configs.get("default", "1"))
            self.topics[topic.topic] = [replicas] * topic.num_partitions
            futures[topic.topic] = _done()
        return futures

    def describe_configs(self, resources: list[ConfigResource]) -> Any:
        out = {}
        for resource in resources:
            configs = {}
            if resource.restype == ConfigResource.Type.BROKER:
                configs = {
                    name: SimpleNamespace(value=value)
                    for name, value in self.broker_configs.items()
                }
            out[resource] = _done(configs)
        return out

    def incremental_alter_configs(self, resources: list[ConfigResource]) -> Any:
        return {resource: _done() for resource in resources}


def _settings(tmp_path: Path, **values: Any) -> Settings:
    return Settings(kafka_bootstrap="k:9092", data_dir=str(tmp_path), **values)


def test_every_topic_is_created_with_the_configured_replication_factor(tmp_path: Path) -> None:
    for factor in (-1, 3):
        admin = FakeAdmin(brokers=3)
        settings = _settings(tmp_path, replication_factor=factor)
        topics = Topics.from_settings(settings)
        ensure_topics(settings, topics, admin)  # type: ignore[arg-type]
        assert {t.topic for t in admin.created} == set(vars(topics).values())
        assert {t.replication_factor for t in admin.created} == {factor}


def test_an_existing_topic_with_fewer_replicas_than_asked_is_refused(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    topics = Topics.from_settings(settings)
    admin = FakeAdmin(brokers=3)
    ensure_topics(settings, topics, admin)  # -1: the broker's default, here 1 replica
    admin.topics[topics.events] = [3, 3, 1, 3]  # one partition lost replicas: it counts
    for accepted in (-1, 1):
        ensure_topics(settings.replace(replication_factor=accepted), topics, admin)  # type: ignore[arg-type]
    with pytest.raises(TopicMismatch) as refused:
        ensure_topics(settings.replace(replication_factor=2), topics, admin)  # type: ignore[arg-type]
    message = str(refused.value)
    assert message.startswith("topic ") and "has replication factor 1 but" in message
    assert "AUDIENCES_REPLICATION_FACTOR=2" in message and "kafka-reassign-partitions" in message

    for name in vars(topics).values():
        admin.topics[name] = [3] * len(admin.topics[name])
    ensure_topics(settings.replace(replication_factor=2), topics, admin)  # type: ignore[arg-type]
    ensure_topics(settings.replace(replication_factor=3), topics, admin)  # type: ignore[arg-type]


def test_more_replicas_than_brokers_stops_with_the_setting_named(tmp_path: Path) -> None:
    settings = _settings(tmp_path, replication_factor=3)
    with pytest.raises(
        TopicMismatch, match=r"larger than available brokers: 1.*at most the number"
    ):
        ensure_topics(settings, Topics.from_settings(settings), FakeAdmin(brokers=1))  # type: ignore[arg-type]


def test_a_destination_topic_gets_the_replication_factor_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    admin = FakeAdmin(brokers=3)
    monkeypatch.setattr(KafkaClients, "admin_for", staticmethod(lambda config: admin))
    ensure_topic({"bootstrap.servers": "k:9092"}, "crm-out", 2)
    ensure_topic({"bootstrap.servers": "k:9092"}, "crm-out-3", 2, 3)
    assert [(t.topic, t.replication_factor) for t in admin.created] == [
        ("crm-out", -1),
        ("crm-out-3", 3),
    ]


def test_faust_gets_the_brokers_default_as_a_number(tmp_path: Path) -> None:
    """Faust's setting is unsigned and its CreateTopics request predates -1."""
    explicit = _settings(tmp_path, replication_factor=2)
    assert faust_replication_factor(explicit, FakeAdmin()) == 2  # type: ignore[arg-type]
    default = _settings(tmp_path)
    reported = FakeAdmin(broker_configs={"default.replication.factor": "3"})
    assert faust_replication_factor(default, reported) == 3  # type: ignore[arg-type]
    assert faust_replication_factor(default, FakeAdmin()) == 1  # type: ignore[arg-type]  # unknown

    secured = default.replace(api_tokens="t:admin")
    assert (
        create_app(secured, lambda: True, replication_factor=3).conf.topic_replication_factor == 3
    )
    assert create_app(secured, lambda: True).conf.topic_replication_factor == 1
    three = secured.replace(replication_factor=3)
    assert create_app(three, lambda: True).conf.topic_replication_factor == 3
