"""Typed settings from `AUDIENCES_*` environment variables (SPEC §10).

Each field documents its variable; `audiences config` prints the effective
values with secrets redacted. A secret (`SECRET_FIELDS`) may instead come from a
file named by the variable with `_FILE` appended (AUDIENCES_API_TOKENS_FILE), the
way Docker and Kubernetes mount secrets.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from audiences.errors import AudiencesError

log = logging.getLogger(__name__)
PREFIX = "AUDIENCES_"
EVENTS_PARTITIONER = "murmur2_random"  # = Java's default: same user, same partition
SECRET_FIELDS = frozenset({"sasl_password", "write_keys", "api_tokens", "api_token"})
SCOPES = ("read", "write", "admin")  # each scope allows what the ones before it allow
LOOPBACK = "127.0.0.1"


class SettingsError(AudiencesError, ValueError):
    """An invalid `AUDIENCES_*` value: the message names the variable and what it expects."""


# Constraints a field's metadata may declare, checked in one place (`_validated`):
#   "choices": allowed strings ("normalise": str.upper compares and stores them upper-cased),
#   "min"/"max": an integer's range, "special": {value: meaning} allowed outside it,
#   "pattern": a regular expression a non-empty string must match (with "expects").
# Booleans (fields typed bool) take true/false, 1/0, yes/no, on/off.
LOG_FORMATS = ("json", "text")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
SECURITY_PROTOCOLS = ("", "PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
# What both librdkafka and Faust (aiokafka) can do with a user name and a password.
SASL_MECHANISMS = ("", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
URL_PATTERN = r"^https?://[^\s/]+"
TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")

# `AUDIENCES_*` variables read by something other than `Settings`, so an unknown-variable
# warning skips them. Found by grepping src, tests, deploy, Makefile, docker-compose.yml
# and .ci for AUDIENCES_ (tests/unit/test_settings_validation.py fails when a new one is
# missing here). Secrets' `_FILE` variants are derived from SECRET_FIELDS.
READ_ELSEWHERE = frozenset(
    {
        "AUDIENCES_PURE_CORE",  # audiences.core: use the pure-Python core
        "AUDIENCES_EXPECT_COMPILED_CORE",  # tests: fail unless the compiled core loads
        "AUDIENCES_PURE_BUILD",  # setup.py: build without compiling the core
        "AUDIENCES_APACHE_KAFKA_VERSION",  # adapters/kafka/apache.py
        "AUDIENCES_ROCKSDB_BLOCK_CACHE_MB",  # adapters/state/store.py
        "AUDIENCES_ROCKSDB_WRITE_BUFFERS_MB",  # adapters/state/store.py
        "AUDIENCES_BENCH_CONFIG",  # tools/bench: a contender's config file
        "AUDIENCES_BENCH_LATENCY_TRACE",  # tools/bench/latency.py
        "AUDIENCES_BENCH_QUIX_PYTHON",  # tools/bench/quix_env.py
    }
)
READ_ELSEWHERE_PREFIXES = ("AUDIENCES_TEST_",)  # test fixtures (tests/conftest.py, tests/system)
_warned: set[str] = set()


@dataclass(frozen=True, slots=True)
class ApiToken:
    """One management API token (`token:scope` in AUDIENCES_API_TOKENS)."""

    token: str = field(repr=False)
    scope: str

    @property
    def rank(self) -> int:
        return SCOPES.index(self.scope)


def parse_api_tokens(raw: str) -> tuple[ApiToken, ...]:
    """`token:scope,token:scope` -> tokens, in order; blanks between commas are ignored."""
    tokens: list[ApiToken] = []
    for number, item in enumerate(raw.split(","), 1):
        item = item.strip()
        if not item:
            continue
        token, colon, scope = item.rpartition(":")
        if not colon or not token.strip() or scope.strip() not in SCOPES:
            raise SettingsError(
                f"{PREFIX}API_TOKENS: item {number} must be TOKEN:SCOPE with SCOPE one of "
                f"{', '.join(SCOPES)} (got scope {scope.strip()!r})"
            )
        tokens.append(ApiToken(token.strip(), scope.strip()))
    return tuple(tokens)


def _secret_file(env: Mapping[str, str], variable: str) -> str | None:
    """A secret's value from the file `variable` names (Docker/Kubernetes secrets mounted
    as files: AUDIENCES_API_TOKENS_FILE=/run/secrets/api_tokens), surrounding whitespace
    removed; None when the variable is unset."""
    path = env.get(variable)
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as file:
            return file.read().strip()
    except OSError as exc:
        raise SettingsError(f"{variable}: cannot read {path}: {exc.strerror}") from None


@dataclass(frozen=True)
class Settings:
    kafka_bootstrap: str = field(
        default="",
        metadata={"doc": "Kafka bootstrap servers; empty = start the embedded broker (up/demo)"},
    )
    app_id: str = field(
        default="audiences",
        metadata={"doc": "Faust app id: consumer groups and internal topic prefix"},
    )
    space_id: str = field(
        default="",
        metadata={
            "doc": "space of the outputs' context.personas (space_id and namespace, as Segment "
            "Engage writes them; SPEC §5); empty = the app id"
        },
    )
    events_topic: str = field(default="events", metadata={"doc": "input Segment events"})
    audience_events_topic: str = field(
        default="audience-events", metadata={"doc": "output transitions (SPEC §5)"}
    )
    definitions_topic: str = field(
        default="audience-definitions", metadata={"doc": "compacted audience definitions"}
    )
    events_dlq_topic: str = field(
        default="events-dlq", metadata={"doc": "invalid input events with the reason"}
    )
    audience_events_dlq_topic: str = field(
        default="audience-events-dlq", metadata={"doc": "undeliverable sink messages"}
    )
    dlq_retention_hours: int = field(
        default=168,
        metadata={
            "min": 1,
            "doc": "hours both DLQs keep a record (they hold events and traits, PII included); "
            "set on the topics at every start",
        },
    )
    partitions: int = field(
        default=4, metadata={"min": 1, "doc": "partitions of topics the worker creates"}
    )
    replication_factor: int = field(
        default=-1,
        metadata={
            "min": 1,
            "max": 32767,
            "special": {-1: "the broker's default.replication.factor"},
            "doc": "replication factor of every topic the engine creates (Faust's included); "
            "-1 = the broker's default. An existing topic with fewer replicas than an "
            "explicit value is refused",
        },
    )
    data_dir: str = field(default="./data", metadata={"doc": "RocksDB state directory"})
    destinations: str = field(default="", metadata={"doc": "destinations file (YAML/JSON)"})
    write_keys: str = field(default="", metadata={"doc": "collector write keys, comma-separated"})
    web_port: int = field(
        default=6066,
        metadata={"min": 1, "max": 65535, "doc": "worker web port: API, health, metrics"},
    )
    web_host: str = field(
        default="127.0.0.1",
        metadata={
            "doc": "worker web bind address (without API_TOKENS the API binds to 127.0.0.1 "
            "whatever this says)"
        },
    )
    api_tokens: str = field(
        default="",
        metadata={
            "doc": "management API tokens, comma-separated TOKEN:SCOPE, scopes read < write < "
            "admin (secret); the first one also authenticates worker-to-worker calls; none = "
            "the API binds to loopback only"
        },
    )
    api_token: str = field(
        default="",
        metadata={"doc": "token the CLI sends to the management API (secret; or --token)"},
    )
    web_advertised_url: str = field(
        default="",
        metadata={
            "pattern": URL_PATTERN,
            "expects": "an http:// or https:// URL",
            "doc": "URL other workers use to reach this one's API (default "
            "http://WEB_HOST:WEB_PORT, 0.0.0.0 read as 127.0.0.1)",
        },
    )
    api_url: str = field(
        default="",
        metadata={
            "pattern": URL_PATTERN,
            "expects": "an http:// or https:// URL",
            "doc": "management API of a worker, for `audiences get/members/explain/preview`",
        },
    )
    collector_port: int = field(
        default=8088, metadata={"min": 1, "max": 65535, "doc": "collector port"}
    )
    collector_host: str = field(
        default="127.0.0.1", metadata={"doc": "collector bind address (0.0.0.0 in containers)"}
    )
    collector_ack_timeout_ms: int = field(
        default=10_000,
        metadata={
            "min": 1,
            "doc": "collector: longest wait for Kafka's acknowledgement before a 503",
        },
    )
    collector_max_inflight_events: int = field(
        default=50_000,
        metadata={"min": 1, "doc": "collector: unacknowledged events held at most; beyond, 503"},
    )
    collector_rate_limit: int = field(
        default=0,
        metadata={
            "min": 0,
            "doc": "collector: events per second accepted per write key; 0 = no limit",
        },
    )
    collector_rate_burst: int = field(
        default=0,
        metadata={
            "min": 0,
            "doc": "collector: events a write key may send at once above its rate "
            "(token bucket size; 0 = one second's worth)",
        },
    )
    collector_max_inflight_bytes: int = field(
        default=64 * 1024 * 1024,
        metadata={
            "min": 1,
            "doc": "collector: unacknowledged event bytes held at most; beyond, 503",
        },
    )
    log_format: str = field(
        default="text",
        metadata={"choices": LOG_FORMATS, "normalise": str.lower, "doc": "json | text"},
    )
    log_level: str = field(
        default="INFO",
        metadata={"choices": LOG_LEVELS, "normalise": str.upper, "doc": "logging level"},
    )
    session_timeout_ms: int = field(
        default=6000,
        metadata={
            "min": 1,
            "doc": "consumer group session timeout (6 s suits the embedded broker)",
        },
    )
    batch_size: int = field(
        default=1000, metadata={"min": 1, "doc": "max records consumed per evaluator batch"}
    )
    tick_interval_ms: int = field(
        default=50,
        metadata={
            "min": 1,
            "doc": "longest time between deadline sweeps (a caught-up partition's earliest "
            "deadline, once past, is swept on the next loop turn)",
        },
    )
    commit_interval_ms: int = field(
        default=100,
        metadata={
            "min": 0,
            "doc": "how often the evaluator makes its work durable (outputs acknowledged, "
            "changelog, store, offsets; 0 = after every loop turn; 5 times that while a "
            "backlog fills every consume); outputs are sent at once, whatever it is",
        },
    )
    sweep_chunk: int = field(
        default=1000,
        metadata={
            "min": 1,
            "doc": "due deadlines fired per partition per loop turn (live events flow between)",
        },
    )
    max_poll_interval_ms: int = field(
        default=300_000,
        metadata={
            "min": 1,
            "doc": "evaluator max.poll.interval.ms: a loop stuck longer leaves the group and "
            "its partitions go to another worker",
        },
    )
    state_cache_size: int = field(
        default=50_000,
        metadata={
            "min": 1,
            "doc": "decoded profiles kept in memory per worker (about 1.1 KB for a new profile; the others "
            "are read from RocksDB when their next event comes)",
        },
    )
    fetch_wait_ms: int = field(
        default=10,
        metadata={
            "min": 0,
            "doc": "evaluator fetch.wait.max.ms: the embedded broker answers fetches only "
            "when it expires, so it bounds event-to-transition latency there",
        },
    )
    sink_fetch_wait_ms: int = field(
        default=50,
        metadata={
            "min": 0,
            "doc": "sink consumers' fetch.wait.max.ms: the embedded broker answers a fetch "
            "only when it expires, so it bounds the sinks' added latency",
        },
    )
    security_protocol: str = field(
        default="",
        metadata={
            "choices": SECURITY_PROTOCOLS,
            "normalise": str.upper,
            "doc": "Kafka security.protocol (SASL_SSL, SSL, ...)",
        },
    )
    sasl_mechanism: str = field(
        default="",
        metadata={
            "choices": SASL_MECHANISMS,
            "normalise": str.upper,
            "doc": "Kafka sasl.mechanism (PLAIN, SCRAM-SHA-512, ...)",
        },
    )
    sasl_username: str = field(default="", metadata={"doc": "Kafka SASL user"})
    sasl_password: str = field(default="", metadata={"doc": "Kafka SASL password (secret)"})
    ssl_ca_location: str = field(default="", metadata={"doc": "CA bundle for TLS"})

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, *, warn_unknown: bool = True, **overrides: Any
    ) -> Settings:
        """Settings from `AUDIENCES_*` variables (then `overrides`), every value checked
        against its field's constraints: SettingsError names the variable and what it
        expects. Unknown `AUDIENCES_*` variables are logged once (with a did-you-mean)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(PREFIX + f.name.upper())
            if raw is None and f.name in SECRET_FIELDS:
                raw = _secret_file(env, PREFIX + f.name.upper() + "_FILE")
            if raw is None:
                continue
            values[f.name] = _parsed(f, raw)
        values.update(overrides)
        for f in dataclasses.fields(cls):
            if f.name in values:
                values[f.name] = _validated(f, values[f.name])
        _check_combinations(values)
        made = cls(**values)
        made.api_token_list()  # an invalid AUDIENCES_API_TOKENS stops the process here
        if warn_unknown:
            warn_unknown_variables(env, cls)
        return made

    @property
    def advertised_url(self) -> str:
        """Where this worker's web server is reachable by the others (no trailing /)."""
        if self.web_advertised_url:
            return self.web_advertised_url.rstrip("/")
        host = self.web_bind_host
        host = host if host not in ("", "0.0.0.0", "::") else LOOPBACK
        return f"http://{host}:{self.web_port}"

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def write_key_list(self) -> list[str]:
        """The collector's write keys (`write_keys`, comma-separated, blanks ignored)."""
        return [key.strip() for key in self.write_keys.split(",") if key.strip()]

    def api_token_list(self) -> tuple[ApiToken, ...]:
        """The management API's tokens (`api_tokens`); raises SettingsError if malformed."""
        return parse_api_tokens(self.api_tokens)

    @property
    def internal_token(self) -> str:
        """What a worker sends to the others (the first token of API_TOKENS; every worker
        of a deployment has the same list), empty when none is configured."""
        tokens = self.api_token_list()
        return tokens[0].token if tokens else ""

    @property
    def web_bind_host(self) -> str:
        """Where the worker's web server listens: WEB_HOST when API tokens are configured,
        else loopback only (an API without tokens must not be reachable from elsewhere)."""
        return self.web_host if self.api_token_list() else LOOPBACK

    def kafka_config(self) -> dict[str, Any]:
        """librdkafka settings shared by every client."""
        config: dict[str, Any] = {"bootstrap.servers": self.kafka_bootstrap}
        config.update(self.kafka_security_config())
        return config

    def kafka_security_config(self) -> dict[str, Any]:
        """The librdkafka security settings of the engine's cluster (none when unset)."""
        config: dict[str, Any] = {}
        if self.security_protocol:
            config["security.protocol"] = self.security_protocol
        if self.sasl_mechanism:
            config["sasl.mechanism"] = self.sasl_mechanism
            config["sasl.username"] = self.sasl_username
            config["sasl.password"] = self.sasl_password
        if self.ssl_ca_location:
            config["ssl.ca.location"] = self.ssl_ca_location
        return config

    def producer_config(self) -> dict[str, Any]:
        """librdkafka producer settings. Records keyed by user must land where the
        user's other events land, and in the order they were produced: every producer
        of `events` (ours and yours) uses the Java client's default partitioner,
        murmur2 of the key, and is idempotent. Without idempotence librdkafka re-sends
        a failed batch after the batches sent since (it keeps up to 1M requests in
        flight): on a topic created a moment before, whose leader the producer did not
        know yet, a partition's first batch (its first hours of events) landed after
        the next ones in 2 of 4 runs, and the profiles read those hours late."""
        return {
            **self.kafka_config(),
            "partitioner": EVENTS_PARTITIONER,
            "enable.idempotence": True,
        }

    def ordered_producer_config(self) -> dict[str, Any]:
        """`producer_config()` kept in order by one request in flight per connection
        instead of idempotence, for the busy producers (the evaluator's outputs, the
        bench's live traffic). librdkafka's idempotent producer sends one ProduceRequest per
        partition at a time (its limit of 5 counts messages, not requests) and, once
        `linger.ms` has passed with that request unanswered, its broker thread polls
        without waiting until the answer comes: a core spent whenever the broker is slower
        than `linger.ms`. On 2 cores shared with the broker that starved the broker, which
        answered later still (0% broker CPU for 1-2 s while both producers' threads spun;
        event -> Entered p99 0.2-1.2 s at 17k events/s); ordered this way, the worker's CPU
        went from 63% to 53% at that rate. With one request in flight a failed batch is
        re-sent before anything after it: never reordered. A retry after a lost answer can
        write a record twice (same `messageId`: delivery is at least once anyway)."""
        return {
            **self.producer_config(),
            "enable.idempotence": False,
            "max.in.flight.requests.per.connection": 1,
        }

    def group_consumer_config(self, group_id: str) -> dict[str, Any]:
        """A consumer in group `group_id` that commits explicitly, starts at the earliest
        offset and rebalances incrementally (cooperative-sticky), with this session."""
        return {
            **self.kafka_config(),
            "group.id": group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "partition.assignment.strategy": "cooperative-sticky",
            "session.timeout.ms": self.session_timeout_ms,
            "heartbeat.interval.ms": max(500, self.session_timeout_ms // 6),
            "enable.partition.eof": False,
        }

    def redacted(self) -> dict[str, Any]:
        """Effective values, secrets replaced, with each variable's documentation."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in SECRET_FIELDS and value:
                value = "***"
            out[PREFIX + f.name.upper()] = {"value": value, "doc": f.metadata.get("doc", "")}
        return out


def _variable(f: dataclasses.Field[Any]) -> str:
    return PREFIX + f.name.upper()


def _parsed(f: dataclasses.Field[Any], raw: str) -> Any:
    """A variable's text as its field's type (int, bool or str)."""
    if f.type in ("int", int):
        try:
            return int(raw.strip())
        except ValueError:
            raise SettingsError(
                f"{_variable(f)}: expected an integer{_range_text(f)}, got {raw!r}"
            ) from None
    if f.type in ("bool", bool):
        word = raw.strip().lower()
        if word in TRUE or word in FALSE:
            return word in TRUE
        raise SettingsError(f"{_variable(f)}: expected true or false, got {raw!r}")
    return raw


def _range_text(f: dataclasses.Field[Any]) -> str:
    low, high = f.metadata.get("min"), f.metadata.get("max")
    if low is None and high is None:
        return ""
    text = (
        f" from {low} to {high}"
        if low is not None and high is not None
        else f" >= {low}"
        if low is not None
        else f" <= {high}"
    )
    for value, meaning in f.metadata.get("special", {}).items():
        text += f" (or {value}: {meaning})"
    return text


def _validated(f: dataclasses.Field[Any], value: Any) -> Any:
    """`value` checked against the constraints in `f.metadata` (normalised: upper-cased
    choices); raises SettingsError naming the variable and what it expects."""
    meta = f.metadata
    if f.type in ("int", int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise SettingsError(f"{_variable(f)}: expected an integer, got {value!r}")
        if value in meta.get("special", {}):
            return value
        low, high = meta.get("min"), meta.get("max")
        if (low is not None and value < low) or (high is not None and value > high):
            raise SettingsError(f"{_variable(f)}: expected an integer{_range_text(f)}, got {value}")
        return value
    if f.type in ("bool", bool):
        if not isinstance(value, bool):
            raise SettingsError(f"{_variable(f)}: expected true or false, got {value!r}")
        return value
    if not isinstance(value, str):
        raise SettingsError(f"{_variable(f)}: expected a string, got {value!r}")
    choices = meta.get("choices")
    if choices is not None:
        given = meta.get("normalise", str)(value.strip())
        if given not in choices:
            shown = ", ".join(c for c in choices if c)
            empty = " (or empty)" if "" in choices else ""
            raise SettingsError(f"{_variable(f)}: expected one of {shown}{empty}, got {value!r}")
        return given
    pattern = meta.get("pattern")
    if pattern is not None and value and not re.match(pattern, value):
        expects = meta.get("expects", f"a value matching {pattern}")
        raise SettingsError(f"{_variable(f)}: expected {expects}, got {value!r}")
    return value


def _check_combinations(values: Mapping[str, Any]) -> None:
    """Settings valid alone but not together. librdkafka uses GSSAPI when a SASL protocol
    has no mechanism and Faust would use PLAIN, so the mechanism is required."""
    protocol = values.get("security_protocol", "")
    mechanism = values.get("sasl_mechanism", "")
    if mechanism and not protocol.startswith("SASL_"):
        raise SettingsError(
            f"{PREFIX}SASL_MECHANISM is set but {PREFIX}SECURITY_PROTOCOL is "
            f"{protocol or 'unset'}: expected SASL_PLAINTEXT or SASL_SSL with a SASL mechanism"
        )
    if protocol.startswith("SASL_") and not mechanism:
        raise SettingsError(
            f"{PREFIX}SASL_MECHANISM: expected one of {', '.join(m for m in SASL_MECHANISMS if m)} "
            f"with {PREFIX}SECURITY_PROTOCOL={protocol}, got nothing"
        )


def known_variables(settings_class: type[Settings] = Settings) -> frozenset[str]:
    """Every `AUDIENCES_*` variable something reads: the settings' fields, the `_FILE`
    variants of secrets, and READ_ELSEWHERE."""
    names = {_variable(f) for f in dataclasses.fields(settings_class)}
    names |= {PREFIX + name.upper() + "_FILE" for name in SECRET_FIELDS}
    return frozenset(names | READ_ELSEWHERE)


def unknown_variables(
    env: Mapping[str, str], settings_class: type[Settings] = Settings
) -> list[tuple[str, str | None]]:
    """(variable, closest known variable or None) for each `AUDIENCES_*` variable that
    nothing reads, sorted."""
    known = known_variables(settings_class)
    found: list[tuple[str, str | None]] = []
    for name in sorted(env):
        if not name.startswith(PREFIX) or name in known:
            continue
        if name.startswith(READ_ELSEWHERE_PREFIXES):
            continue
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
        found.append((name, close[0] if close else None))
    return found


def warn_unknown_variables(
    env: Mapping[str, str] | None = None, settings_class: type[Settings] = Settings
) -> None:
    """Log a WARNING for each unknown `AUDIENCES_*` variable, once per process."""
    known = known_variables(settings_class)
    for name, close in unknown_variables(os.environ if env is None else env, settings_class):
        if name in _warned:
            continue
        _warned.add(name)
        hint = f"; did you mean {close}?" if close else ""
        if name.endswith("_FILE") and name.removesuffix("_FILE") in known:
            secrets = ", ".join(sorted(PREFIX + s.upper() for s in SECRET_FIELDS))
            hint = f"; only secrets may come from files ({secrets})"
        log.warning("unknown setting %s is ignored%s", name, hint)


def settings_or_exit(env: Mapping[str, str] | None = None, **kwargs: Any) -> Settings:
    """`Settings.from_env` for an entry point: an invalid value ends the process with
    exit code 2 and one line, `error: VARIABLE: what it expects`, no traceback."""
    try:
        return Settings.from_env(env, **kwargs)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
