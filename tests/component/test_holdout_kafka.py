"""Holdouts through real Kafka (SPEC §3): the evaluator puts every transition on
`audience-events`, holdout members' with `properties.holdout: true`; destinations
(webhook, Segment) receive only the others, count the skipped ones, and commit past them;
a `kafka` destination with `include_holdout: true` forwards them all."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from apiserver import Worker
from confluent_kafka import Consumer, TopicPartition
from fake_destinations import SEGMENT_WRITE_KEY, WEBHOOK_SECRET, FakeDestination
from harness import T0, Engine, S, track
from prometheus_client import REGISTRY

from audiences.adapters.kafka.clients import KafkaClients
from audiences.adapters.sinks.config import Destination, parse_destinations
from audiences.adapters.sinks.worker import SinkWorker
from audiences.adapters.stream.sinks import prepare_sink_topics
from audiences.core.oracle import bucket as oracle_bucket
from audiences.core.oracle import in_holdout

pytestmark = pytest.mark.kafka

BUYERS: dict[str, Any] = {
    "key": "buyers",
    "name": "Buyers",
    "condition": {"performed": {"event": "Order Completed", "within": "1h"}},
    "holdout": {"percent": 30},
}
USERS = [f"shopper-{n}" for n in range(24)]


def destination(**raw: Any) -> Destination:
    return parse_destinations([{"retry_initial_s": 0.05, "retry_max_s": 0.5, **raw}], {})[0]


def skipped_metric(destination_name: str) -> float:
    labels = {"destination": destination_name, "audience": "buyers"}
    return REGISTRY.get_sample_value("audiences_holdout_skipped_total", labels) or 0.0


async def until(condition: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        await asyncio.sleep(0.01)


def committed(bootstrap: str, engine: Engine, group: str) -> dict[int, int]:
    topic = engine.topics.audience_events
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        offsets = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
        return {tp.partition: tp.offset for tp in offsets}
    finally:
        consumer.close()


def test_holdout_members_reach_the_topic_flagged_and_no_destination(
    engine: Engine, kafka_bootstrap: str
) -> None:
    engine.apply(BUYERS)
    engine.start()
    for n, user in enumerate(USERS):
        engine.send(track(user, "Order Completed", T0 + n * S))
    outputs = engine.outputs(len(USERS))
    held = {u for u in USERS if in_holdout(BUYERS, u)}
    assert 0 < len(held) < len(USERS)  # both groups present (fixed ids: deterministic)
    assert {o["userId"] for o in outputs} == set(USERS)
    for out in outputs:
        assert out["event"] == "Audience Entered"
        if out["userId"] in held:
            assert out["properties"]["holdout"] is True
        else:
            assert "holdout" not in out["properties"]
    engine.stop()  # the sinks read the topic alone

    settings = engine.settings
    clients = KafkaClients(settings)
    expected = sorted(o["messageId"] for o in outputs if o["userId"] not in held)
    copy_topic = f"{settings.app_id}-copy"

    async def scenario() -> None:
        hook_server = await FakeDestination("webhook").start()
        segment_server = await FakeDestination("segment").start()
        sinks = [
            destination(name="hook", type="webhook", url=hook_server.url, secret=WEBHOOK_SECRET),
            destination(
                name="seg", type="segment", url=segment_server.url, write_key=SEGMENT_WRITE_KEY
            ),
            destination(name="copy", type="kafka", topic=copy_topic, include_holdout=True),
        ]
        before = {d.name: skipped_metric(d.name) for d in sinks}
        await asyncio.to_thread(prepare_sink_topics, settings, sinks, clients)
        workers = [SinkWorker(settings, d, clients=clients) for d in sinks]
        tasks = [asyncio.ensure_future(w.run()) for w in workers]
        hook, seg, copy = workers
        try:
            await until(
                lambda: all(w.delivered + w.skipped >= len(USERS) for w in workers),
                what="every output handled by every destination",
            )
        finally:
            for w in workers:
                w.stop()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            await hook_server.stop()
            await segment_server.stop()
        assert not [r for r in results if isinstance(r, BaseException)], results
        assert hook_server.violations == [] and segment_server.violations == []
        assert sorted(c.body["messageId"] for c in hook_server.accepted) == expected
        batch = [m for c in segment_server.accepted for m in c.body["batch"]]
        assert sorted(m["messageId"] for m in batch) == expected
        for worker in (hook, seg):
            assert (worker.delivered, worker.skipped) == (len(expected), len(held))
            name = worker.destination.name
            assert skipped_metric(name) - before[name] == len(held)
        assert (copy.delivered, copy.skipped) == (len(USERS), 0)
        assert skipped_metric("copy") == before["copy"]

    asyncio.run(scenario())
    # Handled: the skipped messages' offsets are committed too (past each holdout record).
    records = engine._outputs.seen  # (the harness reader's messages, with their offsets)
    held_at = [
        (m.partition(), m.offset()) for m in records if orjson.loads(m.value())["userId"] in held
    ]
    assert len(held_at) == len(held)
    for name in ("hook", "seg"):
        progress = committed(kafka_bootstrap, engine, clients.sink_group(name))
        assert all(progress[partition] > offset for partition, offset in held_at), progress
        last = {m.partition(): m.offset() for m in records}
        assert all(progress[partition] == offset + 1 for partition, offset in last.items())


def test_replaying_the_log_reproduces_ids_and_holdout_flags(engine: Engine) -> None:
    """A second evaluator (its own app id, hence its own state) over the same events
    topic writes the same transitions with the same messageIds and holdout flags."""
    engine.apply(BUYERS)
    engine.start()
    for n, user in enumerate(USERS[:10]):
        engine.send(track(user, "Order Completed", T0 + n * S))
    first = engine.outputs(10)
    engine.stop()
    engine.start(app_id=f"{engine.settings.app_id}-replay")
    second = engine.outputs(20)[10:]

    def brief(out: dict[str, Any]) -> tuple[str, str, bool]:
        return (out["messageId"], out["userId"], out["properties"].get("holdout", False))

    assert sorted(map(brief, first)) == sorted(map(brief, second))
    assert {h for *_rest, h in map(brief, first)} == {True, False}


def test_the_api_validates_explains_and_previews_buckets_and_holdouts(
    engine: Engine, tmp_path: Path
) -> None:
    worker = Worker(engine.settings, tmp_path / "worker", engine.clock).start().wait_ready()
    try:
        bad = {**BUYERS, "holdout": {"percent": 100}}
        refused = worker("PUT", "/v1/audiences/buyers", bad)
        assert (refused.status, refused.json()["path"]) == (422, "$.holdout.percent")
        wrong = {"key": "split", "condition": {"random_bucket": {"lt": 10001}}}
        refused = worker("POST", "/v1/audiences/preview", wrong)
        assert (refused.status, refused.json()["path"]) == (422, "$.condition.random_bucket.lt")

        assert worker("PUT", "/v1/audiences/buyers", BUYERS).status == 201
        users = USERS[:8]
        for n, user in enumerate(users):
            engine.send(track(user, "Order Completed", T0 + n * S))
        engine.outputs(len(users))
        for user in users:
            answer = worker("GET", f"/v1/users/{user}/explain/buyers")
            assert answer.status == 200, answer.body
            holdout = answer.json()["holdout"]
            assert holdout["salt"] == "buyers:holdout" and holdout["percent"] == 30
            assert holdout["bucket"] == oracle_bucket("buyers:holdout", user)
            assert holdout["in_holdout"] is in_holdout(BUYERS, user)

        split = {"key": "split", "condition": {"random_bucket": {"lt": 5000}}, "salt": "exp"}
        report = worker("POST", "/v1/audiences/preview", split)
        assert report.status == 200, report.body
        expected = sorted(u for u in users if oracle_bucket("exp", u) < 5000)
        assert report.json()["size"] == len(expected)
        assert sorted(report.json()["would_enter"]) == expected
    finally:
        worker.stop()
