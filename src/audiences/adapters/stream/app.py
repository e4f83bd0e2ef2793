"""The Faust application: worker lifecycle, the runtime service, health and metrics pages.

The runtime is a `mode.Service` registered with `app.service`; it runs the
blocking loop of `runtime.Runtime` in a thread of its own, so the Faust event
loop (web server, API, sinks) never waits on it. If the loop dies (e.g. Kafka
refuses outputs for good), the service crashes the worker: a restart resumes
from durable state without loss (crash-only design). What else runs in the
app (the API's routes, the collector, destination sinks) is wired by
`bootstrap.py`, the composition root; this module knows none of it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import threading
from collections.abc import Callable
from typing import Any

import faust
import mode
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from audiences.adapters.kafka.topics import ensure_topics
from audiences.adapters.settings import Settings, SettingsError
from audiences.adapters.stream.registry import WorkerRegistry
from audiences.adapters.stream.runtime import Runtime
from audiences.logs import logging_config

log = logging.getLogger(__name__)


class RuntimeService(mode.Service):
    """Runs the runtime loop in a thread for the lifetime of the worker."""

    def __init__(self, runtime: Runtime, registry: WorkerRegistry, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.runtime = runtime
        self.registry = registry
        self._thread: threading.Thread | None = None

    @property
    def ready(self) -> bool:
        return self.runtime.ready.is_set() and self.runtime.failed is None

    async def on_start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, ensure_topics, self.runtime.settings, self.runtime.topics)
        self.runtime.on_partitions = self.registry.publish
        self.registry.start()
        self._thread = threading.Thread(target=self.runtime.run, name="runtime", daemon=True)
        self._thread.start()
        log.info("runtime started for topic %s", self.runtime.topics.events)

    @mode.Service.task
    async def _watch(self) -> None:
        while not self.should_stop:
            await self.sleep(0.5)
            if self._thread is not None and not self._thread.is_alive() and not self.should_stop:
                failure = self.runtime.failed
                log.critical("the runtime stopped: %s", failure)
                await self.crash(failure or RuntimeError("the runtime stopped"))
                return

    async def on_stop(self) -> None:
        if self._thread is not None:
            self.runtime.stop()
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 60)
        await asyncio.get_running_loop().run_in_executor(None, self.registry.stop)


class AudiencesApp(faust.App):
    """The Faust app; `web_routes` add routes to its aiohttp application (the API)."""

    web_routes: list[Callable[[Any], None]]

    def on_webserver_init(self, web: Any) -> None:
        # Faust calls this from Web.init_server, before the server starts listening.
        for add in getattr(self, "web_routes", ()):
            add(web.web_app)


def broker_credentials(settings: Settings) -> faust.types.auth.CredentialsT | None:
    """The Kafka security settings of the confluent clients (SPEC §10), as Faust's
    credentials: SASL (PLAIN/SCRAM) with TLS when the protocol is SASL_SSL, or TLS alone
    (SSL) with the configured CA bundle. None for PLAINTEXT (the default)."""
    protocol = settings.security_protocol.upper()
    if protocol in ("", "PLAINTEXT"):
        if settings.sasl_mechanism:
            raise SettingsError(
                "AUDIENCES_SASL_MECHANISM is set but AUDIENCES_SECURITY_PROTOCOL is not "
                "SASL_PLAINTEXT or SASL_SSL"
            )
        return None
    if protocol not in ("SSL", "SASL_SSL", "SASL_PLAINTEXT"):
        raise SettingsError(
            "AUDIENCES_SECURITY_PROTOCOL: expected PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL, "
            f"got {settings.security_protocol!r}"
        )
    context = None
    if protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(cafile=settings.ssl_ca_location or None)
    if protocol == "SSL":
        return faust.SSLCredentials(context)
    return faust.SASLCredentials(
        username=settings.sasl_username,
        password=settings.sasl_password,
        mechanism=settings.sasl_mechanism or "PLAIN",
        ssl_context=context,
    )


def create_app(
    settings: Settings, ready: Callable[[], bool], *, replication_factor: int | None = None
) -> AudiencesApp:
    """The Faust app of one worker process, with /healthz, /readyz (`ready`) and /metrics.

    Its web server (the management API's too) listens on `settings.web_bind_host`:
    loopback only, with a warning, when no API token is configured. Faust creates one
    topic of its own (its assignor's leader topic) with `replication_factor`: Faust cannot
    ask for the broker's default, so the worker passes the number it read from the broker
    (`topics.faust_replication_factor`); by default AUDIENCES_REPLICATION_FACTOR, or 1
    when that is -1."""
    os.makedirs(settings.data_dir, exist_ok=True)
    bind = settings.web_bind_host
    if not settings.api_token_list():
        log.warning(
            "no API tokens configured (AUDIENCES_API_TOKENS): the management API is open, so "
            "it listens on %s only (AUDIENCES_WEB_HOST=%s ignored); set tokens to serve "
            "other hosts",
            bind,
            settings.web_host,
        )
    app = AudiencesApp(
        settings.app_id,
        broker=f"kafka://{settings.kafka_bootstrap}",
        broker_credentials=broker_credentials(settings),
        store="memory://",
        web_enabled=True,
        web_host=settings.web_host,
        web_bind=bind,
        web_port=settings.web_port,
        web_in_thread=False,
        topic_partitions=settings.partitions,
        topic_replication_factor=(
            replication_factor
            if replication_factor is not None
            else max(1, settings.replication_factor)
        ),
        broker_session_timeout=settings.session_timeout_ms / 1000,
        broker_heartbeat_interval=1.0,
        consumer_auto_offset_reset="earliest",
        datadir=f"{settings.data_dir}/faust",
        logging_config=logging_config(settings.log_format, settings.log_level),
    )
    app.web_routes = []

    @app.page("/healthz")
    async def healthz(web: Any, request: Any) -> Any:
        return web.json({"status": "ok"})

    @app.page("/readyz")
    async def readyz(web: Any, request: Any) -> Any:
        is_ready = ready()
        return web.json({"ready": is_ready}, status=200 if is_ready else 503)

    @app.page("/metrics")
    async def metrics_view(web: Any, request: Any) -> Any:
        return web.bytes(generate_latest(), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    return app
