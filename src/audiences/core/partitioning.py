"""The partition of a key, as Java's default partitioner (and librdkafka's
`murmur2_random`) computes it: murmur2 of the key bytes, made positive, modulo
the partition count. The runtime checks every record's partition with it and the API
routes reads to the worker owning a user. A pure function kept in the core so that mypyc
compiles it to machine integers (`i64`: every product below stays under 2**63), fast
enough that the runtime keeps no per-key cache of owners."""

from __future__ import annotations

from typing import Final

from mypy_extensions import i64

# Final: mypyc inlines them (a module global is a dictionary lookup at each use)
_M: Final = 0x5BD1E995
_MASK: Final = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's `Utils.murmur2` (seed 0x9747b28c), as a signed 32-bit int."""
    length: i64 = len(data)
    h: i64 = (0x9747B28C ^ length) & _MASK
    end: i64 = length - length % 4
    i: i64 = 0
    while i < end:
        k: i64 = data[i] | (data[i + 1] << 8) | (data[i + 2] << 16) | (data[i + 3] << 24)
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = (h * _M) & _MASK
        h ^= k
        i += 4
    rest: i64 = length % 4
    if rest == 3:
        h ^= data[end + 2] << 16
    if rest >= 2:
        h ^= data[end + 1] << 8
    if rest >= 1:
        h ^= data[end]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return int(h - (1 << 32) if h & 0x80000000 else h)


def partition_for(key: bytes, partitions: int) -> int:
    return (murmur2(key) & 0x7FFFFFFF) % partitions
