"""`audiences broker --apache`: a real Apache Kafka broker from the command line."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

pytestmark = [pytest.mark.system, pytest.mark.apache]


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("AUDIENCES_")}


def test_broker_apache_prints_a_bootstrap_that_round_trips_and_stops_on_sigterm() -> None:
    from audiences.adapters.kafka.apache import (
        ApacheKafkaUnavailable,
        check_java,
        resolve_classpath,
    )

    try:  # the same checks the command makes; cached after the first start
        check_java()
        resolve_classpath()
    except ApacheKafkaUnavailable as exc:
        pytest.skip(f"no Apache Kafka broker: {exc}")

    proc = subprocess.Popen(
        [sys.executable, "-m", "audiences", "broker", "--apache"],
        env=_clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        bootstrap = proc.stdout.readline().strip()
        assert re.fullmatch(r"127\.0\.0\.1:\d+", bootstrap), (bootstrap, _stderr(proc))

        topic = "apache-broker-round-trip"
        admin = AdminClient({"bootstrap.servers": bootstrap})
        admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(timeout=30)
        producer = Producer({"bootstrap.servers": bootstrap})
        producer.produce(topic, key="k", value="hello")
        assert producer.flush(30) == 0
        consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": "unused",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
            }
        )
        try:
            consumer.assign([TopicPartition(topic, 0, 0)])
            msg = None
            deadline = time.monotonic() + 30
            while msg is None and time.monotonic() < deadline:
                msg = consumer.poll(0.5)
            assert msg is not None, "the record did not come back"
            assert msg.error() is None, msg.error()
            assert (msg.key(), msg.value()) == (b"k", b"hello")
        finally:
            consumer.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    stderr = _stderr(proc)
    assert code == 0, stderr
    # the broker's temporary directory (storage and log) is gone
    found = re.search(r"broker log: (\S+)", stderr)
    assert found, stderr
    assert not Path(found.group(1)).parent.exists()


def _stderr(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None or proc.stderr is None:
        return "(still running)"
    return proc.stderr.read()
