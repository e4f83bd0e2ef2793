"""Time-caused work of a partition, in bounded chunks between batches of live events:
firing due deadlines (`sweep`) and judging stored profiles on a changed catalog
(`rejudge`).

Each call does at most one chunk and leaves the rest for the next loop turn, so a
partition with 200,000 deadlines due at once, or a definition change over a
million profiles, never holds live events back by more than one chunk.
"""

from __future__ import annotations

import logging

from audiences.adapters import metrics
from audiences.adapters.state.partition import PartitionState
from audiences.adapters.stream.emitter import Emitter, Encoded, Rendered
from audiences.core.evaluator import StepResult, Tick
from audiences.core.state import UserState

log = logging.getLogger(__name__)


def sweep(
    partition: PartitionState, now_ms: int, wall_ms: int, chunk: int, emitter: Emitter
) -> bool:
    """Fire deadlines due by `now_ms` (at most `chunk` index entries); True if more are due."""
    rows = partition.due(now_ms, chunk)
    if not rows:
        return False
    due: dict[bytes, int] = {}
    for wake, key in rows:
        if key in due or partition.is_blocked(key):
            partition.drop_due(wake, key)
            continue
        due[key] = wake
    states = partition.load(due, now_ms)
    for key, wake in due.items():
        state = partition.cache.get(key) if key in states else None
        if state is None or state.wake_ms > now_ms:
            # Gone, quarantined, or the entry is older than the profile's deadline (a
            # checkpoint moves entries; recovery may leave superseded ones): drop it.
            partition.drop_due(wake, key)
            continue
        metrics.DEADLINE_LATENESS.observe(max(0, wall_ms - state.wake_ms) / 1000)
        try:
            apply(partition, key, state, Tick(now_ms), emitter)
        except Exception as exc:  # a failing profile must not stop the sweep
            log.exception("partition %d: a deadline failed", partition.number)
            partition.quarantine(key, f"deadline_error: {exc!r}", now_ms, None)
            partition.drop_due(wake, key)
    return len(rows) == chunk


def rejudge(partition: PartitionState, chunk: int, emitter: Emitter) -> None:
    """Judge the next `chunk` stored profiles on the partition's catalog: deleted
    audiences exit their members, edited ones emit real differences, new ones take
    in the profiles — idle users included. Only profiles that change are written."""
    start = partition.rejudge_from
    if start is None:
        return
    catalog = partition.catalog
    rows, partition.rejudge_from = partition.stored_profiles(start, chunk)
    for key, durable in rows:
        if partition.is_blocked(key):
            continue
        state = partition.load((key,), 0).get(key)
        if (
            state is None
            or state.catalog_fingerprint == catalog.fingerprint
            or state.merged_into is not None  # a forwarding stub judges nothing
        ):
            continue
        was_dirty = key in partition.dirty
        judged_on = state.catalog_fingerprint
        try:
            result = apply(partition, key, state, Tick(state.clock_ms), emitter)
        except Exception as exc:  # one profile must not stop the pass
            log.exception("partition %d: re-judging a profile failed", partition.number)
            partition.quarantine(key, f"rejudge_error: {exc!r}", state.clock_ms, None)
            continue
        if not was_dirty and not result.transitions and _same(result.state, judged_on, durable):
            partition.forget(key)  # nothing but the catalog fingerprint changed: no write
    if partition.rejudge_from is None:
        partition.record_judged(catalog.fingerprint)


def apply(
    partition: PartitionState,
    key: bytes,
    state: UserState | None,
    item: Tick,
    emitter: Emitter,
) -> StepResult:
    """Step a Tick into a profile and send what it emits (all or nothing): outputs, and
    the records a deadline makes for other profiles (a user's new value of an account
    audience's predicate, for its accounts)."""
    rendered: Rendered = []
    controls: Encoded = []

    def accept(result: StepResult) -> None:
        rendered.extend(emitter.render(result.transitions, result.state))
        if result.controls:
            controls.extend(emitter.encode_controls(result.controls))

    result = partition.apply(key, state, item, key.decode(), accept)
    assert result is not None
    emitter.send(rendered, result.transitions)
    if controls:
        emitter.send_controls(controls)
    return result


def _same(state: UserState, fingerprint: str, durable: bytes) -> bool:
    """Whether `state` encodes as `durable` once its catalog fingerprint is put back."""
    current = state.catalog_fingerprint
    state.catalog_fingerprint = fingerprint
    try:
        return state.encode() == durable
    finally:
        state.catalog_fingerprint = current
