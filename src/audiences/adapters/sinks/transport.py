"""Transports: how a rendered `Request` reaches a destination.

- `HttpTransport`: one aiohttp `ClientSession` per destination (a pooled
  connector with keep-alive), a total timeout of `timeout_s` per attempt.
  Connection errors and timeouts come back as `Response(status=None)`.
  Redirects are never followed (`allow_redirects=False`): aiohttp would turn
  a 301/302/303 POST into a body-less GET whose 2xx would count as delivered.
- `KafkaTransport`: a confluent-kafka producer (idempotent, acks=all, made by
  `KafkaClients.destination_producer`); a request's records are produced and
  flushed in a worker thread.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from confluent_kafka import KafkaError, KafkaException, Producer

from audiences.adapters.kafka.clients import KafkaClients
from audiences.adapters.sinks.config import Destination
from audiences.adapters.sinks.delivery import EXCERPT_CHARS, Response, Transport
from audiences.adapters.sinks.render import Request

CONNECTIONS_PER_DESTINATION = 16
MAX_CONTENT_CHARS = 1_000_000  # a 2xx body kept whole for answers.py (Braze `errors[]`)
# Kafka errors no retry can fix: the record goes to the DLQ at once.
PERMANENT_KAFKA_ERRORS = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_RECORD,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
    }
)


class HttpTransport:
    def __init__(self, destination: Destination) -> None:
        self.destination = destination
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=CONNECTIONS_PER_DESTINATION, keepalive_timeout=30
                ),
                timeout=aiohttp.ClientTimeout(total=self.destination.timeout_s),
                headers={"User-Agent": "audiences-sink"},
            )
        return self._session

    async def send(self, request: Request, headers: list[tuple[str, str]]) -> Response:
        try:
            async with self._client().request(
                request.method,
                request.url,
                data=request.body,
                headers=headers,
                allow_redirects=False,  # a 3xx is a failure (delivery.py), never followed
            ) as answer:
                text = await answer.text(errors="replace")
                return Response(
                    answer.status,
                    text[:EXCERPT_CHARS],
                    answer.headers.get("Retry-After"),
                    location=answer.headers.get("Location"),
                    content=text[:MAX_CONTENT_CHARS] if 200 <= answer.status < 300 else "",
                    headers={k.lower(): v for k, v in answer.headers.items()},
                )
        except (aiohttp.ClientError, TimeoutError) as exc:
            return Response(None, error=f"{type(exc).__name__}: {exc}"[:EXCERPT_CHARS])

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class KafkaTransport:
    def __init__(self, destination: Destination, producer: Producer) -> None:
        self.destination = destination
        self._producer = producer

    async def send(self, request: Request, headers: list[tuple[str, str]]) -> Response:
        errors: list[KafkaError] = []

        def delivered(err: KafkaError | None, _msg: Any) -> None:
            if err is not None:
                errors.append(err)

        try:
            for key, value in request.records:
                self._producer.produce(request.url, key=key, value=value, on_delivery=delivered)
        except (BufferError, KafkaException) as exc:
            return Response(None, error=f"produce failed: {exc}")
        loop = asyncio.get_running_loop()
        remaining = await loop.run_in_executor(
            None, self._producer.flush, self.destination.timeout_s + 5
        )
        if errors:
            first = errors[0]
            permanent = first.code() in PERMANENT_KAFKA_ERRORS
            return Response(None, error=f"produce failed: {first}", retriable=not permanent)
        if remaining:
            return Response(None, error=f"produce timed out ({remaining} records unacknowledged)")
        return Response(200)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._producer.flush, 10)


def make_transport(destination: Destination, clients: KafkaClients) -> Transport:
    if destination.type == "kafka":  # on its own cluster when it names a bootstrap
        producer = clients.destination_producer(
            bootstrap=destination.bootstrap,
            message_timeout_ms=int(destination.timeout_s * 1000),
            security=destination.kafka_security_config(),
        )
        return KafkaTransport(destination, producer)
    return HttpTransport(destination)
