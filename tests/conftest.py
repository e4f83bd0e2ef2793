"""Shared fixtures.

Kafka for tests, in order (SPEC §9): ``AUDIENCES_TEST_KAFKA_BOOTSTRAP`` if set;
else a testcontainers Kafka (KRaft) if a Docker daemon answers; else Apache
Kafka itself (`ApacheKafka`: KRaft, jars from Maven Central) when Java >= 17
and Maven are there; else the embedded Tansu broker. ``AUDIENCES_TEST_BROKER``
= ``apache`` | ``embedded`` picks one of the last two directly (`make test`
runs the whole suite on Apache Kafka, then a smoke subset on the embedded
broker, `make demo`'s path). ``kafka_flavor`` says which one is in use
("external" | "testcontainers" | "apache" | "embedded") so a test can assert a
known broker quirk only where it exists.

``apache_kafka_bootstrap`` is a real Apache Kafka broker for tests that need
what Tansu cannot do (DeleteRecords, compaction, transactions; mark them
``apache``): ``AUDIENCES_TEST_APACHE_KAFKA_BOOTSTRAP`` if set, else the same
`ApacheKafka` as ``kafka_bootstrap`` when that one is Apache Kafka, else one
started for them, else the test is skipped with the reason.
"""

from __future__ import annotations

import os
import re
import sys
import uuid
import warnings
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlparse

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/shared.py

_FLAVOR = pytest.StashKey[str]()
_FALLBACK = pytest.StashKey[str]()
# `make test` sets it: "1" = the compiled core must run; "auto" = must when the build found a
# C compiler, Python headers and mypyc (see setup.py, audiences/_core_build.py).
EXPECT_COMPILED_CORE = "AUDIENCES_EXPECT_COMPILED_CORE"


def pytest_report_header(config: pytest.Config) -> str:
    from audiences import core_build

    return f"audiences core: {core_build().describe()}"


def pytest_configure(config: pytest.Config) -> None:
    """Fail the run at once when the compiled core was expected but pure Python would run."""
    from audiences import core_build

    expect, build = os.environ.get(EXPECT_COMPILED_CORE, ""), core_build()
    if build.compiled or expect in ("", "0") or (expect == "auto" and not build.toolchain):
        return
    raise pytest.UsageError(
        f"{EXPECT_COMPILED_CORE}={expect}: the compiled core is expected, but "
        f"audiences.core runs as {build.describe()}"
    )


def _docker_available(timeout: float = 2.0) -> bool:
    """True if a Docker daemon answers a ping; fast and silent when there is none."""
    try:
        from testcontainers.core.docker_client import get_docker_host

        host = get_docker_host()
    except Exception:
        return False
    url = host or "unix:///var/run/docker.sock"
    parsed = urlparse(url)
    if parsed.scheme in ("unix", "") and not os.path.exists(parsed.path or url):
        return False  # no socket: no daemon, and no connection attempt at all
    try:
        import docker

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            client = docker.DockerClient(base_url=url, timeout=int(max(timeout, 1)))
            try:
                return bool(client.ping())
            finally:
                client.close()
    except Exception:
        return False


BROKER_CHOICE = "AUDIENCES_TEST_BROKER"  # "apache" | "embedded": skip the detection


@pytest.fixture(scope="session")
def _apache_broker() -> Iterator[Callable[[], str]]:
    """Starts one `ApacheKafka` for the session the first time it is asked for (its
    bootstrap), shared by ``kafka_bootstrap`` and ``apache_kafka_bootstrap``; raises
    `ApacheKafkaUnavailable` without Java >= 17 or Maven."""
    from audiences.adapters.kafka.apache import ApacheKafka

    started: list[ApacheKafka] = []

    def bootstrap() -> str:
        if not started:
            broker = ApacheKafka()
            broker.start()
            started.append(broker)
        return started[0].bootstrap

    yield bootstrap
    for broker in started:
        broker.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(
    request: pytest.FixtureRequest, _apache_broker: Callable[[], str]
) -> Iterator[str]:
    """``bootstrap.servers`` of a Kafka broker for the whole session."""
    from audiences.adapters.kafka.apache import ApacheKafkaUnavailable

    external = os.environ.get("AUDIENCES_TEST_KAFKA_BOOTSTRAP")
    if external:
        request.config.stash[_FLAVOR] = "external"
        yield external
        return

    choice = os.environ.get(BROKER_CHOICE, "")
    if choice not in ("", "apache", "embedded"):
        raise pytest.UsageError(f"{BROKER_CHOICE}={choice!r}: expected apache or embedded")
    if not choice and _docker_available():
        from testcontainers.community.kafka import KafkaContainer

        with KafkaContainer().with_kraft() as container:
            request.config.stash[_FLAVOR] = "testcontainers"
            yield container.get_bootstrap_server()
        return

    if choice != "embedded":
        try:
            bootstrap = _apache_broker()
        except ApacheKafkaUnavailable as exc:
            if choice == "apache":
                raise pytest.UsageError(f"{BROKER_CHOICE}=apache: {exc}") from exc
            # no Java 17 / Maven here: the embedded broker (said once in the summary)
            request.config.stash[_FALLBACK] = f"no Apache Kafka ({exc}): embedded broker"
        else:
            request.config.stash[_FLAVOR] = "apache"
            yield bootstrap
            return

    from audiences.adapters.kafka.embedded import EmbeddedBroker

    with EmbeddedBroker() as broker:
        request.config.stash[_FLAVOR] = "embedded"
        yield broker.bootstrap


@pytest.fixture(scope="session")
def kafka_flavor(request: pytest.FixtureRequest, kafka_bootstrap: str) -> str:
    """Which broker `kafka_bootstrap` is: "external", "testcontainers", "apache" or
    "embedded"."""
    return request.config.stash[_FLAVOR]


@pytest.fixture(scope="session")
def apache_kafka_bootstrap(_apache_broker: Callable[[], str]) -> Iterator[str]:
    """``bootstrap.servers`` of a real Apache Kafka 4.x broker for the whole session.

    ``AUDIENCES_TEST_APACHE_KAFKA_BOOTSTRAP`` if set; else the session's
    `ApacheKafka` (the one ``kafka_bootstrap`` uses when it is Apache Kafka);
    skips the test when Java >= 17 or Maven is missing or Maven cannot resolve
    the jars (``.ci/run`` resolves them first, so on CI that is a failure, not
    a skip). A broker that fails to start is an error.
    """
    external = os.environ.get("AUDIENCES_TEST_APACHE_KAFKA_BOOTSTRAP")
    if external:
        yield external
        return

    from audiences.adapters.kafka.apache import ApacheKafkaUnavailable

    try:
        bootstrap = _apache_broker()
    except ApacheKafkaUnavailable as exc:
        pytest.skip(f"no Apache Kafka broker: {exc}")
    yield bootstrap


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """Which broker the Kafka tests ran on (and why, when it was not Apache Kafka)."""
    flavor = config.stash.get(_FLAVOR, None)
    if flavor:
        note = config.stash.get(_FALLBACK, "")
        terminalreporter.write_line(
            f"Kafka tests ran on: {flavor}" + (f" ({note})" if note else "")
        )


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> Callable[..., str]:
    """Make unique topic/group names: ``unique_name()`` -> ``t-<testname>-<uuid8>``."""
    test = re.sub(r"[^A-Za-z0-9._-]+", "_", request.node.name).strip("_")[:80]

    def make(prefix: str = "t") -> str:
        return f"{prefix}-{test}-{uuid.uuid4().hex[:8]}"

    return make
