"""Composition root: settings -> broker -> adapters. Nothing else builds infrastructure."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator

from audiences.adapters.kafka.topics import Topics, ensure_topics
from audiences.adapters.settings import Settings

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


def prepared(settings: Settings) -> Topics:
    """Topics of `settings`, created when missing."""
    topics = Topics.from_settings(settings)
    ensure_topics(settings, topics)
    return topics
