"""Audience size history: minute buckets of a partition (state/history.py), the query
parameters, the series and the sparkline (http/history.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from audiences.adapters.http.history import (
    MAX_POINTS,
    HistoryQuery,
    parse_query,
    parse_step,
    parse_time,
    render,
    series,
    sparkline,
)
from audiences.adapters.state.history import (
    MINUTE_MS,
    PRUNE_EVERY_MS,
    RETENTION_MS,
    History,
    bucket_key,
    decode_bucket,
    merge_buckets,
    split_bucket_key,
)
from audiences.adapters.state.layout import Family
from audiences.adapters.state.store import MemoryStore, RocksDictStore, StateStore
from audiences.errors import ApiError

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
M, H, D = MINUTE_MS, 3_600_000, 86_400_000


# -- buckets ------------------------------------------------------------------------------------


def test_a_transition_counts_in_the_minute_of_its_own_time() -> None:
    history = History(MemoryStore())
    history.count("buyers", T0 + 59_999, True)
    history.count("buyers", T0, True)
    history.count("buyers", T0 + M, False)
    history.count("buyers_eu", T0, True)  # a key that starts with the other one
    assert history.buckets("buyers", T0) == {T0: (2, 0), T0 + M: (0, 1)}
    assert history.buckets("buyers", T0 + M) == {T0 + M: (0, 1)}
    assert history.buckets("buyers_eu", 0) == {T0: (1, 0)}
    assert history.buckets("buyer", 0) == {}
    assert split_bucket_key(bucket_key("buyers", T0 + 5)) == ("buyers", T0)


def test_buckets_are_written_at_the_checkpoint_and_read_back_from_the_store() -> None:
    store = MemoryStore()
    history = History(store)
    history.count("a", T0, True)
    history.count("a", T0 + 3 * M, False)
    records = history.seal(T0 + 3 * M)
    assert [(split_bucket_key(k), decode_bucket(v or b"")) for k, v in records] == [
        (("a", T0), (1, 0)),
        (("a", T0 + 3 * M), (0, 1)),
    ]
    history.count("a", T0, True)  # after the seal: in the next checkpoint, absolute
    assert [decode_bucket(v or b"") for _k, v in history.seal(T0 + 3 * M)] == [(2, 0)]
    batch = store.new_batch()
    for key, value in records:
        assert value is not None
        batch.put(Family.HISTORY, key, value)
    store.write(batch)
    history.landed()
    # a fresh partition state (a restart) reads the store, and counts on from it
    again = History(store)
    assert again.buckets("a", 0) == {T0: (1, 0), T0 + 3 * M: (0, 1)}
    again.count("a", T0 + 3 * M, True)
    assert again.buckets("a", 0)[T0 + 3 * M] == (1, 1)


@pytest.fixture(params=["memory", "rocksdb"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateStore]:
    opened: StateStore = MemoryStore() if request.param == "memory" else RocksDictStore(tmp_path)
    yield opened
    opened.close()


def _write(store: StateStore, records: list[tuple[bytes, bytes | None]]) -> None:
    batch = store.new_batch()
    for key, value in records:
        assert value is not None
        batch.put(Family.HISTORY, key, value)
    store.write(batch)


def test_a_restarted_partition_counts_on_from_stored_buckets_old_and_new(
    store: StateStore,
) -> None:
    """Counting skips the store's read for a minute later than any stored for the
    audience (most transitions); a minute at or before one reads it (late transitions)."""
    first = History(store)
    first.count("a", T0 + 3 * M, True)
    first.count("a", T0, True)
    first.count("ab", T0 + 9 * M, True)  # a later minute of a key that starts with "a"
    first.count("b", T0 + 2 * M, False)
    _write(store, first.seal(T0 + 9 * M))
    reads: list[bytes] = []
    real_get = store.get

    def counting_get(family: Family, key: bytes) -> bytes | None:
        reads.append(key)
        return real_get(family, key)

    again = History(store)
    store.get = counting_get  # type: ignore[method-assign]
    again.count("a", T0 + 3 * M, True)  # the latest stored minute: read
    again.count("a", T0 + M, False)  # older, not stored: read (nothing there)
    again.count("a", T0, False)  # older, stored: read
    assert reads == [bucket_key("a", T0 + 3 * M), bucket_key("a", T0 + M), bucket_key("a", T0)]
    again.count("a", T0 + 4 * M, True)  # later than any stored: no read
    again.count("a", T0 + 4 * M, True)  # (in memory now)
    again.count("c", T0, True)  # an audience with no bucket stored: no read
    assert len(reads) == 3
    assert again.buckets("a", 0) == {
        T0: (1, 1),
        T0 + M: (0, 1),
        T0 + 3 * M: (2, 0),
        T0 + 4 * M: (2, 0),
    }
    assert again.buckets("ab", 0) == {T0 + 9 * M: (1, 0)}
    assert again.buckets("b", 0) == {T0 + 2 * M: (0, 1)}


def test_a_late_transition_after_its_bucket_left_memory_adds_to_the_stored_one(
    store: StateStore,
) -> None:
    history = History(store)
    history.count("a", T0 + 5 * M, True)
    _write(store, history.seal(T0 + 5 * M))
    history.landed()
    history.values.clear()  # (the memory's limit evicted it)
    history.count("a", T0 + 6 * M, True)  # a new minute moves the bound on
    history.count("a", T0 + 5 * M, False)  # late: the stored bucket is read and counted on
    assert history.buckets("a", 0) == {T0 + 5 * M: (1, 1), T0 + 6 * M: (1, 0)}


def test_the_store_finds_the_last_key_below_a_bound(store: StateStore) -> None:
    assert store.last_key(Family.HISTORY, b"z") is None
    _write(store, [(b"a1", b"x"), (b"a3", b"x"), (b"b", b"x")])
    assert store.last_key(Family.HISTORY, b"a3") == b"a1"  # (below: the bound itself is not)
    assert store.last_key(Family.HISTORY, b"a4") == b"a3"
    assert store.last_key(Family.HISTORY, b"a") is None
    assert store.last_key(Family.HISTORY, b"\xff") == b"b"
    assert store.last_key(Family.PROFILES, b"\xff") is None


def test_a_checkpoint_that_did_not_land_is_written_again() -> None:
    history = History(MemoryStore())
    history.count("a", T0, True)
    first = history.seal(T0)
    history.unseal()
    assert history.seal(T0) == first
    history.landed()
    assert history.seal(T0) == []


def test_buckets_older_than_the_retention_are_tombstoned() -> None:
    store = MemoryStore()
    history = History(store)
    old, kept = T0, T0 + 2 * D
    for audience in ("a", "b"):
        history.count(audience, old, True)
        history.count(audience, kept, True)
    batch = store.new_batch()
    for key, value in history.seal(0):  # (no stream time yet: nothing expires)
        assert value is not None
        batch.put(Family.HISTORY, key, value)
    store.write(batch)
    history.landed()
    history.count("c", old + M, True)  # only in memory yet
    now = old + RETENTION_MS + M + 1
    records = history.seal(now)
    _write(store, records)
    tombstones = sorted(split_bucket_key(k) for k, v in records if v is None)
    assert tombstones == [("a", old), ("b", old), ("c", old + M)]
    assert [v for _k, v in records if v is not None] == []
    assert history.buckets("c", 0) == {}
    # the next search waits PRUNE_EVERY_MS of stream time
    history.count("a", old, True)  # a late transition, before the next search: written
    late = history.seal(now + 1)
    assert [(split_bucket_key(k), v is None) for k, v in late] == [(("a", old), False)]
    _write(store, late)
    history.landed()
    assert [(split_bucket_key(k), v) for k, v in history.seal(now + PRUNE_EVERY_MS)] == [
        (("a", old), None)
    ]


def _write(store: MemoryStore, records: list[tuple[bytes, bytes | None]]) -> None:
    batch = store.new_batch()
    for key, value in records:
        if value is None:
            batch.delete(Family.HISTORY, key)
        else:
            batch.put(Family.HISTORY, key, value)
    store.write(batch)


def test_merge_sums_partitions() -> None:
    assert merge_buckets([{T0: (1, 0), T0 + M: (0, 2)}, {T0: (3, 1)}, {}]) == {
        T0: (4, 1),
        T0 + M: (0, 2),
    }


# -- parameters ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("1m", M),
        ("5m", 5 * M),
        ("1h", H),
        ("1d", D),
        ("60s", M),
        ("15min", 15 * M),
        (" 2h ", 2 * H),
    ],
)
def test_steps(text: str, ms: int) -> None:
    assert parse_step(text) == ms


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("30s", "at least 1m"),
        ("0m", "at least 1m"),
        ("90s", "whole number of minutes"),
        ("1.5h", "duration"),
        ("h", "duration"),
        ("-1m", "duration"),
        ("", "duration"),
        ("9999999d", "at most"),
    ],
)
def test_bad_steps_are_400(text: str, message: str) -> None:
    with pytest.raises(ApiError) as caught:
        parse_step(text)
    assert caught.value.status == 400 and message in str(caught.value)


def test_times_are_iso_8601_or_epoch_ms() -> None:
    assert parse_time(str(T0), "from") == T0
    assert parse_time("2026-01-01T00:00:00Z", "from") == T0
    assert parse_time("2026-01-01T01:00:00+01:00", "from") == T0
    assert parse_time("2026-01-01T00:00:00", "from") == T0  # UTC when it says nothing
    assert parse_time("2026-01-01", "from") == T0
    for bad in ("yesterday", "2026-13-01", "-5", "1e12", "99999999999999999"):
        with pytest.raises(ApiError) as caught:
            parse_time(bad, "from")
        assert caught.value.status == 400 and "`from`" in str(caught.value)


def test_the_default_range_is_the_last_hour_by_minute() -> None:
    now = T0 + 30 * 1000  # half a minute into a minute
    query = parse_query({}, now)
    assert query == HistoryQuery(now - H - 30_000, M, 61)
    assert parse_query({"to": str(T0)}, now) == HistoryQuery(T0 - H, M, 60)


def test_steps_are_aligned_on_multiples_of_the_step() -> None:
    query = parse_query({"from": str(T0 + 90 * M), "to": str(T0 + 5 * H), "step": "1h"}, 0)
    assert query == HistoryQuery(T0 + H, H, 4)
    day = parse_query(
        {"from": "2026-01-02T13:00:00Z", "to": "2026-01-04T00:00:00Z", "step": "1d"}, 0
    )
    assert day == HistoryQuery(T0 + D, D, 2)
    same = parse_query({"from": str(T0), "to": str(T0)}, 0)
    assert same.points == 1


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"from": str(T0 + M), "to": str(T0)}, "after `to`"),
        ({"from": str(T0), "to": str(T0 + (MAX_POINTS + 1) * M)}, "at most 10000"),
        ({"step": "10s"}, "at least 1m"),
        ({"from": "soon"}, "`from`"),
        ({"to": "later"}, "`to`"),
    ],
)
def test_bad_queries_are_400(params: dict[str, str], message: str) -> None:
    with pytest.raises(ApiError) as caught:
        parse_query(params, T0)
    assert caught.value.status == 400 and message in str(caught.value)


def test_many_points_within_the_limit_are_fine() -> None:
    assert parse_query({"from": str(T0), "to": str(T0 + MAX_POINTS * M)}, 0).points == MAX_POINTS


# -- the series ---------------------------------------------------------------------------------


def test_sizes_are_derived_back_from_the_current_size() -> None:
    # 3 entered at T0, 1 more at T0+2m, 2 exited at T0+3m; 1 entered at T0+2h (after the
    # range): the size now is 3
    buckets = {T0: (3, 0), T0 + 2 * M: (1, 0), T0 + 3 * M: (0, 2), T0 + 2 * H: (1, 0)}
    query = HistoryQuery(T0, M, 5)
    assert series(3, buckets, query) == [
        {"t": "2026-01-01T00:00:00.000Z", "size": 3, "entered": 3, "exited": 0},
        {"t": "2026-01-01T00:01:00.000Z", "size": 3, "entered": 0, "exited": 0},
        {"t": "2026-01-01T00:02:00.000Z", "size": 4, "entered": 1, "exited": 0},
        {"t": "2026-01-01T00:03:00.000Z", "size": 2, "entered": 0, "exited": 2},
        {"t": "2026-01-01T00:04:00.000Z", "size": 2, "entered": 0, "exited": 0},
    ]
    hourly = series(3, buckets, HistoryQuery(T0 - H, H, 4))
    assert [(p["size"], p["entered"], p["exited"]) for p in hourly] == [
        (0, 0, 0),
        (2, 4, 2),
        (2, 0, 0),
        (3, 1, 0),
    ]
    assert hourly[0]["t"] == "2025-12-31T23:00:00.000Z"


def test_buckets_before_the_start_are_ignored() -> None:
    assert series(1, {T0 - M: (5, 0), T0: (1, 0)}, HistoryQuery(T0, M, 1)) == [
        {"t": "2026-01-01T00:00:00.000Z", "size": 1, "entered": 1, "exited": 0}
    ]


# -- the sparkline ------------------------------------------------------------------------------


def test_sparkline_scales_between_min_and_max() -> None:
    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7]) == "▁▂▃▄▅▆▇█"
    assert sparkline([10, 20, 10]) == "▁█▁"
    assert sparkline([0, 0]) == "▁▁"
    assert sparkline([5, 5, 5]) == "▅▅▅"
    assert sparkline([]) == ""


def test_render_shows_the_line_and_the_totals() -> None:
    points = series(
        2, {T0: (3, 0), T0 + 2 * M: (0, 1)}, HistoryQuery(T0 - M, M, 4)
    )  # sizes 0, 3, 3, 2
    text = render("buyers", points).splitlines()
    assert text[0] == ("buyers  2025-12-31T23:59:00.000Z .. 2026-01-01T00:02:00.000Z  (4 steps)")
    assert text[1] == "▁██▆"
    assert text[2] == "size: min 0  max 3  current 2"
    assert text[3] == "entered 3  exited 1"
    assert render("buyers", []) == "buyers: no history in this range"
