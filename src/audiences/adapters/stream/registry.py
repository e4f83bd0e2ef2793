"""Which worker serves which partition, for routing API reads (DESIGN: "reads for the
web API route to the worker that owns the user's partition").

Each worker publishes `{"worker": id, "url": advertised URL, "partitions": [...],
"at": ms}` keyed by its id to the compacted `{app_id}-workers` topic whenever its
assignment changes (and a tombstone when it stops cleanly), and reads the topic
in a background thread. A partition belongs to the newest record (in log order)
that claims it: a worker that takes a partition over publishes after the one
that gave it up, so a stale claim of a crashed worker is superseded as soon as
the partition is reassigned.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, Producer, TopicPartition

from audiences.adapters.kafka.clients import KafkaClients
from audiences.adapters.kafka.topics import Topics

log = logging.getLogger(__name__)
_UNSET: Any = object()


def new_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class WorkerRegistry:
    """Publishes this worker's partitions and keeps partition -> owner URL for all."""

    def __init__(
        self, clients: KafkaClients, topics: Topics, url: str, worker_id: str | None = None
    ) -> None:
        self.topic = topics.workers
        self.url = url
        self.worker_id = worker_id or new_worker_id()
        self._lock = threading.Lock()
        self._records: dict[str, tuple[int, dict[str, Any]]] = {}  # id -> (offset, record)
        self._pending: Any = _UNSET  # partitions to publish (the thread produces them)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._clients = clients
        self._producer: Producer | None = None  # Kafka clients exist from start() on
        self._consumer: Consumer | None = None

    # -- this worker ------------------------------------------------------------------------

    def publish(self, partitions: list[int]) -> None:
        """Announce this worker's partitions (called from the evaluator's rebalance
        callbacks: it only records them; the registry thread produces)."""
        with self._lock:
            self._pending = sorted(partitions)

    def _produce(self, partitions: list[int] | None) -> None:
        if self._producer is None:
            return
        value = (
            None
            if partitions is None
            else orjson.dumps(
                {
                    "worker": self.worker_id,
                    "url": self.url,
                    "partitions": partitions,
                    "at": time.time_ns() // 1_000_000,
                }
            )
        )
        self._producer.produce(self.topic, key=self.worker_id.encode(), value=value)
        if self._producer.flush(10):
            log.warning("worker registry: announcement of %s not acknowledged", partitions)
        else:
            log.info(
                "worker %s at %s announced partitions %s", self.worker_id, self.url, partitions
            )

    # -- everyone ---------------------------------------------------------------------------

    def owner(self, partition: int) -> str | None:
        """URL of the worker serving `partition`, None if nobody claims it."""
        return self.owners().get(partition)

    def owners(self) -> dict[int, str]:
        with self._lock:
            records = sorted(self._records.values(), key=lambda entry: entry[0])
        found: dict[int, str] = {}
        for _offset, record in records:  # later claims win
            for partition in record.get("partitions") or ():
                found[int(partition)] = str(record["url"])
        return found

    def workers(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {worker: record for worker, (_, record) in self._records.items()}

    def _apply(self, msg: Message) -> None:
        key = (msg.key() or b"").decode("utf-8", "replace")
        value = msg.value()
        with self._lock:
            if value is None:
                self._records.pop(key, None)
                return
            try:
                record = orjson.loads(value)
            except orjson.JSONDecodeError:
                log.warning("worker registry: unreadable record at offset %d", msg.offset())
                return
            if isinstance(record, dict) and isinstance(record.get("url"), str):
                self._records[key] = (msg.offset(), record)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> WorkerRegistry:
        self._producer = self._clients.producer({"linger.ms": 0})
        self._consumer = self._clients.reader("workers-reader")
        self._consumer.assign([TopicPartition(self.topic, 0, OFFSET_BEGINNING)])
        self._thread = threading.Thread(
            target=self._run, args=(self._consumer,), name="worker-registry", daemon=True
        )
        self._thread.start()
        return self

    def _run(self, consumer: Consumer) -> None:
        while not self._stop.is_set():
            with self._lock:
                pending, self._pending = self._pending, _UNSET
            if pending is not _UNSET:
                try:
                    self._produce(pending)
                except Exception:  # Kafka trouble must not kill routing: retry next turn
                    log.warning("worker registry: cannot announce partitions", exc_info=True)
                    self.publish(pending)
            for msg in consumer.consume(100, 0.2):
                if msg.error() is None:
                    self._apply(msg)

    def stop(self) -> None:
        """Withdraw this worker (tombstone) and stop reading."""
        self._stop.set()
        if self._thread is None or self._consumer is None:
            return
        self._thread.join(10)
        try:
            self._produce(None)
        except Exception:
            log.warning("worker registry: cannot withdraw %s", self.worker_id, exc_info=True)
        self._consumer.close()
