"""Loaded by a fault-suite worker started with this directory on PYTHONPATH: each batch
the runtime evaluates takes AUDIENCES_TEST_BATCH_PAUSE_MS longer, so a backlog lasts
while other workers join and leave (the loop is otherwise too quick for that: it never
waits on the broker). With AUDIENCES_TEST_BATCH_PAUSE_WHILE set to a path, only while
that file exists (a test removes it to let the worker drain at full speed). The product
has no such setting."""

import os
import time

_PAUSE_S = int(os.environ.get("AUDIENCES_TEST_BATCH_PAUSE_MS", "0")) / 1000
_PAUSE_WHILE = os.environ.get("AUDIENCES_TEST_BATCH_PAUSE_WHILE")

if _PAUSE_S > 0:
    from audiences.adapters.stream.runtime import Runtime

    _process = Runtime._process

    def _slow_process(self: Runtime, messages: list) -> None:  # type: ignore[type-arg]
        if _PAUSE_WHILE is None or os.path.exists(_PAUSE_WHILE):
            time.sleep(_PAUSE_S)
        _process(self, messages)

    Runtime._process = _slow_process  # type: ignore[method-assign]
