"""The definitions log: the compacted `audience-definitions` topic as a live catalog.

Every worker reads the whole topic to its real end (fenced, see
`adapters.kafka.fence`) before it evaluates any event, then polls for changes
between batches. The CLI uses the same module to apply and delete definitions.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, Producer, TopicPartition

from audiences.adapters.kafka.clients import KafkaClients
from audiences.adapters.kafka.fence import FENCE_KEY, read_to_end, read_to_fence, write_fences
from audiences.adapters.kafka.topics import Topics, partition_count
from audiences.adapters.metrics import DEFINITIONS_REJECTED
from audiences.adapters.settings import Settings
from audiences.adapters.state.recovery import profiles_in
from audiences.adapters.stream.queries import DefinitionsSnapshot as Snapshot
from audiences.core.definitions import (
    Catalog,
    build_catalog,
    check_references,
    compile_definition,
    validate_definition,
)
from audiences.core.definitions.validate import KEY_PATTERN
from audiences.core.events import format_iso
from audiences.core.state import UserState
from audiences.errors import BrokerError, DefinitionError

log = logging.getLogger(__name__)
Definitions = dict[str, tuple[dict[str, Any], int]]


class _Rejected(Exception):
    """A stored definition a worker will not evaluate (see `_decode`)."""

    def __init__(self, key: str, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.key = key
        self.reason = reason


def _decode(msg: Message) -> tuple[str, tuple[dict[str, Any], int] | None] | None:
    """(key, (document, version)) of a record, (key, None) for a tombstone, None for a
    record that is no definition (a fence). Raises `_Rejected` for a definition that
    cannot be used: not JSON, invalid, over the limits (SPEC §11) — it was written
    around the API (straight to the topic, or by an older version)."""
    raw_key = msg.key()
    if raw_key is None or raw_key == FENCE_KEY:
        return None
    key = raw_key.decode("utf-8", "replace")
    value = msg.value()
    if value is None:
        return key, None
    try:
        raw = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise _Rejected(key, "undecodable", f"not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise _Rejected(key, "undecodable", "not a JSON object")
    try:
        doc = validate_definition(raw)
    except DefinitionError as exc:
        raise _Rejected(key, exc.reason, str(exc)) from None
    except Exception as exc:  # whatever a stored definition does, the worker goes on
        raise _Rejected(key, "invalid", f"{type(exc).__name__}: {exc}") from None
    return key, (doc, int(doc.get("version", 1)))


def _rejected(key: str, reason: str, detail: str, offset: int | None = None) -> None:
    """Log and count a definition left out (bounded labels: keys of the language, or
    one label for a record whose key is none)."""
    where = f" at offset {offset}" if offset is not None else ""
    log.error("definition %r%s is not evaluated (%s): %s", key, where, reason, detail)
    label = key if KEY_PATTERN.match(key) else "(invalid key)"
    DEFINITIONS_REJECTED.labels(key=label, reason=reason).inc()


class DefinitionsLog:
    """Reads definitions into a catalog; `poll` folds in what changed since.

    The consumer reads the (single-partition) topic by assignment; `load` reads it to
    its real end (a fence this log appends, see `adapters.kafka.fence`)."""

    def __init__(self, topic: str, consumer: Consumer, producer: Producer) -> None:
        self.topic = topic
        self.definitions: Definitions = {}
        self.retired: dict[str, tuple[int, str]] = {}  # deleted audiences: (version, name)
        self.catalog: Catalog = build_catalog({})
        self.offset = -1  # next offset to read
        self._consumer = consumer
        self._producer = producer

    def load(self) -> Catalog:
        """Read the topic to its end; afterwards stay assigned for `poll`."""
        fences = write_fences(self._producer, self.topic, [0])
        for msg in read_to_fence(self._consumer, self.topic, fences, {}):
            self._apply(msg)
        self.offset = fences[0] + 1
        self._consumer.assign([TopicPartition(self.topic, 0, self.offset)])
        self.catalog = self._build_isolating(list(self.definitions))
        self._report()
        return self.catalog

    def poll(self) -> bool:
        """Fold in new records; True when the catalog changed."""
        touched: list[str] = []
        for msg in self._consumer.consume(100, 0):
            if msg.error() is not None:
                continue
            self.offset = max(self.offset, msg.offset() + 1)
            key = self._apply(msg)
            if key is not None:
                touched.append(key)
        if touched:
            self.catalog = self._build_isolating(touched)
            self._report()
        return bool(touched)

    def snapshot(self) -> Snapshot:
        """The definitions as evaluated now (for the query port; immutable)."""
        return Snapshot(dict(self.definitions), self.catalog, self.offset)

    def _build_isolating(self, suspects: list[str]) -> Catalog:
        """The catalog of the current definitions. A definition that makes compiling fail
        (it should have been refused when applied) is left out with an error in the log,
        one suspect at a time, so it cannot stop the worker.

        Built from the catalog it replaces: a `performed` tracker an edit narrows keeps
        what it kept (its id and data, no backfill); one that needs more history gets a
        new id, which `Backfills.plan` finds missing from each partition and backfills."""
        try:
            return build_catalog(self.definitions, self.retired, self.catalog)
        except Exception:
            log.exception("compiling the definitions failed; looking for the culprit")
        for key in suspects:
            entry = self.definitions.pop(key, None)
            try:
                catalog = build_catalog(self.definitions, self.retired, self.catalog)
            except Exception:
                if entry is not None:
                    self.definitions[key] = entry
                continue
            _rejected(key, "uncompilable", "compiling it fails")
            return catalog
        log.error("the definitions cannot be compiled: the previous catalog stays")
        return self.catalog

    def _apply(self, msg: Message) -> str | None:
        """Fold one record in; the key it changed (None: nothing changed).

        A record that cannot be used replaces what the key had like any other: the
        audience is not evaluated (as a fresh worker reading the compacted topic, which
        may no longer hold the previous version, would conclude too). It deletes
        nothing: a deleted audience stays retired (its members are still told)."""
        try:
            decoded = _decode(msg)
        except _Rejected as exc:
            _rejected(exc.key, exc.reason, str(exc), msg.offset())
            return exc.key if self.definitions.pop(exc.key, None) is not None else None
        if decoded is None:
            return None
        key, entry = decoded
        if entry is None:
            old = self.definitions.pop(key, None)
            if old is None:
                return None
            doc, version = old
            if "condition" in doc:
                self.retired[key] = (version, str(doc.get("name") or key))
            return key
        self.retired.pop(key, None)
        self.definitions[key] = entry
        return key

    def _report(self) -> None:
        log.info(
            "definitions loaded: %s",
            ", ".join(f"{a.key}@v{a.version}" for a in self.catalog.audiences) or "none",
        )
        for key, why in self.catalog.skipped.items():
            log.error("audience %s is not evaluated: %s", key, why)

    def close(self) -> None:
        self._consumer.close()
        self._producer.flush(5)


def read_definitions(settings: Settings, topics: Topics) -> Definitions:
    """The current definitions (one-shot read, for the CLI)."""
    clients = KafkaClients(settings)
    log_reader = DefinitionsLog(
        topics.definitions, clients.definitions_consumer(), clients.producer({"linger.ms": 0})
    )
    try:
        log_reader.load()
        return log_reader.definitions
    finally:
        log_reader.close()


def next_version(doc: Mapping[str, Any], current: tuple[dict[str, Any], int] | None) -> int | None:
    """Version for `doc`: unchanged documents keep theirs (None = nothing to write)."""
    if current is None:
        return 1
    old_doc, old_version = current
    bookkeeping = ("version", "created_at")
    strip = {k: v for k, v in old_doc.items() if k not in bookkeeping}
    if strip == {k: v for k, v in doc.items() if k not in bookkeeping}:
        return None
    return old_version + 1


class DefinitionsWriter:
    """Publishes definitions to the definitions topic (one long-lived producer)."""

    def __init__(self, topic: str, producer: Producer) -> None:
        self.topic = topic
        self.producer = producer

    def put(
        self, docs: list[dict[str, Any]], current: Definitions, now_ms: int
    ) -> tuple[list[tuple[str, int | None]], int]:
        """Validate and publish `docs` against `current`; returns (key, new version or
        None if unchanged) and the offset of the last record written (-1: none).

        Raises DefinitionError (with the JSON path) before anything is written: each
        document is validated (limits first), checked against the others and compiled
        with them by the workers' compiler."""
        merged = {k: d for k, (d, _) in current.items()}
        validated = []
        for doc in docs:
            checked = validate_definition(doc)
            merged[checked["key"]] = checked
            validated.append(checked)
        for checked in validated:
            check_references(checked, {k: d for k, d in merged.items() if k != checked["key"]})
        compiled = {k: (d, 1) for k, d in merged.items()}
        for checked in validated:  # compiled as the workers will compile it
            compile_definition(checked, {k: e for k, e in compiled.items() if k != checked["key"]})
        results = []
        records: list[tuple[bytes, bytes | None]] = []
        for checked in validated:
            version = next_version(checked, current.get(checked["key"]))
            results.append((checked["key"], version))
            if version is None:
                continue
            existing = current.get(checked["key"])
            # created_at: the moment `backfill: false` counts from; kept across edits.
            created_at = (existing[0].get("created_at") if existing else None) or format_iso(now_ms)
            body = {
                **{k: v for k, v in checked.items() if k != "version"},
                "version": version,
                "created_at": checked.get("created_at") or created_at,
            }
            records.append((checked["key"].encode(), orjson.dumps(body)))
        return results, self._send(records)

    def delete(self, key: str) -> int:
        """Tombstone a definition; returns the tombstone's offset."""
        return self._send([(key.encode(), None)])

    def _send(self, records: list[tuple[bytes, bytes | None]]) -> int:
        offsets: list[int] = []
        errors: list[str] = []

        def delivered(err: object, msg: Message) -> None:
            if err is not None:
                errors.append(str(err))
            else:
                offsets.append(msg.offset())

        for key, value in records:
            self.producer.produce(self.topic, key=key, value=value, on_delivery=delivered)
        if self.producer.flush(30) or errors:
            raise BrokerError(
                f"definitions were not acknowledged by Kafka: {errors or 'timed out'}",
                retriable=True,
            )
        return max(offsets, default=-1)


def apply_definitions(
    settings: Settings,
    topics: Topics,
    docs: list[dict[str, Any]],
    current: Definitions | None = None,
) -> list[tuple[str, int | None]]:
    """Validate and publish definitions (one-shot, for the CLI and tools); returns (key,
    new version or None if unchanged). Raises DefinitionError before anything is written."""
    if current is None:
        current = read_definitions(settings, topics)
    writer = DefinitionsWriter(topics.definitions, KafkaClients(settings).producer())
    results, _offset = writer.put(docs, current, int(time.time() * 1000))
    return results


def delete_definition(settings: Settings, topics: Topics, key: str) -> bool:
    """Tombstone a definition (one-shot, for the CLI); False if it did not exist."""
    if key not in read_definitions(settings, topics):
        return False
    DefinitionsWriter(topics.definitions, KafkaClients(settings).producer()).delete(key)
    return True


def read_profiles(settings: Settings, topics: Topics) -> dict[str, UserState]:
    """Every stored profile, from the state changelog (for `audiences preview` without a
    worker; the API asks the workers instead). Reads each partition to its end."""
    clients = KafkaClients(settings)
    partitions = partition_count(clients.admin(), topics.changelog)
    if partitions is None:
        return {}
    consumer = clients.reader("preview", {"auto.offset.reset": "earliest"})
    try:
        stored = profiles_in(read_to_end(consumer, topics.changelog, partitions))
    finally:
        consumer.close()
    profiles: dict[str, UserState] = {}
    for key, value in stored.items():
        try:
            profiles[key.decode()] = UserState.decode(value)
        except Exception:  # one unreadable profile does not stop a preview
            log.warning("skipping an unreadable profile")
    return profiles


def wait_for_backfill(
    settings: Settings,
    topics: Topics,
    timeout_s: float,
    on_progress: Callable[[int, int, int, int], None],
) -> bool:
    """Wait until every `events` partition reports it finished backfilling the current
    definitions (`on_progress(done, total, finished_partitions, partitions)` on each
    report). False on timeout (e.g. no worker running)."""
    clients = KafkaClients(settings)
    definitions = read_definitions(settings, topics)
    fingerprint = build_catalog(definitions).fingerprint
    partitions = partition_count(clients.admin(), topics.events) or 0
    consumer = clients.reader("progress-reader", {"auto.offset.reset": "earliest"})
    latest: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        consumer.assign([TopicPartition(topics.progress, 0, OFFSET_BEGINNING)])
        while time.monotonic() < deadline:
            for msg in consumer.consume(100, 0.2):
                if msg.error() is not None or msg.value() is None:
                    continue
                report = orjson.loads(msg.value())
                if report.get("catalog") == fingerprint:
                    latest[int(report["partition"])] = report
            done = sum(r["done"] for r in latest.values())
            total = sum(r["total"] for r in latest.values())
            finished = sum(1 for r in latest.values() if r["finished"])
            on_progress(done, total, finished, partitions)
            if partitions and finished == partitions:
                return True
        return False
    finally:
        consumer.close()
