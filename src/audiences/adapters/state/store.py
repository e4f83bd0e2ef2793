"""The `StateStore` port and its implementations: RocksDB (rocksdict) and in memory.

A store holds one `events` partition's state in the families of `layout.Family`.
Writes go through a `StoreBatch` applied atomically by `write`, so the store is
always consistent with one checkpoint. Reads see the last written batch.
"""

from __future__ import annotations

import os
import shutil
import threading
from bisect import bisect_left, insort
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol, cast

from rocksdict import BlockBasedOptions, Cache, Options, Rdict, WriteBatch, WriteOptions

from audiences.adapters.state.layout import Family

Op = tuple[Family, bytes, bytes | None]  # (family, key, value); None = delete


class Batch(Protocol):
    """Changes to apply in one atomic write: from `StateStore.new_batch()` (a store's own,
    fastest) or a `StoreBatch` (any store)."""

    def put(self, family: Family, key: bytes, value: bytes) -> None: ...

    def delete(self, family: Family, key: bytes) -> None: ...

    def __len__(self) -> int: ...


class StoreBatch:
    """Changes to apply in one atomic write (store-independent: a list of operations)."""

    __slots__ = ("ops",)

    def __init__(self) -> None:
        self.ops: list[Op] = []

    def put(self, family: Family, key: bytes, value: bytes) -> None:
        self.ops.append((family, key, value))

    def delete(self, family: Family, key: bytes) -> None:
        self.ops.append((family, key, None))

    def __len__(self) -> int:
        return len(self.ops)


class StateStore(Protocol):
    """The state of one partition, by family (see `layout`)."""

    def get(self, family: Family, key: bytes) -> bytes | None: ...

    def get_many(self, family: Family, keys: list[bytes]) -> list[bytes | None]: ...

    def scan(
        self,
        family: Family,
        start: bytes = b"",
        stop: bytes | None = None,
        limit: int | None = None,
    ) -> list[tuple[bytes, bytes]]:
        """Up to `limit` (key, value) pairs with start <= key < stop, in key order."""
        ...

    def last_key(self, family: Family, stop: bytes) -> bytes | None:
        """The greatest key of `family` below `stop` (None if there is none)."""
        ...

    def new_batch(self) -> Batch:
        """An empty batch in the store's own form (`write` takes any `Batch` of it or a
        `StoreBatch`)."""
        ...

    def write(self, batch: Batch, *, logged: bool = True) -> None:
        """Apply `batch` atomically. `logged=False` skips RocksDB's write-ahead log
        (recovery's bulk writes): such writes survive a crash only once `flush` returned."""
        ...

    def flush(self) -> None:
        """Make every write so far durable without its log (memtables to disk)."""
        ...

    def is_empty(self) -> bool: ...

    def close(self) -> None: ...

    def destroy(self) -> None:
        """Close and delete everything."""
        ...


_MB = 1 << 20
# Memory is bounded per process, not per profile: one block cache for every store of the
# process (RocksDB would give each column family of each partition its own), and each
# partition's memtables together at most this much before they are flushed.
_BLOCK_CACHE_BYTES = int(os.environ.get("AUDIENCES_ROCKSDB_BLOCK_CACHE_MB", "32")) * _MB
_WRITE_BUFFERS_BYTES = int(os.environ.get("AUDIENCES_ROCKSDB_WRITE_BUFFERS_MB", "16")) * _MB
_block_cache: Cache | None = None
_UNLOGGED = WriteOptions()
_UNLOGGED.disable_wal = True  # type: ignore[method-assign,assignment]  # (a property; the stubs say method)


def _options() -> Options:
    global _block_cache
    if _block_cache is None:
        _block_cache = Cache(_BLOCK_CACHE_BYTES)
    table = BlockBasedOptions()
    table.set_block_cache(_block_cache)
    table.set_bloom_filter(10, False)  # a profile's first event misses: skip the read
    options = Options(raw_mode=True)
    options.set_block_based_table_factory(table)
    options.set_write_buffer_size(_WRITE_BUFFERS_BYTES // 2)
    return options


class _RocksBatch:
    """Operations put straight into a native `WriteBatch` (recovery and checkpoints write
    hundreds of thousands of keys: no intermediate list, no second pass)."""

    __slots__ = ("_count", "_handles", "native")

    def __init__(self, handles: dict[Family, Any]) -> None:
        self.native = WriteBatch(raw_mode=True)
        self._handles = handles
        self._count = 0

    def put(self, family: Family, key: bytes, value: bytes) -> None:
        self.native.put(key, value, self._handles[family])
        self._count += 1

    def delete(self, family: Family, key: bytes) -> None:
        self.native.delete(key, self._handles[family])
        self._count += 1

    def __len__(self) -> int:
        return self._count


class RocksDictStore:
    """One RocksDB database, a column family per `Family` (raw bytes).

    rocksdict keeps the database locked while any column-family handle or iterator
    is alive, even after `close()`: handles live only in this object and iterators
    only inside one call, and `close` drops the handles first.
    """

    def __init__(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        options = _options()
        options.create_if_missing(True)
        options.create_missing_column_families(True)
        # All column families of the partition share its memtable budget.
        options.set_db_write_buffer_size(_WRITE_BUFFERS_BYTES)
        families = {family.value: _options() for family in Family}
        self._db = Rdict(str(path), options, column_families=families)
        self._families = {family: self._db.get_column_family(family.value) for family in Family}
        self._handles = {
            family: self._db.get_column_family_handle(family.value) for family in Family
        }

    def get(self, family: Family, key: bytes) -> bytes | None:
        value: bytes | None = self._families[family].get(key)
        return value

    def get_many(self, family: Family, keys: list[bytes]) -> list[bytes | None]:
        if not keys:
            return []
        return cast(list[bytes | None], self._families[family].get(cast(Any, keys)))

    def scan(
        self,
        family: Family,
        start: bytes = b"",
        stop: bytes | None = None,
        limit: int | None = None,
    ) -> list[tuple[bytes, bytes]]:
        out: list[tuple[bytes, bytes]] = []
        it = self._families[family].iter()
        it.seek(start)
        while it.valid() and (limit is None or len(out) < limit):
            key: bytes = it.key()
            if stop is not None and key >= stop:
                break
            out.append((key, it.value()))
            it.next()
        del it
        return out

    def last_key(self, family: Family, stop: bytes) -> bytes | None:
        it = self._families[family].iter()
        it.seek_for_prev(stop)  # (the last key <= stop)
        key: bytes | None = None
        if it.valid() and it.key() == stop:
            it.prev()
        if it.valid():
            key = it.key()
        del it
        return key

    def new_batch(self) -> Batch:
        return _RocksBatch(self._handles)

    def write(self, batch: Batch, *, logged: bool = True) -> None:
        if isinstance(batch, _RocksBatch):
            if len(batch):
                self._db.write(batch.native, None if logged else _UNLOGGED)
            return
        assert isinstance(batch, StoreBatch)
        if not batch.ops:
            return
        native = WriteBatch(raw_mode=True)
        handles = self._handles
        for family, key, value in batch.ops:
            if value is None:
                native.delete(key, handles[family])
            else:
                native.put(key, value, handles[family])
        self._db.write(native, None if logged else _UNLOGGED)

    def flush(self) -> None:
        for family in self._families.values():
            family.flush(True)

    def is_empty(self) -> bool:
        return all(not self.scan(family, limit=1) for family in Family)

    def close(self) -> None:
        self._families.clear()
        self._handles.clear()
        self._db.close()

    def destroy(self) -> None:
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)


class MemoryStore:
    """The same port over dicts (sorted key lists for scans): for tests and previews.
    Writes come from the durability thread while the loop reads (as RocksDB allows):
    scans and writes hold a lock."""

    def __init__(self) -> None:
        self._data: dict[Family, dict[bytes, bytes]] = {family: {} for family in Family}
        self._keys: dict[Family, list[bytes]] = {family: [] for family in Family}
        self._lock = threading.Lock()
        self.closed = False

    def get(self, family: Family, key: bytes) -> bytes | None:
        return self._data[family].get(key)

    def get_many(self, family: Family, keys: list[bytes]) -> list[bytes | None]:
        data = self._data[family]
        return [data.get(key) for key in keys]

    def scan(
        self,
        family: Family,
        start: bytes = b"",
        stop: bytes | None = None,
        limit: int | None = None,
    ) -> list[tuple[bytes, bytes]]:
        keys, data = self._keys[family], self._data[family]
        out: list[tuple[bytes, bytes]] = []
        with self._lock:
            for key in keys[bisect_left(keys, start) :]:
                if (stop is not None and key >= stop) or (limit is not None and len(out) >= limit):
                    break
                out.append((key, data[key]))
        return out

    def last_key(self, family: Family, stop: bytes) -> bytes | None:
        keys = self._keys[family]
        with self._lock:
            at = bisect_left(keys, stop)
            return keys[at - 1] if at else None

    def new_batch(self) -> Batch:
        return StoreBatch()

    def write(self, batch: Batch, *, logged: bool = True) -> None:
        assert isinstance(batch, StoreBatch)
        with self._lock:
            self._write(batch)

    def flush(self) -> None:
        """(Every write is as durable as this store gets already.)"""

    def _write(self, batch: StoreBatch) -> None:
        for family, key, value in batch.ops:
            data, keys = self._data[family], self._keys[family]
            if value is None:
                if data.pop(key, None) is not None:
                    keys.pop(bisect_left(keys, key))
            else:
                if key not in data:
                    insort(keys, key)
                data[key] = value

    def is_empty(self) -> bool:
        return not any(self._data.values())

    def items(self, family: Family) -> Iterable[tuple[bytes, bytes]]:
        return self.scan(family)

    def close(self) -> None:
        self.closed = True

    def destroy(self) -> None:
        for family in Family:
            self._data[family].clear()
            self._keys[family].clear()
        self.closed = True
