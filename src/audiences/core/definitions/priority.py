"""Priority lists (SPEC §3): `{"key": K, "kind": "priority_list", "audiences": [K1, K2, …]}`.

A listed audience Ki keeps its own condition, but a profile is a member of Ki only if
it qualifies for Ki and is a member of no Kj listed before it. Since the members of
K1 … Ki-1 are disjoint and together are exactly the profiles qualifying for one of
them, "member of no higher Kj" is "qualifies for no higher Kj": the compiler wraps
Ki's condition in a `PriorityNode` reading the memberships of the higher audiences,
and makes Ki depend on them as `in_audience` would (dependency order puts K1 first,
and a change of a higher membership re-judges Ki in the same step). `step` then
orders the transitions of one list within one judging pass exits first, so a move
reads `Audience Exited` (old) before `Audience Entered` (new), at the same time.

Nothing here runs for audiences in no list: a catalog without priority lists
compiles and judges exactly as before.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from typing import Any, Final, final

from audiences.core.definitions.conditions import Node
from audiences.core.definitions.language import PRIORITY_LIST, is_priority_list
from audiences.core.state import NEVER, UserState
from audiences.errors import DefinitionError

PRIORITY_FIELDS = ("key", "name", "description", "kind", "audiences", "version", "created_at")
MAX_PRIORITY_AUDIENCES: Final = 64
_KEY = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


def validate_priority_list(obj: Mapping[str, Any]) -> None:
    """The shape of a priority list document (the common fields — key, name,
    description, version, created_at — are checked by `validate_definition`)."""
    for name in obj:
        if name not in PRIORITY_FIELDS:
            matches = difflib.get_close_matches(name, PRIORITY_FIELDS, n=1, cutoff=0.6)
            raise DefinitionError(
                f"$.{name}",
                f"unknown field; a priority list has {', '.join(PRIORITY_FIELDS)}",
                matches[0] if matches else None,
            )
    listed = obj.get("audiences")
    if not isinstance(listed, list) or not listed:
        raise DefinitionError("$.audiences", "expected a non-empty list of audience keys")
    if len(listed) > MAX_PRIORITY_AUDIENCES:
        raise DefinitionError(
            "$.audiences",
            f"at most {MAX_PRIORITY_AUDIENCES} audiences in a priority list, got {len(listed)}",
            reason="limits",
        )
    seen: set[str] = set()
    for index, key in enumerate(listed):
        path = f"$.audiences[{index}]"
        if not isinstance(key, str) or not _KEY.match(key):
            raise DefinitionError(path, f"expected an audience key, got {key!r}")
        if key in seen:
            raise DefinitionError(path, f"{key!r} is listed twice")
        if key == obj.get("key"):
            raise DefinitionError(path, "a priority list cannot list itself")
        seen.add(key)


def listed_audiences(doc: Mapping[str, Any]) -> list[str]:
    return [str(key) for key in doc.get("audiences") or ()]


def priority_edges(definitions: Mapping[str, Mapping[str, Any]]) -> dict[str, set[str]]:
    """Listed audience -> the audiences listed before it (its dependencies: it is
    judged after them and re-judged when their membership changes), for every priority
    list of `definitions`, in key order (validation keeps an audience in one list)."""
    edges: dict[str, set[str]] = {}
    for key in sorted(definitions):
        doc = definitions[key]
        if not is_priority_list(doc):
            continue
        listed = listed_audiences(doc)
        for place, audience in enumerate(listed):
            if audience not in edges:
                edges[audience] = set(listed[:place])
    return edges


def check_priority_references(
    doc: Mapping[str, Any], existing: Mapping[str, Mapping[str, Any]]
) -> None:
    """A priority list against the other definitions: its audiences exist, are
    audiences, and are in no other list. (Cycles with `in_audience`: the caller checks
    the whole graph, `priority_edges` included.)"""
    audiences = {
        key for key, other in existing.items() if "condition" in other and "kind" not in other
    }
    owner: dict[str, str] = {}
    for key in sorted(existing):
        other = existing[key]
        if is_priority_list(other) and key != doc["key"]:
            for listed in listed_audiences(other):
                owner.setdefault(listed, key)
    for index, key in enumerate(listed_audiences(doc)):
        path = f"$.audiences[{index}]"
        if key not in existing:
            matches = difflib.get_close_matches(key, sorted(audiences), n=1, cutoff=0.6)
            raise DefinitionError(
                path, f"unknown audience {key!r}", matches[0] if matches else None
            )
        if key not in audiences:
            raise DefinitionError(path, f"{key!r} is not an audience")
        if key in owner:
            raise DefinitionError(
                path,
                f"{key!r} is already in priority list {owner[key]!r}; an audience "
                "can be in at most one",
            )


@final
class PriorityNode(Node):
    """A listed audience's condition, exclusive: false while the profile is a member of
    an audience listed before it (`taken_by`), else the audience's own condition."""

    def __init__(self, own: Node, higher: list[str], list_key: str) -> None:
        self.own = own
        self.higher = higher
        self.list_key = list_key

    def taken_by(self, state: UserState) -> str | None:
        members = state.members
        for key in self.higher:
            membership = members.get(key)
            if membership is not None and membership.member:
                return key
        return None

    def evaluate(self, state: UserState, now: int) -> tuple[bool, int]:
        if self.taken_by(state) is not None:
            # Nothing of its own can make it a member while a higher audience holds the
            # profile; when that one lets go, this one is re-judged (a dependent).
            return False, NEVER
        return self.own.evaluate(state, now)

    def explain(self, state: UserState, now: int) -> dict[str, Any]:
        value, change = self.evaluate(state, now)
        return {
            "condition": PRIORITY_LIST,
            "definition": {PRIORITY_LIST: self.list_key, "higher": list(self.higher)},
            "value": value,
            "changes_at_ms": change if change < NEVER else None,
            "taken_by": self.taken_by(state),
            "own": self.own.explain(state, now),
        }
