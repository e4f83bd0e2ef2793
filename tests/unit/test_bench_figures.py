"""How `audiences bench` turns its samples into figures (no broker, no processes)."""

from __future__ import annotations

from audiences.tools.bench.runner import cpu_ticks, marginal_mb_per_profile, steal_pct


def test_marginal_memory_is_the_slope_once_bounded_buffers_are_full() -> None:
    # 100 MB of buffers fill during the first 20k profiles, then 0.5 KB per profile
    samples = []
    for profiles in range(0, 200_001, 10_000):
        fixed = min(profiles, 20_000) / 20_000 * 100
        samples.append((profiles, 150 + fixed + profiles * 0.0005))
    slope = marginal_mb_per_profile(samples)
    assert slope is not None and abs(slope * 1_000_000 - 500) < 1e-6


def test_marginal_memory_needs_enough_samples() -> None:
    assert marginal_mb_per_profile([]) is None
    assert marginal_mb_per_profile([(1, 100.0), (2, 101.0), (3, 102.0)]) is None
    assert marginal_mb_per_profile([(5, 100.0)] * 6) is None  # no spread in profiles


def test_steal_is_a_share_of_the_cpu_time_since_a_snapshot() -> None:
    steal, total = cpu_ticks()
    assert 0 <= steal <= total
    share = steal_pct((steal, total - 1000))  # as if 1000 jiffies passed without steal
    assert share is not None and 0 <= share <= 100
    assert steal_pct((steal, total + 10**9)) is None  # nothing passed since


def test_recovery_time_is_the_union_of_restores_that_overlap() -> None:
    """Partitions restore side by side: the bench's restore time is the time any restore
    ran, not the sum of their durations (which would halve the keys/s it reports)."""
    from audiences.tools.bench.engine_worker import covered

    assert covered([]) == 0.0
    assert covered([(0.0, 2.0), (1.0, 3.0)]) == 3.0  # overlapping
    assert covered([(5.0, 6.0), (0.0, 1.0)]) == 2.0  # apart, any order
    assert covered([(0.0, 4.0), (1.0, 2.0)]) == 4.0  # one inside the other
