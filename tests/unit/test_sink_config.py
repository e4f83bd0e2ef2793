"""The destinations file (SPEC §6): parsing, ${ENV} secrets, validation errors naming destination and key."""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator
from standardwebhooks.webhooks import Webhook

from audiences.adapters.sinks.config import (
    DEFAULT_MAX_RETRY_AGE_MS,
    load_destinations,
    parse_destinations,
)
from audiences.adapters.sinks.render import sign_webhook
from audiences.errors import AudiencesError, DestinationConfigError

SPEC_EXAMPLE = """
- name: braze-prod
  type: braze            # webhook | braze | customerio | segment | kafka
  url: https://rest.iad-01.braze.com
  api_key: ${BRAZE_API_KEY}       # secrets from env, never logged
  audiences: [cart_abandoners, dormant_shoppers]   # or "*"
  mode: [track, identify]         # custom events and/or custom attributes
  rate_limit_per_s: 100
  batch_size: 75
"""
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
ROOT = Path(__file__).resolve().parents[2]
SCHEMA = Draft202012Validator(json.loads((ROOT / "schemas/destinations.json").read_text()))
EXAMPLES = sorted((ROOT / "examples/destinations").glob("*.yaml"))
EXAMPLE_ENV = {
    name: SECRET
    for name in (
        "BRAZE_API_KEY",
        "CIO_SITE_ID",
        "CIO_API_KEY",
        "SEGMENT_WRITE_KEY",
        "ADS_WEBHOOK_SECRET",
        "DEMO_WEBHOOK_SECRET",
    )
}


def test_spec_example_loads_with_the_secret_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "destinations.yaml"
    path.write_text(SPEC_EXAMPLE)
    [braze] = load_destinations(path, {"BRAZE_API_KEY": "k-123"})
    assert braze.name == "braze-prod" and braze.type == "braze"
    assert braze.api_key == "k-123"
    assert braze.audiences == frozenset({"cart_abandoners", "dormant_shoppers"})
    assert braze.modes == ("track", "identify")
    assert braze.rate_limit_per_s == 100.0
    assert braze.batch_size == 75
    assert braze.max_retry_age_ms == DEFAULT_MAX_RETRY_AGE_MS == 4 * 3600 * 1000
    assert braze.timeout_s == 10.0
    assert "k-123" not in repr(braze)  # secrets stay out of logs


def test_json_file_and_defaults(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(
        json.dumps(
            {
                "destinations": [
                    {"name": "hook", "type": "webhook", "url": "http://h/x", "secret": SECRET},
                    {"name": "seg", "type": "segment", "write_key": "wk", "audiences": "*"},
                    {"name": "cio", "type": "customerio", "site_id": "s", "api_key": "k"},
                    {"name": "topic", "type": "kafka", "topic": "out", "max_retry_age": "30m"},
                ]
            }
        )
    )
    hook, seg, cio, topic = load_destinations(path, {})
    assert (hook.batch_size, hook.modes, hook.audiences) == (1, ("track",), None)
    assert seg.url == "https://api.segment.io" and seg.batch_size == 100
    assert cio.url == "https://track.customer.io" and cio.modes == ("track", "identify")
    assert topic.max_retry_age_ms == 30 * 60_000
    assert hook.forward_deletions and seg.forward_deletions  # deletions go everywhere
    [quiet] = parse_destinations(
        [{"name": "q", "type": "kafka", "topic": "t", "forward_deletions": False}], {}
    )
    assert not quiet.forward_deletions and not list(
        SCHEMA.iter_errors(
            [{"name": "q", "type": "kafka", "topic": "t", "forward_deletions": False}]
        )
    )
    assert hook.selects("anything") and not parse_destinations(
        [{"name": "x", "type": "webhook", "url": "http://h", "audiences": ["a"]}], {}
    )[0].selects("b")


def error_for(raw: Any, env: dict[str, str] | None = None) -> DestinationConfigError:
    with pytest.raises(DestinationConfigError) as caught:
        parse_destinations(raw, env or {})
    assert isinstance(caught.value, AudiencesError)
    return caught.value


@pytest.mark.parametrize(
    ("raw", "key", "fragment"),
    [
        (
            {"type": "braze", "url": "https://b", "api_key": "${MISSING}"},
            "api_key",
            "MISSING is not set",
        ),
        ({"type": "braze", "url": "https://b"}, "api_key", "required"),
        ({"type": "brase", "url": "https://b"}, "type", "did you mean 'braze'"),
        ({"type": "webhook", "url": "ftp://h"}, "url", "http(s) URL"),
        ({"type": "webhook", "url": "http://h", "secret": "abc"}, "secret", "at least 24 bytes"),
        ({"type": "webhook", "url": "http://h", "secret": "whsec_!!"}, "secret", "base64"),
        (  # 16 bytes: Standard Webhooks asks for 24 to 64
            {"type": "webhook", "url": "http://h", "secret": "whsec_" + "A" * 22 + "=="},
            "secret",
            "at least 24 bytes (Standard Webhooks), got 16",
        ),
        (
            {"type": "webhook", "url": "http://h", "auth_probe_interval_s": 0},
            "auth_probe_interval_s",
            "> 0",
        ),
        ({"type": "webhook", "url": "http://h", "phone_region": "USA"}, "phone_region", "ISO 3166"),
        (
            {"type": "braze", "url": "https://b", "api_key": "k", "batch_size": 1001},
            "batch_size",
            "1..1000",
        ),
        (
            {"type": "customerio", "site_id": "s", "api_key": "k", "hash_pii": True},
            "hash_pii",
            "Customer.io sends email to the `email` attribute",
        ),
        (
            {"type": "braze", "url": "https://b", "api_key": "k", "update_existing_only": 1},
            "update_existing_only",
            "true or false",
        ),
        (
            {"type": "braze", "url": "https://b", "api_key": "k", "anonymous_alias_label": ""},
            "anonymous_alias_label",
            "non-empty",
        ),
        (
            {"type": "braze", "url": "https://b", "api_key": "k", "objects_per_request": 151},
            "objects_per_request",
            "2..150",
        ),
        (
            {"type": "webhook", "url": "http://h", "anonymous_alias_label": "x"},
            "anonymous_alias_label",
            "unknown key",
        ),
        ({"type": "webhook", "url": "http://h", "mode": "push"}, "mode", "track, identify"),
        ({"type": "webhook", "url": "http://h", "audiences": []}, "audiences", '"*"'),
        (
            {"type": "webhook", "url": "http://h", "audiences": ["Bad Key"]},
            "audiences",
            "audience key",
        ),
        ({"type": "webhook", "url": "http://h", "rate_limit_per_s": 0}, "rate_limit_per_s", "> 0"),
        ({"type": "webhook", "url": "http://h", "timeout_s": "10"}, "timeout_s", "> 0"),
        (
            {"type": "webhook", "url": "http://h", "max_retry_age": "4 hours"},
            "max_retry_age",
            "'4h'",
        ),
        ({"type": "webhook", "url": "http://h", "hash_pii": "yes"}, "hash_pii", "true or false"),
        (
            {"type": "braze", "url": "https://b", "api_key": "k", "forward_deletions": "no"},
            "forward_deletions",
            "true or false",
        ),
        (
            {"type": "webhook", "url": "http://h", "batchsize": 5},
            "batchsize",
            "did you mean 'batch_size'",
        ),
        ({"type": "kafka", "topic": "t", "url": "http://h"}, "url", "unknown key"),
        (
            {"type": "kafka", "topic": "t", "sasl_username": "u"},
            "sasl_username",
            "only with `bootstrap`",
        ),
    ],
)
def test_invalid_destination_names_destination_and_key(
    raw: dict[str, Any], key: str, fragment: str
) -> None:
    if "${MISSING}" not in str(raw):  # the schema cannot see the environment
        assert list(SCHEMA.iter_errors([{"name": "dest-1", **raw}])), "schema accepts it"
    error = error_for([{"name": "dest-1", **raw}])
    assert (error.destination, error.key) == ("dest-1", key)
    assert str(error).startswith(f"destination 'dest-1', key '{key}': ")
    assert fragment in str(error)


def test_names_must_be_valid_and_unique() -> None:
    assert error_for([{"name": "Bad Name", "type": "webhook", "url": "http://h"}]).key == "name"
    hook = {"name": "a", "type": "webhook", "url": "http://h"}
    assert "duplicate" in str(error_for([hook, hook]))
    assert "list of destinations" in str(error_for({"name": "a"}))


def test_unreadable_or_unparsable_file(tmp_path: Path) -> None:
    with pytest.raises(DestinationConfigError, match="cannot read"):
        load_destinations(tmp_path / "missing.yaml", {})
    bad = tmp_path / "bad.yaml"
    bad.write_text("- name: [unclosed")
    with pytest.raises(DestinationConfigError, match="cannot parse"):
        load_destinations(bad, {})


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_files_are_valid_for_the_parser_and_the_schema(path: Path) -> None:
    assert load_destinations(path, EXAMPLE_ENV)
    assert [e.message for e in SCHEMA.iter_errors(yaml.safe_load(path.read_text()))] == []


def test_schema_accepts_the_spec_example() -> None:
    assert [e.message for e in SCHEMA.iter_errors(yaml.safe_load(SPEC_EXAMPLE))] == []
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize(
    "secret",
    [
        SECRET,  # whsec_ + padded base64 of 24 bytes
        SECRET.removeprefix("whsec_"),  # without the prefix
        "whsec_" + base64.b64encode(bytes(range(25))).decode().rstrip("="),  # unpadded
        base64.b64encode(bytes(range(64))).decode().rstrip("="),
    ],
)
def test_webhook_secrets_as_standard_webhooks_libraries_accept_them(secret: str) -> None:
    """>= 24 bytes of base64, padded or not, `whsec_` optional: signed as the official
    `standardwebhooks` package signs and verifies."""
    [hook] = parse_destinations(
        [{"name": "h", "type": "webhook", "url": "http://h", "secret": secret}], {}
    )
    assert hook.secret == secret
    body = b'{"messageId":"m1"}'
    signature = sign_webhook(secret, "m1", 1_767_225_600, body)
    official = Webhook(secret)
    assert signature == official.sign(
        "m1", datetime.fromtimestamp(1_767_225_600, UTC), body.decode()
    )
    now = int(time.time())
    headers = {
        "webhook-id": "m1",
        "webhook-timestamp": str(now),
        "webhook-signature": sign_webhook(secret, "m1", now, body),
    }
    assert official.verify(body, headers) == {"messageId": "m1"}


def test_phone_region_defaults_to_us_and_must_be_a_region_with_a_numbering_plan() -> None:
    hook = {"name": "h", "type": "webhook", "url": "http://h"}
    assert parse_destinations([hook], {})[0].phone_region == "US"
    assert parse_destinations([{**hook, "phone_region": "gb"}], {})[0].phone_region == "GB"
    error = error_for([{**hook, "phone_region": "XX"}])  # two letters, no such region
    assert (error.key, "ISO 3166" in str(error)) == ("phone_region", True)


def test_auth_probe_interval_defaults_to_60_seconds() -> None:
    hook = {"name": "h", "type": "webhook", "url": "http://h"}
    assert parse_destinations([hook], {})[0].auth_probe_interval_s == 60.0
    probe = parse_destinations([{**hook, "auth_probe_interval_s": 0.5}], {})[0]
    assert probe.auth_probe_interval_s == 0.5


def test_default_rate_limits_for_braze_and_customerio() -> None:
    braze, cio, hook, tuned = parse_destinations(
        [
            {"name": "b", "type": "braze", "url": "https://b", "api_key": "k"},
            {"name": "c", "type": "customerio", "site_id": "s", "api_key": "k"},
            {"name": "w", "type": "webhook", "url": "http://h"},
            {
                "name": "t",
                "type": "braze",
                "url": "https://b",
                "api_key": "k",
                "rate_limit_per_s": 7,
            },
        ],
        {},
    )
    assert (braze.rate_limit_per_s, cio.rate_limit_per_s) == (100.0, 100.0)
    assert hook.rate_limit_per_s is None and tuned.rate_limit_per_s == 7.0
