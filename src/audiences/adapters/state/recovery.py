"""Restoring a partition's store from its changelog, streamed in bounded chunks.

The log is the truth; the local store is a cache of it that is trusted only when
it provably is one:
- a store that belonged to this app's changelog (same topic id), whose checkpoint
  is not beyond the log's end, and after whose checkpoint no other worker took the
  partition (no foreign owner record), is caught up from its checkpoint;
- anything else is wiped and rebuilt from the start of the log (a partition that
  came back after another owner: compaction may have removed tombstones the
  store never saw; a changelog that was recreated or truncated).

Records are applied as they stream (one `WriteBatch` per chunk), so memory does
not grow with the log. Each state record is a whole value (last write wins) and
carries, in its header, the input position it reflects. The position to resume
`events` from is the latest position record (`Meta.POSITION`), written last in
each checkpoint; a profile record newer than it (a checkpoint cut short on a
broker without transactions) is *ahead*: its input below the position it
reflects is skipped when it is met again, so nothing is applied twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from audiences.adapters.state.layout import (
    FAMILY_OF,
    NEVER,
    Family,
    Kind,
    Meta,
    decode_header,
    due_key,
    split_changelog_key,
)
from audiences.adapters.state.partition import decode_position
from audiences.adapters.state.store import StateStore

log = logging.getLogger(__name__)
CHUNK = 5000  # records per store write
PROGRESS_EVERY_S = 5.0


class Record(Protocol):
    """What recovery reads of a changelog record (confluent-kafka's Message has it)."""

    def offset(self) -> int: ...
    def key(self) -> bytes | None: ...
    def value(self) -> bytes | None: ...
    def headers(self) -> list[tuple[str, bytes]] | None: ...


Reader = Callable[[int], Iterator[Record]]  # start offset -> records up to the fence


@dataclass
class Restored:
    """Where the partition stands after recovery."""

    position: int | None  # next `events` offset to evaluate; None = no checkpoint anywhere
    stream_time_ms: int
    ahead: dict[bytes, int] = field(default_factory=dict)
    records: int = 0  # changelog records read
    keys: int = 0  # state records applied
    seconds: float = 0.0
    rebuilt: str | None = None  # why the local store was discarded, if it was


class _Foreign(Exception):
    """Another worker owned the partition after this store's checkpoint."""


def restore(
    store: StateStore,
    read: Reader,
    *,
    partition: int,
    fence: int,
    session: str,
    topic_id: str | None,
    on_progress: Callable[[int], None] | None = None,
) -> Restored:
    """Bring `store` up to the owner record at offset `fence` (this worker's, just
    written: the true end of the log, whatever the broker reports as its end)."""
    started = time.monotonic()
    reason = _distrust(store, fence, topic_id)
    if reason is not None:
        log.warning(
            "partition %d: local state discarded (%s); rebuilding from the changelog",
            partition,
            reason,
        )
        _wipe(store)
    try:
        restored = _apply(store, read, partition, fence, session, on_progress)
    except _Foreign:
        reason = "another worker owned the partition since this store's checkpoint"
        log.info(
            "partition %d: local state discarded (%s); rebuilding from the changelog",
            partition,
            reason,
        )
        _wipe(store)
        restored = _apply(store, read, partition, fence, session, on_progress)
    restored.rebuilt = reason
    store.flush()  # the restore's writes skipped the log: on disk before the store says done
    final = store.new_batch()
    final.put(Family.META, Meta.CHANGELOG_OFFSET.value, str(fence + 1).encode())
    final.put(Family.META, Meta.SESSION.value, session.encode())
    if topic_id:
        final.put(Family.META, Meta.CHANGELOG_TOPIC_ID.value, topic_id.encode())
    store.write(final)
    restored.seconds = time.monotonic() - started
    rate = restored.records / restored.seconds if restored.seconds > 0 else 0.0
    log.info(
        "partition %d recovered: %d changelog records (%d state keys) in %.3fs (%.0f/s), "
        "resuming at offset %s",
        partition,
        restored.records,
        restored.keys,
        restored.seconds,
        rate,
        restored.position,
    )
    return restored


def _distrust(store: StateStore, fence: int, topic_id: str | None) -> str | None:
    """Why the local store cannot be caught up from its checkpoint (None: it can)."""
    if store.get(Family.META, Meta.SESSION.value) is None:
        return None if store.is_empty() else "a restore was cut short"
    known = store.get(Family.META, Meta.CHANGELOG_TOPIC_ID.value)
    if topic_id and known is not None and known.decode() != topic_id:
        return "the changelog topic was recreated (new topic id)"
    checkpoint = _int(store.get(Family.META, Meta.CHANGELOG_OFFSET.value), 0)
    if checkpoint > fence + 1:
        return f"its checkpoint {checkpoint} is beyond the changelog's end {fence}: truncated?"
    return None


def _wipe(store: StateStore) -> None:
    # The session first, logged: a crash part way leaves a store that says it was cut
    # short (wiped again), never a checkpoint over half its profiles.
    forget = store.new_batch()
    forget.delete(Family.META, Meta.SESSION.value)
    store.write(forget)
    batch = store.new_batch()
    for family in Family:
        for key, _ in store.scan(family):
            batch.delete(family, key)
            if len(batch) >= CHUNK:
                store.write(batch, logged=False)
                batch = store.new_batch()
    store.write(batch, logged=False)


def _apply(
    store: StateStore,
    read: Reader,
    partition: int,
    fence: int,
    session: str,
    on_progress: Callable[[int], None] | None,
) -> Restored:
    warm = store.get(Family.META, Meta.SESSION.value) is not None
    start = _int(store.get(Family.META, Meta.CHANGELOG_OFFSET.value), 0) if warm else 0
    stored_position = store.get(Family.META, Meta.POSITION.value)
    position, stream_time = decode_position(stored_position) if stored_position else (-1, 0)
    restored = Restored(position=None, stream_time_ms=stream_time)
    ahead = restored.ahead
    batch = store.new_batch()
    put, delete = batch.put, batch.delete
    last_report = time.monotonic()
    first = True
    profiles, due = Family.PROFILES, Family.DUE
    profile_kind = Kind.PROFILE.value
    records = keys = 0
    for record in read(start):
        offset = record.offset()
        if first and offset > start:
            log.warning(
                "partition %d: changelog starts at %d, after this store's checkpoint %d "
                "(retention or DeleteRecords removed records it never saw)",
                partition,
                offset,
                start,
            )
        first = False
        records += 1
        key = record.key() or b""
        kind, ident = key[:1], key[1:]
        if kind == profile_kind:
            # The bulk of every changelog: its own branch (recovery speed is a target).
            header = decode_header(record.headers())
            if header is None:
                continue
            at, wake = header
            value = record.value()
            keys += 1
            if value is None:
                delete(profiles, ident)
            else:
                put(profiles, ident, value)
                if wake < NEVER:
                    put(due, due_key(wake, ident), b"")
            if at > position:
                ahead[ident] = at
        elif kind == Kind.OWNER.value:
            if offset >= fence:
                break
            if warm and ident != session.encode():
                raise _Foreign  # (this ownership's own records, from rewinds, are fine)
            continue
        else:
            header = decode_header(record.headers())
            family = FAMILY_OF.get(kind)
            if header is None or family is None:
                continue  # not a state record of this layout (e.g. a fence of an older version)
            value = record.value()
            keys += 1
            if value is None:
                delete(family, ident)
            else:
                put(family, ident, value)
            if family is Family.META and ident == Meta.POSITION.value and value is not None:
                position, stream_time = decode_position(value)
                if ahead:
                    for stale in [k for k, at in ahead.items() if at <= position]:
                        del ahead[stale]
        if len(batch) >= CHUNK:
            store.write(batch, logged=False)  # (see `restore`: flushed before it is done)
            batch = store.new_batch()
            put, delete = batch.put, batch.delete
            if on_progress is not None:
                on_progress(records)
            now = time.monotonic()
            if now - last_report >= PROGRESS_EVERY_S:
                last_report = now
                log.info(
                    "partition %d: restoring, %d changelog records read, at offset %d of %d",
                    partition,
                    records,
                    offset,
                    fence,
                )
    store.write(batch, logged=False)
    restored.records, restored.keys = records, keys
    if on_progress is not None:
        on_progress(records)
    restored.position = position if position >= 0 else None
    restored.stream_time_ms = stream_time
    return restored


def _int(value: bytes | None, default: int) -> int:
    return int(value) if value is not None else default


def profiles_in(records: Iterable[Record]) -> dict[bytes, bytes]:
    """Profile key -> latest stored state among changelog `records` (tombstones delete)."""
    profiles: dict[bytes, bytes] = {}
    for record in records:
        kind, ident = split_changelog_key(record.key() or b"")
        if kind != Kind.PROFILE.value or decode_header(record.headers()) is None:
            continue
        value = record.value()
        if value is None:
            profiles.pop(ident, None)
        else:
            profiles[ident] = value
    return profiles
