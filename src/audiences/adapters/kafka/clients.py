"""Every Kafka client of the engine, and every consumer-group and transactional id, made
in one place. `bootstrap.py` builds one `KafkaClients` per process and hands it to
whoever needs clients; nothing else constructs a consumer, producer or admin client
for the engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient

from audiences.adapters.settings import Settings
from audiences.adapters.state.checkpoint import CHANGELOG_MESSAGE_MAX_BYTES


class KafkaClients:
    """Factories of the engine's Kafka clients for one app (`settings.app_id`)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app_id = settings.app_id

    def admin(self) -> AdminClient:
        """Creates and checks the engine's topics (`ensure_topics`)."""
        return AdminClient(self.settings.kafka_config())

    @staticmethod
    def admin_for(config: Mapping[str, Any]) -> AdminClient:
        """An admin client for an explicit configuration: `ensure_topic` given the config
        of the cluster a topic lives on (e.g. a kafka destination's own `bootstrap`)."""
        return AdminClient(dict(config))

    # -- the runtime ----------------------------------------------------------------------

    def events_consumer(self) -> Consumer:
        """The evaluator's consumer of `events` (its own group, cooperative-sticky)."""
        return Consumer(
            {
                **self.settings.group_consumer_config(f"{self.app_id}-evaluator"),
                "fetch.wait.max.ms": self.settings.fetch_wait_ms,
                "max.poll.interval.ms": self.settings.max_poll_interval_ms,
            }
        )

    def changelog_reader(self) -> Consumer:
        """Reads changelog partitions by assignment (recovery): committed records only,
        from the oldest retained one when a checkpoint's offset is gone."""
        return Consumer(
            {
                **self.settings.kafka_config(),
                "group.id": f"{self.app_id}-recovery",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "isolation.level": "read_committed",
                "fetch.wait.max.ms": self.settings.fetch_wait_ms,
                "enable.partition.eof": False,
                # Recovery reads whole logs: big fetches, a deep prefetch queue.
                "max.partition.fetch.bytes": 16 * 1024 * 1024,
                "queued.max.messages.kbytes": 256 * 1024,
            }
        )

    def history_reader(self) -> Consumer:
        """Re-reads retained `events` for backfills (by assignment)."""
        return Consumer(
            {
                **self.settings.kafka_config(),
                "group.id": f"{self.app_id}-backfill",
                "enable.auto.commit": False,
                "enable.partition.eof": False,
                "auto.offset.reset": "earliest",  # an offset retention removed: the oldest left
                "fetch.wait.max.ms": self.settings.fetch_wait_ms,
            }
        )

    def output_producer(self) -> Producer:
        """Outputs, identity control records, forwarded events and dead letters."""
        return Producer(
            {
                **self.settings.producer_config(),
                "enable.idempotence": True,
                "linger.ms": 2,
                "compression.type": "lz4",
            }
        )

    def changelog_producer(self, partition: int) -> Producer:
        """The transactional producer of one changelog partition: a new owner's
        `init_transactions` with the same id fences every former owner's writes."""
        return Producer(
            {
                **self.settings.kafka_config(),
                "transactional.id": f"{self.app_id}-changelog-{partition}",
                "transaction.timeout.ms": 60_000,
                "linger.ms": 2,
                "compression.type": "lz4",
                "message.max.bytes": CHANGELOG_MESSAGE_MAX_BYTES,
            }
        )

    # -- definitions, registry, API -------------------------------------------------------

    def definitions_consumer(self) -> Consumer:
        return Consumer(
            {
                **self.settings.kafka_config(),
                "group.id": f"{self.app_id}-definitions",
                "enable.auto.commit": False,
                "enable.partition.eof": False,
                "fetch.wait.max.ms": self.settings.fetch_wait_ms,
            }
        )

    def producer(self, overrides: dict[str, Any] | None = None) -> Producer:
        """A plain idempotent producer with the project's partitioner (fences, definitions,
        registry announcements, API control records)."""
        return Producer(
            {**self.settings.producer_config(), "enable.idempotence": True, **(overrides or {})}
        )

    def reader(self, purpose: str, overrides: dict[str, Any] | None = None) -> Consumer:
        """A consumer used by assignment only (no group membership), e.g. the worker
        registry's reader of `{app_id}-workers`."""
        return Consumer(
            {
                **self.settings.kafka_config(),
                "group.id": f"{self.app_id}-{purpose}",
                "enable.auto.commit": False,
                "enable.partition.eof": False,
                **(overrides or {}),
            }
        )
