"""Consumer-group names are a contract with operators (committed offsets, lag dashboards,
ACLs): renaming one makes a sink send everything again. Pinned here."""

from __future__ import annotations

import inspect
from types import SimpleNamespace
from typing import Any

import pytest

from audiences.adapters.kafka import clients as clients_module
from audiences.adapters.kafka.clients import KafkaClients
from audiences.adapters.settings import Settings
from audiences.adapters.sinks.config import parse_destinations


def test_the_sinks_and_the_dlq_replay_keep_their_group_names() -> None:
    clients = KafkaClients(Settings(app_id="shop"))
    assert clients.sink_group("braze") == "shop-sink-braze"
    assert clients.dlq_replay_group("braze") == "shop-dlq-replay-braze"


ENGINE_SASL = Settings(
    kafka_bootstrap="engine:9093",
    security_protocol="SASL_SSL",
    sasl_mechanism="SCRAM-SHA-512",
    sasl_username="engine-user",
    sasl_password="engine-secret",
    ssl_ca_location="/etc/engine-ca.pem",
)


def test_a_kafka_destination_on_its_own_cluster_gets_only_its_own_credentials() -> None:
    """The engine's SASL user and password must never be sent to another cluster."""
    clients = KafkaClients(ENGINE_SASL)
    other = clients.destination_producer_config(bootstrap="other:9092", message_timeout_ms=5000)
    assert other["bootstrap.servers"] == "other:9092"
    assert not {k for k in other if k.startswith(("sasl.", "security.", "ssl."))}
    assert "engine-secret" not in other.values()
    assert other["partitioner"] == "murmur2_random" and other["enable.idempotence"] is True

    [destination] = parse_destinations(
        [
            {
                "name": "lake",
                "type": "kafka",
                "topic": "audiences",
                "bootstrap": "other:9092",
                "security_protocol": "SASL_PLAINTEXT",
                "sasl_mechanism": "PLAIN",
                "sasl_username": "lake-user",
                "sasl_password": "${LAKE_PASSWORD}",
            }
        ],
        {"LAKE_PASSWORD": "lake-secret"},
    )
    own = clients.destination_producer_config(
        bootstrap=destination.bootstrap,
        message_timeout_ms=5000,
        security=destination.kafka_security_config(),
    )
    assert {k: v for k, v in own.items() if k.startswith(("sasl.", "security.", "ssl."))} == {
        "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanism": "PLAIN",
        "sasl.username": "lake-user",
        "sasl.password": "lake-secret",
    }
    assert "lake-secret" not in repr(destination)


def test_a_kafka_destination_on_the_engines_cluster_uses_the_engines_credentials() -> None:
    config = KafkaClients(ENGINE_SASL).destination_producer_config(
        bootstrap=None, message_timeout_ms=5000
    )
    assert config["bootstrap.servers"] == "engine:9093"
    assert (config["sasl.username"], config["sasl.password"]) == ("engine-user", "engine-secret")
    assert config["security.protocol"] == "SASL_SSL"
    assert config["ssl.ca.location"] == "/etc/engine-ca.pem"


def test_every_client_of_the_engine_gets_the_security_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SPEC §10: the SASL/TLS settings reach every Kafka client the process makes (Faust's
    app: tests/unit/test_security_settings.py). Each factory of `KafkaClients` is called
    and the configuration it hands librdkafka is checked."""
    made: list[tuple[str, dict[str, Any]]] = []

    def recorder(kind: str) -> Any:
        def make(config: dict[str, Any]) -> Any:
            made.append((kind, dict(config)))
            return SimpleNamespace()

        return make

    for kind in ("Consumer", "Producer", "AdminClient"):
        monkeypatch.setattr(clients_module, kind, recorder(kind))
    monkeypatch.setattr(clients_module, "AckedProducer", lambda *a, **k: SimpleNamespace())
    clients = KafkaClients(ENGINE_SASL)
    calls = {
        "admin": lambda: clients.admin(),
        "events_consumer": lambda: clients.events_consumer(),
        "changelog_reader": lambda: clients.changelog_reader(),
        "history_reader": lambda: clients.history_reader(),
        "output_producer": lambda: clients.output_producer(),
        "changelog_producer": lambda: clients.changelog_producer(0),
        "definitions_consumer": lambda: clients.definitions_consumer(),
        "producer": lambda: clients.producer(),
        "reader": lambda: clients.reader("x"),
        "collector_producer": lambda: clients.collector_producer(
            max_inflight_records=10, max_inflight_bytes=1 << 20, delivery_timeout_ms=1000
        ),
        "sink_consumer": lambda: clients.sink_consumer("crm"),
        "dead_letter_producer": lambda: clients.dead_letter_producer(),
        "destination_producer": lambda: clients.destination_producer(
            bootstrap=None, message_timeout_ms=1000
        ),
        "dlq_replay_consumer": lambda: clients.dlq_replay_consumer("crm"),
    }
    factories = {
        name
        for name, member in inspect.getmembers(KafkaClients, inspect.isfunction)
        if not name.startswith("_")
        and name != "admin_for"  # an explicit configuration (e.g. a destination's cluster)
        and inspect.signature(member).return_annotation
        in ("Consumer", "Producer", "AdminClient", "AckedProducer")
    }
    assert factories == set(calls)  # a new factory must be added here
    expected = {
        "bootstrap.servers": "engine:9093",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "engine-user",
        "sasl.password": "engine-secret",
        "ssl.ca.location": "/etc/engine-ca.pem",
    }
    for name, call in calls.items():
        made.clear()
        call()
        assert len(made) == 1, name
        kind, config = made[0]
        assert {k: config.get(k) for k in expected} == expected, (name, kind)


def test_a_destination_topic_on_its_own_cluster_is_created_with_its_own_credentials(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The admin client that creates a kafka destination's topic on another cluster gets
    that cluster's security settings, never the engine's (and its default replication)."""
    from audiences.adapters.stream import sinks

    made: list[tuple[dict[str, Any], str, int, int]] = []
    monkeypatch.setattr(sinks, "ensure_topics", lambda *a, **k: None)
    monkeypatch.setattr(
        sinks,
        "ensure_topic",
        lambda config, topic, n, rf: made.append((dict(config), topic, n, rf)),
    )
    destinations = parse_destinations(
        [
            {
                "name": "lake",
                "type": "kafka",
                "topic": "lake-audiences",
                "bootstrap": "other:9092",
                "security_protocol": "SSL",
                "ssl_ca_location": "/etc/lake-ca.pem",
            },
            {"name": "mirror", "type": "kafka", "topic": "mirror-audiences"},
        ],
        {},
    )
    settings = ENGINE_SASL.replace(replication_factor=3, partitions=6)
    sinks.prepare_sink_topics(settings, destinations, SimpleNamespace(admin=lambda: None))  # type: ignore[arg-type]
    assert made == [
        (
            {
                "bootstrap.servers": "other:9092",
                "security.protocol": "SSL",
                "ssl.ca.location": "/etc/lake-ca.pem",
            },
            "lake-audiences",
            6,
            -1,
        ),
        (settings.kafka_config(), "mirror-audiences", 6, 3),
    ]


def test_the_evaluators_output_producer_is_ordered_by_one_request_in_flight() -> None:
    """Not idempotent: librdkafka's idempotent producer spins its broker thread while a
    request is unanswered (Settings.ordered_producer_config). Order is kept by sending
    one request at a time; keys are placed by murmur2 like every producer here."""
    config = KafkaClients(ENGINE_SASL).output_producer_config()
    assert config["enable.idempotence"] is False
    assert config["max.in.flight.requests.per.connection"] == 1
    assert config["partitioner"] == "murmur2_random"
    assert config["sasl.password"] == "engine-secret"
    # every other producer of `events` stays idempotent
    assert ENGINE_SASL.producer_config()["enable.idempotence"] is True
