"""Per-user state and its compact, versioned codec.

A profile keeps only what the conditions need (Unomi-style): a tracker per
distinct event leaf (a count, the last N timestamps of a window, or funnel
instances), the latest identify traits, memberships and the next wake-up.
Trackers are keyed by a hash of what they track, so audiences sharing a leaf
share its state and an edit that keeps a leaf keeps its history.

Bounds (SPEC §11). Everything a producer sends is untrusted, so every part of a
profile that input can grow is bounded; what does not fit is dropped, the rest
of the event still counts, and each drop is reported in `UserState.dropped`
(reason -> count, for `audiences_state_dropped_total{what}`):

| part of the profile | bound | reason when dropped |
|---|---|---|
| traits (identify `traits`, any event's `context.traits`) | MAX_TRAITS top-level names: a new name beyond is not stored, known names still update | `traits` |
| | a new name longer than MAX_TRAIT_NAME_BYTES (JSON) is not stored | `trait_name_size` |
| | a value longer than MAX_TRAIT_VALUE_BYTES (JSON) is not stored: the old value stays | `trait_value_size` |
| | a value over SMALL_TRAIT_BYTES is stored only while all traits together stay within MAX_TRAITS_BYTES | `traits_size` |
| | a number the codec cannot write (NaN, infinity, an int beyond 64 bits) is not stored | `non_finite_number` |
| identity links (`aliases`) | MAX_ALIASES per profile (SPEC §11: at most 100 merges): a further link is refused, no merge is requested, the event is dead-lettered `merge_limit` (counted per event that carries it) | `aliases` |
| | a linked id longer than MAX_ALIAS_ID_BYTES (JSON) is refused | `alias_id_size` |
| messageIds counted (dedup, `SeenIds`) | the ids of the last 24 h of the profile's clock, at most DEDUP_MAX_IDS: beyond, the oldest id is forgotten (a copy of it would count again) | `recent_ids` |
| timestamps of `performed ... between` | `conditions.MAX_KEPT_TIMESTAMPS`, the most recent: counts above it are capped | `between_timestamps` |
| timestamps of `performed ... times N within` | N + 1 (lossless), at most `conditions.MAX_KEPT_TIMESTAMPS` (a calendar window too: kept N_days + 1 days) | `window_timestamps` |
| funnel instances (`sequence` with `match_on`) | `conditions.MAX_SEQUENCE_INSTANCES`, the most recently active | `sequence_instances` |
| events a funnel instance keeps to reorder late arrivals | `conditions.MAX_SEQUENCE_HISTORY` within the funnel's horizon: the oldest beyond are folded in early (a later-arriving event older than them is ignored); ~20 KB per funnel at both bounds | `sequence_history` |
| devices | `conditions.MAX_DEVICES`, the most recently seen | `devices` |
| `match_on` values and device ids as keys | longer than MAX_KEY_CHARS: stored as a digest (`bounded_key`) | (nothing lost) |
| account links of a user (`group` calls, account audiences only) | `accounts.MAX_GROUPS` accounts; a groupId longer than `accounts.MAX_GROUP_ID_BYTES` is not linked | `groups`, `group_id_size` |
| users an account's profile remembers | `evaluator.MAX_ACCOUNT_USERS` (linked or unlinked); a user id longer than MAX_ALIAS_ID_BYTES is not taken | `account_users` |
| computed traits | see `definitions/traits.py`: distinct values, value sizes, finite numbers; a calendar window keeps a bucket per local day with events, at most calendar_days + 1 | `distinct_values`, `computed_value_size`, `non_finite_number` |

The profile's size then depends only on the catalog: with one tracker of each
kind (tests/unit/test_hostile_input.py) a profile at every bound at once encodes
to ~257 KB (~14 KB of it the messageIds of the last 24 h), far below a changelog
record's limit.

`UserState.dropped` is transient (never encoded): None until something is dropped
during a step (or `fold_history`); the runtime reads it after each and resets it to
None. A drop is counted each time it happens (a trait over the bound that every
event's `context.traits` carries is counted once per event).
"""

from __future__ import annotations

import base64
import hashlib
import zlib
from typing import Any, Final, final

import orjson

CODEC_VERSION: Final = 4
READABLE_VERSIONS = (2, 3, 4)
# "No deadline": larger than any epoch-ms time, and the largest int compiled code keeps
# unboxed (mypyc's short ints end at 2**62 - 1: at 1 << 62, every comparison with it took
# the slow path). Stored deadlines of 1 << 62, from before, still read as none (`< NEVER`).
NEVER: Final = (1 << 62) - 1
DEDUP_WINDOW_MS: Final = 24 * 3_600_000
DEDUP_WINDOW_S: Final = DEDUP_WINDOW_MS // 1000
DEDUP_HOURS: Final = 24  # whole hours kept before the clock's (see `SeenIds`)
DEDUP_MAX_IDS: Final = 1024  # messageIds remembered per profile (10 KB in memory)
# Above FILTER_FROM_IDS ids, a lookup first reads two bits of a FILTER_BYTES filter
# (rebuilt after FILTER_REBUILD_AFTER ids): a new id scans the hashes only when both
# are set (~2% at the bound), so a lookup costs O(1), not a scan of up to 8 KB.
FILTER_FROM_IDS: Final = 64
FILTER_BYTES: Final = 4096
FILTER_REBUILD_AFTER: Final = 2 * DEDUP_MAX_IDS
_FILTER_MASK: Final = 8 * FILTER_BYTES - 1
_GOLDEN: Final = 0x9E3779B97F4A7C15  # Fibonacci hashing: the filter's bits depend on all 64

MAX_TRAITS: Final = 200
MAX_TRAIT_NAME_BYTES: Final = 128
MAX_TRAIT_VALUE_BYTES: Final = 1024
SMALL_TRAIT_BYTES: Final = 64
MAX_TRAITS_BYTES: Final = 32 * 1024
MAX_ALIASES: Final = 100
MAX_ALIAS_ID_BYTES: Final = 128
MAX_KEY_CHARS: Final = 40  # (a UUID has 36); a length test only: this is on the hot path
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
# Every reason `UserState.dropped` may hold (a bounded label set for the metric).
DROP_REASONS: Final = (
    "traits",
    "trait_name_size",
    "trait_value_size",
    "traits_size",
    "non_finite_number",
    "aliases",
    "alias_id_size",
    "recent_ids",
    "between_timestamps",
    "window_timestamps",
    "sequence_instances",
    "sequence_history",
    "devices",
    "distinct_values",
    "computed_value_size",
    "groups",
    "group_id_size",
    "account_users",
)
_UNENCODABLE: Final = 1 << 62


def json_size(value: Any) -> int:
    """Bytes of `value` as the codec writes it; beyond every bound if it cannot be written."""
    try:
        return len(orjson.dumps(value))
    except TypeError:  # (orjson.JSONEncodeError is one) ints beyond 64 bits, surrogates, ...
        return _UNENCODABLE


def right_sized(data: bytes) -> bytes:
    """`data` in an allocation of its own length. orjson (3.12 and later) returns its
    whole write buffer, at least 4 KB, whatever the JSON's length: an encoded profile
    kept until its checkpoint lands (~150 bytes for most) would hold 4 KB. The copy
    costs ~0.1 µs."""
    return memoryview(data).tobytes()


def string_fits(text: str, limit: int) -> bool:
    """Whether the JSON of `text` takes at most `limit` bytes (measured only when the
    length alone cannot tell: a character takes 1 to 6 bytes)."""
    length = len(text)
    if 6 * length + 2 <= limit:
        return True
    if length + 2 > limit:
        return False
    try:
        return len(orjson.dumps(text)) <= limit
    except TypeError:  # (lone surrogates)
        return False


def bounded_key(text: str) -> str:
    """`text` as a key of stored data: itself when it has at most MAX_KEY_CHARS
    characters, else a 128-bit digest (`#` + 32 hex digits), which keeps equal values
    equal and the state small."""
    if len(text) <= MAX_KEY_CHARS:
        return text
    data = text.encode("utf-8", "surrogatepass")
    return "#" + hashlib.blake2b(data, digest_size=16).hexdigest()


def message_hash(message_id: str) -> int:
    """The 64-bit hash `SeenIds` keeps of a messageId: CRC-32 and Adler-32 of its UTF-8
    (~0.3 µs; the hash the codec's version 3 kept)."""
    data = message_id.encode("utf-8", "surrogatepass")
    return zlib.crc32(data) | (zlib.adler32(data) << 32)


def _by_second(entry: tuple[bytes, int]) -> int:
    return entry[1]


@final
class SeenIds:
    """The messageIds a profile counted within the last 24 h, exactly (SPEC §2/§11: the
    same messageId for the same profile within 24 h counts once, however many other
    events came between).

    Time is the profile's clock in seconds (`latest_s`: the latest event time seen,
    duplicates included, see `advance`). An id counted at second c is a duplicate at
    second `latest_s` while c > latest_s - 86,400. Kept per id: its 64-bit hash
    (`message_hash`) packed in 8 bytes in `ids`, and the second it counted at as 2
    bytes in `seconds` (the second within its hour), oldest first, in groups by hour:
    `hours` is flat [hour, count, hour, count, ...], hours ascending (the clock never
    goes back, so a new id always joins the last group). Groups of hours more than
    DEDUP_HOURS before the current one hold only expired ids and are dropped. At most
    DEDUP_MAX_IDS ids are kept: beyond, the oldest is forgotten (a copy of it would
    count again) and `add` says so.

    Costs, per event O(1): up to FILTER_FROM_IDS ids a lookup is a `bytearray.find`
    over the packed hashes (C speed, at most 512 bytes); beyond, a bit filter answers
    for almost every new id (see FILTER_FROM_IDS); a duplicate is confirmed by the
    scan. Adding appends; expired hours are cut from the front. Memory: 10 bytes per
    id plus two ints per hour (plus the transient filter, FILTER_BYTES, for a profile
    with more than FILTER_FROM_IDS ids); encoded as [latest_s, hours, base64 of the
    hashes and seconds], ~13.3 bytes per id. False positives: two different ids of one profile
    with the same 64-bit hash within one window (at most ~DEDUP_MAX_IDS / 2^64 per
    event for ids that hash like random strings)."""

    __slots__ = ("filter", "filtered", "hours", "ids", "latest_s", "seconds", "tag")

    def __init__(
        self,
        latest_s: int = -1,
        hours: list[int] | None = None,
        ids: bytearray | None = None,
        seconds: bytearray | None = None,
        tag: str = "",
    ) -> None:
        self.latest_s = latest_s
        self.hours: list[int] = hours if hours is not None else []
        self.ids: bytearray = ids if ids is not None else bytearray()
        self.seconds: bytearray = seconds if seconds is not None else bytearray()
        self.tag = tag  # a backfill's memory: the run it belongs to (see `fold_history`)
        # Transient (never encoded): a bit filter in front of the scan, built once
        # FILTER_FROM_IDS ids are kept, and how many ids it took since it was built.
        self.filter: bytearray | None = None
        self.filtered = 0

    def __len__(self) -> int:
        return len(self.ids) >> 3

    def advance(self, now_ms: int) -> None:
        """Move the clock to `now_ms` if it is later, dropping the hours it leaves behind."""
        now_s = now_ms // 1000
        if now_s <= self.latest_s:
            return
        self.latest_s = now_s
        hours = self.hours
        floor = now_s // 3600 - DEDUP_HOURS
        if hours and hours[0] < floor:
            index = forgotten = 0
            while index < len(hours) and hours[index] < floor:
                forgotten += hours[index + 1]
                index += 2
            del hours[:index]
            del self.ids[: 8 * forgotten]
            del self.seconds[: 2 * forgotten]
            # (the filter keeps their bits: a false positive costs a scan, not a result)

    def remember(self, digest: int) -> int:
        """-1 if the id of hash `digest` was counted within 24 h of the clock (a
        duplicate: nothing changes); else it is remembered as counted now (at
        `latest_s`, after `advance`) and the result is how many ids within 24 h the
        bound forgot (0 or 1)."""
        data = digest.to_bytes(8, "little")
        ids = self.ids
        bits = self.filter
        if bits is None and len(ids) >= 8 * FILTER_FROM_IDS:
            bits = self._build_filter()
        if bits is None:
            if self._kept(data):
                return -1
        else:
            mixed = digest * _GOLDEN  # (CRC bits of similar ids are not independent)
            low = (mixed >> 64) & _FILTER_MASK
            high = (mixed >> 96) & _FILTER_MASK
            both = (bits[low >> 3] >> (low & 7)) & 1 and (bits[high >> 3] >> (high & 7)) & 1
            if both and self._kept(data):  # (scanned for ~2% of new ids: false positives)
                return -1
            bits[low >> 3] |= 1 << (low & 7)
            bits[high >> 3] |= 1 << (high & 7)
            self.filtered += 1
            if self.filtered > FILTER_REBUILD_AFTER:
                self.filter = None  # (full of forgotten ids: rebuilt when next needed)
        self._insert(data, self.latest_s)
        if len(ids) <= 8 * DEDUP_MAX_IDS:
            return 0
        hours, seconds = self.hours, self.seconds
        oldest = hours[0] * 3600 + (seconds[0] | (seconds[1] << 8))
        del ids[:8]
        del seconds[:2]
        hours[1] -= 1
        if not hours[1]:
            del hours[:2]
        return int(oldest > self.latest_s - DEDUP_WINDOW_S)  # (an expired id is no loss)

    def _kept(self, data: bytes) -> bool:
        """Whether the hash `data` (8 bytes) is kept and was counted within 24 h: a scan
        of the packed hashes (C speed) for a match at a multiple of 8 bytes."""
        ids = self.ids
        at = ids.find(data)
        while at >= 0:
            if at & 7:  # straddling two hashes: look further
                at = ids.find(data, at + 1)
                continue
            if self._second_of(at >> 3) > self.latest_s - DEDUP_WINDOW_S:
                return True
            at = ids.find(data, at + 8)  # expired (in the oldest hour): a later copy?
        return False

    def _build_filter(self) -> bytearray:
        """The bit filter of the ids kept (two bit positions from each hash, mixed)."""
        bits = bytearray(FILTER_BYTES)
        ids = self.ids
        for at in range(0, len(ids), 8):
            mixed = int.from_bytes(ids[at : at + 8], "little") * _GOLDEN
            low = (mixed >> 64) & _FILTER_MASK
            high = (mixed >> 96) & _FILTER_MASK
            bits[low >> 3] |= 1 << (low & 7)
            bits[high >> 3] |= 1 << (high & 7)
        self.filter = bits
        self.filtered = len(ids) >> 3
        return bits

    def _second_of(self, index: int) -> int:
        seconds = self.seconds
        within = seconds[2 * index] | (seconds[2 * index + 1] << 8)
        hours = self.hours
        for group in range(0, len(hours), 2):
            if index < hours[group + 1]:
                return hours[group] * 3600 + within
            index -= hours[group + 1]
        return -1

    def entries(self) -> list[tuple[bytes, int]]:
        """(digest, second counted) of every id kept, oldest first."""
        out: list[tuple[bytes, int]] = []
        ids = bytes(self.ids)
        seconds = self.seconds
        hours = self.hours
        index = 0
        for group in range(0, len(hours), 2):
            base = hours[group] * 3600
            for _ in range(hours[group + 1]):
                within = seconds[2 * index] | (seconds[2 * index + 1] << 8)
                out.append((ids[8 * index : 8 * index + 8], base + within))
                index += 1
        return out

    def union(self, other: SeenIds) -> int:
        """Add the ids of `other` (an id in both keeps its later second) and take the
        later clock; returns how many ids the bound forgot."""
        latest: dict[bytes, int] = {}
        for digest, second in self.entries() + other.entries():
            if latest.get(digest, -1) < second:
                latest[digest] = second
        now_s = max(self.latest_s, other.latest_s)
        horizon = now_s - DEDUP_WINDOW_S
        kept = sorted((e for e in latest.items() if e[1] > horizon), key=_by_second)
        forgotten = max(0, len(kept) - DEDUP_MAX_IDS)
        self.latest_s = now_s
        self.hours = []
        self.ids = bytearray()
        self.seconds = bytearray()
        self.filter = None
        for digest, second in kept[forgotten:]:
            self._insert(digest, second)
        return forgotten

    def _insert(self, digest: bytes, second: int) -> None:
        """Append an id counted at `second` (not before the last one kept)."""
        hour = second // 3600
        hours = self.hours
        if hours and hours[-2] == hour:
            hours[-1] += 1
        else:
            hours.append(hour)
            hours.append(1)
        self.ids.extend(digest)
        within = second - hour * 3600
        self.seconds.append(within & 0xFF)
        self.seconds.append(within >> 8)

    def to_json(self) -> list[Any]:
        if not self.ids:
            return []  # (nothing to compare with: the clock need not be kept)
        encoded = base64.b64encode(self.ids + self.seconds).decode("ascii")
        if self.tag:
            return [self.latest_s, self.hours, encoded, self.tag]
        return [self.latest_s, self.hours, encoded]

    @classmethod
    def from_json(cls, data: list[Any]) -> SeenIds:
        """Raises ValueError or TypeError on data that is not of this shape."""
        if not data:
            return cls()
        latest_s, hours = data[0], data[1]
        packed = base64.b64decode(data[2], validate=True)
        tag = data[3] if len(data) > 3 else ""
        if type(latest_s) is not int or type(hours) is not list or len(hours) & 1:
            raise ValueError("malformed messageId memory")
        count = sum(hours[1::2])
        if 10 * count != len(packed) or type(tag) is not str:
            raise ValueError("malformed messageId memory")
        ids = bytearray(packed[: 8 * count])
        return cls(latest_s, hours, ids, bytearray(packed[8 * count :]), tag)

    @classmethod
    def from_legacy(cls, flat: list[int], clock_ms: int) -> SeenIds:
        """The codec's versions 2 and 3 kept the last 16 ids as [hash, event seconds, ...]:
        each counts from its event time, those still within 24 h of `clock_ms`."""
        seen = cls()
        pairs = sorted(zip(flat[0::2], flat[1::2], strict=False), key=_second)
        for digest, second in pairs:
            seen.advance(second * 1000)
            seen.remember(digest)
        seen.advance(clock_ms)
        return seen


def _second(pair: tuple[int, int]) -> int:
    return pair[1]


@final
class Membership:
    """One audience's membership of one user."""

    __slots__ = ("member", "seq", "since_ms", "wake_ms")

    def __init__(
        self, member: bool = False, since_ms: int = 0, seq: int = 0, wake_ms: int = NEVER
    ) -> None:
        self.member = member
        self.since_ms = since_ms
        self.seq = seq  # transitions emitted so far: part of the deterministic messageId
        self.wake_ms = wake_ms  # next time this audience may change with no input

    def encode(self) -> list[int]:
        return [
            int(self.member),
            self.since_ms,
            self.seq,
            0 if self.wake_ms == NEVER else self.wake_ms,
        ]

    @classmethod
    def decode(cls, data: list[int]) -> Membership:
        return cls(bool(data[0]), data[1], data[2], data[3] or NEVER)


@final
class UserState:
    """Everything the evaluator keeps about one profile."""

    __slots__ = (
        "aliases",
        "anonymous",
        "catalog_fingerprint",
        "clock_ms",
        "computed",
        "dropped",
        "generation",
        "history_seen",
        "members",
        "merged_into",
        "profile_key",
        "seen",
        "trackers",
        "trait_times",
        "traits",
        "traits_at_ms",
        "wake_ms",
    )

    def __init__(self, anonymous: bool = False) -> None:
        self.anonymous = anonymous
        self.clock_ms = 0  # the profile's own clock: latest event or deadline applied
        self.traits: dict[str, Any] = {}
        self.traits_at_ms = 0
        self.trait_times: dict[str, int] = {}  # per trait: time of the value (for merges)
        self.trackers: dict[str, Any] = {}
        self.members: dict[str, Membership] = {}
        self.seen = SeenIds()  # messageIds counted within 24 h (duplicates are dropped)
        # While a backfill folds history (`fold_history`): the ids it folded within 24 h
        # of its own history clock; dropped when the full catalog is adopted.
        self.history_seen: SeenIds | None = None
        self.catalog_fingerprint = ""
        self.wake_ms = NEVER  # earliest time any audience or trait may change without input
        self.computed: dict[str, list[Any]] = {}  # trait key -> [value, seq, wake_ms (0=never)]
        # Identity: anonymous ids linked to this user (0 = merge requested, 1 = merged);
        # on an anonymous profile that was merged, the user it now forwards to.
        self.aliases: dict[str, int] = {}
        self.merged_into: str | None = None
        # Set when a deleted profile is unsuppressed: part of the messageIds of the new
        # life, so they never repeat those of the deleted one.
        self.generation = 0
        # Transient, never encoded: what bounds dropped since the runtime last reset it
        # (reason -> count, reasons from DROP_REASONS); None when nothing was dropped.
        self.dropped: dict[str, int] | None = None
        # Transient, never encoded: the key of the profile being judged (its userId, or
        # anonymousId), set by `evaluator._evaluate` (and explain) for `random_bucket`.
        self.profile_key = ""

    def drop(self, reason: str, count: int = 1) -> None:
        """Count something a bound kept out of the profile (see the module docstring)."""
        dropped = self.dropped
        if dropped is None:
            self.dropped = {reason: count}
        else:
            dropped[reason] = dropped.get(reason, 0) + count

    def refresh_wake(
        self,
        frozen_audiences: frozenset[str] = frozenset(),
        frozen_traits: frozenset[str] = frozenset(),
    ) -> None:
        """The earliest wake of any audience or trait, but those frozen (not judged while
        a backfill is pending, see `Catalog.with_pending`)."""
        if frozen_audiences or frozen_traits:
            wake = min(
                (m.wake_ms for k, m in self.members.items() if k not in frozen_audiences),
                default=NEVER,
            )
            for key, (_value, _seq, trait_wake) in self.computed.items():
                if trait_wake and trait_wake < wake and key not in frozen_traits:
                    wake = trait_wake
            self.wake_ms = wake
            return
        wake = min((m.wake_ms for m in self.members.values()), default=NEVER)
        for _value, _seq, trait_wake in self.computed.values():
            if trait_wake and trait_wake < wake:
                wake = trait_wake
        self.wake_ms = wake

    def encode(self) -> bytes:
        return right_sized(orjson.dumps(self.to_json()))

    def to_json(self) -> list[Any]:
        """The codec's JSON value (also carried by identity-merge records)."""
        fields = [
            CODEC_VERSION,
            int(self.anonymous),
            self.clock_ms,
            self.traits,
            self.traits_at_ms,
            self.trackers,
            {  # (Membership.encode, inlined: one call less per audience)
                k: [int(m.member), m.since_ms, m.seq, 0 if m.wake_ms == NEVER else m.wake_ms]
                for k, m in self.members.items()
            },
            self.seen.to_json(),
            self.catalog_fingerprint,
            self.computed,
            self.aliases,
            self.merged_into,
            self.generation,
            self.trait_times,
        ]
        if self.history_seen is not None:
            fields.append(self.history_seen.to_json())
        return fields

    @classmethod
    def decode(cls, data: bytes) -> UserState:
        return cls.from_json(orjson.loads(data))

    @classmethod
    def from_json(cls, fields: list[Any]) -> UserState:
        if fields[0] not in READABLE_VERSIONS:
            raise ValueError(f"unknown state codec version {fields[0]}")
        state = cls(bool(fields[1]))
        state.clock_ms = fields[2]
        state.traits = fields[3]
        state.traits_at_ms = fields[4]
        state.trackers = fields[5]
        state.members = {
            k: Membership(bool(v[0]), v[1], v[2], v[3] or NEVER) for k, v in fields[6].items()
        }
        state.catalog_fingerprint = fields[8]
        if fields[0] >= 3:
            state.computed = fields[9]
            state.aliases = fields[10]
            state.merged_into = fields[11]
            state.generation = fields[12]
            state.trait_times = fields[13]
        if fields[0] >= 4:
            state.seen = SeenIds.from_json(fields[7])
            if len(fields) > 14:
                state.history_seen = SeenIds.from_json(fields[14])
        else:
            state.seen = SeenIds.from_legacy(fields[7], state.clock_ms)
        state.refresh_wake()
        return state
