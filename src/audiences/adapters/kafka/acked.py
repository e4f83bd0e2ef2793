"""Produce from asyncio and await Kafka's acknowledgement, within a bounded budget.

`AckedProducer.send(topic, records)` returns once Kafka acknowledged every record,
or raises `DeliveryError` (retriable). It backs the collector's promise "200 only
after Kafka has the events" without letting memory grow when Kafka is slow or down:

- An **in-flight budget** (records and bytes) is reserved for a whole request before
  anything is produced and released per record by its delivery report, not when the
  request gives up waiting. A request that does not fit is refused at once; records
  already handed to librdkafka keep counting until delivered or timed out
  (`message.timeout.ms`), so the budget bounds what the process holds.
- The librdkafka queue is sized above the budget (`KafkaClients.collector_producer`
  makes the producer), so `BufferError` (queue full) is a safety net, not the normal
  refusal; it is handled the same way.
- Delivery reports are served by one poll thread; each request's future is resolved
  with one `loop.call_soon_threadsafe` when its last record is reported.
- The producer is idempotent (`enable.idempotence`): librdkafka's own retries cannot
  duplicate or reorder records of a partition. (The embedded Tansu broker grants
  producer ids; `tests/component/test_collector.py` checks a PID is acquired.)
- A fatal producer error (possible with idempotence) leaves the producer unusable:
  `failure` says why, every later `send` fails, and the collector's `/healthz` turns
  503 so that a supervisor restarts the process (crash-only, like the worker).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Sequence

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from audiences.adapters import metrics
from audiences.errors import DeliveryError

log = logging.getLogger(__name__)

RETRY_SOON_S = 1  # Retry-After when the budget or queue is full: a burst drains quickly
RETRY_LATER_S = 5  # when Kafka did not answer in time or failed: it may be down


class _Pending:
    """The records of one `send` still waiting for their delivery report."""

    __slots__ = ("error", "future", "lock", "loop", "remaining")

    def __init__(self, loop: asyncio.AbstractEventLoop, count: int) -> None:
        self.loop = loop
        self.future: asyncio.Future[str | None] = loop.create_future()
        self.remaining = count
        self.error: str | None = None
        self.lock = threading.Lock()

    def settle(self, count: int, error: str | None) -> None:
        """Called from any thread as records are reported (or given up)."""
        with self.lock:
            self.remaining -= count
            if error is not None and self.error is None:
                self.error = error
            finished = self.remaining == 0
        if finished:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                self.loop.call_soon_threadsafe(self._finish)

    def _finish(self) -> None:
        if not self.future.done():
            self.future.set_result(self.error)


class ProducerErrors:
    """librdkafka's error callback target (`error_cb`), apart from `AckedProducer` so that
    the producer does not reference its owner (no cycle: dropping the owner frees it)."""

    def __init__(self) -> None:
        self.failure: str | None = None
        self._last: int | None = None

    def __call__(self, err: KafkaError) -> None:
        if err.fatal():
            self.failure = str(err)
            log.critical("Kafka producer fatal error, the collector needs a restart: %s", err)
        elif err.code() != self._last:  # broker-down errors repeat every second
            log.warning("Kafka producer: %s", err)
        self._last = err.code()


class AckedProducer:
    """An idempotent confluent-kafka producer with a bounded in-flight budget."""

    def __init__(
        self,
        producer: Producer,
        errors: ProducerErrors,
        *,
        max_inflight_records: int,
        max_inflight_bytes: int,
    ) -> None:
        """`producer` reports its errors to `errors` (its `error_cb`) and is sized for this
        budget: `KafkaClients.collector_producer` makes both."""
        self.max_inflight_records = max_inflight_records
        self.max_inflight_bytes = max_inflight_bytes
        self._errors = errors
        self._records = 0
        self._bytes = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._producer = producer
        self._thread = threading.Thread(target=self._poll, name="collector-producer", daemon=True)
        self._thread.start()

    @property
    def failure(self) -> str | None:
        """Why the producer is unusable (a fatal librdkafka error), or None."""
        return self._errors.failure

    @property
    def inflight(self) -> tuple[int, int]:
        """(records, bytes) produced and not yet reported."""
        with self._lock:
            return self._records, self._bytes

    def queued(self) -> int:
        """Records librdkafka holds (queued or in flight)."""
        return len(self._producer)

    async def send(
        self,
        topic: str,
        records: Sequence[tuple[bytes | None, bytes]],
        timeout_s: float,
        headers: Sequence[list[tuple[str, bytes]]] | None = None,
    ) -> None:
        """Produce `records` (key, value; with `headers[i]` for the i-th when given) and
        return when Kafka acknowledged all of them."""
        if self.failure is not None:
            raise DeliveryError(
                f"Kafka producer failed: {self.failure}", retry_after_s=RETRY_LATER_S
            )
        if not records:
            return
        size = sum(len(key or b"") + len(value) for key, value in records)
        self._reserve(len(records), size)
        pending = _Pending(asyncio.get_running_loop(), len(records))
        produced = 0

        def delivered(err: KafkaError | None, msg: Message) -> None:
            self._release(1, len(msg.key() or b"") + len(msg.value() or b""))
            pending.settle(1, None if err is None else str(err))

        try:
            if headers is None:
                for key, value in records:
                    self._producer.produce(topic, value, key, on_delivery=delivered)
                    produced += 1
            else:
                for (key, value), extra in zip(records, headers, strict=True):
                    self._producer.produce(topic, value, key, on_delivery=delivered, headers=extra)
                    produced += 1
        except (BufferError, KafkaException) as exc:
            unsent = records[produced:]
            self._release(len(unsent), sum(len(k or b"") + len(v) for k, v in unsent))
            pending.settle(len(unsent), str(exc))
            raise DeliveryError(
                f"Kafka producer queue is full ({exc})", retry_after_s=RETRY_SOON_S
            ) from None
        try:
            error = await asyncio.wait_for(pending.future, timeout_s)
        except TimeoutError:
            raise DeliveryError(
                f"Kafka did not acknowledge {len(records)} event(s) within {timeout_s:g}s",
                retry_after_s=RETRY_LATER_S,
            ) from None
        if error is not None:
            raise DeliveryError(f"Kafka refused the events: {error}", retry_after_s=RETRY_LATER_S)

    def close(self, timeout_s: float = 10.0) -> int:
        """Stop polling and wait up to `timeout_s` for queued records; returns how many
        were left undelivered."""
        self._stop.set()
        self._thread.join()
        left = int(self._producer.flush(timeout_s))
        if left:
            log.warning("collector stopped with %d event(s) not acknowledged by Kafka", left)
        return left

    # -- internals ------------------------------------------------------------------------

    def _reserve(self, count: int, size: int) -> None:
        with self._lock:
            if (
                self._records + count > self.max_inflight_records
                or self._bytes + size > self.max_inflight_bytes
            ) and self._records > 0:  # an oversized request alone still gets its chance
                raise DeliveryError(
                    f"too many events waiting for Kafka ({self._records} events, "
                    f"{self._bytes} bytes in flight)",
                    retry_after_s=RETRY_SOON_S,
                )
            self._records += count
            self._bytes += size
            records, size_now = self._records, self._bytes
        metrics.COLLECTOR_INFLIGHT_EVENTS.set(records)
        metrics.COLLECTOR_INFLIGHT_BYTES.set(size_now)

    def _release(self, count: int, size: int) -> None:
        with self._lock:
            self._records -= count
            self._bytes -= size
            records, size_now = self._records, self._bytes
        metrics.COLLECTOR_INFLIGHT_EVENTS.set(records)
        metrics.COLLECTOR_INFLIGHT_BYTES.set(size_now)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                self._producer.poll(0.1)
            except Exception:  # a callback bug must not stop delivery reports
                log.exception("error while serving Kafka delivery reports")
