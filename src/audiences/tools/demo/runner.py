"""`audiences demo`: broker + worker + a generated shop + live transitions and sizes.

Definitions are written with real-world windows ("2h") and scaled by
`hour_ms` so they complete in seconds (default: one shop hour = 5 s).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from importlib import resources
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from audiences.adapters.settings import Settings
from audiences.adapters.stream.definitions import apply_definitions
from audiences.bootstrap import broker_for, prepared
from audiences.core.durations import parse_duration_ms
from audiences.tools.simulation import ShopConfig, shop_traffic

DURATION_FIELDS = ("within", "active_for")
REAL_HOUR_MS = 3_600_000


def scale_durations(node: Any, hour_ms: int) -> Any:
    """The definition with every duration scaled from real hours to demo hours (>= 1 s)."""

    def scaled(text: str) -> str:
        ms = parse_duration_ms(text)
        return text if ms is None else f"{max(1, round(ms * hour_ms / REAL_HOUR_MS / 1000))}s"

    if isinstance(node, dict):
        return {
            k: (
                scaled(v)
                if k in DURATION_FIELDS and isinstance(v, str)
                else [scaled(x) for x in v]
                if k == "between"
                else scale_durations(v, hour_ms)
            )
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [scale_durations(item, hour_ms) for item in node]
    return node


def demo_definitions(hour_ms: int) -> list[dict[str, Any]]:
    text = resources.files("audiences.tools.demo").joinpath("definitions.json").read_text()
    return [scale_durations(doc, hour_ms) for doc in json.loads(text)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _play_shop(settings: Settings, topic: str, config: ShopConfig, stop: threading.Event) -> None:
    producer = Producer({**settings.producer_config(), "linger.ms": 5})
    start = int(time.time() * 1000) + 1000
    spread_ms = config.users * config.hour_ms // 6
    for at_ms, event in shop_traffic(config, start, spread_ms):
        while not stop.is_set() and (wait := at_ms / 1000 - time.time()) > 0:
            stop.wait(min(wait, 0.2))
        if stop.is_set():
            break
        producer.produce(topic, key=event["userId"].encode(), value=orjson.dumps(event))
        producer.poll(0)
    producer.flush(10)


def run_demo(
    users: int = 40,
    duration_s: float | None = None,
    hour_ms: int = 5_000,
    destinations: str = "",
    seed: int | None = None,
) -> int:
    """Returns the exit code. `destinations`: a validated destinations file the
    worker delivers the transitions to (SPEC §6), or "" for none. `seed` fixes the
    generated shop's traffic (default: a new shop every run)."""
    shop_config = ShopConfig(
        users=users, hour_ms=hour_ms, seed=int(time.time()) if seed is None else seed
    )
    with broker_for(Settings.from_env()) as settings:
        topics = prepared(settings)
        definitions = demo_definitions(hour_ms)
        apply_definitions(settings, topics, definitions)
        names = {d["key"]: d.get("name", d["key"]) for d in definitions if "condition" in d}
        print(
            f"Kafka: {settings.kafka_bootstrap}   one shop hour = {hour_ms / 1000:g} s", flush=True
        )
        for doc in definitions:
            kind = "audience" if "condition" in doc else "trait   "
            print(f"  {kind} {doc['key']:<16} {doc.get('description', '')}", flush=True)
        web_port = _free_port()
        env = {
            **os.environ,
            "AUDIENCES_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "AUDIENCES_DATA_DIR": settings.data_dir,
            "AUDIENCES_WEB_PORT": str(web_port),
            "AUDIENCES_DESTINATIONS": destinations,
        }
        os.makedirs(settings.data_dir, exist_ok=True)
        log_path = os.path.join(settings.data_dir, "worker.log")
        print(f"  worker log: {log_path}", flush=True)
        print(f"  console: http://127.0.0.1:{web_port}/ui   (API: /v1, /openapi.json)", flush=True)
        with open(log_path, "ab") as log_file:
            worker = subprocess.Popen(
                [sys.executable, "-m", "audiences", "worker"],
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        shop = threading.Thread(
            target=_play_shop, args=(settings, topics.events, shop_config, stop), daemon=True
        )
        shop.start()
        try:
            _show_transitions(settings, topics.audience_events, names, stop, duration_s, worker)
        finally:
            stop.set()
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
    return 0


def _show_transitions(
    settings: Settings,
    topic: str,
    names: dict[str, str],
    stop: threading.Event,
    duration_s: float | None,
    worker: subprocess.Popen[bytes],
) -> None:
    consumer = Consumer(
        {**settings.kafka_config(), "group.id": "audiences-demo-view", "enable.auto.commit": False}
    )
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    members: dict[str, set[str]] = {key: set() for key in names}
    started = time.monotonic()
    last_sizes = started
    try:
        while not stop.is_set():
            if duration_s is not None and time.monotonic() - started > duration_s:
                break
            if worker.poll() is not None:
                print(f"worker exited with code {worker.returncode}", flush=True)
                break
            for msg in consumer.consume(100, 0.25):
                if msg.error() is not None or msg.value() is None:
                    continue
                out = orjson.loads(msg.value())
                props = out["properties"]
                user = out.get("userId") or out.get("anonymousId") or out.get("groupId")
                if out["event"] == "User Deleted":
                    for group in members.values():
                        group.discard(user)
                    print(f"{out['timestamp'][11:19]}  User Deleted {user}", flush=True)
                    continue
                if out["event"] == "Trait Computed":
                    trait = props["trait_key"]
                    print(f"{out['timestamp'][11:19]}  {trait} = {props[trait]!r:<9} {user}")
                    continue
                key = props["audience_key"]
                group = members.setdefault(key, set())
                (group.add if props.get(key) else group.discard)(user)
                held = "  (holdout: not sent to destinations)" if props.get("holdout") else ""
                print(
                    f"{out['timestamp'][11:19]}  {out['event']:<16} {key:<16} {user}{held}",
                    flush=True,
                )
            if time.monotonic() - last_sizes >= 5:
                last_sizes = time.monotonic()
                sizes = "  ".join(f"{key}={len(group)}" for key, group in members.items())
                print(f"-- audience sizes: {sizes}", flush=True)
    finally:
        consumer.close()
