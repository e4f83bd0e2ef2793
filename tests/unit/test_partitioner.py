"""murmur2 as Kafka's Java client computes it (vectors from Kafka's UtilsTest)."""

from __future__ import annotations

import pytest

from audiences.core.partitioning import murmur2, partition_for


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"21", -973932308),
        (b"foobar", -790332482),
        (b"a-little-bit-long-string", -985981536),
        (b"a-little-bit-longer-string", -1486304829),
        (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
        (b"abc", 479470107),
    ],
)
def test_murmur2_matches_the_java_client(data: bytes, expected: int) -> None:
    assert murmur2(data) == expected


def test_partition_is_positive_modulo() -> None:
    assert all(0 <= partition_for(f"user-{n}".encode(), 7) < 7 for n in range(200))
