"""Consumer-group names are a contract with operators (committed offsets, lag dashboards,
ACLs): renaming one makes a sink send everything again. Pinned here."""

from __future__ import annotations

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
