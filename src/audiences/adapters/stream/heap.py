"""When a worker's garbage collector scans, and when it runs in full.

CPython finds reference cycles by scanning containers, generation by generation. What
survives a worker's loop turn is mostly profiles it decoded and holds, and they make
no cycles. Measured on `audiences bench` (README, "Garbage collection"), the stock
generational collector took 13% of a catching-up worker's CPU to rescan them, found
almost no garbage, and its generation-1 passes stopped the loop for up to 0.3 s.

So after every loop turn, whatever is alive is frozen (`gc.freeze`, a constant-time
list move): no collection scans it again. Within a turn, generation 0 still runs at
GC_THRESHOLDS. Frozen objects are freed by their reference counts as before; only a
cycle that becomes garbage once frozen waits, for a full collection (unfreeze, collect,
freeze). That runs when the blocks Python's allocator holds have doubled since the last
one (FULL_GROWTH, and by at least FULL_MIN_BLOCKS), so whatever producers send, cyclic
garbage never outgrows the larger of the two; and at least every FULL_EVERY_S, so a
cycle holding a resource (a socket, a file) is closed within minutes even when the heap
is steady. A full collection stops the loop: 0.2-0.4 s for a catching-up bench
worker's ~450k containers here, one or none a run while its heap grows, none while it
is steady.
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable
from typing import Final

# Batches allocate many short-lived objects; the default gen-0 threshold (700) makes the
# collector run every few events.
GC_THRESHOLDS: Final = (50_000, 50, 100)
FULL_GROWTH: Final = 1.0  # blocks allocated since the last full collection, over those kept
# Nor before this many new blocks (~130 MB): a worker filling its cache of decoded
# profiles would otherwise stop for full collections at 0.25, 0.5, 1 and 2M blocks
# (up to 0.17 s each in the bench's live phase) for cycles it does not make.
FULL_MIN_BLOCKS: Final = 2_000_000
FULL_EVERY_S: Final = 600.0
CHECK_EVERY_S: Final = 1.0  # reading the allocator's count costs ~350 µs per 2.6M blocks


class FrozenHeap:
    """The collector's policy for one process (`gc` is process-wide): `start` once,
    `turn` after every loop turn, `rebalanced` once partitions were restored."""

    def __init__(
        self,
        monotonic: Callable[[], float] = time.monotonic,
        blocks: Callable[[], int] = sys.getallocatedblocks,
    ) -> None:
        self._monotonic = monotonic
        self._blocks = blocks
        self._kept_blocks = 0  # held after the last collection (full, start or rebalance)
        self._last_full = 0.0
        self._next_check = 0.0
        self.full_collections = 0

    def start(self) -> None:
        gc.set_threshold(*GC_THRESHOLDS)
        self.rebalanced()
        self._last_full = self._monotonic()  # (FULL_EVERY_S counts from the start)

    def turn(self) -> None:
        """Freeze what the turn left alive; collect in full when the heap has grown."""
        gc.freeze()
        now = self._monotonic()
        if now < self._next_check:
            return
        self._next_check = now + CHECK_EVERY_S
        grown = self._blocks() - self._kept_blocks
        if (
            grown > max(FULL_GROWTH * self._kept_blocks, FULL_MIN_BLOCKS)
            or now - self._last_full >= FULL_EVERY_S
        ):
            self.collect()

    def rebalanced(self) -> None:
        """Collect what is not frozen yet (the restores' garbage) and freeze the rest:
        what the partitions restored counts as kept, not as growth. (What an earlier
        runtime of this process froze is not scanned again.)"""
        gc.collect()
        gc.freeze()
        self._kept_blocks = self._blocks()
        self._next_check = self._monotonic() + CHECK_EVERY_S

    def collect(self) -> None:
        """A full collection, then everything left frozen."""
        gc.unfreeze()
        self.rebalanced()
        self.full_collections += 1
        self._last_full = self._monotonic()
