"""One owned `events` partition: its store, decoded profiles, and what changed since the
last checkpoint.

Profiles are changed only through `PartitionState.apply`, which runs `step` (or
a history fold) and either records the result — the profile becomes *dirty*,
the input goes into its *journal* — or, when anything raises, puts the profile
back exactly as it was before that input: its durable state (the store) with
the journal replayed. `step` mutates the state it is given; this rollback is
what makes its result atomic for the runtime, at no cost on the happy path.

A profile whose durable state cannot be decoded, or whose deadline or
re-judging fails, is *quarantined*: its events go to the DLQ (reason
`profile_quarantined`) and its deadlines are dropped, until the user is
deleted. Everything else about a failing input is the caller's business
(dead-lettering it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, final

import orjson

from audiences.adapters import metrics
from audiences.adapters.state.history import History
from audiences.adapters.state.layout import (
    NEVER,
    Family,
    Header,
    Kind,
    Meta,
    changelog_key,
    due_key,
    split_due_key,
)
from audiences.adapters.state.store import Batch, StateStore
from audiences.core.definitions import Catalog
from audiences.core.evaluator import StepResult, Tick, Transition, fold_history, step
from audiences.core.events import Event, parse_event
from audiences.core.state import UserState

log = logging.getLogger(__name__)
# A test's stand-in for the core's `step` (to simulate a bug in the core); None: `step`
# itself. Compiled in one group with the core, a call to `step` is a direct C call that
# no patch reaches; this module global is looked up at each call instead (cheaper than
# calling through it: ~500 instructions per event).
step_override: Callable[[UserState | None, Event | Tick, Catalog, str], StepResult] | None = None
# Likewise a test's stand-in for `UserState.encode` at a checkpoint (an unencodable profile).
encode_override: Callable[[UserState], bytes] | None = None
RECENT_TIMES = 256  # event times the stream time is a low percentile of
MAX_STATE_BYTES = 900_000  # a changelog record stays under Kafka's 1 MB message limit
ChangelogRecord = tuple[bytes, bytes | None, Header]  # (key, value, header)


@dataclass(frozen=True, slots=True)
class Fold:
    """A past event folded into backfilled trackers only (see stream/backfill.py)."""

    event: Event
    trackers: frozenset[str]


Input = Event | Tick | Fold


@final
class Recorded:
    """An event in the journal as the Kafka record it was parsed from. An interval holds
    up to `MAX_UNCOMMITTED` inputs, in flight and current together: as records they
    cost one object each instead of the parsed event's ~18, and are parsed again
    (the same `Event`: `parse_event` is deterministic) only when their profile is
    rolled back or its inputs are asked for."""

    __slots__ = ("record_ms", "value")

    def __init__(self, value: bytes, record_ms: int) -> None:
        self.value = value
        self.record_ms = record_ms

    def event(self) -> Event:
        return parse_event(self.value, self.record_ms)


Journaled = Input | Recorded


@dataclass(slots=True)
class Quarantine:
    reason: str
    at_ms: int
    state: bytes | None  # the durable state as it was, when it could be kept

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "reason": self.reason,
                "at_ms": self.at_ms,
                # The state, for inspection, when it fits in a changelog record.
                "state": self.state.decode("utf-8", "replace")
                if self.state and len(self.state) < 256_000
                else None,
            }
        )


@dataclass(slots=True)
class Sealed:
    """One interval handed to the durability thread (see state/checkpoint.py): what it
    changed, as the loop left it at the seal, until it is durable (`landed`) or given
    back (`unseal`). Its encoded profiles are the durable base for rollbacks and loads
    while it is in flight."""

    position: int
    stream_time_ms: int
    encoded: dict[bytes, bytes | None]  # profile -> its record value (None = erased)
    dirty: dict[bytes, UserState | None]
    journal: list[tuple[bytes, Journaled, Catalog]]
    durable_wakes: dict[bytes, int]
    suppression_changes: dict[bytes, bool]
    quarantine_changes: dict[bytes, Quarantine | None]
    stale_due: list[bytes]
    meta_changes: dict[Meta, bytes]
    earliest_due: int  # the earliest deadline it puts in the index (NEVER: none)


@dataclass
class Counts:
    """Members per audience and profiles stored in one partition (for metrics and the API)."""

    sizes: dict[str, int] = field(default_factory=dict)
    users: int = 0

    def encode(self) -> bytes:
        return orjson.dumps({"sizes": self.sizes, "users": self.users})

    @classmethod
    def decode(cls, data: bytes) -> Counts:
        value = orjson.loads(data)
        return cls(dict(value["sizes"]), int(value["users"]))


class PartitionState:
    """Everything the runtime holds for one owned partition (owned by the runtime thread)."""

    def __init__(
        self,
        number: int,
        store: StateStore,
        *,
        position: int,
        stream_time_ms: int,
        catalog: Catalog,
        cache_limit: int,
        ahead: dict[bytes, int] | None = None,
    ) -> None:
        self.number = number
        self.store = store
        self.session = ""  # the ownership this state belongs to (its owner record's id)
        self.position = position  # next input offset to evaluate (in memory)
        self.committed = position  # position of the last durable checkpoint
        # The partition's clock while it catches up (see `observe`); checkpointed.
        self.stream_time_ms = stream_time_ms
        self.committed_stream_time_ms = stream_time_ms
        self._recent_times: list[int] = []  # event times of the last RECENT_TIMES events
        self._recent_next = 0
        self._times_dirty = False
        self.catalog = catalog  # the full catalog, or a pending variant while backfilling
        self.cache_limit = cache_limit
        # Profiles whose durable state already reflects input up to an offset beyond
        # `position` (a checkpoint cut short: see recovery.py): their input below it is
        # skipped. Emptied once the position passes them.
        self.ahead: dict[bytes, int] = ahead or {}
        self.cache: dict[bytes, UserState] = {}
        # Changed since the last checkpoint:
        self.dirty: dict[bytes, UserState | None] = {}  # None = erased
        # (profile, input, catalog it was applied with), in order; read only on rollback
        self.journal: list[tuple[bytes, Journaled, Catalog]] = []
        self.durable_wakes: dict[bytes, int] = {}  # wake of each dirty profile when durable
        self.suppression_changes: dict[bytes, bool] = {}
        self.quarantine_changes: dict[bytes, Quarantine | None] = {}
        self.stale_due: list[bytes] = []  # due-index keys to delete at the checkpoint
        self.meta_changes: dict[Meta, bytes] = {}
        # The deadline index (see `due`): no live entry visible in the store has a wake
        # below `due_from` (0: not looked yet; NEVER: none). Entries of the interval in
        # flight join it when it lands (`Sealed.earliest_due`).
        self.due_from = 0
        self._due_encoded = NEVER  # earliest wake the last ENCODE put in the index
        # The previous interval while the durability thread makes it durable (one deep).
        self.inflight: Sealed | None = None
        # Loaded from the store:
        self.suppressed: set[bytes] = {k for k, _ in store.scan(Family.SUPPRESSED)}
        self.quarantined: set[bytes] = {k for k, _ in store.scan(Family.QUARANTINE)}
        counts = store.get(Family.META, Meta.COUNTS.value)
        self.counts = Counts.decode(counts) if counts is not None else Counts()
        self.counts_written = counts or b""  # the counts the changelog holds
        trackers = store.get(Family.META, Meta.TRACKERS.value)
        self.complete_trackers: set[str] | None = (
            set(orjson.loads(trackers)) if trackers is not None else None
        )
        judged = store.get(Family.META, Meta.JUDGED.value)
        self.judged = judged.decode() if judged is not None else ""
        self.rejudge_from: bytes | None = None  # next profile key to re-judge, None = done
        self.backfill: Any = None  # stream.backfill.Backfill while one runs
        self.dropped: dict[str, int] = {}  # bounded-state drops, flushed to metrics
        self.history = History(store)  # entered/exited per audience and minute

    # -- reading ---------------------------------------------------------------------------

    def load(self, keys: Iterable[bytes], now_ms: int) -> dict[bytes, UserState]:
        """Decoded profiles of `keys` that exist (cache, then one multi-get). A stored
        profile that cannot be decoded is quarantined and left out."""
        cache = self.cache
        states: dict[bytes, UserState] = {}
        missing: list[bytes] = []
        inflight = self.inflight.encoded if self.inflight is not None else None
        for key in keys:
            state = cache.get(key)
            if state is not None:
                states[key] = state
            elif key in self.dirty:
                continue  # (a dirty None: erased in this interval)
            elif inflight is not None and key in inflight:
                data = inflight[key]  # newer than the store until the checkpoint lands
                if data is not None:
                    states[key] = cache[key] = UserState.decode(data)
            else:
                missing.append(key)
        if missing:
            for key, data in zip(
                missing, self.store.get_many(Family.PROFILES, missing), strict=True
            ):
                if data is None:
                    continue
                try:
                    state = UserState.decode(data)
                except Exception as exc:  # any decoding failure: quarantine
                    self.quarantine(key, f"undecodable_state: {exc!r}", now_ms, data)
                    continue
                states[key] = cache[key] = state
        return states

    def durable_state(self, key: bytes) -> UserState | None:
        """The profile as the last checkpoint left it (a fresh object)."""
        data = self.store.get(Family.PROFILES, key)
        return UserState.decode(data) if data is not None else None

    def _durable_base(self, key: bytes) -> UserState | None:
        """The profile as it will be once everything sealed is durable (a fresh object)."""
        if self.inflight is not None and key in self.inflight.encoded:
            data = self.inflight.encoded[key]
            return UserState.decode(data) if data is not None else None
        return self.durable_state(key)

    def is_blocked(self, key: bytes) -> bool:
        return key in self.suppressed or key in self.quarantined

    def stored_profiles(
        self, start: bytes, limit: int
    ) -> tuple[list[tuple[bytes, bytes]], bytes | None]:
        """Up to `limit` stored (key, encoded state) from `start` on in key order, and the
        key to continue from (None: none left)."""
        rows = self.store.scan(Family.PROFILES, start, limit=limit + 1)
        return rows[:limit], rows[limit][0] if len(rows) > limit else None

    def due(self, until_ms: int, limit: int) -> list[tuple[int, bytes]]:
        """Up to `limit` (wake_ms, profile key) of the deadline index, due by `until_ms`,
        from `due_from` on: the entries of deadlines fired before are deleted, and a
        RocksDB seek from the start of the index would step over every delete not yet
        compacted away (thousands a second under live traffic). Every entry returned is
        fired or dropped by the caller, so `due_from` moves past them, to the next entry
        (which says when the next sweep has work)."""
        if self.due_from > until_ms:
            return []  # (nothing visible is due: no seek)
        start = due_key(self.due_from, b"")
        rows = self.store.scan(Family.DUE, start, due_key(until_ms + 1, b""), limit=limit)
        if len(rows) == limit:  # more may be due: go on from the last wake
            self.due_from = split_due_key(rows[-1][0])[0]
        else:
            after = self.store.scan(Family.DUE, due_key(until_ms + 1, b""), limit=1)
            self.due_from = split_due_key(after[0][0])[0] if after else NEVER
        return [split_due_key(entry) for entry, _ in rows]

    def drop_due(self, wake_ms: int, key: bytes) -> None:
        """Remove a deadline-index entry at the next checkpoint."""
        self.stale_due.append(due_key(wake_ms, key))

    def record_trackers(self, trackers: set[str]) -> None:
        """Trackers whose whole retained history this partition holds."""
        self.complete_trackers = trackers
        self.set_meta(Meta.TRACKERS, orjson.dumps(sorted(trackers)))

    def record_judged(self, fingerprint: str) -> None:
        """Every stored profile was judged on the catalog with this fingerprint."""
        self.judged = fingerprint
        self.set_meta(Meta.JUDGED, fingerprint.encode())

    def recount(self) -> None:
        """Count profiles and members from the store (after a cut-short checkpoint)."""
        sizes: dict[str, int] = {}
        users = 0
        start: bytes | None = b""
        while start is not None:
            rows, start = self.stored_profiles(start, 5000)
            for _key, data in rows:
                try:
                    state = UserState.decode(data)
                except Exception:  # quarantined at its next use
                    continue
                users += 1
                for audience, membership in state.members.items():
                    if membership.member:
                        sizes[audience] = sizes.get(audience, 0) + 1
        self.counts = Counts(sizes, users)

    def check_events_topic(self, topic_id: str | None) -> bool:
        """Record the `events` topic id this state reads; False if it read another one
        (the topic was recreated: its offsets mean nothing for this state)."""
        known = self.store.get(Family.META, Meta.EVENTS_TOPIC_ID.value)
        if topic_id:
            self.set_meta(Meta.EVENTS_TOPIC_ID, topic_id.encode())
        return not (topic_id and known is not None and known.decode() != topic_id)

    # -- changing --------------------------------------------------------------------------

    def apply(
        self,
        key: bytes,
        state: UserState | None,
        item: Input,
        profile_key: str,
        accept: Callable[[StepResult], Any] | None = None,
        recorded: Recorded | None = None,
    ) -> StepResult | None:
        """Fold `item` into the profile `key` (currently `state`) atomically.

        `accept(result)` runs before the result is recorded (e.g. rendering outputs): if
        it or `step` raises, the profile is rolled back and the exception propagates.
        `recorded`: the record `item` was parsed from, journaled in its place.
        For a `Fold`, the result is None when nothing changed."""
        durable_wake = state.wake_ms if state is not None else NEVER
        try:
            if isinstance(item, Fold):
                assert state is not None
                if not fold_history(state, item.event, self.catalog, item.trackers):
                    self._count_drops(state)
                    return None
                result = StepResult(state, [], state.wake_ms, False)
            else:
                override = step_override
                if override is None:
                    result = step(state, item, self.catalog, profile_key)
                else:
                    result = override(state, item, self.catalog, profile_key)
            if accept is not None:
                accept(result)
        except Exception:
            self.rollback(key, profile_key)
            raise
        if key not in self.dirty:
            self.durable_wakes[key] = durable_wake
        self.journal.append((key, item if recorded is None else recorded, self.catalog))
        if isinstance(item, Event) and item.type == "unsuppress":
            self.suppress(key, False)
        if result.erase:
            self.dirty[key] = None
            self.cache.pop(key, None)
            if state is not None:
                self.counts.users -= 1
            self.suppress(key, True)
            if key in self.quarantined:  # deleting a user lifts its quarantine
                self.quarantined.discard(key)
                self.quarantine_changes[key] = None
        else:
            if state is None:
                self.counts.users += 1
            self.dirty[key] = self.cache[key] = result.state
        for output in result.transitions:
            if isinstance(output, Transition):
                self.count_transition(output.audience_key, output.entered)
                self.history.count(output.audience_key, output.at_ms, output.entered)
        self._count_drops(result.state)
        return result

    def _count_drops(self, state: UserState) -> None:
        """Move what bounding the profile dropped to the partition's counters (metrics)."""
        dropped = state.dropped
        if dropped:
            for what, count in dropped.items():
                self.dropped[what] = self.dropped.get(what, 0) + count
            state.dropped = None

    def rollback(self, key: bytes, profile_key: str) -> None:
        """Put profile `key` back as it was before the input being applied: its durable
        state with this interval's journal replayed (outputs discarded: they were
        emitted when the inputs were first applied, and `step` is deterministic)."""
        self.cache.pop(key, None)
        try:
            state = self._durable_base(key)
            for owner, journaled, catalog in self.journal:
                if owner != key:
                    continue
                item = journaled.event() if isinstance(journaled, Recorded) else journaled
                if isinstance(item, Fold):
                    if state is not None:
                        fold_history(state, item.event, catalog, item.trackers)
                    continue
                override = step_override
                if override is None:
                    result = step(state, item, catalog, profile_key)
                else:
                    result = override(state, item, catalog, profile_key)
                state = None if result.erase else result.state
        except Exception as exc:  # the journal replayed before: cannot happen
            log.exception("partition %d: a profile could not be rolled back", self.number)
            self.quarantine(key, f"rollback_failed: {exc!r}", 0, None)
            return
        if state is not None:
            state.dropped = None
            self.cache[key] = state
            if key in self.dirty:
                self.dirty[key] = state

    def forget(self, key: bytes) -> None:
        """Nothing worth writing changed for `key` in this interval (re-judging found
        the same memberships): do not checkpoint it."""
        self.dirty.pop(key, None)
        self._forget_inputs(key)
        self.durable_wakes.pop(key, None)

    def inputs_of(self, key: bytes) -> list[Input]:
        """The inputs applied to profile `key` since the last checkpoint, in order."""
        return [
            item.event() if isinstance(item, Recorded) else item
            for owner, item, _catalog in self.journal
            if owner == key
        ]

    def _forget_inputs(self, key: bytes) -> None:
        if any(entry[0] == key for entry in self.journal):
            self.journal = [entry for entry in self.journal if entry[0] != key]

    def suppress(self, key: bytes, on: bool) -> None:
        if on:
            self.suppressed.add(key)
        else:
            self.suppressed.discard(key)
        self.suppression_changes[key] = on

    def quarantine(self, key: bytes, reason: str, at_ms: int, data: bytes | None) -> None:
        """Stop evaluating profile `key`: its durable state stays as it is."""
        log.error(
            "partition %d: profile quarantined (%s); its events go to the DLQ until the user "
            "is deleted",
            self.number,
            reason,
        )
        metrics.PROFILES_QUARANTINED.labels(reason.split(":")[0]).inc()
        self.quarantined.add(key)
        self.cache.pop(key, None)
        if key in self.dirty:  # nothing of this interval is kept for it
            del self.dirty[key]
            self._forget_inputs(key)
            self.durable_wakes.pop(key, None)
        if data is None:
            data = self.store.get(Family.PROFILES, key)
        self.quarantine_changes[key] = Quarantine(reason.split(":")[0], at_ms, data)

    def set_meta(self, name: Meta, value: bytes) -> None:
        self.meta_changes[name] = value

    def count_transition(self, audience: str, entered: bool) -> None:
        sizes = self.counts.sizes
        sizes[audience] = sizes.get(audience, 0) + (1 if entered else -1)

    # -- checkpoints -----------------------------------------------------------------------

    @property
    def changed(self) -> bool:
        sealed = self.inflight
        return bool(
            self.dirty
            or self.suppression_changes
            or self.quarantine_changes
            or self.meta_changes
            or self.stale_due
            or self.position != (sealed.position if sealed else self.committed)
            or self.stream_time_ms
            != (sealed.stream_time_ms if sealed else self.committed_stream_time_ms)
        )

    def encode_interval(
        self,
    ) -> tuple[list[ChangelogRecord], Batch, dict[bytes, bytes | None]]:
        """Changelog records, the store batch and the encoded profiles of the interval (the
        checkpoint's ENCODE step, on the loop thread)."""
        records: list[ChangelogRecord] = []
        batch = self.store.new_batch()
        profiles: dict[bytes, bytes | None] = {}
        position = self.position
        due_encoded = NEVER
        for key in list(self.dirty):
            state = self.dirty.get(key, ...)
            if state is ...:
                continue  # quarantined meanwhile
            value: bytes | None = None
            wake = NEVER
            if state is not None:
                try:
                    encode = encode_override
                    value = state.encode() if encode is None else encode(state)
                    if len(value) > MAX_STATE_BYTES:
                        raise ValueError(f"{len(value)} bytes > {MAX_STATE_BYTES}")
                except Exception as exc:  # any encoding failure: quarantine
                    self.quarantine(key, f"unencodable_state: {exc}", state.clock_ms, None)
                    continue
                wake = state.wake_ms
            records.append((changelog_key(Kind.PROFILE, key), value, Header(position, wake)))
            profiles[key] = value
            if value is None:
                batch.delete(Family.PROFILES, key)
            else:
                batch.put(Family.PROFILES, key, value)
            old = self.durable_wakes.get(key, NEVER)
            if old != wake or value is None:
                if old < NEVER:
                    batch.delete(Family.DUE, due_key(old, key))
                if wake < NEVER and value is not None:
                    batch.put(Family.DUE, due_key(wake, key), b"")
                    if wake < due_encoded:
                        due_encoded = wake
        for key, on in self.suppression_changes.items():
            marker = b"1" if on else None
            records.append((changelog_key(Kind.SUPPRESSED, key), marker, Header(position, NEVER)))
            if on:
                batch.put(Family.SUPPRESSED, key, b"")
            else:
                batch.delete(Family.SUPPRESSED, key)
        for key, quarantine in self.quarantine_changes.items():
            value = quarantine.encode() if quarantine is not None else None
            records.append((changelog_key(Kind.QUARANTINE, key), value, Header(position, NEVER)))
            if value is None:
                batch.delete(Family.QUARANTINE, key)
            else:
                batch.put(Family.QUARANTINE, key, value)  # (its deadlines: dropped by the sweep)
        for stale in self.stale_due:
            batch.delete(Family.DUE, stale)
        self._due_encoded = due_encoded
        for bucket, value in self.history.seal(self.clock_ms()):
            records.append((changelog_key(Kind.HISTORY, bucket), value, Header(position, NEVER)))
            if value is None:
                batch.delete(Family.HISTORY, bucket)
            else:
                batch.put(Family.HISTORY, bucket, value)
        counts = self.counts.encode()
        if counts != self.counts_written:
            self.meta_changes[Meta.COUNTS] = counts
            self.counts_written = counts
        # The position goes last: on a broker without read_committed, its record landing
        # means every earlier record of this checkpoint landed (one producer, in order).
        self.meta_changes.pop(Meta.POSITION, None)
        self.meta_changes[Meta.POSITION] = self.position_record()
        for name, value in self.meta_changes.items():
            records.append((changelog_key(Kind.META, name.value), value, Header(position, NEVER)))
            batch.put(Family.META, name.value, value)
        return records, batch, profiles

    def seal(self, encoded: dict[bytes, bytes | None]) -> None:
        """Hand the interval over to the durability thread (`encoded`: its profiles as
        the checkpoint writes them) and start a new one."""
        assert self.inflight is None, "one checkpoint in flight at a time"
        self.inflight = Sealed(
            self.position,
            self.stream_time_ms,
            encoded,
            self.dirty,
            self.journal,
            self.durable_wakes,
            self.suppression_changes,
            self.quarantine_changes,
            self.stale_due,
            self.meta_changes,
            self._due_encoded,
        )
        self._due_encoded = NEVER
        self.dirty = {}
        self.journal = []
        self.durable_wakes = {}
        self.suppression_changes = {}
        self.quarantine_changes = {}
        self.stale_due = []
        self.meta_changes = {}

    def landed(self) -> None:
        """The sealed interval is durable: forget it, keep the cache within its limit."""
        sealed = self.inflight
        assert sealed is not None
        self.inflight = None
        self.committed = sealed.position
        self.committed_stream_time_ms = sealed.stream_time_ms
        if sealed.earliest_due < self.due_from:  # its deadlines are in the index now
            self.due_from = sealed.earliest_due
        if self.ahead and self.committed >= max(self.ahead.values()):
            self.ahead.clear()
        self.history.landed()
        cache = self.cache
        excess = len(cache) - self.cache_limit
        if excess > 0:
            excess += self.cache_limit // 10
            dirty = self.dirty  # changed since the seal: only the cache holds them
            # (a loop, not `islice` over a generator: compiled, mypyc turns the generator
            # into a list of every key of the cache, ~1,000 instructions per event)
            evicted: list[bytes] = []
            for key in cache:
                if key not in dirty:
                    evicted.append(key)
                    if len(evicted) == excess:
                        break
            for key in evicted:
                del cache[key]

    def unseal(self) -> None:
        """The sealed interval did not become durable, and this partition is kept (another
        partition's checkpoint failed after every output was acknowledged): fold it back
        into the current interval, so that the next checkpoint writes both."""
        sealed = self.inflight
        assert sealed is not None
        self.inflight = None  # (its deadlines were not written: encoded again)
        sealed.dirty.update(self.dirty)
        self.dirty = sealed.dirty
        self.journal = sealed.journal + self.journal
        self.durable_wakes.update(sealed.durable_wakes)  # the sealed ones are older
        sealed.suppression_changes.update(self.suppression_changes)
        self.suppression_changes = sealed.suppression_changes
        sealed.quarantine_changes.update(self.quarantine_changes)
        self.quarantine_changes = sealed.quarantine_changes
        self.stale_due = sealed.stale_due + self.stale_due
        sealed.meta_changes.update(self.meta_changes)
        self.meta_changes = sealed.meta_changes
        self.counts_written = b""  # write the counts again
        self.history.unseal()

    def observe(self, event_time_ms: int) -> None:
        """Note an evaluated event's time; the stream time follows the recent ones.

        The stream time is a low percentile of the last RECENT_TIMES event times, never
        decreasing: deadlines fired on it can only be late, never ahead of an event still
        to come in the log — so one event stamped hours ahead of the others (a skewed
        clock, a hostile producer) cannot make every other profile's windows close
        before their own next events, while a backlog in time order still fires
        deadlines as it goes (a deadline fired later is still fired at its own time)."""
        recent = self._recent_times
        if len(recent) < RECENT_TIMES:
            recent.append(event_time_ms)
        else:
            recent[self._recent_next] = event_time_ms
            self._recent_next = (self._recent_next + 1) % RECENT_TIMES
        self._times_dirty = True

    def clock_ms(self) -> int:
        """The stream time (see `observe`)."""
        if self._times_dirty and self._recent_times:
            self._times_dirty = False
            ordered = sorted(self._recent_times)
            low = ordered[len(ordered) // 10]
            if low > self.stream_time_ms:
                self.stream_time_ms = low
        return self.stream_time_ms

    def position_record(self) -> bytes:
        return orjson.dumps({"offset": self.position, "stream_time": self.clock_ms()})


def decode_position(data: bytes) -> tuple[int, int]:
    value = orjson.loads(data)
    return int(value["offset"]), int(value["stream_time"])
