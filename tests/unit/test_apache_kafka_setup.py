"""What `ApacheKafka` needs before it starts anything: Java >= 17, Maven, a cached classpath."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from audiences.adapters.kafka import apache
from audiences.adapters.kafka.apache import (
    ApacheKafkaUnavailable,
    check_java,
    check_maven,
    classpath_cache_file,
    java_major_version,
    resolve_classpath,
)
from audiences.errors import AudiencesError, BrokerError


def _fake_java(home: Path, version_line: str) -> Path:
    """A JAVA_HOME whose bin/java prints `version_line` on stderr, as `java -version` does."""
    java = home / "bin" / "java"
    java.parent.mkdir(parents=True)
    java.write_text(f"#!/bin/sh\necho '{version_line}' >&2\n")
    java.chmod(0o755)
    return java


@pytest.mark.parametrize(
    ("line", "major"),
    [
        ('openjdk version "17.0.15" 2025-04-15', 17),
        ('openjdk version "21" 2023-09-19', 21),
        ('openjdk version "25.0.1" 2025-10-21 LTS', 25),
        ('java version "1.8.0_402"', 8),
        ('openjdk version "11.0.22" 2024-01-16', 11),
    ],
)
def test_java_major_version(tmp_path: Path, line: str, major: int) -> None:
    assert java_major_version(str(_fake_java(tmp_path, line))) == major


def test_an_old_java_is_refused_with_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_java(tmp_path, 'openjdk version "11.0.22" 2024-01-16')
    monkeypatch.setenv("JAVA_HOME", str(tmp_path))
    with pytest.raises(ApacheKafkaUnavailable, match=r"needs Java >= 17; .* is Java 11"):
        check_java()


def test_java_home_comes_before_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    java = _fake_java(tmp_path, 'openjdk version "21.0.2" 2024-01-16')
    monkeypatch.setenv("JAVA_HOME", str(tmp_path))
    assert check_java() == str(java)


def test_missing_java_and_maven_are_clear_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on it
    with pytest.raises(ApacheKafkaUnavailable, match="no `java` on the PATH"):
        check_java()
    with pytest.raises(ApacheKafkaUnavailable, match="no `mvn` on the PATH") as missing:
        check_maven()
    assert isinstance(missing.value, BrokerError)
    assert isinstance(missing.value, AudiencesError)
    assert missing.value.retriable is False


def test_a_cached_classpath_is_used_without_maven(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))  # no mvn: it must not be needed
    jars = [tmp_path / "a.jar", tmp_path / "b.jar"]
    for jar in jars:
        jar.write_bytes(b"")
    with pytest.raises(ApacheKafkaUnavailable, match="no `mvn`"):
        resolve_classpath("4.4.0")  # nothing cached yet
    cached = classpath_cache_file("4.4.0")
    assert cached.is_relative_to(tmp_path / "cache" / "audiences" / "apache-kafka")
    cached.parent.mkdir(parents=True)
    cached.write_text(os.pathsep.join(str(j) for j in jars))
    assert resolve_classpath("4.4.0") == [str(j) for j in jars]

    jars[1].unlink()  # e.g. ~/.m2 cleaned: the cache is stale, Maven is needed again
    with pytest.raises(ApacheKafkaUnavailable, match="no `mvn`"):
        resolve_classpath("4.4.0")


def test_the_version_comes_from_the_environment_or_the_pom(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(apache.VERSION_ENV, raising=False)
    assert apache.default_kafka_version().startswith("4.")
    monkeypatch.setenv(apache.VERSION_ENV, "4.1.2")
    assert apache.default_kafka_version() == "4.1.2"


def test_cluster_ids_look_like_kafkas() -> None:
    for _ in range(200):
        cid = apache._cluster_id()
        assert len(cid) == 22 and not cid.startswith("-")
        assert len(base64.urlsafe_b64decode(cid + "==")) == 16
