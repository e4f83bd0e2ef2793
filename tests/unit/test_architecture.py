"""The shape of the house (DESIGN.md), checked on the sources: no module imports another in a
circle, the core does no I/O and reads no clock, the engine never imports its tools, only
the state layer knows how state is laid out, and only `KafkaClients` makes Kafka clients."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = "audiences"
# Libraries that mean I/O, concurrency or infrastructure: never in the core.
IO_LIBRARIES = {
    "aiohttp",
    "asyncio",
    "confluent_kafka",
    "faust",
    "mode",
    "prometheus_client",
    "requests",
    "rocksdict",
    "socket",
    "subprocess",
    "threading",
    "urllib",
    "http",
    "logging",
}
CLOCK_READS = {
    ("time", "time"),
    ("time", "time_ns"),
    ("time", "monotonic"),
    ("time", "perf_counter"),
    ("datetime", "now"),
    ("datetime", "utcnow"),
    ("datetime", "today"),
    ("date", "today"),
}

# confluent_kafka's clients: the engine makes them only in `adapters/kafka/clients.py`
# (`KafkaClients`). The broker launchers talk to the broker they start, and the tools are
# users of the engine: they make their own.
KAFKA_CLIENTS = {
    "Producer",
    "Consumer",
    "AdminClient",
    "SerializingProducer",
    "DeserializingConsumer",
}
CLIENT_MAKERS = {
    f"{PACKAGE}.adapters.kafka.clients",
    f"{PACKAGE}.adapters.kafka.launcher",  # the broker launchers' readiness probe
}


def modules() -> dict[str, Path]:
    found = {}
    for path in (SRC / PACKAGE).rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(path: Path, name: str, known: set[str]) -> tuple[set[str], set[str]]:
    """(modules of this package, top-level external packages) imported anywhere in a file
    (module level and inside functions alike)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    ours, theirs = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    ours.add(_nearest(alias.name, known))
                else:
                    theirs.add(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            if base.split(".")[0] != PACKAGE:
                theirs.add(base.split(".")[0])
                continue
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                ours.add(candidate if candidate in known else _nearest(base, known))
    ours.discard(name)
    return ours, theirs


def _nearest(name: str, known: set[str]) -> str:
    while name not in known and "." in name:
        name = name.rpartition(".")[0]
    return name


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imports(path, name, known)[0] for name, path in found.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges.get(node, ())):
            # A package's __init__ importing its own submodules is not a circle of modules.
            if target not in edges or node.startswith(target + "."):
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_another_in_a_circle() -> None:
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_cycles() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_core_does_no_io_and_reads_no_clock() -> None:
    found = modules()
    known = set(found)
    for name, path in found.items():
        if not name.startswith(f"{PACKAGE}.core"):
            continue
        ours, theirs = imports(path, name, known)
        assert not {
            m for m in ours if not m.startswith((f"{PACKAGE}.core", f"{PACKAGE}.errors"))
        }, name
        assert not theirs & IO_LIBRARIES, (name, theirs & IO_LIBRARIES)
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
            ):
                assert (node.func.value.id, node.func.attr) not in CLOCK_READS, (
                    f"{name} reads the clock: {node.func.value.id}.{node.func.attr}()"
                )


def test_the_engine_never_imports_its_tools() -> None:
    for name, targets in graph().items():
        if name.startswith(f"{PACKAGE}.tools") or name == f"{PACKAGE}.cli":
            continue
        assert not {t for t in targets if t.startswith(f"{PACKAGE}.tools")}, name


def test_only_the_state_layer_knows_the_layout() -> None:
    layout = f"{PACKAGE}.adapters.state.layout"
    for name, targets in graph().items():
        if layout in targets:
            assert name.startswith(f"{PACKAGE}.adapters.state"), f"{name} imports the layout"


def test_http_reaches_the_runtime_only_through_the_query_port() -> None:
    allowed = {
        f"{PACKAGE}.adapters.stream.queries",
        f"{PACKAGE}.adapters.stream.registry",
        f"{PACKAGE}.adapters.stream.definitions",
    }
    for name, targets in graph().items():
        if name.startswith(f"{PACKAGE}.adapters.http"):
            stream = {t for t in targets if t.startswith(f"{PACKAGE}.adapters.stream")}
            assert stream <= allowed, (name, stream - allowed)
        if name.startswith((f"{PACKAGE}.adapters.stream", f"{PACKAGE}.adapters.state")):
            assert not {t for t in targets if t.startswith(f"{PACKAGE}.adapters.http")}, name


def kafka_client_calls(source: str) -> list[str]:
    """Calls in `source` that make a confluent_kafka client, however it was imported (by
    name, renamed, or through its module), as "line: confluent_kafka.…Name"."""
    tree = ast.parse(source)
    bound: dict[str, str] = {}  # a name in the module -> what it is in confluent_kafka
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] != "confluent_kafka":
                    continue
                if alias.asname:
                    bound[alias.asname] = alias.name
                else:  # `import confluent_kafka.admin` binds `confluent_kafka`
                    bound["confluent_kafka"] = "confluent_kafka"
        elif isinstance(node, ast.ImportFrom) and not node.level:
            module = node.module or ""
            if module.split(".")[0] == "confluent_kafka":
                for alias in node.names:
                    bound[alias.asname or alias.name] = f"{module}.{alias.name}"
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        attributes: list[str] = []
        func = node.func
        while isinstance(func, ast.Attribute):
            attributes.insert(0, func.attr)
            func = func.value
        if not isinstance(func, ast.Name) or func.id not in bound:
            continue
        called = ".".join([bound[func.id], *attributes])
        if called.rpartition(".")[2] in KAFKA_CLIENTS:
            found.append(f"{node.lineno}: {called}")
    return found


def test_the_client_finder_finds_clients_however_imported() -> None:
    source = """
import confluent_kafka
import confluent_kafka.admin as kafka_admin
from confluent_kafka import Consumer, TopicPartition, Producer as MakeProducer
from confluent_kafka.admin import AdminClient

def make():
    Consumer({})
    MakeProducer({})
    confluent_kafka.Producer({})
    kafka_admin.AdminClient({})
    AdminClient({})
    TopicPartition("t", 0)
    Producer({})  # not confluent_kafka's: this module never imported that name
    confluent_kafka.Producer.__len__(None)
"""
    assert kafka_client_calls(source) == [
        "8: confluent_kafka.Consumer",
        "9: confluent_kafka.Producer",
        "10: confluent_kafka.Producer",
        "11: confluent_kafka.admin.AdminClient",
        "12: confluent_kafka.admin.AdminClient",
    ]


def test_only_the_kafka_clients_factory_makes_kafka_clients() -> None:
    found = {
        name: calls
        for name, path in sorted(modules().items())
        if name not in CLIENT_MAKERS and not name.startswith(f"{PACKAGE}.tools")
        if (calls := kafka_client_calls(path.read_text()))
    }
    assert found == {}, (
        "Kafka clients made outside adapters/kafka/clients.py: add a factory to "
        f"KafkaClients and pass it (or its client) in from bootstrap.py: {found}"
    )
