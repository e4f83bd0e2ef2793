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
| recent messageIds (dedup) | DEDUP_MAX_IDS: an id still inside the 24 h window pushed out by newer ones | `recent_ids` |
| timestamps of `performed ... between` | `conditions.MAX_KEPT_TIMESTAMPS`, the most recent: counts above it are capped | `between_timestamps` |
| timestamps of `performed ... times N within` | N + 1 (lossless), at most `conditions.MAX_KEPT_TIMESTAMPS` | `window_timestamps` |
| funnel instances (`sequence` with `match_on`) | `conditions.MAX_SEQUENCE_INSTANCES`, the most recently active | `sequence_instances` |
| events a funnel instance keeps to reorder late arrivals | `conditions.MAX_SEQUENCE_HISTORY` within the funnel's horizon: the oldest beyond are folded in early (a later-arriving event older than them is ignored); ~20 KB per funnel at both bounds | `sequence_history` |
| devices | `conditions.MAX_DEVICES`, the most recently seen | `devices` |
| `match_on` values and device ids as keys | longer than MAX_KEY_CHARS: stored as a digest (`bounded_key`) | (nothing lost) |
| computed traits | see `definitions/traits.py`: distinct values, value sizes, finite numbers | `distinct_values`, `computed_value_size`, `non_finite_number` |

The profile's size then depends only on the catalog: with one tracker of each
kind (tests/unit/test_hostile_input.py) a profile at every bound at once encodes
to ~225 KB, far below a changelog record's limit.

`UserState.dropped` is transient (never encoded): None until something is dropped
during a step (or `fold_history`); the runtime reads it after each and resets it to
None. A drop is counted each time it happens (a trait over the bound that every
event's `context.traits` carries is counted once per event).
"""

from __future__ import annotations

import hashlib
from typing import Any, final

import orjson

CODEC_VERSION = 3
READABLE_VERSIONS = (2, 3)
NEVER = 1 << 62  # "no deadline": larger than any epoch-ms time
DEDUP_WINDOW_MS = 24 * 3_600_000
DEDUP_MAX_IDS = 16

MAX_TRAITS = 200
MAX_TRAIT_NAME_BYTES = 128
MAX_TRAIT_VALUE_BYTES = 1024
SMALL_TRAIT_BYTES = 64
MAX_TRAITS_BYTES = 32 * 1024
MAX_ALIASES = 100
MAX_ALIAS_ID_BYTES = 128
MAX_KEY_CHARS = 40  # (a UUID has 36); a length test only: this is on the hot path
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
# Every reason `UserState.dropped` may hold (a bounded label set for the metric).
DROP_REASONS = (
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
)
_UNENCODABLE = 1 << 62


def json_size(value: Any) -> int:
    """Bytes of `value` as the codec writes it; beyond every bound if it cannot be written."""
    try:
        return len(orjson.dumps(value))
    except TypeError:  # (orjson.JSONEncodeError is one) ints beyond 64 bits, surrogates, ...
        return _UNENCODABLE


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
        "members",
        "merged_into",
        "recent_ids",
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
        self.recent_ids: list[int] = []  # flat [messageId hash, event seconds, ...] for dedup
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
        return orjson.dumps(self.to_json())

    def to_json(self) -> list[Any]:
        """The codec's JSON value (also carried by identity-merge records)."""
        return [
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
            self.recent_ids,
            self.catalog_fingerprint,
            self.computed,
            self.aliases,
            self.merged_into,
            self.generation,
            self.trait_times,
        ]

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
        state.recent_ids = fields[7]
        state.catalog_fingerprint = fields[8]
        if fields[0] >= 3:
            state.computed = fields[9]
            state.aliases = fields[10]
            state.merged_into = fields[11]
            state.generation = fields[12]
            state.trait_times = fields[13]
        state.refresh_wake()
        return state
