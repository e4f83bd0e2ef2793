"""The read port: how the API (and anything else off the runtime thread) reads state.

The runtime thread owns every store and decoded profile. Other threads never
touch them: they hand a query (a function of a `StateView`) to `QueryPort.ask`,
the runtime runs it right after a checkpoint (every commit interval, 100 ms by
default), so the stores hold everything evaluated so far — and the answer comes back on the
asker's event loop. Definitions are answered from the runtime's in-memory
catalog (`QueryPort.definitions`), published after every change; nothing here
builds a Kafka client or writes to a topic.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from audiences.core.definitions import Catalog, build_catalog
from audiences.core.state import UserState
from audiences.errors import ApiError

T = TypeVar("T")
SERVE_BUDGET_S = 0.05  # longest time one loop turn spends answering queries


@dataclass(frozen=True)
class PartitionHistory:
    """One partition's share of an audience's size history (state/history.py)."""

    size: int
    buckets: dict[int, tuple[int, int]]  # minute (epoch ms) -> (entered, exited)


class StateView(Protocol):
    """What a query may read, on the runtime thread. Profiles are fresh copies."""

    def owned(self) -> list[int]: ...

    def partition_of(self, key: bytes) -> int: ...

    def profile(self, partition: int, key: bytes) -> tuple[str, UserState | None]:
        """(status, state): status is "ok", "missing", "suppressed" (deleted user) or
        "quarantined"; raises KeyError when the partition is not owned here."""
        ...

    def profiles(
        self, partition: int, start: bytes, limit: int
    ) -> tuple[list[tuple[bytes, UserState]], bytes | None]:
        """Stored profiles of a partition in key order from `start` on (at most `limit`
        read; quarantined and unreadable ones left out) and the key to resume from
        (None = the partition is done); raises KeyError when it is not owned here."""
        ...

    def sizes(self) -> dict[int, dict[str, int]]:
        """Members per audience, per owned partition."""
        ...

    def history(self, audience: str, from_ms: int) -> dict[int, PartitionHistory]:
        """Per owned partition: the audience's current member count and its
        (entered, exited) per minute from the minute of `from_ms` on."""
        ...

    def now(self) -> int: ...


@dataclass(frozen=True)
class DefinitionsSnapshot:
    """The definitions as the runtime evaluates them, and how far it read the topic."""

    documents: Mapping[str, tuple[dict[str, Any], int]] = field(default_factory=dict)
    catalog: Catalog = field(default_factory=lambda: build_catalog({}))
    offset: int = -1  # next offset of the definitions topic to read (one partition)


class QueryPort:
    """Thread-safe: `ask`, `definitions` and `wait_for_definitions` from any event loop;
    `serve` and `publish` from the runtime thread."""

    def __init__(self) -> None:
        self._requests: queue.SimpleQueue[
            tuple[Callable[[StateView], Any], asyncio.AbstractEventLoop, asyncio.Future[Any]]
        ] = queue.SimpleQueue()
        self._definitions: DefinitionsSnapshot | None = None
        self._changed = threading.Condition()
        self.serving = False  # the runtime is running and answers queries
        self.partitions = 0  # of `events` (known once the runtime started)
        self.owned: frozenset[int] = frozenset()  # partitions owned now (a snapshot)

    # -- askers --------------------------------------------------------------------------

    async def ask(self, query: Callable[[StateView], T], timeout_s: float = 30.0) -> T:
        """Run `query` on the runtime thread; 503 when it is not running or too slow."""
        if not self.serving:
            raise ApiError(503, "the worker is starting or stopping; retry")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._requests.put((query, loop, future))
        try:
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            raise ApiError(503, "the worker did not answer in time; retry") from None

    @property
    def definitions(self) -> DefinitionsSnapshot:
        """The current definitions; 503 before the runtime has read them."""
        current = self._definitions
        if current is None:
            raise ApiError(503, "the worker has not read the definitions yet; retry")
        return current

    async def wait_for_definitions(
        self, offset: int, timeout_s: float = 10.0
    ) -> DefinitionsSnapshot:
        """The definitions once the runtime has read the topic past `offset` (read your
        own writes: a definition just written is visible to the next read)."""
        deadline = time.monotonic() + timeout_s
        while True:
            current = self._definitions
            if current is not None and current.offset > offset:
                return current
            if time.monotonic() > deadline:
                raise ApiError(503, "the worker has not seen the change yet; retry")
            await asyncio.sleep(0.01)

    # -- the runtime thread ---------------------------------------------------------------

    def publish(self, definitions: DefinitionsSnapshot) -> None:
        self._definitions = definitions

    def serve(self, view: StateView, budget_s: float = SERVE_BUDGET_S) -> None:
        """Answer waiting queries (for at most about `budget_s`)."""
        deadline = time.monotonic() + budget_s
        while time.monotonic() < deadline:
            try:
                query, loop, future = self._requests.get_nowait()
            except queue.Empty:
                return
            try:
                result = query(view)
            except BaseException as exc:  # handed to the asker
                loop.call_soon_threadsafe(_settle, future, None, exc)
            else:
                loop.call_soon_threadsafe(_settle, future, result, None)

    def stop_serving(self) -> None:
        """Fail every waiting query (the runtime stops)."""
        self.serving = False
        while True:
            try:
                _query, loop, future = self._requests.get_nowait()
            except queue.Empty:
                return
            error = ApiError(503, "the worker is stopping; retry")
            loop.call_soon_threadsafe(_settle, future, None, error)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
