"""The Faust application: worker lifecycle, the evaluator service, web endpoints.

The evaluator is a `mode.Service` registered with `app.service`; it runs the
blocking batch loop of `evaluator.Evaluator` in a thread of its own, so the
Faust event loop (web server, sinks) never waits on it. With
`AUDIENCES_DESTINATIONS` set, a `SinkService` runs one sink per destination
(`adapters/stream/sinks.py`); the file is validated here, before anything
starts, so a bad file stops the worker with an error naming the destination
and key. If the
loop dies (e.g. Kafka refuses outputs), the service crashes the worker: a
restart resumes from durable state without loss (crash-only design).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from typing import Any

import faust
import mode
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from audiences.adapters.http.api import ManagementApi
from audiences.adapters.http.collector import Collector
from audiences.adapters.http.registry import WorkerRegistry
from audiences.adapters.kafka.topics import Topics, ensure_topics
from audiences.adapters.settings import Settings
from audiences.adapters.sinks.config import load_destinations
from audiences.adapters.stream.evaluator import Clock, Evaluator, wall_clock_ms
from audiences.adapters.stream.sinks import SinkService
from audiences.logs import logging_config

log = logging.getLogger(__name__)


class EvaluatorService(mode.Service):
    """Runs the evaluator loop in a thread for the lifetime of the worker."""

    def __init__(self, settings: Settings, clock: Clock = wall_clock_ms, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.topics = Topics.from_settings(settings)
        self.clock = clock
        self.evaluator: Evaluator | None = None
        self.registry = WorkerRegistry(settings, self.topics, settings.advertised_url)
        self._thread: threading.Thread | None = None

    @property
    def ready(self) -> bool:
        return self.evaluator is not None and self.evaluator.ready.is_set()

    async def on_start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, ensure_topics, self.settings, self.topics)
        self.evaluator = Evaluator(self.settings, self.topics, clock=self.clock)
        self.evaluator.on_partitions = self.registry.publish
        self.registry.start()
        self._thread = threading.Thread(target=self.evaluator.run, name="evaluator", daemon=True)
        self._thread.start()
        log.info("evaluator started for topic %s", self.topics.events)

    @mode.Service.task
    async def _watch(self) -> None:
        while not self.should_stop:
            await self.sleep(0.5)
            if self._thread is not None and not self._thread.is_alive() and not self.should_stop:
                failure = self.evaluator.failed if self.evaluator else None
                log.critical("the evaluator stopped: %s", failure)
                await self.crash(failure or RuntimeError("evaluator stopped"))
                return

    async def on_stop(self) -> None:
        if self.evaluator is not None and self._thread is not None:
            self.evaluator.stop()
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 30)
        await asyncio.get_running_loop().run_in_executor(None, self.registry.stop)


class AudiencesApp(faust.App):
    """The Faust app with the management API on its web server."""

    api: ManagementApi | None = None

    def on_webserver_init(self, web: Any) -> None:
        # Faust calls this from Web.init_server, before the server starts listening.
        if self.api is not None:
            self.api.register(web.web_app)


class CollectorService(mode.Service):
    """The HTTP collector on the worker's event loop (`audiences up`)."""

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.collector = Collector(settings)

    async def on_start(self) -> None:
        topics = Topics.from_settings(self.settings)
        await asyncio.get_running_loop().run_in_executor(None, ensure_topics, self.settings, topics)
        await self.collector.start()

    async def on_stop(self) -> None:
        await self.collector.stop()


def create_app(
    settings: Settings, clock: Clock = wall_clock_ms, *, with_collector: bool = False
) -> faust.App:
    """The Faust app of one worker process; `with_collector` adds the HTTP collector."""
    destinations = (
        load_destinations(settings.destinations, os.environ) if settings.destinations else []
    )
    os.makedirs(settings.data_dir, exist_ok=True)
    app = AudiencesApp(
        settings.app_id,
        broker=f"kafka://{settings.kafka_bootstrap}",
        store="memory://",
        web_enabled=True,
        web_host=settings.web_host,
        web_port=settings.web_port,
        web_in_thread=False,
        topic_partitions=settings.partitions,
        topic_replication_factor=1,
        broker_session_timeout=settings.session_timeout_ms / 1000,
        broker_heartbeat_interval=1.0,
        consumer_auto_offset_reset="earliest",
        datadir=f"{settings.data_dir}/faust",
        logging_config=logging_config(settings.log_format, settings.log_level),
    )
    service = EvaluatorService(settings, clock)
    app.service(service)  # type: ignore[arg-type]  # faust accepts instances too
    app.evaluator_service = service  # type: ignore[attr-defined]
    app.api = ManagementApi(settings, service.topics, lambda: service.evaluator, service.registry)
    if with_collector:
        app.service(CollectorService(settings))  # type: ignore[arg-type]
    if destinations:
        sinks = SinkService(settings, destinations)
        app.service(sinks)  # type: ignore[arg-type]
        app.sink_service = sinks  # type: ignore[attr-defined]

    @app.page("/healthz")
    async def healthz(web: Any, request: Any) -> Any:
        return web.json({"status": "ok"})

    @app.page("/readyz")
    async def readyz(web: Any, request: Any) -> Any:
        ready = service.ready
        return web.json({"ready": ready}, status=200 if ready else 503)

    @app.page("/metrics")
    async def metrics_view(web: Any, request: Any) -> Any:
        return web.bytes(generate_latest(), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    return app


def run_worker(settings: Settings, loglevel: str = "info", *, with_collector: bool = False) -> None:
    """Run one worker (and the collector if asked) until SIGTERM/SIGINT (blocks)."""
    app = create_app(settings, with_collector=with_collector)
    worker = faust.Worker(app, loglevel=loglevel.upper(), quiet=True)
    worker.execute_from_commandline()
