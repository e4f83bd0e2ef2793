"""Where the engine keeps what: every namespace, key and header of a partition's state.

Nothing outside `adapters/state/` knows a key prefix. Untrusted ids (user ids,
anonymous ids, trait names) only ever appear *after* a namespace byte or inside
a column family of their own, so no id can reach an internal key (SPEC §11).

The local store (one RocksDB per `events` partition) has one column family per
namespace:

| family       | key                           | value                                   |
|--------------|-------------------------------|-----------------------------------------|
| `profiles`   | profile key (raw id bytes)    | encoded `UserState`                     |
| `due`        | be64(wake_ms) + profile key   | empty: the deadline index, time-ordered |
| `suppressed` | profile key                   | empty: a deleted user, events dropped   |
| `quarantine` | profile key                   | JSON `{reason, at_ms, state}`           |
| `meta`       | a `Meta` name                 | a partition-level value (see `Meta`)    |
| `history`    | audience + NUL + be64(minute) | be64 entered + be64 exited (history.py) |

The changelog topic (`{app_id}-users-changelog`, compacted, partition N = state
of `events` partition N) mirrors it. Its record key is one namespace byte and
the id; its `HEADER` carries the input position the record reflects and the
profile's next wake-up:

| key            | value                          | meaning                                   |
|----------------|--------------------------------|-------------------------------------------|
| `p` + key      | encoded state / tombstone      | a profile (tombstone = deleted)           |
| `s` + key      | `b"1"` / tombstone             | suppression marker on / lifted            |
| `q` + key      | quarantine JSON / tombstone    | a profile that cannot be evaluated        |
| `m` + name     | meta value                     | partition meta (`Meta`)                   |
| `h` + bucket   | entered/exited / tombstone     | size history of one audience-minute (tombstone = older than 30 days) |
| `o` + session  | owner JSON                     | a worker took the partition (never compacted away: one key per ownership) |

Every record is written inside a Kafka transaction of the partition's own
transactional producer, so a former owner is fenced by the broker (see
`checkpoint.py`).
"""

from __future__ import annotations

import struct
from enum import Enum, StrEnum
from typing import Final, NamedTuple

NEVER: Final = (1 << 62) - 1  # no deadline (same value as core.state.NEVER; see there)
_pack_due_time = struct.Struct(">Q").pack  # = int.to_bytes(8, "big")


class Family(StrEnum):
    """Column families of a partition's store."""

    PROFILES = "profiles"
    DUE = "due"
    SUPPRESSED = "suppressed"
    QUARANTINE = "quarantine"
    META = "meta"
    HISTORY = "history"


class Meta(bytes, Enum):
    """Names in the `meta` family (and `m` records of the changelog)."""

    POSITION = b"position"  # JSON {"offset": next input offset, "stream_time": ms}
    COUNTS = b"counts"  # JSON {"sizes": {audience: members}, "users": profiles}
    TRACKERS = b"trackers"  # JSON [tracker id whose history this partition holds]
    JUDGED = b"judged"  # catalog fingerprint every stored profile was judged on
    # Local-only (never in the changelog): where this store stands against the log.
    CHANGELOG_OFFSET = b"changelog_offset"  # next changelog offset to read
    CHANGELOG_TOPIC_ID = b"changelog_topic_id"
    EVENTS_TOPIC_ID = b"events_topic_id"
    SESSION = b"session"  # the ownership (owner record) this store belongs to


class Kind(bytes, Enum):
    """Namespace byte of a changelog record key."""

    PROFILE = b"p"
    SUPPRESSED = b"s"
    QUARANTINE = b"q"
    META = b"m"
    HISTORY = b"h"
    OWNER = b"o"


# Changelog kinds that mirror a store family one to one.
FAMILY_OF: dict[bytes, Family] = {
    Kind.PROFILE.value: Family.PROFILES,
    Kind.SUPPRESSED.value: Family.SUPPRESSED,
    Kind.QUARANTINE.value: Family.QUARANTINE,
    Kind.META.value: Family.META,
    Kind.HISTORY.value: Family.HISTORY,
}


def changelog_key(kind: Kind, name: bytes) -> bytes:
    return kind.value + name


def split_changelog_key(key: bytes) -> tuple[bytes, bytes]:
    """(kind byte, id) of a changelog record key; kind b"" for an empty key."""
    return key[:1], key[1:]


def due_key(wake_ms: int, profile_key: bytes) -> bytes:
    """A deadline-index key: time-ordered, then by profile. Wakes outside [0, NEVER] are
    clamped so that no value can make the key unencodable."""
    if wake_ms < 0:
        wake_ms = 0
    elif wake_ms > NEVER:
        wake_ms = NEVER
    return _pack_due_time(wake_ms) + profile_key  # (recovery writes one per profile)


def split_due_key(key: bytes) -> tuple[int, bytes]:
    return int.from_bytes(key[:8], "big"), key[8:]


class Header(NamedTuple):
    """The changelog header of a state record.

    `position`: the record reflects every input of its `events` partition below this
    offset (recovery uses it to skip input a profile already holds: see recovery.py);
    `wake_ms`: the profile's next deadline (NEVER if none), to rebuild the due-index.
    """

    position: int
    wake_ms: int


HEADER = "audiences.v1"  # header name; the value is `_HEADER_FORMAT`-packed
_HEADER_FORMAT = struct.Struct(">qq")


def encode_header(header: Header) -> list[tuple[str, bytes]]:
    return [(HEADER, _HEADER_FORMAT.pack(header.position, min(max(header.wake_ms, 0), NEVER)))]


def decode_header(headers: list[tuple[str, bytes]] | None) -> tuple[int, int] | None:
    """(position, wake_ms) of a record's state header; None when it has none (or an
    unreadable one). A plain tuple, not a `Header`: recovery reads one per record."""
    for name, value in headers or ():
        if name == HEADER and value is not None and len(value) == _HEADER_FORMAT.size:
            position, wake = _HEADER_FORMAT.unpack(value)
            return position, wake
    return None
