"""Factory helpers for unit tests of the pure core.

ev = make_event(ts=T0 + 5 * M, properties={"cart_id": "A"})
catalog = catalog_of({"key": "buyers", "condition": {...}})
transitions = run(catalog, [ev, Tick(T0 + H)])
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from typing import Any

from audiences.core.definitions import build_catalog, validate_definition
from audiences.core.definitions.catalog import Catalog
from audiences.core.evaluator import Output, Refusal, Tick, TraitChange, Transition, step
from audiences.core.events import Event, format_iso, parse_event
from audiences.core.state import UserState

S = 1_000
M = 60 * S
H = 60 * M
D = 24 * H
T0 = 1_700_000_000_000  # 2023-11-14T22:13:20.000Z: a fixed "now" for every test

_ids = itertools.count(1)


def iso(ms: int) -> str:
    """ISO-8601 UTC with milliseconds (as the core formats times)."""
    return format_iso(ms)


def event_dict(*, ts: int | None = None, **overrides: Any) -> dict[str, Any]:
    """A valid Segment track event as a dict.

    `ts` sets `timestamp` from epoch ms; any Segment field can be overridden by
    its wire name (`userId=...`, `event=...`); an override of None removes it.
    """
    raw: dict[str, Any] = {
        "type": "track",
        "userId": "u1",
        "event": "Checkout Started",
        "messageId": f"m-{next(_ids)}",
        "timestamp": iso(T0 if ts is None else ts),
        "properties": {},
    }
    raw.update(overrides)
    return {k: v for k, v in raw.items() if v is not None}


def make_event(
    *, ts: int | None = None, received_at_ms: int | None = None, **overrides: Any
) -> Event:
    """A parsed `Event` built from `event_dict(**overrides)`."""
    raw = event_dict(ts=ts, **overrides)
    return parse_event(raw, T0 if received_at_ms is None else received_at_ms)


def identify(ts: int, user: str = "u1", **traits: Any) -> Event:
    """A parsed identify event carrying `traits`."""
    return make_event(ts=ts, type="identify", event=None, userId=user, traits=traits)


def catalog_of(*definitions: Mapping[str, Any], version: int = 1) -> Catalog:
    """Validate and compile audience definitions, all at `version`."""
    docs = {}
    for definition in definitions:
        doc = validate_definition(dict(definition))
        docs[doc["key"]] = (doc, version)
    return build_catalog(docs)


def audience(key: str, condition: Mapping[str, Any], **fields: Any) -> dict[str, Any]:
    """A definition document."""
    return {"key": key, "condition": condition, **fields}


def feed(
    catalog: Catalog,
    items: Iterable[Event | Tick | dict[str, Any]],
    user: str = "u1",
    state: UserState | None = None,
) -> tuple[UserState | None, list[Output]]:
    """Feed events (dicts are parsed) and ticks to `step`; returns (state, outputs)."""
    transitions: list[Output] = []
    for item in items:
        if isinstance(item, dict):
            item = parse_event(item, T0)
        result = step(state, item, catalog, user)
        state = result.state
        transitions.extend(result.transitions)
    return state, transitions


def run(
    catalog: Catalog,
    items: Iterable[Event | Tick | dict[str, Any]],
    user: str = "u1",
    state: UserState | None = None,
) -> list[Output]:
    """The outputs (transitions and trait changes) of feeding `items` to `step` for one profile."""
    return feed(catalog, items, user, state)[1]


def summary(transitions: Iterable[Output]) -> list[tuple[str, str, int]]:
    """`(audience, "entered"|"exited", at_ms)` per transition: compact to assert on."""
    return [
        (t.audience_key, "entered" if t.entered else "exited", t.at_ms)
        for t in transitions
        if isinstance(t, Transition)
    ]


def trait_values(outputs: Iterable[Output]) -> list[tuple[str, Any, int]]:
    """`(trait, value, at_ms)` per `Trait Computed`."""
    return [(t.trait_key, t.value, t.at_ms) for t in outputs if isinstance(t, TraitChange)]


class Cluster:
    """Profiles by key, with Kafka's part played in memory: control records a step
    returns are delivered at once to the profile they are keyed by (through the wire
    format), deleted profiles' events are dropped, as the worker does."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.states: dict[str, UserState] = {}
        self.suppressed: set[str] = set()
        self.outputs: list[tuple[str, Output]] = []
        self.erased: list[str] = []
        self.refused: list[Refusal] = []  # dead-lettered events (links refused)

    def send(self, item: dict[str, Any]) -> None:
        import orjson

        queue = [item]
        while queue:
            event = parse_event(orjson.dumps(queue.pop(0)), T0)
            key = event.key
            if key in self.suppressed and event.type != "unsuppress":
                continue
            self.suppressed.discard(key)
            result = step(self.states.get(key), event, self.catalog, key)
            self._record(key, result.transitions)
            if result.erase:
                self.states.pop(key, None)
                self.suppressed.add(key)
                self.erased.append(key)
            else:
                self.states[key] = result.state
            queue += [record for _target, record in result.controls]
            self.refused += result.refused

    def tick_until(self, until_ms: int) -> None:
        """Deliver every wake before `until_ms`, earliest first (the sweeper's job)."""
        while True:
            due = [(s.wake_ms, k) for k, s in self.states.items() if s.wake_ms < until_ms]
            if not due:
                return
            wake, key = min(due)
            result = step(self.states[key], Tick(wake), self.catalog, key)
            self.states[key] = result.state
            self._record(key, result.transitions)

    def _record(self, key: str, outputs: list[Output]) -> None:
        self.outputs += [(key, output) for output in outputs]


def drive(catalog: Catalog, history: list[Event], after_ms: int) -> list[Output]:
    """Drive `step` as the runtime does: a Tick at every wake before the next event
    (and up to `after_ms` past the last one), a codec round trip between inputs."""
    state: UserState | None = None
    outputs: list[Output] = []
    wake = 1 << 62

    def feed_one(item: Event | Tick) -> int:
        nonlocal state
        result = step(state, item, catalog, "p1")
        state = UserState.decode(result.state.encode())
        outputs.extend(result.transitions)
        return result.next_wake_ms

    for event in history:
        while wake < event.timestamp_ms:
            wake = feed_one(Tick(wake))
        wake = feed_one(event)
    horizon = history[-1].timestamp_ms + after_ms
    while wake <= horizon:
        wake = feed_one(Tick(wake))
    return outputs
