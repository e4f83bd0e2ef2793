"""The destinations file (`AUDIENCES_DESTINATIONS`, SPEC §6): parsing and validation.

A YAML or JSON file holding a list of destinations (or `{"destinations": [...]}`).
`${NAME}` in any string value is replaced by the environment variable NAME;
a missing variable is an error. Everything is validated once, at start, and
every error names the destination and the key (`DestinationConfigError`).
Secrets (`secret`, `api_key`, `write_key`) are kept out of `repr()` and logs.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import phonenumbers
import yaml

from audiences.core.durations import parse_duration_ms
from audiences.errors import DestinationConfigError

TYPES = ("webhook", "braze", "customerio", "segment", "kafka")
MODES = ("track", "identify", "group")  # group: Segment group calls of account audiences
HTTP_TYPES = frozenset({"webhook", "braze", "customerio", "segment"})
COMMON_KEYS = (
    "name",
    "type",
    "audiences",
    "mode",
    "rate_limit_per_s",
    "batch_size",
    "timeout_s",
    "hash_pii",
    "max_retry_age",
    "retry_initial_s",
    "retry_max_s",
    "forward_deletions",
    "auth_probe_interval_s",
    "phone_region",
)
TYPE_KEYS: dict[str, tuple[str, ...]] = {
    "webhook": ("url", "secret"),
    "braze": (
        "url",
        "api_key",
        "update_existing_only",
        "anonymous_alias_label",
        "objects_per_request",
    ),
    "customerio": ("url", "site_id", "api_key"),
    "segment": ("url", "write_key"),
    "kafka": (
        "topic",
        "include_holdout",
        "bootstrap",
        "security_protocol",
        "sasl_mechanism",
        "sasl_username",
        "sasl_password",
        "ssl_ca_location",
    ),
}
# A `kafka` destination's own cluster security (librdkafka names); only with `bootstrap`.
KAFKA_SECURITY_KEYS = (
    "security_protocol",
    "sasl_mechanism",
    "sasl_username",
    "sasl_password",
    "ssl_ca_location",
)
REQUIRED: dict[str, tuple[str, ...]] = {
    "webhook": ("url",),
    "braze": ("url", "api_key"),
    "customerio": ("site_id", "api_key"),
    "segment": ("write_key",),
    "kafka": ("topic",),
}
DEFAULT_URL = {"customerio": "https://track.customer.io", "segment": "https://api.segment.io"}
DEFAULT_BATCH = {"webhook": 1, "braze": 75, "customerio": 1, "segment": 100, "kafka": 500}
# Braze: `batch_size` counts messages; requests are cut by objects (<= 75 attributes and
# <= 75 events each, render.py), so a batch may span several requests.
MAX_BATCH = {"webhook": 1000, "braze": 1000, "customerio": 100, "segment": 2500, "kafka": 10_000}
# Requests per second when `rate_limit_per_s` is absent (README, "Sending audiences"):
# Braze and Customer.io both throttle a workspace with 429s well above this.
DEFAULT_RATE_PER_S = {"braze": 100.0, "customerio": 100.0}
DEFAULT_MODE = {
    "webhook": ("track",),
    "braze": ("track", "identify"),
    "customerio": ("track", "identify"),
    "segment": ("track",),
    "kafka": ("track",),
}
DEFAULT_MAX_RETRY_AGE_MS = 4 * 3_600_000
DEFAULT_AUTH_PROBE_INTERVAL_S = 60.0
DEFAULT_PHONE_REGION = "US"
# Standard Webhooks: secrets of 24 to 64 bytes; the official libraries accept the key with or
# without the `whsec_` prefix and with or without base64 padding.
WEBHOOK_SECRET_PREFIX = "whsec_"
WEBHOOK_SECRET_MIN_BYTES = 24
_BASE64 = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")
NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
AUDIENCE_KEY = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class Destination:
    """One validated destination. Secrets are excluded from `repr`."""

    name: str
    type: str
    audiences: frozenset[str] | None  # None = every audience ("*")
    modes: tuple[str, ...]
    batch_size: int
    timeout_s: float
    max_retry_age_ms: int
    rate_limit_per_s: float | None = None
    hash_pii: bool = False
    retry_initial_s: float = 0.5
    retry_max_s: float = 60.0
    url: str = ""
    topic: str = ""
    bootstrap: str = ""
    site_id: str = ""
    secret: str = field(default="", repr=False)
    api_key: str = field(default="", repr=False)
    write_key: str = field(default="", repr=False)
    kafka_security: dict[str, str] = field(default_factory=dict, repr=False)
    # `User Deleted` (SPEC §4/§6) is forwarded whatever `audiences` selects, unless false
    forward_deletions: bool = True
    # paused by a 401/403: the held request is sent again this often until accepted
    auth_probe_interval_s: float = DEFAULT_AUTH_PROBE_INTERVAL_S
    # `hash_pii`: the region of phone numbers written without a country code
    phone_region: str = DEFAULT_PHONE_REGION
    # braze: `_update_existing_only` on every attributes object (None: not sent)
    update_existing_only: bool | None = None
    # braze: anonymous profiles go as `user_alias {alias_name: anonymousId, alias_label}`
    anonymous_alias_label: str = ""
    # braze: attributes + events objects per request, for contracts that count them
    # combined (None: <= 75 of each, the classic limit)
    objects_per_request: int | None = None
    # kafka: also forward holdout outputs (`properties.holdout: true`, SPEC §3), which
    # every destination skips by default
    include_holdout: bool = False

    def kafka_security_config(self) -> dict[str, str]:
        """librdkafka security settings of a `kafka` destination's own cluster."""
        return {key.replace("_", "."): value for key, value in self.kafka_security.items()}

    def selects(self, key: str) -> bool:
        return self.audiences is None or key in self.audiences


def load_destinations(path: str | Path, env: Mapping[str, str]) -> list[Destination]:
    """Read and validate a destinations file (YAML, or JSON for a `.json` name)."""
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as exc:
        raise DestinationConfigError("", "", f"cannot read {file}: {exc}") from None
    try:
        data = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise DestinationConfigError("", "", f"cannot parse {file}: {exc}") from None
    return parse_destinations(data, env)


def parse_destinations(data: Any, env: Mapping[str, str]) -> list[Destination]:
    if isinstance(data, dict) and set(data) == {"destinations"}:
        data = data["destinations"]
    if data is None:
        return []
    if not isinstance(data, list):
        raise DestinationConfigError(
            "", "", "expected a list of destinations (or {destinations: [...]})"
        )
    destinations: list[Destination] = []
    for index, raw in enumerate(data):
        destination = parse_destination(raw, env, index)
        if any(d.name == destination.name for d in destinations):
            raise DestinationConfigError(destination.name, "name", "duplicate destination name")
        destinations.append(destination)
    return destinations


def parse_destination(raw: Any, env: Mapping[str, str], index: int = 0) -> Destination:
    label = f"#{index + 1}"
    if not isinstance(raw, dict):
        raise DestinationConfigError(label, "", "expected an object")
    name = raw.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise DestinationConfigError(
            label, "name", "expected a name of lower-case letters, digits, '-' or '_' (<= 63)"
        )
    kind = raw.get("type")
    if kind not in TYPES:
        raise DestinationConfigError(
            name,
            "type",
            f"expected one of {', '.join(TYPES)}, got {kind!r}",
            _suggest(str(kind), TYPES),
        )
    allowed = COMMON_KEYS + TYPE_KEYS[kind]
    for key in raw:
        if key not in allowed:
            raise DestinationConfigError(
                name,
                str(key),
                f"unknown key for a {kind} destination; expected one of {', '.join(allowed)}",
                _suggest(str(key), allowed),
            )
    values = {key: _expand(value, env, name, key) for key, value in raw.items()}
    for key in REQUIRED[kind]:
        if not values.get(key):
            raise DestinationConfigError(name, key, f"required for a {kind} destination")
    for key in (
        "url",
        "topic",
        "bootstrap",
        "site_id",
        "secret",
        "api_key",
        "write_key",
        "anonymous_alias_label",
        *KAFKA_SECURITY_KEYS,
    ):
        if key in values and not isinstance(values[key], str):
            raise DestinationConfigError(name, key, "expected a string")
    security = {key: values[key] for key in KAFKA_SECURITY_KEYS if values.get(key)}
    if security and not values.get("bootstrap"):
        key = next(iter(security))
        raise DestinationConfigError(
            name,
            key,
            "only with `bootstrap`: on the engine's own cluster the engine's Kafka settings apply",
        )
    url = values.get("url") or DEFAULT_URL.get(kind, "")
    if kind in HTTP_TYPES:
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise DestinationConfigError(name, "url", f"expected an http(s) URL, got {url!r}")
    secret = values.get("secret", "")
    if secret:
        _check_webhook_secret(name, secret)
    batch_size = _integer(values, "batch_size", DEFAULT_BATCH[kind], name)
    if not 1 <= batch_size <= MAX_BATCH[kind]:
        raise DestinationConfigError(
            name, "batch_size", f"expected 1..{MAX_BATCH[kind]} for {kind}, got {batch_size}"
        )
    rate = values.get("rate_limit_per_s")
    if rate is not None and (not _number(rate) or rate <= 0):
        raise DestinationConfigError(
            name, "rate_limit_per_s", f"expected a number > 0, got {rate!r}"
        )
    hash_pii = values.get("hash_pii", False)
    if not isinstance(hash_pii, bool):
        raise DestinationConfigError(name, "hash_pii", f"expected true or false, got {hash_pii!r}")
    if hash_pii and kind == "customerio":
        raise DestinationConfigError(
            name,
            "hash_pii",
            "not for customerio: Customer.io sends email to the `email` attribute, so a hashed "
            "one would leave nothing to send to (leave hash_pii off for this destination)",
        )
    update_existing_only = values.get("update_existing_only")
    if update_existing_only is not None and not isinstance(update_existing_only, bool):
        raise DestinationConfigError(
            name, "update_existing_only", f"expected true or false, got {update_existing_only!r}"
        )
    objects = values.get("objects_per_request")
    if objects is not None:
        objects = _integer(values, "objects_per_request", 0, name)
        if not 2 <= objects <= 150:
            raise DestinationConfigError(
                name, "objects_per_request", f"expected 2..150 (e.g. 75 or 50), got {objects}"
            )
    if "anonymous_alias_label" in values and not values["anonymous_alias_label"]:
        raise DestinationConfigError(name, "anonymous_alias_label", "expected a non-empty string")
    forward_deletions = values.get("forward_deletions", True)
    if not isinstance(forward_deletions, bool):
        raise DestinationConfigError(
            name, "forward_deletions", f"expected true or false, got {forward_deletions!r}"
        )
    include_holdout = values.get("include_holdout", False)
    if not isinstance(include_holdout, bool):
        raise DestinationConfigError(
            name, "include_holdout", f"expected true or false, got {include_holdout!r}"
        )
    phone_region = values.get("phone_region", DEFAULT_PHONE_REGION)
    if (
        not isinstance(phone_region, str)
        or phone_region.upper() not in phonenumbers.SUPPORTED_REGIONS
    ):
        raise DestinationConfigError(
            name,
            "phone_region",
            f"expected an ISO 3166-1 alpha-2 region with a phone numbering plan (US, GB, FR, ...), "
            f"got {phone_region!r}",
        )
    return Destination(
        name=name,
        type=kind,
        audiences=_audiences(values.get("audiences", "*"), name),
        modes=_modes(values.get("mode"), kind, name),
        batch_size=batch_size,
        timeout_s=_positive(values, "timeout_s", 10.0, name),
        max_retry_age_ms=_age(values.get("max_retry_age"), name),
        rate_limit_per_s=float(rate) if rate is not None else DEFAULT_RATE_PER_S.get(kind),
        hash_pii=hash_pii,
        retry_initial_s=_positive(values, "retry_initial_s", 0.5, name),
        retry_max_s=_positive(values, "retry_max_s", 60.0, name),
        url=url,
        topic=values.get("topic", ""),
        bootstrap=values.get("bootstrap", ""),
        site_id=values.get("site_id", ""),
        secret=secret,
        api_key=values.get("api_key", ""),
        write_key=values.get("write_key", ""),
        kafka_security=security,
        forward_deletions=forward_deletions,
        auth_probe_interval_s=_positive(
            values, "auth_probe_interval_s", DEFAULT_AUTH_PROBE_INTERVAL_S, name
        ),
        phone_region=phone_region.upper(),
        update_existing_only=update_existing_only,
        anonymous_alias_label=values.get("anonymous_alias_label", ""),
        objects_per_request=objects,
        include_holdout=include_holdout,
    )


def _expand(value: Any, env: Mapping[str, str], name: str, key: str) -> Any:
    """`${NAME}` -> the environment variable NAME, in every string of `value`."""
    if isinstance(value, str):

        def lookup(match: re.Match[str]) -> str:
            variable = match.group(1)
            if variable not in env:
                raise DestinationConfigError(
                    name, key, f"environment variable {variable} is not set"
                )
            return env[variable]

        return ENV_REF.sub(lookup, value)
    if isinstance(value, list):
        return [_expand(item, env, name, key) for item in value]
    return value


def _suggest(word: str, options: tuple[str, ...]) -> str | None:
    matches = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return matches[0] if matches else None


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _integer(values: Mapping[str, Any], key: str, default: int, name: str) -> int:
    value = values.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise DestinationConfigError(name, key, f"expected an integer, got {value!r}")
    return value


def _positive(values: Mapping[str, Any], key: str, default: float, name: str) -> float:
    value = values.get(key, default)
    if not _number(value) or value <= 0:
        raise DestinationConfigError(name, key, f"expected a number > 0, got {value!r}")
    return float(value)


def _age(value: Any, name: str) -> int:
    if value is None:
        return DEFAULT_MAX_RETRY_AGE_MS
    if _number(value) and value > 0:
        return int(value * 1000)
    ms = parse_duration_ms(value)
    if ms is None or ms <= 0:
        raise DestinationConfigError(
            name, "max_retry_age", f"expected a duration like '4h' or seconds, got {value!r}"
        )
    return ms


def _audiences(value: Any, name: str) -> frozenset[str] | None:
    if value == "*":
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise DestinationConfigError(
            name, "audiences", 'expected "*" or a non-empty list of audience keys'
        )
    for key in value:
        if not isinstance(key, str) or not AUDIENCE_KEY.match(key):
            raise DestinationConfigError(
                name, "audiences", f"{key!r} is not an audience key (^[a-z][a-z0-9_]{{0,63}}$)"
            )
    return frozenset(value)


def _modes(value: Any, kind: str, name: str) -> tuple[str, ...]:
    if value is None:
        return DEFAULT_MODE[kind]
    if value == "both":
        return ("track", "identify")
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or any(m not in MODES for m in items):
        raise DestinationConfigError(
            name, "mode", f"expected track, identify, group, both or a list of them, got {value!r}"
        )
    if "group" in items and kind != "segment":
        raise DestinationConfigError(
            name, "mode", "group (Segment group calls of account audiences) is for segment"
        )
    return tuple(m for m in MODES if m in items)


def webhook_key(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret: base64 (padded or not), `whsec_` optional.

    Raises ValueError when it is not base64."""
    text = secret.removeprefix(WEBHOOK_SECRET_PREFIX)
    if not _BASE64.match(text):
        raise ValueError("not base64")
    text = text.rstrip("=")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64") from None


def _check_webhook_secret(name: str, secret: str) -> None:
    try:
        key = webhook_key(secret)
    except ValueError:
        raise DestinationConfigError(
            name, "secret", "expected base64 (optionally after 'whsec_'), e.g. whsec_<base64>"
        ) from None
    if len(key) < WEBHOOK_SECRET_MIN_BYTES:
        raise DestinationConfigError(
            name,
            "secret",
            f"the key must be at least {WEBHOOK_SECRET_MIN_BYTES} bytes (Standard Webhooks), "
            f"got {len(key)}",
        )
