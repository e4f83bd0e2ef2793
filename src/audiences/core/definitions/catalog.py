"""A catalog: every live definition compiled, indexed for the hot path."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, final

from audiences.core.calendar import horizon_ms
from audiences.core.definitions.accounts import (
    GroupTracker,
    account_parts,
    compile_account,
    hidden_key,
    is_account_definition,
)
from audiences.core.definitions.buckets import (
    Holdout,
    RandomBucketNode,
    definition_salt,
    holdout_of,
)
from audiences.core.definitions.conditions import (
    ALL_EVENTS,
    AllNode,
    AnyNode,
    ComputedNode,
    DeviceNode,
    DeviceTracker,
    InAudienceNode,
    Node,
    NotNode,
    PerformedNode,
    PerformedTracker,
    SequenceNode,
    SequenceTracker,
    Tracker,
    TraitNode,
)
from audiences.core.definitions.language import (
    audience_references,
    is_priority_list,
    is_trait_definition,
    trait_references,
)
from audiences.core.definitions.priority import PriorityNode, listed_audiences
from audiences.core.definitions.traits import ComputedTrait, counts_from_ms
from audiences.core.definitions.validate import find_cycle
from audiences.core.durations import parse_duration_ms
from audiences.errors import DefinitionError


@dataclass(slots=True)
class CompiledAudience:
    key: str
    version: int
    name: str
    include_anonymous: bool
    root: Node
    definition: Mapping[str, Any]
    tracker_ids: frozenset[str] = frozenset()
    uses_traits: bool = False
    references: frozenset[str] = frozenset()
    backfill: bool = True
    subject: str = "user"  # or "account" (accounts.py)
    hidden: bool = False  # the per-user predicate of an account audience: never announced
    holdout: Holdout | None = None  # SPEC §3 `holdout` (definitions/buckets.py)


@final
class Dispatch:
    """A tracker on a route of the compiled plan, and what a change of its data makes
    `step` re-judge: audiences as a bit mask of their positions, computed traits as a
    bit mask of their places in `Catalog.trait_order`."""

    __slots__ = ("audiences", "tracker", "traits")

    def __init__(self, tracker: Tracker, audiences: int, traits: int) -> None:
        self.tracker = tracker
        self.audiences = audiences
        self.traits = traits


@dataclass(slots=True)
class Catalog:
    """Audiences in dependency order, with indexes from inputs to audiences."""

    audiences: list[CompiledAudience] = field(default_factory=list)
    trackers: dict[str, Tracker] = field(default_factory=dict)
    trackers_by_event: dict[str, list[Tracker]] = field(default_factory=dict)
    audiences_by_tracker: dict[str, frozenset[str]] = field(default_factory=dict)
    trait_audiences: frozenset[str] = frozenset()
    dependents: dict[str, frozenset[str]] = field(default_factory=dict)
    index: dict[str, int] = field(default_factory=dict)  # key -> position in `audiences`
    fingerprint: str = ""
    skipped: dict[str, str] = field(default_factory=dict)  # key -> why it is not evaluated
    # Computed traits, judged before audiences on every step that touches them.
    traits: dict[str, ComputedTrait] = field(default_factory=dict)
    traits_by_tracker: dict[str, frozenset[str]] = field(default_factory=dict)  # id -> keys
    trait_dependents: dict[str, frozenset[str]] = field(default_factory=dict)
    # The same indexes as positions in `audiences`, for the hot path.
    tracker_positions: dict[str, frozenset[int]] = field(default_factory=dict)
    trait_positions: frozenset[int] = frozenset()
    dependent_positions: dict[int, tuple[int, ...]] = field(default_factory=dict)
    trait_dependent_positions: dict[str, frozenset[int]] = field(default_factory=dict)
    # Deleted audiences (key -> (last version, name)): their members are told they exit.
    retired: dict[str, tuple[int, str]] = field(default_factory=dict)
    # A backfill in progress (`with_pending`): trackers live events do not update yet, and
    # the audiences and traits that depend on them, which `step` does not judge. Empty
    # (falsy) for a full catalog: the hot path tests nothing else.
    pending: frozenset[str] = frozenset()
    frozen_audiences: frozenset[str] = frozenset()  # keys
    frozen_positions: frozenset[int] = frozenset()  # the same as positions in `audiences`
    frozen_traits: frozenset[str] = frozenset()
    full_fingerprint: str = ""  # of the catalog without anything pending
    # The compiled plan of the hot path (`plan_dispatch`), from the indexes above. Sets of
    # audiences are bit masks of positions (bit i: `audiences[i]`), sets of computed
    # traits bit masks of places in `trait_order` (sorted by key): `step` ORs and walks
    # ints instead of building sets.
    routes: dict[str, tuple[Dispatch, ...]] = field(default_factory=dict)  # route -> plan
    unrouted: tuple[Dispatch, ...] = ()  # events of any other route, or none (identify)
    trait_order: list[ComputedTrait] = field(default_factory=list)
    trait_places: dict[str, int] = field(default_factory=dict)  # key -> place in trait_order
    all_audiences: int = 0
    all_traits: int = 0
    trait_audiences_mask: int = 0  # audiences comparing identify traits
    dependents_masks: list[int] = field(default_factory=list)  # position -> in_audience users
    trait_dependents_masks: list[int] = field(default_factory=list)  # place -> audiences
    frozen_mask: int = 0
    frozen_traits_mask: int = 0
    # Account audiences (accounts.py): hidden per-user audience key -> account audience
    # key, and the positions of account audiences. Empty: `step` does nothing more.
    account_hidden: dict[str, str] = field(default_factory=dict)
    account_positions: tuple[int, ...] = ()
    # Priority lists (SPEC §3): list key -> its audiences as compiled (in list order),
    # listed audience -> its list, and the listed audiences as a bit mask of positions
    # (zero without lists: `step` then does nothing more).
    priority_lists: dict[str, tuple[str, ...]] = field(default_factory=dict)
    priority_of: dict[str, str] = field(default_factory=dict)
    exclusive_mask: int = 0

    def audience(self, key: str) -> CompiledAudience | None:
        position = self.index.get(key)
        return None if position is None else self.audiences[position]

    def with_pending(self, tracker_ids: frozenset[str]) -> Catalog:
        """This catalog while trackers `tracker_ids` are being backfilled (a second cursor
        over the log folds history into them with `evaluator.fold_history`):

        - live events do not update them (`trackers_by_event` leaves them out), but
          `trackers` keeps them, so adopting this catalog keeps their data;
        - every audience that depends on one — directly, through a computed trait that
          uses one, or through `in_audience` of such an audience; every audience of a
          priority list that has such an audience — and every computed
          trait whose tracker is pending is *frozen*: `step` neither judges it nor emits
          for it, and leaves its membership or value and its deadline as they are
          (adopting this catalog keeps them too: no exit, no deletion);
        - its fingerprint differs from the full catalog's, deterministically, so that
          when the runtime switches back to the full catalog every profile adopts that
          once: the audiences thawed are judged then, and unchanged members hear nothing.

        Ids this catalog does not track are ignored; with none left, or none given, this
        catalog is returned. Pending sets accumulate when called on a pending catalog."""
        pending = frozenset(t for t in tracker_ids if t in self.trackers) - self.pending
        if not pending:
            return self
        pending |= self.pending
        frozen_traits = frozenset(k for k, t in self.traits.items() if t.id in pending)
        frozen: set[str] = set()
        for key in frozen_traits:
            frozen |= self.trait_dependents.get(key, frozenset())
        while True:
            before = len(frozen)
            for audience in self.audiences:  # in dependency order: references come first
                if audience.tracker_ids & pending or audience.references & frozen:
                    frozen.add(audience.key)
            # A priority list freezes whole: its audiences judged apart could hold a
            # profile in two of them until the backfill ends.
            for listed in self.priority_lists.values():
                if frozen.intersection(listed):
                    frozen.update(listed)
            if len(frozen) == before:
                break
        by_event = {
            route: [t for t in trackers if t.id not in pending]
            for route, trackers in self.trackers_by_event.items()
        }
        full = self.full_fingerprint or self.fingerprint
        digest = hashlib.sha1(f"{full}|pending|{','.join(sorted(pending))}".encode())
        return plan_dispatch(
            dataclasses.replace(
                self,
                trackers_by_event={route: group for route, group in by_event.items() if group},
                pending=pending,
                frozen_audiences=frozenset(frozen),
                frozen_positions=frozenset(self.index[key] for key in frozen),
                frozen_traits=frozen_traits,
                full_fingerprint=full,
                fingerprint=digest.hexdigest()[:16],
            )
        )


def plan_dispatch(catalog: Catalog) -> Catalog:
    """Fill the hot path's plan of `catalog` from its indexes (and return it): for each
    route, the trackers an event of that route updates — those of the route, then those
    that see every event, as `step` always visited them — with the audiences and traits
    each one's change re-judges."""
    index = catalog.index
    catalog.trait_order = [catalog.traits[key] for key in sorted(catalog.traits)]
    places = {trait.key: place for place, trait in enumerate(catalog.trait_order)}
    catalog.trait_places = places

    def audience_mask(positions: Any) -> int:
        mask = 0
        for position in positions:
            mask |= 1 << position
        return mask

    def dispatch(tracker: Tracker) -> Dispatch:
        trait_keys = catalog.traits_by_tracker.get(tracker.id)
        if trait_keys is not None:
            traits = 0
            for key in trait_keys:
                traits |= 1 << places[key]
            return Dispatch(tracker, 0, traits)
        return Dispatch(tracker, audience_mask(catalog.tracker_positions.get(tracker.id, ())), 0)

    by_event = catalog.trackers_by_event
    every = tuple(dispatch(t) for t in by_event.get(ALL_EVENTS, ()))
    catalog.routes = {
        route: tuple(dispatch(t) for t in trackers) + every
        for route, trackers in by_event.items()
        if route != ALL_EVENTS
    }
    catalog.unrouted = every
    catalog.all_audiences = (1 << len(catalog.audiences)) - 1
    catalog.all_traits = (1 << len(catalog.trait_order)) - 1
    catalog.trait_audiences_mask = audience_mask(catalog.trait_positions)
    catalog.dependents_masks = [
        audience_mask(catalog.dependent_positions.get(position, ()))
        for position in range(len(catalog.audiences))
    ]
    catalog.trait_dependents_masks = [
        audience_mask(catalog.trait_dependent_positions.get(trait.key, ()))
        for trait in catalog.trait_order
    ]
    catalog.frozen_mask = audience_mask(index[key] for key in catalog.frozen_audiences)
    catalog.frozen_traits_mask = 0
    for key in catalog.frozen_traits:
        catalog.frozen_traits_mask |= 1 << places[key]
    catalog.exclusive_mask = audience_mask(index[key] for key in catalog.priority_of)
    return catalog


class _Compiler:
    def __init__(self) -> None:
        self.trackers: dict[str, Tracker] = {}
        self.from_ms = 0  # of the audience being compiled (backfill: false)
        self.salt = ""  # of the audience being compiled (random_bucket)
        self.performed: list[PerformedNode] = []

    def settle(self, previous: Catalog | None) -> dict[str, str]:
        """Fix the ids of `performed` trackers now that every leaf was served (see
        `PerformedTracker.settle`), taking over what the previous catalog's tracker of
        the same base kept when that covers the need; re-key `trackers` by the settled
        ids and return the renames (id while compiling -> settled id)."""
        kept: dict[str, PerformedTracker] = {}
        if previous is not None:
            for old in previous.trackers.values():
                if isinstance(old, PerformedTracker):
                    kept[old.base_id] = old
        renames: dict[str, str] = {}
        settled: dict[str, Tracker] = {}
        for compiling_id, tracker in self.trackers.items():
            if isinstance(tracker, PerformedTracker):
                tracker.settle(kept.get(tracker.base_id))
                renames[compiling_id] = tracker.id
            settled[tracker.id] = tracker
        self.trackers = settled
        for node in self.performed:
            node.tracker_id = node.tracker.id
        return renames

    def _share(self, tracker: Tracker) -> Tracker:
        return self.trackers.setdefault(tracker.id, tracker)

    def compile(self, condition: Mapping[str, Any], used: set[str], flags: dict[str, bool]) -> Node:
        node = self._compile(condition, used, flags)
        node.condition = condition
        return node

    def _compile(
        self, condition: Mapping[str, Any], used: set[str], flags: dict[str, bool]
    ) -> Node:
        ((name, body),) = condition.items()
        if name == "all":
            return AllNode([self.compile(c, used, flags) for c in body])
        if name == "any":
            return AnyNode([self.compile(c, used, flags) for c in body])
        if name == "not":
            return NotNode(self.compile(body, used, flags))
        if name in ("performed", "page_viewed", "screen_viewed"):
            event_type = "track" if name == "performed" else name.split("_")[0]
            ((op, count),) = (body.get("times") or {"gte": 1}).items()
            if "within" in body:
                mode, horizon = "window", horizon_ms(body["within"])  # (a calendar window too)
            elif "between" in body:
                mode, horizon = "between", parse_duration_ms(body["between"][1]) or 0
            else:
                mode, horizon = "count", 0
            tracker = self._share(PerformedTracker(body, mode, event_type, self.from_ms))
            assert isinstance(tracker, PerformedTracker)
            tracker.serve(horizon, count + 1)
            used.add(tracker.id)
            node = PerformedNode(tracker, body, op, count)
            self.performed.append(node)
            return node
        if name == "sequence":
            seq = self._share(SequenceTracker(body, self.from_ms))
            used.add(seq.id)
            assert isinstance(seq, SequenceTracker)
            return SequenceNode(seq)
        if name == "trait":
            flags["traits"] = True
            return TraitNode(body)
        if name == "in_audience":
            return InAudienceNode(body)
        if name == "device":
            used.add(self._share(DeviceTracker()).id)
            return DeviceNode(body)
        if name == "computed":
            return ComputedNode(body)
        if name == "random_bucket":  # no tracker: constant per profile (buckets.py)
            return RandomBucketNode(body, self.salt)
        raise ValueError(f"condition {name!r} cannot be compiled")


def build_catalog(
    definitions: Mapping[str, tuple[Mapping[str, Any], int]],
    retired: Mapping[str, tuple[int, str]] | None = None,
    previous: Catalog | None = None,
) -> Catalog:
    """Compile validated definitions (key -> (document, version)).

    Definitions are validated when applied, so this never raises on a single
    bad one: an audience in a reference cycle or referring to a missing audience
    is skipped and reported in `skipped` instead of stopping the worker.

    `previous`, the catalog this one replaces, decides only tracker ids: a `performed`
    tracker whose need the previous tracker of the same events covers keeps its
    parameters and id (a narrowing edit reuses the data, nothing to backfill); one that
    needs more history than was kept gets a new id (its data starts from a backfill).
    Memberships never depend on it: kept data that covers a leaf answers it exactly.
    """
    trait_docs = {k: v for k, v in definitions.items() if is_trait_definition(v[0])}
    list_docs = {k: v for k, v in definitions.items() if is_priority_list(v[0])}
    definitions = {
        k: v for k, v in definitions.items() if k not in trait_docs and k not in list_docs
    }
    account_hidden: dict[str, str] = {}
    for key, (doc, version) in list(definitions.items()):
        if not is_account_definition(doc):
            continue
        for n, (_quantifier, inner) in enumerate(account_parts(doc["condition"])):
            hidden = hidden_key(key, n)
            account_hidden[hidden] = key
            hidden_doc = {"key": hidden, "name": hidden, "condition": inner}
            for option in ("include_anonymous", "backfill", "created_at"):
                if option in doc:
                    hidden_doc[option] = doc[option]
            hidden_doc["salt"] = doc.get("salt", key)  # (random buckets: the account's)
            definitions[hidden] = (hidden_doc, version)
    graph = {key: audience_references(doc["condition"]) for key, (doc, _) in definitions.items()}
    for hidden, key in account_hidden.items():
        graph[key].add(hidden)  # (a skipped predicate skips its account audience)
    skipped: dict[str, str] = {}
    # Priority lists: each listed audience depends on those listed before it (judged
    # after them, re-judged when their membership changes). Audiences that no longer
    # exist are left out of the list; an audience claimed by two lists (validation
    # prevents it) stays in the first by key.
    higher: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for list_key in sorted(list_docs):
        present = [
            k for k in listed_audiences(list_docs[list_key][0]) if k in graph and k not in owner
        ]
        for place, key in enumerate(present):
            owner[key] = list_key
            higher[key] = present[:place]
            graph[key] = graph[key] | set(present[:place])
    for key, (doc, _) in definitions.items():
        missing_traits = sorted(trait_references(doc["condition"]) - set(trait_docs))
        if missing_traits:
            skipped[key] = f"refers to missing computed trait {missing_traits[0]!r}"
            graph.pop(key)
    while (cycle := find_cycle(graph)) is not None:
        for key in cycle:
            skipped[key] = "reference cycle: " + " -> ".join(cycle)
            graph.pop(key, None)
    changed = True
    while changed:
        changed = False
        for key, refs in list(graph.items()):
            missing = sorted(ref for ref in refs if ref not in graph)
            if missing:
                skipped[key] = f"refers to missing audience {missing[0]!r}"
                del graph[key]
                changed = True

    # Dependency order (references first), depth-first with an explicit stack: a chain
    # of thousands of audiences, each referring to the next, needs no recursion.
    order: list[str] = []
    placed: set[str] = set()
    for first in sorted(graph):
        if first in placed:
            continue
        placed.add(first)
        pending: list[tuple[str, Iterator[str]]] = [(first, iter(sorted(graph[first])))]
        while pending:
            current, unplaced = pending[-1]
            ref = next(unplaced, None)
            if ref is None:
                pending.pop()
                order.append(current)
            elif ref not in placed:
                placed.add(ref)
                pending.append((ref, iter(sorted(graph[ref]))))

    lists: dict[str, tuple[str, ...]] = {}
    for list_key in sorted(list_docs):  # what is left of each list (in dependency order)
        kept = tuple(
            k for k in listed_audiences(list_docs[list_key][0]) if owner.get(k) == list_key
        )
        if any(k not in graph for k in kept):
            skipped[list_key] = next(skipped[k] for k in kept if k not in graph)
        lists[list_key] = tuple(k for k in kept if k in graph)
    for key in owner:
        higher[key] = [k for k in higher[key] if k in graph]

    compiler = _Compiler()
    catalog = Catalog(skipped=skipped, retired=dict(retired or {}))
    for key in sorted(trait_docs):
        trait = ComputedTrait(*trait_docs[key])
        catalog.traits[key] = trait
        compiler.trackers[trait.id] = trait
        catalog.traits_by_tracker[trait.id] = catalog.traits_by_tracker.get(
            trait.id, frozenset()
        ) | {key}
    trait_dependents: dict[str, set[str]] = {}
    by_tracker: dict[str, set[str]] = {}
    trait_keys: set[str] = set()
    dependents: dict[str, set[str]] = {}
    compiled: list[tuple[str, Node, set[str], dict[str, bool]]] = []
    for key in order:
        doc = definitions[key][0]
        used: set[str] = set()
        flags: dict[str, bool] = {}
        compiler.from_ms = counts_from_ms(doc)
        if is_account_definition(doc):
            compiled.append((key, compile_account(key, doc["condition"]), used, flags))
            continue
        compiler.salt = definition_salt(doc)
        root = compiler.compile(doc["condition"], used, flags)
        if key in owner:  # a listed audience: exclusive in its list's order
            root = PriorityNode(root, higher[key], owner[key])
            root.condition = doc["condition"]
        compiled.append((key, root, used, flags))
    renames = compiler.settle(previous)  # every leaf is served: what each tracker keeps
    for key, root, compiling_ids, flags in compiled:
        doc, version = definitions[key]
        used = {renames.get(tracker_id, tracker_id) for tracker_id in compiling_ids}
        audience = CompiledAudience(
            key=key,
            version=version,
            name=str(doc.get("name") or key),
            include_anonymous=bool(doc.get("include_anonymous", False)),
            root=root,
            definition=doc,
            tracker_ids=frozenset(used),
            uses_traits=bool(flags.get("traits")),
            references=frozenset(graph[key]),
            backfill=bool(doc.get("backfill", True)),
            subject="account" if is_account_definition(doc) else "user",
            hidden=key in account_hidden,
            holdout=holdout_of(doc),
        )
        for trait_key in trait_references(doc["condition"]):
            trait_dependents.setdefault(trait_key, set()).add(key)
        catalog.audiences.append(audience)
        for tracker_id in used:
            by_tracker.setdefault(tracker_id, set()).add(key)
        if audience.uses_traits:
            trait_keys.add(key)
        for ref in graph[key]:
            dependents.setdefault(ref, set()).add(key)
    catalog.index = {audience.key: i for i, audience in enumerate(catalog.audiences)}
    catalog.account_hidden = {h: k for h, k in account_hidden.items() if h in catalog.index}
    catalog.account_positions = tuple(
        i for i, audience in enumerate(catalog.audiences) if audience.subject == "account"
    )
    if catalog.account_positions:
        group_tracker = GroupTracker()
        compiler.trackers[group_tracker.id] = group_tracker
    catalog.trackers = compiler.trackers
    for tracker in compiler.trackers.values():
        for event_name in tracker.events:
            catalog.trackers_by_event.setdefault(event_name, []).append(tracker)
    catalog.audiences_by_tracker = {k: frozenset(v) for k, v in by_tracker.items()}
    catalog.trait_audiences = frozenset(trait_keys)
    catalog.dependents = {k: frozenset(v) for k, v in dependents.items()}
    catalog.trait_dependents = {k: frozenset(v) for k, v in trait_dependents.items()}
    index = catalog.index
    catalog.tracker_positions = {
        k: frozenset(index[a] for a in v) for k, v in catalog.audiences_by_tracker.items()
    }
    catalog.trait_positions = frozenset(index[a] for a in catalog.trait_audiences)
    catalog.dependent_positions = {
        index[k]: tuple(sorted(index[a] for a in v)) for k, v in catalog.dependents.items()
    }
    catalog.trait_dependent_positions = {
        k: frozenset(index[a] for a in v) for k, v in catalog.trait_dependents.items()
    }
    versions = [f"{a.key}:{a.version}" for a in catalog.audiences]
    versions += [f"trait {t.key}:{t.version}" for t in catalog.traits.values()]
    # (a list's membership order is the document's: an edit of the list changes it)
    versions += [f"priority {k}:{list_docs[k][1]}:{','.join(v)}" for k, v in lists.items()]
    catalog.priority_lists = lists
    catalog.priority_of = {k: owner[k] for k in lists_members(lists)}
    catalog.fingerprint = hashlib.sha1("|".join(versions).encode()).hexdigest()[:16]
    catalog.full_fingerprint = catalog.fingerprint
    return plan_dispatch(catalog)


def lists_members(lists: Mapping[str, tuple[str, ...]]) -> list[str]:
    return [key for listed in lists.values() for key in listed]


def compile_definition(
    doc: Mapping[str, Any],
    definitions: Mapping[str, tuple[Mapping[str, Any], int]],
    version: int = 1,
    previous: Catalog | None = None,
) -> Catalog:
    """The catalog of `definitions` with the validated `doc` applied, compiled as every
    worker will compile it: apply time runs the workers' compiler, so what cannot be
    compiled is refused with a DefinitionError instead of reaching the workers (which
    would leave it out, see `adapters.stream.definitions`). `previous`: as in
    `build_catalog`."""
    key = str(doc["key"])
    try:
        catalog = build_catalog({**definitions, key: (doc, version)}, previous=previous)
    except DefinitionError:
        raise
    except Exception as exc:  # a bug of the compiler or validation: refuse, do not store
        raise DefinitionError(
            "$", f"cannot be compiled: {type(exc).__name__}: {exc}", reason="uncompilable"
        ) from None
    if key in catalog.skipped:
        path = "$.audiences" if is_priority_list(doc) else "$.condition"
        raise DefinitionError(path, catalog.skipped[key])
    return catalog
