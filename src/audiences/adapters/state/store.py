"""Per-partition RocksDB stores of profile state (rocksdict, raw bytes).

Key layout of one partition's store:
  b"u" + profile key                  -> encoded UserState
  b"d" + be64(wake_ms) + profile key  -> b""   (due-index: time-ordered deadlines)
  b"m" + name                         -> meta  (checkpoints: input and changelog offsets)
A batch writes states, due-index changes and checkpoints in one WriteBatch, so
the store is always consistent with one input offset.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import cast

from rocksdict import Options, Rdict, WriteBatch

USER = b"u"
DUE = b"d"
META = b"m"
INPUT_OFFSET = META + b"input_offset"  # next `events` offset to consume
CHANGELOG_OFFSET = META + b"changelog_offset"  # next changelog offset to read on recovery
STREAM_TIME = META + b"stream_time"  # latest event time evaluated in this partition
JUDGED_CATALOG = META + b"judged_catalog"  # fingerprint every stored profile was judged on


def due_key(wake_ms: int, profile_key: bytes) -> bytes:
    return DUE + wake_ms.to_bytes(8, "big") + profile_key


class PartitionStore:
    """State of one `events` partition."""

    def __init__(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        options = Options(raw_mode=True)
        options.create_if_missing(True)
        self._db = Rdict(str(path), options)

    def get_states(self, keys: list[bytes]) -> list[bytes | None]:
        return cast(list[bytes | None], self._db.get([USER + key for key in keys]))

    def get_meta(self, key: bytes, default: int) -> int:
        value = self._db.get(key)
        return int(value) if value is not None else default

    def get_text(self, key: bytes) -> str:
        value = self._db.get(key)
        return value.decode() if value is not None else ""

    def put_text(self, key: bytes, value: str) -> None:
        self._db.put(key, value.encode())

    def due(self, until_ms: int) -> Iterator[tuple[int, bytes]]:
        """(wake_ms, profile key) of deadlines <= until_ms, oldest first."""
        it = self._db.iter()
        it.seek(DUE)
        while it.valid():
            key: bytes = it.key()
            if not key.startswith(DUE):
                return
            wake = int.from_bytes(key[1:9], "big")
            if wake > until_ms:
                return
            yield wake, key[9:]
            it.next()

    def user_keys(self, prefix: bytes = b"") -> list[bytes]:
        """Profile keys starting with `prefix` (a scan: for recovery-time indexes)."""
        return [key for key, _ in self.states_from(prefix, None, prefix=prefix)]

    def states_from(
        self, start: bytes, limit: int | None, *, prefix: bytes = b""
    ) -> list[tuple[bytes, bytes]]:
        """Up to `limit` (profile key, state) pairs in key order from `start` on."""
        out: list[tuple[bytes, bytes]] = []
        it = self._db.iter()
        it.seek(USER + start)
        while it.valid() and (limit is None or len(out) < limit):
            key: bytes = it.key()
            if not key.startswith(USER + prefix):
                break
            out.append((key[1:], it.value()))
            it.next()
        return out

    def new_batch(self) -> WriteBatch:
        return WriteBatch(raw_mode=True)

    def write(self, batch: WriteBatch) -> None:
        self._db.write(batch)

    def close(self) -> None:
        self._db.close()

    def destroy(self) -> None:
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)
