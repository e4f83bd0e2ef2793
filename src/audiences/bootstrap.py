"""Composition root: settings -> broker -> Kafka clients -> runtime, API, collector, sinks.

Nothing else decides which adapters a process runs or builds its Kafka clients
(they are made by the one `KafkaClients` factory created here).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import faust
import mode

from audiences.adapters.http.api import ManagementApi
from audiences.adapters.http.collector import Collector, serve_until_signalled
from audiences.adapters.kafka.clients import KafkaClients
from audiences.adapters.kafka.topics import Topics, ensure_topics, faust_replication_factor
from audiences.adapters.settings import Settings
from audiences.adapters.sinks.config import Destination, load_destinations
from audiences.adapters.sinks.dlq import ReplayReport, replay_dead_letters
from audiences.adapters.sinks.transport import make_transport
from audiences.adapters.stream.app import AudiencesApp, RuntimeService, create_app
from audiences.adapters.stream.definitions import DefinitionsWriter
from audiences.adapters.stream.queries import QueryPort
from audiences.adapters.stream.registry import WorkerRegistry
from audiences.adapters.stream.runtime import Clock, Runtime, wall_clock_ms
from audiences.adapters.stream.sinks import SinkService

log = logging.getLogger(__name__)


@contextlib.contextmanager
def broker_for(settings: Settings) -> Iterator[Settings]:
    """`settings` with a bootstrap: the configured one, else an embedded broker
    that lives as long as the context.

    The embedded broker keeps topics in memory, so unless AUDIENCES_DATA_DIR is
    set explicitly, state goes to a fresh temporary directory: local RocksDB
    state must never outlive the topics it checkpoints against.
    """
    if settings.kafka_bootstrap:
        yield settings
        return
    from audiences.adapters.kafka.embedded import EmbeddedBroker

    if "AUDIENCES_DATA_DIR" not in os.environ:
        settings = settings.replace(data_dir=tempfile.mkdtemp(prefix="audiences-"))
    with EmbeddedBroker() as broker:
        log.info("embedded broker (Tansu) at %s; state in %s", broker.bootstrap, settings.data_dir)
        yield settings.replace(kafka_bootstrap=broker.bootstrap)


def prepared(settings: Settings, clients: KafkaClients | None = None) -> Topics:
    """Topics of `settings`, created when missing (and checked when present)."""
    topics = Topics.from_settings(settings)
    ensure_topics(settings, topics, (clients or KafkaClients(settings)).admin())
    return topics


class Worker:
    """The parts of one worker process, wired together (before the Faust app runs them)."""

    def __init__(self, settings: Settings, clock: Clock = wall_clock_ms) -> None:
        self.settings = settings
        self.topics = Topics.from_settings(settings)
        self.clients = KafkaClients(settings)
        self.queries = QueryPort()
        self.runtime = Runtime(settings, self.topics, self.clients, self.queries, clock=clock)
        self.registry = WorkerRegistry(self.clients, self.topics, settings.advertised_url)
        self.api = management_api(settings, self.clients, self.queries, self.registry, clock)


def management_api(
    settings: Settings,
    clients: KafkaClients,
    queries: QueryPort,
    registry: WorkerRegistry | None,
    clock: Clock = wall_clock_ms,
) -> ManagementApi:
    """The API of a worker over its query port (writes through long-lived producers)."""
    topics = Topics.from_settings(settings)
    return ManagementApi(
        settings,
        topics,
        queries,
        registry,
        DefinitionsWriter(topics.definitions, clients.producer({"linger.ms": 0})),
        clients.producer({"linger.ms": 0, "message.timeout.ms": 5_000}),
        clock,
    )


class CollectorService(mode.Service):
    """The HTTP collector on the worker's event loop (`audiences up`)."""

    def __init__(self, settings: Settings, clients: KafkaClients, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.clients = clients
        self.collector = Collector(settings, clients)

    async def on_start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(
            None, prepared, self.settings, self.clients
        )
        await self.collector.start()

    async def on_stop(self) -> None:
        await self.collector.stop()


def worker_app(
    settings: Settings,
    clock: Clock = wall_clock_ms,
    *,
    with_collector: bool = False,
    replication_factor: int | None = None,
) -> AudiencesApp:
    """The Faust app of one worker process: the runtime, the management API on its web
    server, and (when configured) the collector and destination sinks.
    `replication_factor`: of the topics Faust creates itself (see `create_app`)."""
    destinations = (
        load_destinations(settings.destinations, os.environ) if settings.destinations else []
    )
    worker = Worker(settings, clock)
    service = RuntimeService(worker.runtime, worker.registry)
    app = create_app(settings, lambda: service.ready, replication_factor=replication_factor)
    app.service(service)  # type: ignore[arg-type]  # faust accepts instances too
    app.web_routes.append(worker.api.register)
    app.worker_parts = worker  # type: ignore[attr-defined]
    if with_collector:
        app.service(CollectorService(settings, worker.clients))  # type: ignore[arg-type]
    if destinations:
        sinks = SinkService(settings, destinations, worker.clients)
        app.service(sinks)  # type: ignore[arg-type]
        app.sink_service = sinks  # type: ignore[attr-defined]
    return app


def run_worker(settings: Settings, loglevel: str = "info", *, with_collector: bool = False) -> None:
    """Run one worker (and the collector if asked) until SIGTERM/SIGINT (blocks)."""
    replicas = faust_replication_factor(settings, KafkaClients(settings).admin())
    app = worker_app(settings, with_collector=with_collector, replication_factor=replicas)
    faust.Worker(app, loglevel=loglevel.upper(), quiet=True).execute_from_commandline()


def run_collector(settings: Settings) -> None:
    """`audiences collector`: the topics prepared, then the collector alone, serving until
    SIGINT/SIGTERM (blocks)."""
    clients = KafkaClients(settings)
    prepared(settings, clients)
    serve_until_signalled(Collector(settings, clients))


def replay_destination_dead_letters(
    settings: Settings,
    destination: Destination,
    *,
    from_beginning: bool = False,
    max_retry_age_ms: int = 60_000,
) -> ReplayReport:
    """`audiences dlq replay`: the topics prepared, then the dead letters of `destination`
    re-sent through a transport of its own (blocks)."""
    clients = KafkaClients(settings)
    prepared(settings, clients)
    return replay_dead_letters(
        clients,
        destination,
        make_transport(destination, clients),
        from_beginning=from_beginning,
        max_retry_age_ms=max_retry_age_ms,
    )
