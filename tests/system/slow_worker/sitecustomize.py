"""Loaded by a fault-suite worker started with this directory on PYTHONPATH: each batch
the runtime evaluates takes AUDIENCES_TEST_BATCH_PAUSE_MS longer, so a backlog lasts
while other workers join and leave (the loop is otherwise too quick for that: it never
waits on the broker). The product has no such setting."""

import os
import time

_PAUSE_S = int(os.environ.get("AUDIENCES_TEST_BATCH_PAUSE_MS", "0")) / 1000

if _PAUSE_S > 0:
    from audiences.adapters.stream.runtime import Runtime

    _process = Runtime._process

    def _slow_process(self: Runtime, messages: list) -> None:  # type: ignore[type-arg]
        time.sleep(_PAUSE_S)
        _process(self, messages)

    Runtime._process = _slow_process  # type: ignore[method-assign]
