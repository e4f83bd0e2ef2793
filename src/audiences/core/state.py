"""Per-user state and its compact, versioned codec.

A profile keeps only what the conditions need (Unomi-style): a tracker per
distinct event leaf (a count, the last N timestamps of a window, or funnel
instances), the latest identify traits, memberships and the next wake-up.
Trackers are keyed by a hash of what they track, so audiences sharing a leaf
share its state and an edit that keeps a leaf keeps its history.
"""

from __future__ import annotations

from typing import Any

import orjson

CODEC_VERSION = 3
READABLE_VERSIONS = (2, 3)
NEVER = 1 << 62  # "no deadline": larger than any epoch-ms time
DEDUP_WINDOW_MS = 24 * 3_600_000
DEDUP_MAX_IDS = 16


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
        self.dropped: dict[str, int] | None = None  # TEMP(core-hardening) transient

    def refresh_wake(self) -> None:
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
            {k: m.encode() for k, m in self.members.items()},
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
        state.members = {k: Membership.decode(v) for k, v in fields[6].items()}
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
