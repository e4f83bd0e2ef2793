"""Composition root: settings -> broker -> adapters. Nothing else builds infrastructure."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from audiences.adapters.kafka.topics import Topics, ensure_topics
from audiences.adapters.settings import Settings

log = logging.getLogger(__name__)


@contextlib.contextmanager
def broker_for(settings: Settings) -> Iterator[Settings]:
    """`settings` with a bootstrap: the configured one, else an embedded broker
    that lives as long as the context."""
    if settings.kafka_bootstrap:
        yield settings
        return
    from audiences.adapters.kafka.embedded import EmbeddedBroker

    with EmbeddedBroker() as broker:
        log.info("embedded broker (Tansu) at %s", broker.bootstrap)
        yield settings.replace(kafka_bootstrap=broker.bootstrap)


def prepared(settings: Settings) -> Topics:
    """Topics of `settings`, created when missing."""
    topics = Topics.from_settings(settings)
    ensure_topics(settings, topics)
    return topics
