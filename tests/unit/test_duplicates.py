"""Duplicates (SPEC §2, §11): the same messageId for the same profile within 24 h
counts once, however many other events came between — live, across the codec, across
merges and in backfills. (The bound per profile: tests/unit/test_hostile_input.py.)"""

from __future__ import annotations

import zlib
from typing import Any

import factories
import orjson
from factories import T0, H, M, S, audience, catalog_of, event_dict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audiences.core.definitions.catalog import Catalog
from audiences.core.evaluator import Output, StepResult, Transition, fold_history, step
from audiences.core.events import Event, parse_event
from audiences.core.state import (
    DEDUP_MAX_IDS,
    FILTER_REBUILD_AFTER,
    SeenIds,
    UserState,
    message_hash,
)


def orders(n: int) -> dict[str, Any]:
    return audience(f"orders_{n}", {"performed": {"event": "Order Completed", "times": {"gte": n}}})


def recent_orders(n: int, within: str = "30d") -> dict[str, Any]:
    """An audience over a tracker other than `orders`' (a window)."""
    condition = {"performed": {"event": "Order Completed", "times": {"gte": n}, "within": within}}
    return audience(f"recent_{n}_{within}", condition)


def order(ts: int, message_id: str, **fields: Any) -> Event:
    return parse_event(
        event_dict(ts=ts, event="Order Completed", messageId=message_id, **fields), T0
    )


def view(ts: int, message_id: str) -> Event:
    return parse_event(event_dict(ts=ts, event="Product Viewed", messageId=message_id), T0)


class Profile:
    """One profile driven through `step`, its state through the codec after each input
    (as the runtime stores it), its outputs and duplicates recorded."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.state: UserState | None = None
        self.outputs: list[Output] = []
        self.duplicates = 0

    def send(self, *events: Event) -> list[StepResult]:
        results = []
        for event in events:
            result = step(self.state, event, self.catalog, "u1")
            self.state = UserState.decode(result.state.encode())
            self.outputs += result.transitions
            self.duplicates += result.duplicate
            results.append(result)
        return results

    def entered(self) -> list[str]:
        return [o.audience_key for o in self.outputs if isinstance(o, Transition) and o.entered]


def test_a_resent_batch_of_17_with_other_events_between_counts_once() -> None:
    """The probe of issue 11: 17 re-sent orders made a `gte 20` audience enter."""
    profile = Profile(catalog_of(orders(17), orders(20)))
    batch = [order(T0 + i * S, f"o{i}") for i in range(17)]
    profile.send(*batch)
    profile.send(*[view(T0 + M + i * S, f"v{i}") for i in range(5)])  # others between
    results = profile.send(*batch)  # the client re-sends the whole batch
    assert all(r.duplicate and not r.transitions for r in results)
    assert profile.duplicates == 17
    assert profile.entered() == ["orders_17"]
    profile.send(order(T0 + H, "o17"), order(T0 + H + S, "o18"))
    assert profile.entered() == ["orders_17"]  # 19 orders
    profile.send(order(T0 + H + 2 * S, "o19"))
    assert profile.entered() == ["orders_17", "orders_20"]  # the 20th


def test_1000_resent_events_with_other_events_between_count_once() -> None:
    profile = Profile(catalog_of(orders(1000), orders(1001)))
    batch = [order(T0 + i * 20 * S, f"order-{i}") for i in range(1000)]  # ~5.5 h
    profile.send(*batch)
    profile.send(*[view(T0 + 6 * H + i * S, f"view-{i}") for i in range(DEDUP_MAX_IDS - 1000)])
    results = profile.send(*batch)
    assert sum(r.duplicate for r in results) == 1000
    assert profile.entered() == ["orders_1000"]
    profile.send(order(T0 + 7 * H, "order-1000"))
    assert profile.entered() == ["orders_1000", "orders_1001"]


def test_a_copy_23_hours_later_is_dropped_and_25_hours_later_counts() -> None:
    """Later on the profile's clock (other events moved it), whether the copy carries the
    original timestamp (a re-sent event) or a new one."""
    for resend_at in (lambda t: T0, lambda t: t):
        profile = Profile(catalog_of(orders(2)))
        profile.send(order(T0, "o1"))
        profile.send(view(T0 + 23 * H, "v1"))
        (copy,) = profile.send(order(resend_at(T0 + 23 * H), "o1"))
        assert copy.duplicate and profile.entered() == []
        profile.send(view(T0 + 24 * H - S, "v2"))
        (copy,) = profile.send(order(resend_at(T0 + 24 * H - S), "o1"))
        assert copy.duplicate and profile.entered() == []  # (within 24 h, to the second)
        profile.send(view(T0 + 25 * H, "v3"))
        (copy,) = profile.send(order(resend_at(T0 + 25 * H), "o1"))
        assert not copy.duplicate and profile.entered() == ["orders_2"]
        (again,) = profile.send(order(resend_at(T0 + 25 * H + S), "o1"))
        assert again.duplicate  # counted again: remembered again


def test_a_copy_with_a_later_timestamp_moves_the_memory_clock_not_the_profile() -> None:
    """A duplicate is not counted: the profile's clock stays; but its time is part of
    the log, so 24 h are measured from it too (as the oracle measures them)."""
    profile = Profile(catalog_of(orders(2)))
    profile.send(order(T0, "o1"), view(T0 + 30 * H, "v1"))
    profile.send(order(T0 + 30 * H + S, "v1"))  # a copy of v1, stamped later
    assert profile.state is not None and profile.state.clock_ms == T0 + 30 * H
    (late,) = profile.send(order(T0 + 5 * H, "o2"))  # counted at the memory's clock
    assert not late.duplicate
    (copy,) = profile.send(order(T0 + 5 * H, "o2"))
    assert copy.duplicate


def test_the_memory_round_trips_through_the_codec_and_reads_version_3_state() -> None:
    catalog = catalog_of(orders(2))
    profile = Profile(catalog)
    profile.send(*[view(T0 + i * M, f"v{i}") for i in range(100)])  # over 2 hours
    state = profile.state
    assert state is not None and len(state.seen) == 100
    fields = orjson.loads(state.encode())
    assert fields[0] == 4
    latest_s, hours, packed = fields[7]
    assert latest_s == (T0 + 99 * M) // 1000 and sum(hours[1::2]) == 100
    assert len(packed) == 4 * -(-1000 // 3)  # base64 of 10 bytes per id
    again = UserState.decode(state.encode())
    assert again.seen.to_json() == state.seen.to_json()
    assert all(profile.send(view(T0 + 3 * H, f"v{i}"))[0].duplicate for i in range(100))

    # Version 3 kept [crc32 | adler32 << 32, event seconds, ...] of the last 16 ids.
    def legacy(message_id: str) -> int:
        data = message_id.encode()
        return zlib.crc32(data) | (zlib.adler32(data) << 32)

    v3 = [3, 0, T0 + H, {}, 0, {}, {}, [], "", {}, {}, None, 0, {}]
    v3[7] = [legacy("old"), (T0 - 22 * H) // 1000, legacy("older"), (T0 - 2 * H) // 1000 - 86_400]
    migrated = UserState.decode(orjson.dumps(v3))
    assert len(migrated.seen) == 1  # "older" was counted more than 24 h before the clock
    assert step(migrated, view(T0 + H, "old"), catalog, "u1").duplicate
    assert not step(migrated, view(T0 + H, "older"), catalog, "u1").duplicate


def test_a_merge_unions_the_memories_of_both_profiles() -> None:
    cluster = factories.Cluster(catalog_of(orders(22), orders(23)))

    def send(ts: int, message_id: str, **ids: Any) -> None:
        ids = {"userId": None, **ids}
        cluster.send(event_dict(ts=ts, event="Order Completed", messageId=message_id, **ids))

    for i in range(17):  # anonymous orders
        send(T0 + i * S, f"a{i}", anonymousId="a1")
    for i in range(5):  # the user's own
        send(T0 + M + i * S, f"u{i}", userId="u1")
    cluster.send(
        event_dict(ts=T0 + 2 * M, type="identify", event=None, userId="u1", anonymousId="a1")
    )
    assert cluster.states["u1"].aliases == {"a1": 1}  # merged
    entered = [(k, o.audience_key) for k, o in cluster.outputs if getattr(o, "entered", False)]
    assert entered == [("u1", "orders_22")]
    for i in range(17):  # both re-sent, as the user now
        send(T0 + i * S, f"a{i}", userId="u1", anonymousId="a1")
    for i in range(5):
        send(T0 + M + i * S, f"u{i}", userId="u1")
    entered = [(k, o.audience_key) for k, o in cluster.outputs if getattr(o, "entered", False)]
    assert entered == [("u1", "orders_22")]  # still 22 orders
    assert len(cluster.states["u1"].seen) == 17 + 5 + 1  # (and the identify's id)


def test_fold_history_folds_a_resent_event_once() -> None:
    """A backfill of a new `performed ... times` audience counts a re-sent event once,
    with a memory of its own (the live one is of the present, not of the history)."""
    old = catalog_of(orders(1))
    full = catalog_of(orders(1), recent_orders(3))
    pending = frozenset(full.trackers) - frozenset(old.trackers)
    assert pending
    history = [order(T0, "o1"), view(T0 + S, "v1"), order(T0 + 2 * S, "o2"), order(T0, "o1")]
    profile = Profile(old)
    profile.send(*history)
    assert profile.duplicates == 1
    state = profile.state
    assert state is not None
    catalog = full.with_pending(pending)
    folded = [fold_history(state, event, catalog, pending) for event in history]
    assert folded == [True, True, True, False]  # the copy folds nothing (the view: a clock)
    assert state.history_seen is not None and len(state.history_seen) == 2
    state = UserState.decode(state.encode())
    assert state.history_seen is not None and len(state.history_seen) == 2
    profile.state = state
    profile.catalog = full  # the switch: re-judged with the full catalog
    profile.send(order(T0 + 3 * S, "o3"))
    assert profile.entered() == ["orders_1", "recent_3_30d"]  # o1, o2, o3: not the copy
    assert profile.state is not None and profile.state.history_seen is None  # done with


def test_a_new_backfill_run_starts_with_an_empty_memory() -> None:
    """A run for other trackers re-reads the log from its start: what an earlier run
    remembered must not hide history from it."""
    base = catalog_of(orders(1))
    first = catalog_of(orders(1), recent_orders(2))
    between = {"performed": {"event": "Order Completed", "between": ["1d", "30d"]}}
    second = catalog_of(orders(1), recent_orders(2), audience("earlier", between))
    state = Profile(base)
    state.send(order(T0, "o1"))
    assert state.state is not None
    run1 = frozenset(first.trackers) - frozenset(base.trackers)
    assert fold_history(state.state, order(T0, "o1"), first.with_pending(run1), run1)
    run2 = frozenset(second.trackers) - frozenset(first.trackers)
    assert run2 and not run2 & run1
    assert fold_history(state.state, order(T0, "o1"), second.with_pending(run2), run2)


def test_a_backfill_that_goes_on_after_a_catalog_change_keeps_its_memory() -> None:
    """The catalog changes during a run (another audience edited): the cursor goes on for
    its trackers under a new pending catalog; what it folded stays remembered."""
    base = catalog_of(orders(1))
    first = catalog_of(orders(1), recent_orders(2))
    run = frozenset(first.trackers) - frozenset(base.trackers)
    profile = Profile(base)
    profile.send(order(T0, "o1"))
    state = profile.state
    assert state is not None
    assert fold_history(state, order(T0, "o1"), first.with_pending(run), run)
    edited = catalog_of(orders(1), recent_orders(2), orders(5))  # (no new tracker)
    assert not fold_history(state, order(T0, "o1"), edited.with_pending(run), run)


def later(n: int) -> int:
    """Mostly seconds; 1% of the time around 24 h (the memory fills up between)."""
    return {296: 3600, 297: 86_399, 298: 86_400, 299: 86_401}.get(n, n % 3)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.integers(0, 299).map(later),  # seconds later
            st.integers(0, 199),  # which id
            st.booleans(),  # through the codec first
        ),
        min_size=150,  # (more than FILTER_FROM_IDS ids: the filter too)
        max_size=500,
    )
)
def test_seen_ids_agree_with_a_plain_dict_of_when_each_id_counted(
    ops: list[tuple[int, int, bool]],
) -> None:
    """The packed memory (scan below FILTER_FROM_IDS ids, the bit filter above, through
    the codec or not) answers as the rule says, read off a dict."""
    seen, counted_at, now_s = SeenIds(), {}, 1_700_000_000
    for later_s, which, encode in ops:
        now_s += later_s
        if encode:
            seen = SeenIds.from_json(orjson.loads(orjson.dumps(seen.to_json())))
        seen.advance(now_s * 1000)
        expected = which in counted_at and counted_at[which] > now_s - 86_400
        assert (seen.remember(message_hash(f"id-{which}")) < 0) == expected
        if not expected:
            counted_at[which] = now_s


def test_the_filter_is_rebuilt_and_a_full_memory_still_answers_exactly() -> None:
    seen = SeenIds()
    seen.advance(1_700_000_000_000)
    for n in range(FILTER_REBUILD_AFTER + 2 * DEDUP_MAX_IDS):
        assert seen.remember(message_hash(f"n{n}")) == (n >= DEDUP_MAX_IDS)  # (forgot one)
    last = FILTER_REBUILD_AFTER + 2 * DEDUP_MAX_IDS - 1
    assert len(seen) == DEDUP_MAX_IDS and seen.filter is not None
    assert all(seen.remember(message_hash(f"n{last - k}")) < 0 for k in range(DEDUP_MAX_IDS))
    assert seen.remember(message_hash(f"n{last - DEDUP_MAX_IDS}")) == 1  # forgotten: new
