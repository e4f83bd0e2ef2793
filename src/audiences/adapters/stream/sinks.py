"""The destination sinks inside the Faust worker (SPEC §6).

`SinkService` starts one `SinkWorker` per configured destination on the
worker's event loop. Each has a consumer group of its own over
`audience-events` (see `adapters/sinks/worker.py` for why not agents on
the app's shared consumer): a destination that is down, slow or throttled
never holds back another. A sink that fails for a reason it cannot handle
(not a destination failure: those are retried or dead-lettered) crashes the
worker, like the evaluator; a restart resumes from committed offsets.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import mode

from audiences.adapters.kafka.clients import KafkaClients
from audiences.adapters.kafka.topics import Topics, ensure_topic, ensure_topics
from audiences.adapters.settings import Settings
from audiences.adapters.sinks.config import Destination
from audiences.adapters.sinks.worker import SinkWorker

log = logging.getLogger(__name__)


def prepare_sink_topics(
    settings: Settings, destinations: list[Destination], clients: KafkaClients
) -> None:
    """audience-events, its DLQ and the topics of kafka destinations, created when missing."""
    ensure_topics(settings, Topics.from_settings(settings), clients.admin())
    for destination in destinations:
        if destination.type == "kafka":
            config: dict[str, object] = dict(settings.kafka_config())
            replicas = settings.replication_factor
            if destination.bootstrap:  # another cluster: its own security, its default
                config = {
                    "bootstrap.servers": destination.bootstrap,
                    **destination.kafka_security_config(),
                }
                replicas = -1
            ensure_topic(config, destination.topic, settings.partitions, replicas)


class SinkService(mode.Service):
    """One sink per destination for the lifetime of the worker."""

    def __init__(
        self,
        settings: Settings,
        destinations: list[Destination],
        clients: KafkaClients,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.destinations = destinations
        self.clients = clients
        self.workers: list[SinkWorker] = []
        self._runs: list[asyncio.Future[None]] = []

    async def on_start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(
            None, prepare_sink_topics, self.settings, self.destinations, self.clients
        )
        self.workers = [
            SinkWorker(self.settings, d, clients=self.clients) for d in self.destinations
        ]
        self._runs = [asyncio.ensure_future(w.run()) for w in self.workers]
        log.info("sinks started: %s", ", ".join(d.name for d in self.destinations))

    @mode.Service.task
    async def _watch(self) -> None:
        while not self.should_stop:
            await self.sleep(0.5)
            for worker, task in zip(self.workers, self._runs, strict=True):
                if task.done() and not self.should_stop:
                    failure = (None if task.cancelled() else task.exception()) or RuntimeError(
                        "sink stopped"
                    )
                    log.critical("sink %s stopped: %s", worker.destination.name, failure)
                    await self.crash(failure)
                    return

    async def on_stop(self) -> None:
        for worker in self.workers:
            worker.stop()
        await asyncio.gather(*self._runs, return_exceptions=True)
