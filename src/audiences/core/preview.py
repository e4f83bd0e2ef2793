"""What applying a definition would do, judged on stored profiles (`audiences preview`).

Every profile is judged with `step` itself on a catalog where the proposed
document replaces the current version, at the profile's own clock — exactly
what the workers' re-judging pass does after the definition is applied — so a
preview and the real change agree.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from audiences.core.definitions import build_catalog, compile_definition
from audiences.core.definitions.language import is_priority_list, is_trait_definition
from audiences.core.evaluator import Tick, TraitChange, Transition, step
from audiences.core.state import UserState


@dataclass
class Preview:
    key: str
    version: int  # the version the document would get
    profiles: int = 0  # profiles judged
    size: int = 0  # members (or, for a computed trait, profiles with a value) afterwards
    entering: int = 0
    exiting: int = 0
    sample: list[Any] = field(default_factory=list)  # members, or (profile, value)
    would_enter: list[str] = field(default_factory=list)  # up to `sample_size` each
    would_exit: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        # (explicit: compiled with mypyc, instances have no __dict__)
        return {
            "key": self.key,
            "version": self.version,
            "profiles": self.profiles,
            "size": self.size,
            "entering": self.entering,
            "exiting": self.exiting,
            "sample": self.sample,
            "would_enter": self.would_enter,
            "would_exit": self.would_exit,
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> Preview:
        """The inverse of `as_json` (another worker's partial report)."""
        return Preview(
            str(data["key"]),
            int(data["version"]),
            int(data.get("profiles", 0)),
            int(data.get("size", 0)),
            int(data.get("entering", 0)),
            int(data.get("exiting", 0)),
            list(data.get("sample", [])),
            list(data.get("would_enter", [])),
            list(data.get("would_exit", [])),
        )


def preview(
    doc: Mapping[str, Any],
    definitions: Mapping[str, tuple[Mapping[str, Any], int]],
    profiles: Iterable[tuple[str, UserState]],
    sample_size: int = 10,
) -> Preview:
    """Judge `profiles` on `definitions` with `doc` applied (validated beforehand)."""
    key = doc["key"]
    current = definitions.get(key)
    result = Preview(key, current[1] + 1 if current else 1)
    # Trackers the edit leaves alone or narrows keep their ids, as on the workers (an
    # edit needing more history than was kept gets a new, empty tracker here, which the
    # workers backfill when it is applied).
    catalog = compile_definition(doc, definitions, result.version, build_catalog(definitions))
    trait = is_trait_definition(doc)
    # A priority list is previewed over its audiences: size is the members of any of
    # them (disjoint: each member counted once), entering/exiting count their
    # transitions (a move between two of them is one exit and one entry).
    listed = catalog.priority_lists.get(key, ()) if is_priority_list(doc) else (key,)
    judged = frozenset(listed)
    for profile, state in profiles:
        if state.merged_into is not None:
            continue
        result.profiles += 1
        outputs = step(state, Tick(state.clock_ms), catalog, profile).transitions
        for output in outputs:
            if isinstance(output, Transition) and output.audience_key in judged:
                target = result.would_enter if output.entered else result.would_exit
                if output.entered:
                    result.entering += 1
                else:
                    result.exiting += 1
                if len(target) < sample_size:
                    target.append(profile)
        if trait:
            entry = state.computed.get(key)
            changed = any(isinstance(o, TraitChange) and o.trait_key == key for o in outputs)
            if entry is not None and (changed or entry[1]):
                result.size += 1
                if len(result.sample) < sample_size:
                    result.sample.append([profile, entry[0]])
            continue
        memberships = (state.members.get(k) for k in listed)
        if any(m is not None and m.member for m in memberships):
            result.size += 1
            if len(result.sample) < sample_size:
                result.sample.append(profile)
    return result
