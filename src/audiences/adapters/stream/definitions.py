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

from audiences.adapters.kafka.fence import FENCE_KEY, read_to_fence, write_fences
from audiences.adapters.kafka.topics import Topics, partition_count
from audiences.adapters.settings import Settings
from audiences.core.definitions import Catalog, build_catalog, check_references, validate_definition
from audiences.core.events import format_iso
from audiences.core.state import UserState
from audiences.errors import AudiencesError, BrokerError

log = logging.getLogger(__name__)
Definitions = dict[str, tuple[dict[str, Any], int]]


def _decode(msg: Message) -> tuple[str, tuple[dict[str, Any], int] | None] | None:
    """(key, (document, version)) of a record, (key, None) for a tombstone, None if unusable."""
    raw_key = msg.key()
    if raw_key is None or raw_key == FENCE_KEY:
        return None
    key = raw_key.decode("utf-8", "replace")
    value = msg.value()
    if value is None:
        return key, None
    try:
        doc = validate_definition({k: v for k, v in orjson.loads(value).items()})
    except (orjson.JSONDecodeError, AttributeError, AudiencesError) as exc:
        log.error("ignoring invalid definition %r at offset %d: %s", key, msg.offset(), exc)
        return None
    return key, (doc, int(doc.get("version", 1)))


class DefinitionsLog:
    """Reads definitions into a catalog; `poll` folds in what changed since."""

    def __init__(self, settings: Settings, topics: Topics) -> None:
        self.settings = settings
        self.topic = topics.definitions
        self.definitions: Definitions = {}
        self.retired: dict[str, tuple[int, str]] = {}  # deleted audiences: (version, name)
        self.catalog: Catalog = build_catalog({})
        self._consumer = Consumer(
            {
                **settings.kafka_config(),
                "group.id": f"{settings.app_id}-definitions",
                "enable.auto.commit": False,
                "enable.partition.eof": False,
            }
        )

    def load(self, producer: Producer) -> Catalog:
        """Read the topic to its end; afterwards stay assigned for `poll`."""
        from confluent_kafka.admin import AdminClient

        partitions = partition_count(AdminClient(self.settings.kafka_config()), self.topic)
        if partitions is None:
            raise BrokerError(f"topic {self.topic} does not exist", retriable=True)
        fences = write_fences(producer, self.topic, list(range(partitions)))
        for msg in read_to_fence(self._consumer, self.topic, fences, {}):
            self._apply(msg)
        self._consumer.assign([TopicPartition(self.topic, p, fences[p] + 1) for p in fences])
        self.catalog = build_catalog(self.definitions, self.retired)
        self._report()
        return self.catalog

    def poll(self) -> bool:
        """Fold in new records; True when the catalog changed."""
        changed = False
        for msg in self._consumer.consume(100, 0):
            if msg.error() is None and self._apply(msg):
                changed = True
        if changed:
            self.catalog = build_catalog(self.definitions, self.retired)
            self._report()
        return changed

    def _apply(self, msg: Message) -> bool:
        decoded = _decode(msg)
        if decoded is None:
            return False
        key, entry = decoded
        if entry is None:
            old = self.definitions.pop(key, None)
            if old is None:
                return False
            doc, version = old
            if "condition" in doc:
                self.retired[key] = (version, str(doc.get("name") or key))
            return True
        self.retired.pop(key, None)
        self.definitions[key] = entry
        return True

    def _report(self) -> None:
        log.info(
            "definitions loaded: %s",
            ", ".join(f"{a.key}@v{a.version}" for a in self.catalog.audiences) or "none",
        )
        for key, why in self.catalog.skipped.items():
            log.error("audience %s is not evaluated: %s", key, why)

    def close(self) -> None:
        self._consumer.close()


def read_definitions(settings: Settings, topics: Topics) -> Definitions:
    """The current definitions (one-shot read, for the CLI)."""
    producer = Producer(settings.kafka_config())
    log_reader = DefinitionsLog(settings, topics)
    try:
        log_reader.load(producer)
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


def apply_definitions(
    settings: Settings,
    topics: Topics,
    docs: list[dict[str, Any]],
    current: Definitions | None = None,
) -> list[tuple[str, int | None]]:
    """Validate and publish definitions; returns (key, new version or None if unchanged).
    `current`: the definitions as just read, if the caller has them.

    Raises DefinitionError (with the JSON path) before anything is written.
    """
    if current is None:
        current = read_definitions(settings, topics)
    merged = {k: d for k, (d, _) in current.items()}
    validated = []
    for doc in docs:
        checked = validate_definition(doc)
        merged[checked["key"]] = checked
        validated.append(checked)
    for checked in validated:
        check_references(checked, {k: d for k, d in merged.items() if k != checked["key"]})
    producer = Producer({**settings.kafka_config(), "enable.idempotence": True})
    results = []
    for checked in validated:
        version = next_version(checked, current.get(checked["key"]))
        results.append((checked["key"], version))
        if version is None:
            continue
        existing = current.get(checked["key"])
        # created_at: the moment `backfill: false` counts from; kept across edits.
        created_at = (existing[0].get("created_at") if existing else None) or format_iso(
            int(time.time() * 1000)
        )
        body = {
            **{k: v for k, v in checked.items() if k != "version"},
            "version": version,
            "created_at": checked.get("created_at") or created_at,
        }
        producer.produce(topics.definitions, key=checked["key"].encode(), value=orjson.dumps(body))
    if producer.flush(30):
        raise BrokerError("definitions were not acknowledged by Kafka", retriable=True)
    return results


def delete_definition(settings: Settings, topics: Topics, key: str) -> bool:
    """Tombstone a definition; False if it did not exist."""
    current = read_definitions(settings, topics)
    if key not in current:
        return False
    producer = Producer({**settings.kafka_config(), "enable.idempotence": True})
    producer.produce(topics.definitions, key=key.encode(), value=None)
    if producer.flush(30):
        raise BrokerError("the deletion was not acknowledged by Kafka", retriable=True)
    return True


def read_profiles(settings: Settings, topics: Topics) -> dict[str, UserState]:
    """Every stored profile, from the state changelog (last write wins, tombstones
    delete). For previews: a batch a crashed worker never completed may be included."""
    from audiences.adapters.stream.evaluator import MARKER_PREFIX, META_PREFIX

    consumer = Consumer(
        {
            **settings.kafka_config(),
            "group.id": f"{settings.app_id}-preview",
            "enable.auto.commit": False,
            "enable.partition.eof": False,
        }
    )
    producer = Producer(settings.producer_config())
    try:
        from confluent_kafka.admin import AdminClient

        partitions = partition_count(AdminClient(settings.kafka_config()), topics.changelog)
        if partitions is None:
            return {}
        fences = write_fences(producer, topics.changelog, list(range(partitions)))
        raw: dict[bytes, bytes | None] = {}
        for msg in read_to_fence(consumer, topics.changelog, fences, {}):
            key = msg.key() or b""
            if key == FENCE_KEY or key.startswith((MARKER_PREFIX, META_PREFIX)):
                continue
            raw[key] = msg.value()
    finally:
        consumer.close()
    profiles: dict[str, UserState] = {}
    for key, value in raw.items():
        if value is None:
            continue
        try:
            profiles[key.decode()] = UserState.decode(value)
        except (ValueError, TypeError, IndexError, KeyError, AttributeError):
            log.warning("skipping an unreadable profile %r", key)
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
    from confluent_kafka.admin import AdminClient

    definitions = read_definitions(settings, topics)
    fingerprint = build_catalog(definitions).fingerprint
    partitions = partition_count(AdminClient(settings.kafka_config()), topics.events) or 0
    consumer = Consumer(
        {
            **settings.kafka_config(),
            "group.id": f"{settings.app_id}-progress-reader",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
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
