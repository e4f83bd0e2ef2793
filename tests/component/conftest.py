from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from harness import Engine


@pytest.fixture
def engine(
    kafka_bootstrap: str, unique_name: Callable[..., str], tmp_path: Path
) -> Iterator[Engine]:
    created = Engine(kafka_bootstrap, unique_name("e"), tmp_path / "data")
    yield created
    created.close()
