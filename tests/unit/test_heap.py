"""The worker's garbage-collector policy (`adapters/stream/heap.py`): what a turn leaves
alive is frozen, and cyclic garbage is freed by a full collection when the heap has
doubled or FULL_EVERY_S has passed, never before."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from audiences.adapters.stream import heap
from audiences.adapters.stream.heap import FrozenHeap


class Node:
    """A container that can be part of a cycle and be weakly referenced."""

    def __init__(self) -> None:
        self.other: Node | None = None


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Blocks:
    def __init__(self) -> None:
        self.count = 4 * heap.FULL_MIN_BLOCKS  # (above the floor: doubling decides)

    def __call__(self) -> int:
        return self.count


@pytest.fixture(autouse=True)
def _restore_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def garbage_cycle() -> weakref.ref[Node]:
    """A cycle nothing else references: only a collection that scans it frees it."""
    first, second = Node(), Node()
    first.other, second.other = second, first
    return weakref.ref(first)


def started() -> tuple[FrozenHeap, Clock, Blocks]:
    clock, blocks = Clock(), Blocks()
    policy = FrozenHeap(monotonic=clock, blocks=blocks)
    policy.start()
    return policy, clock, blocks


def test_start_sets_the_thresholds_and_freezes_what_is_alive() -> None:
    kept = Node()
    started()
    assert gc.get_threshold() == heap.GC_THRESHOLDS
    assert all(obj is not kept for obj in gc.get_objects())  # frozen: in no generation
    assert gc.get_freeze_count() > 0


def test_a_turn_freezes_what_it_left_alive_so_no_collection_scans_it() -> None:
    policy, _clock, _blocks = started()
    kept = Node()
    assert any(obj is kept for obj in gc.get_objects(generation=0))
    policy.turn()
    assert all(obj is not kept for obj in gc.get_objects())
    assert gc.get_count()[0] < 10  # (freezing reset the young generation's count)


def test_a_frozen_cycle_waits_for_the_heap_to_double() -> None:
    policy, clock, blocks = started()
    cycle = garbage_cycle()
    policy.turn()  # frozen while garbage
    gc.collect()
    assert cycle() is not None  # a frozen cycle is not scanned, even by a full collect

    clock.now += heap.CHECK_EVERY_S
    blocks.count = 8 * heap.FULL_MIN_BLOCKS  # grown by exactly the blocks kept: not yet
    policy.turn()
    assert cycle() is not None
    assert policy.full_collections == 0

    clock.now += heap.CHECK_EVERY_S
    blocks.count = 8 * heap.FULL_MIN_BLOCKS + 1
    policy.turn()
    assert cycle() is None
    assert policy.full_collections == 1


def test_growth_is_read_at_most_once_per_check_interval() -> None:
    policy, clock, blocks = started()
    cycle = garbage_cycle()
    blocks.count = 20 * heap.FULL_MIN_BLOCKS
    clock.now += heap.CHECK_EVERY_S / 2
    policy.turn()
    assert cycle() is not None
    clock.now += heap.CHECK_EVERY_S / 2
    policy.turn()
    assert cycle() is None


def test_a_small_heap_is_not_collected_for_small_growth() -> None:
    policy, clock, blocks = started()
    blocks.count = 1000
    policy.collect()
    cycle = garbage_cycle()
    clock.now += heap.CHECK_EVERY_S
    blocks.count = 1000 + heap.FULL_MIN_BLOCKS  # more than doubled, but under the floor
    policy.turn()
    assert cycle() is not None
    clock.now += heap.CHECK_EVERY_S
    blocks.count += 1
    policy.turn()
    assert cycle() is None


def test_a_steady_heap_is_collected_in_full_every_full_interval() -> None:
    policy, clock, _blocks = started()
    cycle = garbage_cycle()
    clock.now += heap.FULL_EVERY_S - 1
    policy.turn()
    assert cycle() is not None
    clock.now += 1
    policy.turn()
    assert cycle() is None
    assert policy.full_collections == 1


def test_cycles_made_and_dropped_within_a_turn_are_still_collected_at_the_threshold() -> None:
    """Generation 0 still runs inside a long turn: garbage made there is freed."""
    started()
    gc.set_threshold(1000, 50, 100)  # (the policy's 50,000, made quick to reach)
    cycle = garbage_cycle()
    keep = [Node() for _ in range(2000)]
    assert cycle() is None
    assert len(keep) == 2000


def test_what_partitions_restored_counts_as_kept_not_as_growth() -> None:
    policy, clock, blocks = started()
    restored = Node()
    cycle = garbage_cycle()  # (not frozen yet: the restores' garbage)
    blocks.count = 40 * heap.FULL_MIN_BLOCKS
    policy.rebalanced()
    assert cycle() is None
    assert all(obj is not restored for obj in gc.get_objects())
    clock.now += heap.CHECK_EVERY_S
    later = garbage_cycle()
    policy.turn()
    assert later() is not None  # all of it kept: no full collection yet
    assert policy.full_collections == 0
