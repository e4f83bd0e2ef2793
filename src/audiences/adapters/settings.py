"""Typed settings from `AUDIENCES_*` environment variables (SPEC §10).

Each field documents its variable; `audiences config` prints the effective
values with secrets redacted.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

PREFIX = "AUDIENCES_"
EVENTS_PARTITIONER = "murmur2_random"  # = Java's default: same user, same partition
SECRET_FIELDS = frozenset({"sasl_password", "write_keys"})


@dataclass(frozen=True)
class Settings:
    kafka_bootstrap: str = field(
        default="",
        metadata={"doc": "Kafka bootstrap servers; empty = start the embedded broker (up/demo)"},
    )
    app_id: str = field(
        default="audiences",
        metadata={"doc": "Faust app id: consumer groups and internal topic prefix"},
    )
    events_topic: str = field(default="events", metadata={"doc": "input Segment events"})
    audience_events_topic: str = field(
        default="audience-events", metadata={"doc": "output transitions (SPEC §5)"}
    )
    definitions_topic: str = field(
        default="audience-definitions", metadata={"doc": "compacted audience definitions"}
    )
    events_dlq_topic: str = field(
        default="events-dlq", metadata={"doc": "invalid input events with the reason"}
    )
    audience_events_dlq_topic: str = field(
        default="audience-events-dlq", metadata={"doc": "undeliverable sink messages"}
    )
    dlq_retention_hours: int = field(
        default=168,
        metadata={
            "doc": "hours both DLQs keep a record (they hold events and traits, PII included); "
            "set on the topics at every start"
        },
    )
    partitions: int = field(default=4, metadata={"doc": "partitions of topics the worker creates"})
    data_dir: str = field(default="./data", metadata={"doc": "RocksDB state directory"})
    destinations: str = field(default="", metadata={"doc": "destinations file (YAML/JSON)"})
    write_keys: str = field(default="", metadata={"doc": "collector write keys, comma-separated"})
    web_port: int = field(default=6066, metadata={"doc": "worker web port: API, health, metrics"})
    web_host: str = field(default="127.0.0.1", metadata={"doc": "worker web bind address"})
    web_advertised_url: str = field(
        default="",
        metadata={
            "doc": "URL other workers use to reach this one's API (default "
            "http://WEB_HOST:WEB_PORT, 0.0.0.0 read as 127.0.0.1)"
        },
    )
    api_url: str = field(
        default="",
        metadata={"doc": "management API of a worker, for `audiences get/members/explain/preview`"},
    )
    collector_port: int = field(default=8088, metadata={"doc": "collector port"})
    collector_host: str = field(
        default="127.0.0.1", metadata={"doc": "collector bind address (0.0.0.0 in containers)"}
    )
    collector_ack_timeout_ms: int = field(
        default=10_000,
        metadata={"doc": "collector: longest wait for Kafka's acknowledgement before a 503"},
    )
    collector_max_inflight_events: int = field(
        default=50_000,
        metadata={"doc": "collector: unacknowledged events held at most; beyond, 503"},
    )
    collector_max_inflight_bytes: int = field(
        default=64 * 1024 * 1024,
        metadata={"doc": "collector: unacknowledged event bytes held at most; beyond, 503"},
    )
    log_format: str = field(default="text", metadata={"doc": "json | text"})
    log_level: str = field(default="INFO", metadata={"doc": "logging level"})
    session_timeout_ms: int = field(
        default=6000,
        metadata={"doc": "consumer group session timeout (6 s suits the embedded broker)"},
    )
    batch_size: int = field(
        default=1000, metadata={"doc": "max records consumed per evaluator batch"}
    )
    tick_interval_ms: int = field(default=50, metadata={"doc": "deadline sweep interval when idle"})
    commit_interval_ms: int = field(
        default=100,
        metadata={
            "doc": "how often the evaluator makes its work durable (outputs acknowledged, "
            "changelog, store, offsets); outputs are sent at once, whatever it is"
        },
    )
    sweep_chunk: int = field(
        default=1000,
        metadata={
            "doc": "due deadlines fired per partition per loop turn (live events flow between)"
        },
    )
    max_poll_interval_ms: int = field(
        default=300_000,
        metadata={
            "doc": "evaluator max.poll.interval.ms: a loop stuck longer leaves the group and "
            "its partitions go to another worker"
        },
    )
    state_cache_size: int = field(
        default=50_000,
        metadata={
            "doc": "decoded profiles kept in memory per worker (about 1.5 KB each; the others "
            "are read from RocksDB when their next event comes)"
        },
    )
    fetch_wait_ms: int = field(
        default=10,
        metadata={
            "doc": "evaluator fetch.wait.max.ms: the embedded broker answers fetches only "
            "when it expires, so it bounds event-to-transition latency there"
        },
    )
    sink_fetch_wait_ms: int = field(
        default=50,
        metadata={
            "doc": "sink consumers' fetch.wait.max.ms: the embedded broker answers a fetch "
            "only when it expires, so it bounds the sinks' added latency"
        },
    )
    security_protocol: str = field(
        default="", metadata={"doc": "Kafka security.protocol (SASL_SSL, SSL, ...)"}
    )
    sasl_mechanism: str = field(
        default="", metadata={"doc": "Kafka sasl.mechanism (PLAIN, SCRAM-SHA-512, ...)"}
    )
    sasl_username: str = field(default="", metadata={"doc": "Kafka SASL user"})
    sasl_password: str = field(default="", metadata={"doc": "Kafka SASL password (secret)"})
    ssl_ca_location: str = field(default="", metadata={"doc": "CA bundle for TLS"})

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(PREFIX + f.name.upper())
            if raw is None:
                continue
            values[f.name] = int(raw) if f.type in ("int", int) else raw
        values.update(overrides)
        return cls(**values)

    @property
    def advertised_url(self) -> str:
        """Where this worker's web server is reachable by the others (no trailing /)."""
        if self.web_advertised_url:
            return self.web_advertised_url.rstrip("/")
        host = self.web_host if self.web_host not in ("", "0.0.0.0", "::") else "127.0.0.1"
        return f"http://{host}:{self.web_port}"

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def write_key_list(self) -> list[str]:
        """The collector's write keys (`write_keys`, comma-separated, blanks ignored)."""
        return [key.strip() for key in self.write_keys.split(",") if key.strip()]

    def kafka_config(self) -> dict[str, Any]:
        """librdkafka settings shared by every client."""
        config: dict[str, Any] = {"bootstrap.servers": self.kafka_bootstrap}
        if self.security_protocol:
            config["security.protocol"] = self.security_protocol
        if self.sasl_mechanism:
            config["sasl.mechanism"] = self.sasl_mechanism
            config["sasl.username"] = self.sasl_username
            config["sasl.password"] = self.sasl_password
        if self.ssl_ca_location:
            config["ssl.ca.location"] = self.ssl_ca_location
        return config

    def producer_config(self) -> dict[str, Any]:
        """librdkafka producer settings. Records keyed by user must land where the
        user's other events land: every producer of `events` (ours and yours) uses
        the Java client's default partitioner, murmur2 of the key."""
        return {**self.kafka_config(), "partitioner": EVENTS_PARTITIONER}

    def group_consumer_config(self, group_id: str) -> dict[str, Any]:
        """A consumer in group `group_id` that commits explicitly, starts at the earliest
        offset and rebalances incrementally (cooperative-sticky), with this session."""
        return {
            **self.kafka_config(),
            "group.id": group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "partition.assignment.strategy": "cooperative-sticky",
            "session.timeout.ms": self.session_timeout_ms,
            "heartbeat.interval.ms": max(500, self.session_timeout_ms // 6),
            "enable.partition.eof": False,
        }

    def redacted(self) -> dict[str, Any]:
        """Effective values, secrets replaced, with each variable's documentation."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in SECRET_FIELDS and value:
                value = "***"
            out[PREFIX + f.name.upper()] = {"value": value, "doc": f.metadata.get("doc", "")}
        return out
