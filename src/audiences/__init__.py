"""audiences: a real-time, Kafka-native audience engine."""

from audiences._core_build import CoreBuild, select_core

__version__ = "0.1.0"

# Before any module of `audiences.core` is imported: compiled (mypyc) or pure Python.
_CORE_BUILD = select_core()


def core_build() -> CoreBuild:
    """Which `audiences.core` this process runs: `.kind` "compiled" | "pure", `.reason`."""
    return _CORE_BUILD
