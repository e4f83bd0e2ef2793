"""Records reach the owner of their profile whatever partitioner the producer used.

The README asks producers to partition `events` with murmur2 (the Java client's
default), but librdkafka's default — what confluent-kafka, and so many producers, use
when `partitioner` is not set — is `consistent_random`: CRC32 of the key modulo the
partition count (for a non-empty key; rdkafka_msg.c). An engine that keeps a profile
where its records happen to land, and sends its identity control records (SPEC §4)
with murmur2, then never brings an anonymous visitor's history to the user: SPEC §4
says the merge must happen, so the engine has to find the profile anyway, count the
misrouted records (`audiences_misrouted_events_total`) and say in its log what to fix.
"""

from __future__ import annotations

import re
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from faults import (
    Announcements,
    EventProducer,
    OutputLog,
    WorkerHandle,
    apply_definitions_cli,
    check_transitions,
    expected_outputs,
    two_workers_sharing,
)

from audiences.adapters.settings import Settings
from audiences.core.events import format_iso
from audiences.core.partitioning import partition_for

pytestmark = [pytest.mark.kafka, pytest.mark.system]

PRICING = {"page_viewed": {"url": "*/pricing*", "times": {"gte": 2}}}
DEFINITIONS = [
    {"key": "pricing_viewers", "condition": PRICING, "include_anonymous": False},
    {"key": "anon_pricing", "condition": PRICING, "include_anonymous": True},
]
PARTITIONS = 3


def crc32_partition(key: bytes) -> int:
    """librdkafka's `consistent_random` for a non-empty key: rd_crc32(key) % partitions."""
    return zlib.crc32(key) % PARTITIONS


def murmur2_partition(key: bytes) -> int:
    return partition_for(key, PARTITIONS)


def first_id(prefix: str, wanted: Callable[[bytes], bool]) -> str:
    return next(f"{prefix}-{n}" for n in range(10_000) if wanted(f"{prefix}-{n}".encode()))


def misrouted(key: bytes) -> bool:
    return crc32_partition(key) != murmur2_partition(key)


ANONYMOUS = first_id("visitor", misrouted)
USER = first_id("user", misrouted)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def test_identity_merge_finds_profiles_produced_with_the_default_partitioner(
    fault_settings: Settings,
    fault_workers: Callable[..., WorkerHandle],
    outputs: OutputLog,
    announcements: Callable[[], Announcements],
    tmp_path: Path,
) -> None:
    """An anonymous visitor's page views (keyed by the anonymousId) qualify for an
    audience that excludes anonymous profiles; an `identify` (keyed by the userId) links
    the visitor to a user: the user enters. All produced with librdkafka's default
    partitioner, with ids it puts on other partitions than murmur2 does, and two workers
    splitting the partitions."""
    settings = fault_settings
    assert settings.partitions == PARTITIONS
    apply_definitions_cli(settings, DEFINITIONS, tmp_path)
    workers, _ = two_workers_sharing(fault_workers, announcements, tmp_path / "second-data")
    producer = EventProducer(settings, partitioner=None)  # librdkafka's default
    base = now_ms() - 2 * 3_600_000
    events: list[dict[str, Any]] = []

    def send(event: dict[str, Any]) -> None:
        sent = producer.send(event)
        producer.flush()
        assert sent.partition == crc32_partition(sent.key or b""), "not the CRC32 partitioner"
        events.append(event)

    for n in (1, 2):
        send(
            {
                "type": "page",
                "anonymousId": ANONYMOUS,
                "name": "Pricing",
                "properties": {"url": "https://shop.example/pricing?plan=team"},
                "timestamp": format_iso(base + 3_000_000 + n * 60_000),
                "messageId": f"m-{ANONYMOUS}-view-{n}",
            }
        )
    # the visitor's own audience (include_anonymous): its views were evaluated together
    outputs.wait_for_ids(set(expected_outputs(DEFINITIONS, events, now_ms())), 30, 0.1)
    send(
        {
            "type": "identify",
            "userId": USER,
            "anonymousId": ANONYMOUS,
            "traits": {"email": "u@example.com"},
            "timestamp": format_iso(base + 3_600_000),
            "messageId": f"m-{USER}-identify",
        }
    )
    expected = expected_outputs(DEFINITIONS, events, now_ms())
    assert any(
        o["userId"] == USER and o["properties"]["audience_key"] == "pricing_viewers"
        for o in expected.values()
        if "userId" in o
    ), "the pure core says the user enters (test premise)"
    outputs.wait_for_ids(set(expected), timeout=30)

    check_transitions(outputs.outputs, expected)
    misrouted_total = sum(w.metric("audiences_misrouted_events_total") for w in workers)
    assert misrouted_total > 0, "audiences_misrouted_events_total never counted"
    advice = re.compile(r"murmur2|partitioner", re.IGNORECASE)
    assert any(advice.search(w.log_text()) for w in workers), (
        "no worker's log says which partitioner producers must use"
    )
