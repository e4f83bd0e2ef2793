"""The compose stack, Prometheus/Grafana provisioning and dashboard are consistent (SPEC §9)."""

from __future__ import annotations

import base64
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from audiences.adapters.settings import PREFIX, SECRET_FIELDS

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"

# Every metric the dashboard may use (declared in audiences/adapters/metrics.py).
METRICS = {
    "audiences_events_in_total": "counter",
    "audiences_events_invalid_total": "counter",
    "audiences_events_duplicate_total": "counter",
    "audiences_transitions_total": "counter",
    "audiences_audience_size": "gauge",
    "audiences_batch_duration_seconds": "histogram",
    "audiences_deadline_lateness_seconds": "histogram",
    "audiences_processing_latency_seconds": "histogram",
    "audiences_consumer_lag": "gauge",
    "audiences_state_users": "gauge",
    "audiences_build_info": "gauge",
    "audiences_checkpoint_duration_seconds": "histogram",
    "audiences_misrouted_events_total": "counter",
    "audiences_profiles_quarantined_total": "counter",
    "audiences_state_dropped_total": "counter",
    "audiences_recovery_records_total": "counter",
    "audiences_sink_deliveries_total": "counter",
    "audiences_sink_request_duration_seconds": "histogram",
    "audiences_sink_delivery_lag_seconds": "histogram",
    "audiences_sink_retries_total": "counter",
    "audiences_sink_queue_depth": "gauge",
    "audiences_sink_dlq_total": "counter",
}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(ROOT / "docker-compose.yml")


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads((DEPLOY / "grafana/dashboards/audiences.json").read_text())


def listeners(value: str) -> dict[str, str]:
    """'PLAINTEXT://kafka:9092,HOST://:9094' -> {'PLAINTEXT': 'kafka:9092', 'HOST': ':9094'}"""
    return dict(item.split("://", 1) for item in value.split(","))


# --------------------------------------------------------------------------- compose


def test_compose_services(compose: dict[str, Any]) -> None:
    assert {"kafka", "worker", "collector", "prometheus", "grafana"} <= set(compose["services"])


def test_kafka_is_a_single_kraft_node(compose: dict[str, Any]) -> None:
    kafka = compose["services"]["kafka"]
    image, tag = kafka["image"].split(":")
    assert image == "apache/kafka"
    assert tuple(int(p) for p in tag.split(".")[:2]) >= (3, 9)
    env = {k: str(v) for k, v in kafka["environment"].items()}
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}

    bound = listeners(env["KAFKA_LISTENERS"])
    advertised = listeners(env["KAFKA_ADVERTISED_LISTENERS"])
    protocols = dict(p.split(":") for p in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert set(bound) <= set(protocols)
    assert controller in bound and controller not in advertised
    assert env["KAFKA_INTER_BROKER_LISTENER_NAME"] in advertised

    voter_id, voter_address = env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split("@")
    assert voter_id == env["KAFKA_NODE_ID"]
    assert voter_address.split(":")[1] == bound[controller].rsplit(":", 1)[1]
    assert len(base64.urlsafe_b64decode(env["CLUSTER_ID"] + "==")) == 16
    for name in (
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
    ):
        assert env[name] == "1"

    for service in ("worker", "collector"):
        bootstrap = compose["services"][service]["environment"]["AUDIENCES_KAFKA_BOOTSTRAP"]
        assert bootstrap == "kafka:9092"
        assert bootstrap in advertised.values()


def test_worker_and_collector(compose: dict[str, Any]) -> None:
    worker, collector = compose["services"]["worker"], compose["services"]["collector"]
    assert worker["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (ROOT / worker["build"]["context"] / worker["build"]["dockerfile"]).is_file()
    assert worker["command"] == ["worker"] and collector["command"] == ["collector"]
    assert worker["environment"]["AUDIENCES_DATA_DIR"] == "/data"
    assert any(v.endswith(":/data") for v in worker["volumes"])
    assert "6066" in worker["expose"] and "8088" in collector["expose"]
    assert "profiles" not in collector  # part of the default stack
    assert collector["environment"]["AUDIENCES_COLLECTOR_HOST"] == "0.0.0.0"  # reachable
    assert worker["depends_on"]["kafka"]["condition"] == "service_healthy"


def test_bind_mounts_exist(compose: dict[str, Any]) -> None:
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), volume
            else:
                assert source in compose["volumes"], volume


def test_dockerfile() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    assert 'ENTRYPOINT ["audiences"]' in text


# --------------------------------------------------------------------------- secrets

SECRET_VARIABLES = {PREFIX + name.upper() for name in SECRET_FIELDS}


def committed(path: Path) -> bool:
    """Whether git tracks `path` or would add it (not ignored)."""
    relative = str(path.relative_to(ROOT))
    tracked = subprocess.run(
        ["git", "ls-files", "--error-unmatch", relative], cwd=ROOT, capture_output=True
    )
    ignored = subprocess.run(["git", "check-ignore", "-q", relative], cwd=ROOT)
    return tracked.returncode == 0 or ignored.returncode != 0


def test_compose_sets_tokens_and_write_keys_from_secret_files(compose: dict[str, Any]) -> None:
    assert "AUDIENCES_API_TOKENS" in SECRET_VARIABLES and "AUDIENCES_WRITE_KEYS" in SECRET_VARIABLES
    needs = {"worker": "AUDIENCES_API_TOKENS", "collector": "AUDIENCES_WRITE_KEYS"}
    for name, service in compose["services"].items():
        env = {k: str(v) for k, v in service.get("environment", {}).items()}
        assert not SECRET_VARIABLES & set(env), f"{name}: a secret as a plain value"
        for variable, path in env.items():
            if variable.removesuffix("_FILE") in SECRET_VARIABLES:
                secret = path.removeprefix("/run/secrets/")
                assert path == f"/run/secrets/{secret}", (name, variable, path)
                assert secret in service["secrets"], (name, secret)
                source = ROOT / compose["secrets"][secret]["file"]
                assert source.parent == DEPLOY / "secrets", source
                assert not committed(source), f"{source} could be committed"
        if name in needs:
            assert needs[name] + "_FILE" in env, name
    worker = compose["services"]["worker"]["environment"]
    assert worker["AUDIENCES_WEB_HOST"] == "0.0.0.0"  # needs the tokens (else loopback)
    # only the instructions and the ignore rule can be committed there
    assert not committed(DEPLOY / "secrets/api_tokens.example")
    kept = {p.name for p in (DEPLOY / "secrets").iterdir() if committed(p)}
    assert kept == {".gitignore", "README.md"}, kept


def k8s_documents() -> list[dict[str, Any]]:
    return [
        doc
        for path in sorted((DEPLOY / "k8s").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return list(spec.get("containers", []))


def test_k8s_examples_take_every_secret_from_a_secret() -> None:
    docs = k8s_documents()
    assert docs, "no Kubernetes example under deploy/k8s"
    assert not [d for d in docs if d["kind"] == "Secret"], "a Secret with values is committed"
    secret_env: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        for container in containers(doc):
            for entry in container.get("env", []):
                if entry["name"] in SECRET_VARIABLES:
                    assert "value" not in entry, (doc["metadata"]["name"], entry["name"])
                    reference = entry["valueFrom"]["secretKeyRef"]
                    assert reference["name"] and reference["key"]
                    secret_env.setdefault(container["name"], []).append(entry)
    assert [e["name"] for e in secret_env["worker"]] == ["AUDIENCES_API_TOKENS"]
    assert [e["name"] for e in secret_env["collector"]] == ["AUDIENCES_WRITE_KEYS"]
    [worker] = [c for d in docs for c in containers(d) if c["name"] == "worker"]
    env = {e["name"]: e.get("value") for e in worker["env"]}
    assert env["AUDIENCES_WEB_HOST"] == "0.0.0.0" and env["AUDIENCES_WEB_ADVERTISED_URL"]
    # probes use the routes that need no token
    assert worker["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert worker["livenessProbe"]["httpGet"]["path"] == "/healthz"


# --------------------------------------------------------------------------- prometheus, grafana


def test_prometheus_scrapes_worker_and_collector() -> None:
    config = load_yaml(DEPLOY / "prometheus/prometheus.yml")
    targets = {
        target
        for job in config["scrape_configs"]
        if job.get("metrics_path", "/metrics") == "/metrics"
        for static in job["static_configs"]
        for target in static["targets"]
    }
    assert {"worker:6066", "collector:8088"} <= targets


def test_grafana_provisioning(compose: dict[str, Any]) -> None:
    datasources = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")
    (prometheus,) = datasources["datasources"]
    assert prometheus["type"] == "prometheus" and prometheus["url"] == "http://prometheus:9090"

    providers = load_yaml(DEPLOY / "grafana/provisioning/dashboards/dashboards.yml")
    (provider,) = providers["providers"]
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"


# --------------------------------------------------------------------------- dashboard


def queries(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    templates = [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    return exprs + templates


def test_dashboard_uses_only_known_metrics(dashboard: dict[str, Any]) -> None:
    used = set()
    for query in queries(dashboard):
        for name in re.findall(r"\baudiences_[a-z0-9_]+", query):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            if base != name and METRICS.get(base) == "histogram":
                name = base
            assert name in METRICS, f"unknown metric {name} in {query}"
            used.add(name)
    assert used == set(METRICS)


def test_dashboard_panels(dashboard: dict[str, Any]) -> None:
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    titles = {p["title"] for p in panels}
    for expected in (
        "Events in /s by type",
        "Invalid and duplicate events /s",
        "Transitions /s by audience",
        "Audience size",
        "Batch duration",
        "Processing latency (event to output)",
        "Deadline lateness",
        "Consumer lag per partition",
        "Users in state per partition",
        "Deliveries /s by destination and outcome",
        "Retries and dead letters /s",
    ):
        assert expected in titles
    for panel in panels:
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}"
