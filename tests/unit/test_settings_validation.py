"""Settings validation (SPEC §10): an invalid value stops the process with a message naming
the variable and what it expects; unknown `AUDIENCES_*` variables are warned about."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from audiences import cli
from audiences.adapters import settings as settings_module
from audiences.adapters.settings import (
    Settings,
    SettingsError,
    unknown_variables,
    warn_unknown_variables,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _root_logging_kept() -> Iterator[None]:
    """`cli.main` configures the root logger (its handler writes to this test's captured
    stderr): put back what was there, so later tests do not log into a closed stream."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize(
    ("variable", "raw", "expects"),
    [
        ("LOG_FORMAT", "jsn", "expected one of json, text, got 'jsn'"),
        ("LOG_LEVEL", "verbose", "expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
        ("WEB_PORT", "abc", "expected an integer from 1 to 65535, got 'abc'"),
        ("WEB_PORT", "0", "expected an integer from 1 to 65535, got 0"),
        ("COLLECTOR_PORT", "65536", "expected an integer from 1 to 65535, got 65536"),
        ("PARTITIONS", "0", "expected an integer >= 1, got 0"),
        ("BATCH_SIZE", "-5", "expected an integer >= 1, got -5"),
        ("COLLECTOR_MAX_INFLIGHT_BYTES", "-1", "expected an integer >= 1"),
        ("COLLECTOR_RATE_LIMIT", "-1", "expected an integer >= 0, got -1"),
        ("DLQ_RETENTION_HOURS", "1.5", "expected an integer >= 1, got '1.5'"),
        ("REPLICATION_FACTOR", "0", "from 1 to 32767 (or -1: the broker's default"),
        ("REPLICATION_FACTOR", "-2", "from 1 to 32767 (or -1"),
        ("SECURITY_PROTOCOL", "TLS", "expected one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL"),
        ("API_URL", "localhost:6066", "expected an http:// or https:// URL"),
        ("WEB_ADVERTISED_URL", "ftp://w1", "expected an http:// or https:// URL"),
    ],
)
def test_an_invalid_value_names_its_variable_and_what_it_expects(
    variable: str, raw: str, expects: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({f"AUDIENCES_{variable}": raw})
    message = str(caught.value)
    assert message.startswith(f"AUDIENCES_{variable}: ")
    assert expects in message


def test_sasl_settings_are_checked_together() -> None:
    with pytest.raises(SettingsError, match="AUDIENCES_SASL_MECHANISM: expected one of PLAIN"):
        Settings.from_env(
            {"AUDIENCES_SECURITY_PROTOCOL": "SASL_SSL", "AUDIENCES_SASL_MECHANISM": "GSSAPI"}
        )
    # librdkafka would pick GSSAPI and Faust PLAIN: a SASL protocol needs a mechanism
    with pytest.raises(SettingsError, match=r"AUDIENCES_SASL_MECHANISM: .* got nothing"):
        Settings.from_env({"AUDIENCES_SECURITY_PROTOCOL": "SASL_PLAINTEXT"})
    with pytest.raises(
        SettingsError, match=r"SASL_MECHANISM is set but .*SECURITY_PROTOCOL is SSL"
    ):
        Settings.from_env(
            {"AUDIENCES_SECURITY_PROTOCOL": "SSL", "AUDIENCES_SASL_MECHANISM": "PLAIN"}
        )


def test_valid_values_are_normalised() -> None:
    settings = Settings.from_env(
        {
            "AUDIENCES_LOG_FORMAT": "JSON",
            "AUDIENCES_LOG_LEVEL": "debug",
            "AUDIENCES_SECURITY_PROTOCOL": "sasl_ssl",
            "AUDIENCES_SASL_MECHANISM": "scram-sha-512",
            "AUDIENCES_WEB_PORT": " 8080 ",
            "AUDIENCES_REPLICATION_FACTOR": "3",
            "AUDIENCES_API_URL": "https://w1.example:6066",
        }
    )
    assert (settings.log_format, settings.log_level) == ("json", "DEBUG")
    assert (settings.security_protocol, settings.sasl_mechanism) == ("SASL_SSL", "SCRAM-SHA-512")
    assert (settings.web_port, settings.replication_factor) == (8080, 3)
    assert Settings.from_env({}).replication_factor == -1  # the broker's default
    assert Settings.from_env({"AUDIENCES_REPLICATION_FACTOR": "-1"}).replication_factor == -1


def test_overrides_are_checked_like_variables() -> None:
    with pytest.raises(SettingsError, match="AUDIENCES_PARTITIONS: expected an integer >= 1"):
        Settings.from_env({}, partitions=0)
    with pytest.raises(SettingsError, match="AUDIENCES_WEB_PORT: expected an integer"):
        Settings.from_env({}, web_port="6066")


@dataclass(frozen=True)
class _WithFlag(Settings):
    verbose_flag: bool = field(default=False, metadata={"doc": "a boolean"})


@pytest.mark.parametrize(("raw", "value"), [("true", True), ("1", True), ("No", False)])
def test_booleans_take_true_or_false(raw: str, value: bool) -> None:
    assert _WithFlag.from_env({"AUDIENCES_VERBOSE_FLAG": raw}).verbose_flag is value


def test_a_bad_boolean_names_its_variable() -> None:
    with pytest.raises(SettingsError, match="AUDIENCES_VERBOSE_FLAG: expected true or false"):
        _WithFlag.from_env({"AUDIENCES_VERBOSE_FLAG": "maybe"})


def test_unknown_variables_are_warned_about_once_with_a_did_you_mean(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(settings_module, "_warned", set())
    env = {
        "AUDIENCES_PARTITONS": "3",  # typo
        "AUDIENCES_WEB_HOST_FILE": "/run/secrets/host",  # not a secret
        "AUDIENCES_SOMETHING_ELSE": "x",
        "AUDIENCES_API_TOKENS_FILE": "/dev/null",  # a secret's file: known
        "AUDIENCES_PURE_CORE": "1",  # read by audiences.core
        "AUDIENCES_TEST_KAFKA_BOOTSTRAP": "k:9092",  # test fixtures
        "AUDIENCES_PARTITIONS": "3",
        "OTHER_PARTITONS": "3",  # not ours
    }
    with caplog.at_level(logging.WARNING, logger="audiences.adapters.settings"):
        Settings.from_env(env)
        Settings.from_env(env)  # once per process
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "unknown setting AUDIENCES_PARTITONS is ignored; did you mean AUDIENCES_PARTITIONS?",
        "unknown setting AUDIENCES_SOMETHING_ELSE is ignored",
        "unknown setting AUDIENCES_WEB_HOST_FILE is ignored; only secrets may come from files "
        "(AUDIENCES_API_TOKEN, AUDIENCES_API_TOKENS, AUDIENCES_SASL_PASSWORD, "
        "AUDIENCES_WRITE_KEYS)",
    ]
    caplog.clear()
    Settings.from_env({"AUDIENCES_LOG_FORMT": "json"}, warn_unknown=False)
    assert not caplog.records


def _variables_in(path: Path) -> set[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    return {m for m in re.findall(r"\bAUDIENCES_[A-Z0-9_]*[A-Z0-9]\b", text)}


# Named on purpose as variables nothing reads: test_security_settings (not a secret) and
# the README's example of the warning.
DELIBERATELY_UNKNOWN = {"AUDIENCES_WEB_HOST_FILE", "AUDIENCES_PARTITONS"}


def test_every_variable_the_repository_names_is_known() -> None:
    """READ_ELSEWHERE stays complete: a variable read outside `Settings` (and named in the
    code, tests, deployment or docs) would otherwise be warned about as unknown."""
    files = [ROOT / name for name in ("Makefile", "docker-compose.yml", "README.md", "setup.py")]
    for folder in ("src", "tests", "deploy", ".ci"):
        files += [
            p for p in (ROOT / folder).rglob("*") if p.is_file() and ".egg-info" not in str(p)
        ]
    named: set[str] = set()
    for path in files:
        if path == Path(__file__).resolve():
            continue  # this file names unknown variables on purpose
        if path.suffix in ("", ".py", ".md", ".yml", ".yaml", ".json", ".toml", ".sh", ".env") or (
            path.name in ("Makefile", "Dockerfile", "run")
        ):
            named |= _variables_in(path)
    assert "AUDIENCES_PURE_CORE" in named and "AUDIENCES_WEB_PORT" in named  # the scan works
    # "AUDIENCES_BENCH_*" in prose, a match= pattern cut short: prefixes of other names
    whole = {n for n in named if not any(other.startswith(n + "_") for other in named)}
    assert unknown_variables(dict.fromkeys(whole - DELIBERATELY_UNKNOWN, "")) == []


def test_the_cli_reports_an_invalid_value_in_one_line_with_exit_code_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AUDIENCES_LOG_FORMAT", "jsn")
    with pytest.raises(SystemExit) as exited:
        cli.main(["config"])
    assert exited.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "error: AUDIENCES_LOG_FORMAT: expected one of json, text, got 'jsn'\n"


def test_the_installed_command_stops_without_a_traceback(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "AUDIENCES_WEB_PORT": "abc", "HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "audiences", "config"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert (
        done.stderr == "error: AUDIENCES_WEB_PORT: expected an integer from 1 to 65535, got 'abc'\n"
    )
    assert done.stdout == ""


def test_the_cli_warns_about_unknown_variables_after_configuring_logs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(settings_module, "_warned", set())
    monkeypatch.setenv("AUDIENCES_LOG_FORMAT", "json")
    monkeypatch.setenv("AUDIENCES_WEB_PROT", "7000")
    assert cli.main(["config"]) == 0
    err = capsys.readouterr().err
    assert (
        '"message":"unknown setting AUDIENCES_WEB_PROT is ignored; did you mean '
        'AUDIENCES_WEB_PORT?"' in err
    )
    warn_unknown_variables()  # already said
    assert capsys.readouterr().err == ""


def test_a_commit_interval_of_0_checkpoints_every_turn_and_is_accepted() -> None:
    """0 is meaningful (a checkpoint after every loop turn; the fault suite uses it)."""
    assert Settings.from_env({"AUDIENCES_COMMIT_INTERVAL_MS": "0"}).commit_interval_ms == 0
    with pytest.raises(SettingsError, match="AUDIENCES_COMMIT_INTERVAL_MS"):
        Settings.from_env({"AUDIENCES_COMMIT_INTERVAL_MS": "-1"})
