"""The compose stack, Kubernetes manifests, Prometheus alert rules, Grafana provisioning and
dashboard are consistent with each other and with the code (SPEC §9, §10)."""

from __future__ import annotations

import base64
import importlib
import json
import pkgutil
import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import promql_parser
import pytest
import yaml
from prometheus_client import REGISTRY

import audiences.adapters
from audiences.adapters.settings import PREFIX, SECRET_FIELDS, Settings
from audiences.adapters.sinks.config import parse_destinations

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def declared_metrics() -> dict[str, str]:
    """Every `audiences_*` metric the code declares, by name (without `_total`) -> type:
    the modules of audiences.adapters are imported, so a metric declared anywhere there
    registers itself."""
    for module in pkgutil.walk_packages(audiences.adapters.__path__, "audiences.adapters."):
        importlib.import_module(module.name)
    return {
        family.name: family.type
        for family in REGISTRY.collect()
        if family.name.startswith("audiences_")
    }


# The destination sinks publish these gauges (1 while a destination is paused by a
# 401/403 / stopped by a 410, label `destination`); the alert rules and the dashboard
# use them. Listed here in case the sinks have not declared them yet.
SINK_STATE_GAUGES = {"audiences_destination_paused", "audiences_destination_stopped"}
# Series Prometheus makes itself for every scrape target.
PROMETHEUS_SERIES = {"up"}


def exposed_names(metrics: dict[str, str]) -> dict[str, str]:
    """The names /metrics exposes -> the metric they belong to: counters as `_total`,
    histograms as `_bucket`, `_sum` and `_count`, gauges as they are."""
    names: dict[str, str] = {}
    for name, kind in metrics.items():
        if kind == "counter":
            names[name + "_total"] = name
        elif kind in ("histogram", "summary"):
            for suffix in ("_bucket", "_sum", "_count")[kind == "summary" :]:
                names[name + suffix] = name
        else:
            names[name] = name
    return names


METRICS = declared_metrics() | {name: "gauge" for name in SINK_STATE_GAUGES}
EXPOSED = exposed_names(METRICS)


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (parsed, so label values and function names
    never count); a syntax error raises ValueError."""
    names: set[str] = set()

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            names.add(node.name)
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def test_exposed_names_of_each_metric_type() -> None:
    assert exposed_names({"a": "counter", "b": "histogram", "c": "gauge"}) == {
        "a_total": "a",
        "b_bucket": "b",
        "b_sum": "b",
        "b_count": "b",
        "c": "c",
    }
    assert metric_names('sum by (le) (rate(x_bucket{a="up"}[5m])) / on() group_left y') == {
        "x_bucket",
        "y",
    }
    with pytest.raises(ValueError):
        metric_names("sum(rate(x[5m])")


def setting_variables() -> set[str]:
    """Every AUDIENCES_* variable the settings read (secrets also as `_FILE`)."""
    variables = set(Settings().redacted())
    return variables | {PREFIX + name.upper() + "_FILE" for name in SECRET_FIELDS}


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


def workers(services: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services.items() if s.get("command") == ["worker"]}


def test_compose_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"kafka", "worker-1", "worker-2", "collector", "prometheus", "grafana"} <= set(services)
    assert set(workers(services)) == {"worker-1", "worker-2"}


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

    for service in ("worker-1", "worker-2", "collector"):
        bootstrap = compose["services"][service]["environment"]["AUDIENCES_KAFKA_BOOTSTRAP"]
        assert bootstrap == "kafka:9092"
        assert bootstrap in advertised.values()


def check_worker(name: str, worker: dict[str, Any], compose: dict[str, Any]) -> None:
    """A worker service that joins the others: same image, settings and tokens; its own
    data volume; an advertised URL the other containers reach it at; ready-checked."""
    first = compose["services"]["worker-1"]
    assert worker["image"] == first["image"] and worker["build"] == first["build"], name
    env = {k: str(v) for k, v in worker["environment"].items()}
    first_env = {k: str(v) for k, v in first["environment"].items()}
    for same in ("AUDIENCES_KAFKA_BOOTSTRAP", "AUDIENCES_PARTITIONS", "AUDIENCES_API_TOKENS_FILE"):
        assert env[same] == first_env[same], (name, same)
    port = env.get("AUDIENCES_WEB_PORT", "6066")
    assert port in [str(p) for p in worker["expose"]], name
    assert env["AUDIENCES_WEB_ADVERTISED_URL"] == f"http://{name}:{port}"
    assert env["AUDIENCES_WEB_HOST"] == "0.0.0.0"  # honoured with the tokens: reachable
    assert env["AUDIENCES_API_TOKENS_FILE"] == "/run/secrets/api_tokens"
    assert "api_tokens" in worker["secrets"] and "api_tokens" in compose["secrets"]
    data = env["AUDIENCES_DATA_DIR"]
    [volume] = [v.split(":")[0] for v in worker["volumes"] if v.split(":")[1] == data]
    assert volume in compose["volumes"], (name, volume)
    assert worker["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert f"http://localhost:{port}/readyz" in " ".join(worker["healthcheck"]["test"])


def check_stack(compose: dict[str, Any]) -> None:
    services = compose["services"]
    running = workers(services)
    for name, worker in running.items():
        check_worker(name, worker, compose)
    data_volumes = [v.split(":")[0] for w in running.values() for v in w["volumes"]]
    assert len(data_volumes) == len(set(data_volumes)), "workers share a data volume"
    host_ports = [str(p).rsplit(":", 1)[0] for s in services.values() for p in s.get("ports", [])]
    assert len(host_ports) == len(set(host_ports)), f"a host port published twice: {host_ports}"
    for name, service in services.items():
        depends = service.get("depends_on", {})
        for other in depends:
            assert other in services, (name, other)
            if isinstance(depends, dict) and depends[other].get("condition") == "service_healthy":
                assert "healthcheck" in services[other], f"{name} waits for {other}'s health"


def test_compose_stack(compose: dict[str, Any]) -> None:
    check_stack(compose)
    collector = compose["services"]["collector"]
    assert collector["command"] == ["collector"] and "8088" in collector["expose"]
    assert "profiles" not in collector  # part of the default stack
    assert collector["environment"]["AUDIENCES_COLLECTOR_HOST"] == "0.0.0.0"  # reachable
    # the workers create the topics the collector produces to
    assert collector["depends_on"]["worker-1"]["condition"] == "service_healthy"
    worker = compose["services"]["worker-1"]
    assert worker["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (ROOT / worker["build"]["context"] / worker["build"]["dockerfile"]).is_file()


COMPOSE_SCHEMA = json.loads((Path(__file__).parent / "fixtures/compose-spec.json").read_text())


def compose_errors(config: dict[str, Any]) -> list[str]:
    """What the Compose Specification's schema finds wrong (tests/unit/fixtures/README.md)."""
    validator = jsonschema.Draft7Validator(COMPOSE_SCHEMA)
    return [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(config)]


def test_compose_file_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    assert compose_errors(compose) == []
    changed = json.loads(json.dumps(compose))
    changed["services"]["worker-2"]["healthcheck"]["intervall"] = "10s"
    changed["services"]["worker-1"]["depends_on"]["kafka"]["condition"] = "healthy"
    assert len(compose_errors(changed)) >= 2


def test_check_stack_finds_a_broken_worker(compose: dict[str, Any]) -> None:
    """The structural check refuses what would break a worker in the stack."""
    broken = [
        ("worker-2", "environment", "AUDIENCES_WEB_ADVERTISED_URL", "http://worker-1:6066"),
        ("worker-2", "volumes", None, ["worker-1-data:/data"]),
        ("worker-2", "ports", None, ["6066:6066"]),
        ("collector", "depends_on", None, {"prometheus": {"condition": "service_healthy"}}),
    ]
    for service, key, variable, value in broken:
        changed = json.loads(json.dumps(compose))
        if variable:
            changed["services"][service][key][variable] = value
        else:
            changed["services"][service][key] = value
        with pytest.raises(AssertionError):
            check_stack(changed)


def test_compose_uses_only_real_settings(compose: dict[str, Any]) -> None:
    known = setting_variables()
    for name, service in compose["services"].items():
        for variable in service.get("environment", {}):
            if variable.startswith(PREFIX):
                assert variable in known, f"{name}: {variable} is not a setting"
    text = (ROOT / "docker-compose.yml").read_text()
    for variable in re.findall(r"\$\{(AUDIENCES_[A-Z0-9_]+)", text):
        assert variable in known, variable


def test_bind_mounts_exist(compose: dict[str, Any]) -> None:
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), volume
            else:
                assert source in compose["volumes"], volume


def readme_section(path: Path, heading: str) -> str:
    text = path.read_text()
    start = text.index(heading + "\n")
    following = text.find("\n## ", start + len(heading))
    return text[start : following if following >= 0 else len(text)]


def yaml_blocks(text: str) -> list[Any]:
    return [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", text, re.S)]


def test_more_workers_recipe(compose: dict[str, Any]) -> None:
    """deploy/README.md "More workers": its override adds a worker that joins the others
    (checked as the stack's own workers are), and its Prometheus targets list them all."""
    override, scrape = yaml_blocks(readme_section(DEPLOY / "README.md", "## More workers"))
    merged = json.loads(json.dumps(compose))
    added = set(override["services"]) - set(compose["services"])
    assert added and added <= set(workers(override["services"])), added
    merged["services"].update(override["services"])
    merged["volumes"].update(override.get("volumes") or {})
    assert compose_errors(override) == []
    check_stack(merged)
    for variable in override["services"][next(iter(added))]["environment"]:
        assert variable in setting_variables(), variable
    [job] = [j for j in scrape["scrape_configs"] if j["job_name"] == "audiences-worker"]
    targets = {t for static in job["static_configs"] for t in static["targets"]}
    assert targets == {f"{name}:6066" for name in workers(merged["services"])}


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
    needs = {
        "worker-1": "AUDIENCES_API_TOKENS",
        "worker-2": "AUDIENCES_API_TOKENS",
        "collector": "AUDIENCES_WRITE_KEYS",
    }
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
    # only the instructions and the ignore rule can be committed there
    assert not committed(DEPLOY / "secrets/api_tokens.example")
    kept = {p.name for p in (DEPLOY / "secrets").iterdir() if committed(p)}
    assert kept == {".gitignore", "README.md"}, kept


# --------------------------------------------------------------------------- kubernetes

K8S_VERSION = "1.30"  # schemas shipped (offline) by the kubernetes-validate package
K8S = DEPLOY / "k8s"


def k8s_documents() -> list[dict[str, Any]]:
    return [
        doc
        for path in sorted(K8S.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def k8s_one(kind: str, name: str) -> dict[str, Any]:
    [doc] = [d for d in k8s_documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return list(spec.get("containers", []))


def test_k8s_documents_are_valid_kubernetes_objects() -> None:
    docs = k8s_documents()
    kinds = {d["kind"] for d in docs}
    assert {"ConfigMap", "Service", "StatefulSet", "PodDisruptionBudget", "Deployment"} <= kinds
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {path}: {exc.message}")


def test_k8s_validation_catches_a_wrong_field() -> None:
    statefulset = json.loads(json.dumps(k8s_one("StatefulSet", "audiences-worker")))
    statefulset["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"][
        "paht"
    ] = "/readyz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(statefulset, K8S_VERSION, strict=True)


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def test_k8s_worker_statefulset() -> None:
    statefulset = k8s_one("StatefulSet", "audiences-worker")
    spec = statefulset["spec"]
    pod = spec["template"]
    labels = pod["metadata"]["labels"]
    assert selects(spec["selector"]["matchLabels"], labels)

    # headless Service: stable per-pod DNS names, published before readiness
    headless = k8s_one("Service", spec["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert selects(headless["spec"]["selector"], labels)

    [worker] = pod["spec"]["containers"]
    assert worker["args"] == ["worker"]
    env = {e["name"]: e for e in worker["env"]}
    order = [e["name"] for e in worker["env"]]
    values = {name: e.get("value") for name, e in env.items()}
    port = int(values.get("AUDIENCES_WEB_PORT") or 6066)
    [http] = [p for p in worker["ports"] if p["containerPort"] == port]

    # the advertised URL is the pod's DNS name; $(VAR) expands only variables defined above
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    service = spec["serviceName"]
    assert values["AUDIENCES_WEB_ADVERTISED_URL"] == (
        f"http://$(POD_NAME).{service}.$(POD_NAMESPACE).svc.cluster.local:{port}"
    )
    for variable in re.findall(r"\$\((\w+)\)", values["AUDIENCES_WEB_ADVERTISED_URL"]):
        assert order.index(variable) < order.index("AUDIENCES_WEB_ADVERTISED_URL"), variable
    assert values["AUDIENCES_WEB_HOST"] == "0.0.0.0"
    assert "secretKeyRef" in env["AUDIENCES_API_TOKENS"]["valueFrom"]

    # probes: the routes that need no token (SPEC §8), on the web port
    probes = {
        kind: worker[kind]["httpGet"]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe")
    }
    assert probes["readinessProbe"]["path"] == "/readyz"  # partitions assigned, state recovered
    assert probes["livenessProbe"]["path"] == "/healthz"  # the process is up
    assert probes["startupProbe"]["path"] == "/healthz"  # before the (long) recovery
    for probe in probes.values():
        assert probe["port"] in (http["name"], port)
    startup = worker["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120

    # the RocksDB data dir is a volume claim of each pod
    [claim] = spec["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in worker["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == values["AUDIENCES_DATA_DIR"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]

    budget = k8s_one("PodDisruptionBudget", "audiences-worker")
    assert selects(budget["spec"]["selector"]["matchLabels"], labels)
    assert budget["spec"]["maxUnavailable"] == 1


def test_k8s_destinations_come_from_a_mounted_configmap() -> None:
    statefulset = k8s_one("StatefulSet", "audiences-worker")
    pod = statefulset["spec"]["template"]["spec"]
    [worker] = pod["containers"]
    env = {e["name"]: e for e in worker["env"]}
    path = Path(env["AUDIENCES_DESTINATIONS"]["value"])
    [mount] = [m for m in worker["volumeMounts"] if Path(m["mountPath"]) == path.parent]
    assert mount.get("readOnly") is True
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    config_map = k8s_one("ConfigMap", volume["configMap"]["name"])
    text = config_map["data"][path.name]
    # every ${VAR} it references is in the worker's environment, from the Secret
    references = set(re.findall(r"\$\{(\w+)\}", text))
    for variable in references:
        assert "secretKeyRef" in env[variable]["valueFrom"], variable
    secret = "whsec_" + base64.b64encode(bytes(32)).decode()
    destinations = parse_destinations(yaml.safe_load(text), dict.fromkeys(references, secret))
    assert destinations


def test_k8s_resources_and_collector() -> None:
    for doc in k8s_documents():
        for container in containers(doc):
            resources = container["resources"]
            assert resources["requests"]["cpu"] and resources["requests"]["memory"]
            assert resources["limits"]["memory"]
    collector = k8s_one("Deployment", "audiences-collector")
    [container] = containers(collector)
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    labels = collector["spec"]["template"]["metadata"]["labels"]
    service = k8s_one("Service", "audiences-collector")
    assert selects(service["spec"]["selector"], labels)
    budget = k8s_one("PodDisruptionBudget", "audiences-collector")
    assert selects(budget["spec"]["selector"]["matchLabels"], labels)


def test_k8s_uses_only_real_settings() -> None:
    known = setting_variables()
    for doc in k8s_documents():
        for container in containers(doc):
            for entry in container.get("env", []):
                if entry["name"].startswith(PREFIX):
                    assert entry["name"] in known, entry["name"]


def test_k8s_examples_take_every_secret_from_a_secret() -> None:
    docs = k8s_documents()
    assert not [d for d in docs if d["kind"] == "Secret"], "a Secret with values is committed"
    secret_env: dict[str, list[str]] = {}
    referenced: set[tuple[str, str]] = set()
    for doc in docs:
        for container in containers(doc):
            for entry in container.get("env", []):
                reference = entry.get("valueFrom", {}).get("secretKeyRef")
                if entry["name"] in SECRET_VARIABLES:
                    assert "value" not in entry, (doc["metadata"]["name"], entry["name"])
                    assert reference, entry["name"]
                if reference:
                    referenced.add((reference["name"], reference["key"]))
                    secret_env.setdefault(container["name"], []).append(entry["name"])
    assert "AUDIENCES_API_TOKENS" in secret_env["worker"]
    assert secret_env["collector"] == ["AUDIENCES_WRITE_KEYS"]
    # the README's `kubectl create secret` makes every key the pods read
    readme = (K8S / "README.md").read_text()
    [command] = re.findall(r"kubectl create secret generic (\S+)((?:.|\n)*?)\n```", readme)
    created = {(command[0], key) for key in re.findall(r"--from-literal=([\w-]+)=", command[1])}
    assert referenced <= created, referenced - created


# --------------------------------------------------------------------------- prometheus


def test_prometheus_scrapes_workers_and_collector(compose: dict[str, Any]) -> None:
    config = load_yaml(DEPLOY / "prometheus/prometheus.yml")
    targets = {
        target
        for job in config["scrape_configs"]
        if job.get("metrics_path", "/metrics") == "/metrics"
        for static in job["static_configs"]
        for target in static["targets"]
    }
    expected = {f"{name}:6066" for name in workers(compose["services"])} | {"collector:8088"}
    assert targets == expected
    # the alert rules are loaded: the file is mounted where rule_files says
    mounts = dict(v.split(":")[:2] for v in compose["services"]["prometheus"]["volumes"])
    assert config["rule_files"] == [mounts["./deploy/prometheus/alerts.yml"]]


ALERTS = DEPLOY / "prometheus/alerts.yml"
RULE_KEYS = {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")


def check_rules(config: Any) -> list[dict[str, Any]]:
    """The Prometheus rule-file structure, every expression parsed and every metric
    known; returns the alerting rules."""
    assert set(config) == {"groups"}
    groups = config["groups"]
    assert [g["name"] for g in groups] == list(dict.fromkeys(g["name"] for g in groups))
    rules = []
    for group in groups:
        assert set(group) <= {"name", "interval", "limit", "rules"}, group["name"]
        assert group["rules"], group["name"]
        for rule in group["rules"]:
            assert set(rule) <= RULE_KEYS and {"alert", "expr"} <= set(rule), rule
            assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", rule["alert"]), rule["alert"]
            for key in ("for", "keep_firing_for"):
                assert key not in rule or DURATION.match(rule[key]), (rule["alert"], key)
            names = metric_names(rule["expr"])
            assert names, rule["alert"]
            for name in names:
                assert name in EXPOSED or name in PROMETHEUS_SERIES, (rule["alert"], name)
            assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
            annotations = rule["annotations"]
            assert isinstance(annotations["summary"], str) and annotations["summary"].strip()
            for value in [*rule["labels"].values(), *annotations.values()]:
                assert isinstance(value, str), (rule["alert"], value)
                # a label the summary shows must survive the expression's aggregation
                for label in re.findall(r"\$labels\.(\w+)", value):
                    assert label in rule["expr"] or (
                        label == "instance" and " by (" not in rule["expr"]
                    ), (rule["alert"], label)
            rules.append(rule)
    alerts = [r["alert"] for r in rules]
    assert len(alerts) == len(set(alerts)), alerts
    return rules


def test_alert_rules() -> None:
    rules = check_rules(load_yaml(ALERTS))
    used = {EXPOSED.get(n, n) for rule in rules for n in metric_names(rule["expr"])}
    for required in (
        "audiences_consumer_lag",  # lag high and growing
        "audiences_events_invalid",  # events-dlq rate
        "audiences_sink_dlq",  # audience-events-dlq rate
        "audiences_deadline_lateness_seconds",
        "audiences_sink_deliveries",  # nothing delivered
        "audiences_sink_retries",
        "audiences_destination_paused",
        "audiences_destination_stopped",
    ):
        assert required in used, required


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda r: r.update(expr="sum(rate(audiences_consumer_lag[5m])"), "syntax"),
        (lambda r: r.update(expr="audiences_consumer_lags > 1"), "unknown metric"),
        (lambda r: r.update(expr="rate(audiences_sink_retries[5m]) > 1"), "counter without _total"),
        (lambda r: r.update(expr="audiences_deadline_lateness_seconds > 1"), "histogram family"),
        (lambda r: r["labels"].pop("severity"), "no severity"),
        (lambda r: r["annotations"].pop("summary"), "no summary"),
        (lambda r: r.update({"for": "ten minutes"}), "duration"),
        (lambda r: r.update(expression=r.pop("expr")), "structure"),
    ],
)
def test_alert_rule_check_refuses(change: Any, why: str) -> None:
    config = load_yaml(ALERTS)
    change(config["groups"][0]["rules"][0])
    with pytest.raises((AssertionError, ValueError, KeyError)):
        check_rules(config)


# --------------------------------------------------------------------------- grafana


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


GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


def as_promql(query: str) -> str:
    """A panel's query as Prometheus receives it (Grafana's range variables filled in)."""
    for variable, value in GRAFANA_VARIABLES.items():
        query = query.replace(variable, value)
    return query


def dashboard_metrics(dashboard: dict[str, Any]) -> set[str]:
    """The exposed names every panel query and template variable selects (each query
    parsed as PromQL: a syntax error fails)."""
    names: set[str] = set()
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            try:
                names |= metric_names(as_promql(target["expr"]))
            except ValueError as exc:
                raise AssertionError(f"{panel['title']}: {target['expr']}: {exc}") from None
    for variable in dashboard["templating"]["list"]:
        if "definition" in variable:  # label_values(METRIC, LABEL)
            [metric] = re.findall(r"^label_values\((\w+),", variable["definition"])
            names.add(metric)
    return names


def test_dashboard_uses_only_known_metrics_and_shows_them_all(dashboard: dict[str, Any]) -> None:
    used = dashboard_metrics(dashboard)
    unknown = used - set(EXPOSED)
    assert not unknown, f"the dashboard uses metrics the code does not define: {unknown}"
    assert {EXPOSED[name] for name in used} == set(METRICS), set(METRICS) - {
        EXPOSED[name] for name in used
    }


def test_dashboard_check_refuses_an_unknown_metric(dashboard: dict[str, Any]) -> None:
    changed = json.loads(json.dumps(dashboard))
    changed["panels"][0]["targets"][0]["expr"] = "sum(rate(audiences_collector_events[5m]))"
    assert "audiences_collector_events" in dashboard_metrics(changed) - set(EXPOSED)
    changed["panels"][0]["targets"][0]["expr"] = "sum(rate(audiences_events_in_total[5m])"
    with pytest.raises(AssertionError):
        dashboard_metrics(changed)


def test_dashboard_panels(dashboard: dict[str, Any]) -> None:
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    titles = {p["title"] for p in panels}
    for expected in (
        "Events in /s by type",
        "Invalid, duplicate and suppressed events /s",
        "Transitions /s by audience",
        "Audience size",
        "Batch duration",
        "Processing latency (event to output)",
        "Deadline lateness",
        "Consumer lag per partition",
        "Users in state per partition",
        "Deliveries /s by destination and outcome",
        "Retries and dead letters /s",
        "Paused and stopped destinations",
        "Collector requests /s by status",
        "Collector events /s: accepted, invalid, rate-limited",
        "Collector in flight (not yet acknowledged by Kafka)",
        "Collector request duration by endpoint",
    ):
        assert expected in titles
    occupied: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & occupied, f"{panel['title']} overlaps another panel"
        occupied |= cells
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}"
