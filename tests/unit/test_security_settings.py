"""Security settings (SPEC §8, §10): API tokens and their scopes, secrets from files, the
loopback bind without tokens, and the Faust app's Kafka credentials."""

from __future__ import annotations

import ssl
from pathlib import Path

import faust
import pytest

from audiences.adapters.http.auth import TokenCheck, bearer_token, required_scope
from audiences.adapters.settings import Settings, SettingsError, parse_api_tokens
from audiences.adapters.stream.app import create_app


def test_tokens_are_token_colon_scope_and_the_first_one_is_the_internal_token() -> None:
    tokens = parse_api_tokens(" r3ad:read , ,wr:ite:write,adm:admin")
    assert [(t.token, t.scope, t.rank) for t in tokens] == [
        ("r3ad", "read", 0),
        ("wr:ite", "write", 1),  # the scope is after the last colon
        ("adm", "admin", 2),
    ]
    assert "r3ad" not in repr(tokens)
    assert Settings(api_tokens="r3ad:read,adm:admin").internal_token == "r3ad"
    assert Settings().internal_token == ""


@pytest.mark.parametrize("raw", ["tok", "tok:root", ":read", "a:read,b:"])
def test_a_malformed_token_list_stops_with_the_variable_named(raw: str) -> None:
    with pytest.raises(SettingsError, match=r"AUDIENCES_API_TOKENS: item \d must be TOKEN:SCOPE"):
        Settings.from_env({"AUDIENCES_API_TOKENS": raw})


def test_a_bad_integer_names_its_variable() -> None:
    with pytest.raises(SettingsError, match="AUDIENCES_COLLECTOR_RATE_LIMIT: expected an integer"):
        Settings.from_env({"AUDIENCES_COLLECTOR_RATE_LIMIT": "lots"})


def test_secrets_may_come_from_files(tmp_path: Path) -> None:
    (tmp_path / "tokens").write_text("t1:admin\n")
    (tmp_path / "keys").write_text("k1,k2\n")
    settings = Settings.from_env(
        {
            "AUDIENCES_API_TOKENS_FILE": str(tmp_path / "tokens"),
            "AUDIENCES_WRITE_KEYS_FILE": str(tmp_path / "keys"),
            "AUDIENCES_WEB_HOST_FILE": str(tmp_path / "keys"),  # not a secret: ignored
        }
    )
    assert settings.api_tokens == "t1:admin" and settings.write_key_list() == ["k1", "k2"]
    assert settings.web_host == "127.0.0.1"
    assert Settings.from_env({"AUDIENCES_API_TOKENS": "t2:read"}).api_tokens == "t2:read"
    with pytest.raises(SettingsError, match="AUDIENCES_API_TOKENS_FILE: cannot read"):
        Settings.from_env({"AUDIENCES_API_TOKENS_FILE": str(tmp_path / "missing")})
    shown = Settings(api_tokens="t1:admin", api_token="t1").redacted()
    assert shown["AUDIENCES_API_TOKENS"]["value"] == shown["AUDIENCES_API_TOKEN"]["value"] == "***"


def test_without_tokens_the_web_server_binds_to_loopback_whatever_the_host(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    open_api = Settings(web_host="0.0.0.0", web_port=6066, data_dir=str(tmp_path))
    assert open_api.web_bind_host == "127.0.0.1"
    assert open_api.advertised_url == "http://127.0.0.1:6066"
    with caplog.at_level("WARNING"):
        app = create_app(open_api, lambda: True)
    assert app.conf.web_bind == "127.0.0.1"
    assert any("no API tokens configured" in r.getMessage() for r in caplog.records)

    secured = open_api.replace(api_tokens="t:admin", web_host="0.0.0.0")
    assert create_app(secured, lambda: True).conf.web_bind == "0.0.0.0"
    assert secured.replace(web_host="10.1.2.3").advertised_url == "http://10.1.2.3:6066"


def test_the_faust_app_gets_the_kafka_security_settings(tmp_path: Path) -> None:
    base = Settings(kafka_bootstrap="k:9093", data_dir=str(tmp_path), api_tokens="t:read")
    sasl = create_app(
        base.replace(
            security_protocol="SASL_SSL",
            sasl_mechanism="SCRAM-SHA-512",
            sasl_username="engine-user",
            sasl_password="engine-secret",
        ),
        lambda: True,
    ).conf.broker_credentials
    assert isinstance(sasl, faust.SASLCredentials)
    assert (sasl.username, sasl.password) == ("engine-user", "engine-secret")
    assert sasl.mechanism.value == "SCRAM-SHA-512" and sasl.protocol.value == "SASL_SSL"
    assert isinstance(sasl.ssl_context, ssl.SSLContext)

    plain = create_app(
        base.replace(
            security_protocol="SASL_PLAINTEXT",
            sasl_mechanism="PLAIN",
            sasl_username="u",
            sasl_password="p",
        ),
        lambda: True,
    ).conf.broker_credentials
    assert isinstance(plain, faust.SASLCredentials)
    assert plain.protocol.value == "SASL_PLAINTEXT" and plain.ssl_context is None

    tls = create_app(base.replace(security_protocol="SSL"), lambda: True).conf.broker_credentials
    assert isinstance(tls, faust.SSLCredentials) and isinstance(tls.context, ssl.SSLContext)
    assert create_app(base, lambda: True).conf.broker_credentials is None
    with pytest.raises(SettingsError, match="AUDIENCES_SECURITY_PROTOCOL"):
        create_app(base.replace(security_protocol="KERBEROS"), lambda: True)


@pytest.mark.parametrize(
    ("method", "path", "scope"),
    [
        ("GET", "/healthz", None),
        ("GET", "/readyz", None),
        ("GET", "/metrics", None),
        ("GET", "/openapi.json", "read"),
        ("GET", "/v1/audiences", "read"),
        ("GET", "/v1/users/u1", "read"),
        ("POST", "/v1/audiences/preview", "read"),
        ("POST", "/v1/internal/partitions/3/preview", "read"),
        ("GET", "/router/", "read"),  # Faust's own introspection routes are not open
        ("PUT", "/v1/audiences/buyers", "write"),
        ("DELETE", "/v1/traits/ltv", "write"),
        ("POST", "/v1/anything-new", "write"),  # an unknown change needs write at least
        ("DELETE", "/v1/users/u1", "admin"),
    ],
)
def test_each_route_needs_its_scope(method: str, path: str, scope: str | None) -> None:
    assert required_scope(method, path) == scope


def test_token_check_finds_the_strongest_scope_and_refuses_the_rest() -> None:
    check = TokenCheck(parse_api_tokens("same:read,same:admin,w:write"))
    assert check.rank("same") == 2 and check.rank("w") == 1
    assert check.rank("") == check.rank("sam") == check.rank("same ") == -1
    assert not TokenCheck(()).enabled
    assert bearer_token("Bearer  abc ") == "abc"
    assert bearer_token("bearer abc") == "abc"
    for header in (None, "Basic abc", "Bearer", "Bearer   ", "abc"):
        assert bearer_token(header) is None
