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

from audiences.adapters.kafka.acked import AckedProducer, ProducerErrors
from audiences.adapters.settings import EVENTS_PARTITIONER, Settings
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
                # Prefetched records held in memory: 16 MB is seconds of input at full
                # speed (librdkafka's default, 64 MB, is memory that never holds state).
                "queued.max.messages.kbytes": 16 * 1024,
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
                # Recovery reads whole logs: big fetches, a deep prefetch queue (64 MB:
                # up to RESTORE_THREADS of these read at once, see runtime._open_all).
                "max.partition.fetch.bytes": 16 * 1024 * 1024,
                "queued.max.messages.kbytes": 64 * 1024,
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
        """Outputs, identity control records, forwarded events and dead letters: the
        evaluator's busiest producer, so ordered without idempotence (see
        `Settings.ordered_producer_config`)."""
        return Producer(self.output_producer_config())

    def output_producer_config(self) -> dict[str, Any]:
        return {
            **self.settings.ordered_producer_config(),
            "linger.ms": 2,
            "compression.type": "lz4",
        }

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
        return Producer({**self.settings.producer_config(), **(overrides or {})})

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

    # -- the collector --------------------------------------------------------------------

    def collector_producer(
        self,
        *,
        max_inflight_records: int,
        max_inflight_bytes: int,
        delivery_timeout_ms: int,
        overrides: Mapping[str, Any] | None = None,
    ) -> AckedProducer:
        """The collector's producer of `events`: idempotent, every request awaits Kafka's
        acknowledgement within an in-flight budget; librdkafka's queue is sized above that
        budget, so the budget refuses first and `BufferError` is only a safety net.
        `overrides` (tests) come last."""
        errors = ProducerErrors()
        producer = Producer(
            {
                "linger.ms": 5,
                "compression.type": "lz4",
                "message.timeout.ms": delivery_timeout_ms,
                "queue.buffering.max.messages": max_inflight_records + 1000,
                "queue.buffering.max.kbytes": max_inflight_bytes // 1024 + 4096,
                "error_cb": errors,
                # murmur2 partitioner (a user's events share one partition), idempotent
                **self.settings.producer_config(),
                **(overrides or {}),
            }
        )
        return AckedProducer(
            producer,
            errors,
            max_inflight_records=max_inflight_records,
            max_inflight_bytes=max_inflight_bytes,
        )

    # -- the destination sinks ------------------------------------------------------------

    def sink_group(self, destination: str) -> str:
        """The consumer group of one destination's sink over `audience-events` (its committed
        offsets are the sink's progress: renaming it would send everything again)."""
        return f"{self.app_id}-sink-{destination}"

    def sink_consumer(self, destination: str) -> Consumer:
        """One destination's consumer of `audience-events`, in a group of its own
        (cooperative-sticky), so a slow destination holds back only its own offsets."""
        return Consumer(
            {
                **self.settings.group_consumer_config(self.sink_group(destination)),
                "fetch.wait.max.ms": self.settings.sink_fetch_wait_ms,
            }
        )

    def dead_letter_producer(self) -> Producer:
        """Dead letters of the sinks into `audience-events-dlq`, and the fences a replay of
        them reads to."""
        return Producer({**self.settings.producer_config(), "linger.ms": 2})

    def destination_producer(
        self,
        *,
        bootstrap: str | None,
        message_timeout_ms: int,
        security: Mapping[str, Any] | None = None,
    ) -> Producer:
        """A `kafka` destination's producer (see `destination_producer_config`)."""
        return Producer(
            self.destination_producer_config(
                bootstrap=bootstrap, message_timeout_ms=message_timeout_ms, security=security
            )
        )

    def destination_producer_config(
        self,
        *,
        bootstrap: str | None,
        message_timeout_ms: int,
        security: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """A `kafka` destination's producer settings (idempotent, murmur2 keys so that a
        user's records land where Java's would): on the engine's cluster with the engine's
        security settings, or on the destination's own cluster when it names a
        `bootstrap`, with only the destination's own `security` settings (the engine's
        SASL credentials never go to another cluster); `message_timeout_ms` is its
        `timeout_s`."""
        if bootstrap:
            config: dict[str, Any] = {
                "bootstrap.servers": bootstrap,
                "partitioner": EVENTS_PARTITIONER,
                **(security or {}),
            }
        else:
            config = self.settings.producer_config()
        return {
            **config,
            "enable.idempotence": True,
            "linger.ms": 2,
            "message.timeout.ms": message_timeout_ms,
        }

    def dlq_replay_group(self, destination: str) -> str:
        """The consumer group remembering how far `audiences dlq replay` re-sent one
        destination's dead letters."""
        return f"{self.app_id}-dlq-replay-{destination}"

    def dlq_replay_consumer(self, destination: str) -> Consumer:
        """Reads `audience-events-dlq` by assignment for a replay of one destination's dead
        letters; commits where the replay stopped, in `dlq_replay_group(destination)`."""
        return Consumer(
            {
                **self.settings.kafka_config(),
                "group.id": self.dlq_replay_group(destination),
                "enable.auto.commit": False,
            }
        )
