"""The `audiences` CLI against the test broker: apply, get, delete, tail, config, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Producer
from harness import T0

from audiences.core.events import format_iso

pytestmark = pytest.mark.kafka


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "audiences", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def cli_env(kafka_bootstrap: str, unique_name: Callable[..., str]) -> dict[str, str]:
    name = unique_name("cli")
    return {
        **os.environ,
        "AUDIENCES_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "AUDIENCES_APP_ID": name,
        "AUDIENCES_DEFINITIONS_TOPIC": f"{name}-defs",
        "AUDIENCES_EVENTS_TOPIC": f"{name}-events",
        "AUDIENCES_AUDIENCE_EVENTS_TOPIC": f"{name}-ae",
        "AUDIENCES_EVENTS_DLQ_TOPIC": f"{name}-dlq",
        "AUDIENCES_AUDIENCE_EVENTS_DLQ_TOPIC": f"{name}-ae-dlq",
    }


def test_apply_get_update_delete(cli_env: dict[str, str], tmp_path: Path) -> None:
    doc = {
        "key": "buyers",
        "name": "Buyers",
        "condition": {"performed": {"event": "Order Completed"}},
    }
    path = tmp_path / "buyers.yaml"
    path.write_text(f"key: buyers\nname: Buyers\ncondition: {json.dumps(doc['condition'])}\n")
    first = run(cli_env, "apply", "-f", str(path))
    assert first.returncode == 0, first.stderr
    assert "buyers: applied as version 1" in first.stdout
    assert "buyers: unchanged" in run(cli_env, "apply", "-f", str(path)).stdout

    doc["name"] = "Buyers (edited)"
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "buyers.json").write_text(json.dumps(doc))
    assert (
        "buyers: applied as version 2" in run(cli_env, "apply", "-f", str(tmp_path / "dir")).stdout
    )

    listing = run(cli_env, "get")
    assert listing.stdout.strip() == "buyers\tv2\tBuyers (edited)"
    shown = json.loads(run(cli_env, "get", "buyers").stdout)
    assert shown["name"] == "Buyers (edited)" and shown["version"] == 2

    assert run(cli_env, "delete", "buyers").stdout.strip() == "buyers: deleted"
    assert run(cli_env, "get").stdout.strip() == ""
    missing = run(cli_env, "delete", "buyers")
    assert missing.returncode == 1 and "no audience 'buyers'" in missing.stderr


def test_invalid_definition_is_rejected_with_its_json_path(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(
        json.dumps(
            {
                "key": "bad",
                "condition": {
                    "sequence": {
                        "steps": [{"event": "A"}],
                        "then_not": {"event": "B", "wihtin": "2h"},
                    }
                },
            }
        )
    )
    result = run(cli_env, "apply", "-f", str(path))
    assert result.returncode == 2
    assert "$.condition.sequence.then_not.wihtin" in result.stderr
    assert "did you mean 'within'" in result.stderr
    assert run(cli_env, "get").stdout.strip() == ""  # nothing was written


def test_definitions_over_the_limits_are_rejected_before_anything_is_written(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    """`apply` and `preview` run the workers' compiler with the limits of SPEC §11."""
    condition: dict[str, Any] = {"performed": {"event": "A"}}
    for _ in range(32):
        condition = {"not": condition}  # 33 levels
    (tmp_path / "deep.json").write_text(json.dumps({"key": "deep", "condition": condition}))
    regex = {"trait": {"name": "email", "op": "matches", "value": r"(\w+)@\1"}}
    (tmp_path / "backref.yaml").write_text(json.dumps({"key": "backref", "condition": regex}))
    (tmp_path / "huge.json").write_text(
        '{"key": "huge", "condition": ' + '{"not": ' * 100_000 + "1" + "}" * 100_001
    )
    for command in ("apply", "preview"):
        deep = run(cli_env, command, "-f", str(tmp_path / "deep.json"))
        assert deep.returncode == 2, deep.stderr
        assert "$.condition" + ".not" * 32 + ": conditions nested deeper than 32" in deep.stderr
        backref = run(cli_env, command, "-f", str(tmp_path / "backref.yaml"))
        assert backref.returncode == 2, backref.stderr
        assert "$.condition.trait.value: not a regular expression RE2 can run" in backref.stderr
        huge = run(cli_env, command, "-f", str(tmp_path / "huge.json"))
        assert huge.returncode == 1
        assert "cannot parse: nested too deeply" in huge.stderr
        assert "Traceback" not in huge.stderr
    assert run(cli_env, "get").stdout.strip() == ""  # nothing was written


def test_tail_prints_transitions(cli_env: dict[str, str], kafka_bootstrap: str) -> None:
    topic = cli_env["AUDIENCES_AUDIENCE_EVENTS_TOPIC"]
    assert run(cli_env, "get").returncode == 0  # creates the topics
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    out = {
        "type": "track",
        "event": "Audience Entered",
        "userId": "u1",
        "timestamp": format_iso(T0),
        "properties": {"audience_key": "vip", "vip": True},
    }
    producer.produce(topic, key=b"u1", value=orjson.dumps(out))
    producer.flush(10)
    result = run(cli_env, "tail", "--from-beginning", "--limit", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [format_iso(T0), "u1", "+", "vip"]


def test_config_redacts_secrets(cli_env: dict[str, str]) -> None:
    result = run({**cli_env, "AUDIENCES_SASL_PASSWORD": "hunter2"}, "config")
    assert "AUDIENCES_SASL_PASSWORD=***" in result.stdout
    assert "hunter2" not in result.stdout


def test_worker_without_bootstrap_explains_what_to_do() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUDIENCES_")}
    result = run(env, "worker")
    assert result.returncode != 0 and "AUDIENCES_KAFKA_BOOTSTRAP is not set" in result.stderr
