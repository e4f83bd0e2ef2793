"""`step`: the pure per-user state machine every runtime path goes through.

`step(state, input, catalog)` folds one input — an `Event`, or a `Tick` when a
deadline is reached — into a profile and returns the new state, the membership
transitions and the next time the profile wants to be woken. Live processing,
deadline sweeps, replays and the oracle tests all call it.

Time: a profile has its own clock, the latest event time or deadline applied
to it. The wall clock only decides *when* a Tick is delivered, never what it
computes, so a replay of the same log gives the same transitions. Before an
event at time T is applied, every deadline <= T of the profile fires first
(at its own time), whether or not a sweeper already delivered it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Final, NamedTuple, final

import orjson

from audiences.core.definitions.accounts import (
    ACCOUNT_DATA,
    ACCOUNT_PREFIX,
    GROUPS_DATA,
    group_of,
    linked_users,
    user_groups,
)
from audiences.core.definitions.catalog import Catalog
from audiences.core.definitions.conditions import ALL_EVENTS, Tracker, route_of
from audiences.core.definitions.traits import is_empty_value
from audiences.core.events import CONTROL_TYPES, Event, format_iso
from audiences.core.state import (
    INT64_MIN,
    MAX_ALIAS_ID_BYTES,
    MAX_ALIASES,
    MAX_TRAIT_NAME_BYTES,
    MAX_TRAIT_VALUE_BYTES,
    MAX_TRAITS,
    MAX_TRAITS_BYTES,
    NEVER,
    SMALL_TRAIT_BYTES,
    Membership,
    SeenIds,
    UserState,
    json_size,
    message_hash,
    string_fits,
)

_UINT64_MAX: Final = (1 << 64) - 1  # the largest int the codec (orjson) writes


@dataclass(frozen=True, slots=True)
class Tick:
    """A profile's deadline has been reached."""

    at_ms: int


@dataclass(slots=True)
class Transition:
    """A membership change of one profile in one audience (treat as immutable)."""

    audience_key: str
    audience_version: int
    audience_name: str
    profile_key: str
    entered: bool
    at_ms: int
    seq: int
    effective_at_ms: int
    trigger: str  # event | deadline | definition | merge | deleted
    trigger_message_id: str | None
    generation: int = 0  # non-zero for a profile recreated after deletion
    # In the audience's holdout (SPEC §3 `holdout`): the output carries
    # `properties.holdout: true` and destinations skip it. Not part of the messageId.
    holdout: bool = False
    group_id: str | None = None  # an account audience's transition (profile group:{id})
    users: tuple[str, ...] = ()  # of an account's transition: its linked users, sorted

    def __init__(  # written out: the one `dataclass` generates runs interpreted under mypyc
        self,
        audience_key: str,
        audience_version: int,
        audience_name: str,
        profile_key: str,
        entered: bool,
        at_ms: int,
        seq: int,
        effective_at_ms: int,
        trigger: str,
        trigger_message_id: str | None,
        generation: int = 0,
        holdout: bool = False,
        group_id: str | None = None,
        users: tuple[str, ...] = (),
    ) -> None:
        self.audience_key = audience_key
        self.audience_version = audience_version
        self.audience_name = audience_name
        self.profile_key = profile_key
        self.entered = entered
        self.at_ms = at_ms
        self.seq = seq
        self.effective_at_ms = effective_at_ms
        self.trigger = trigger
        self.trigger_message_id = trigger_message_id
        self.generation = generation
        self.holdout = holdout
        self.group_id = group_id
        self.users = users

    @property
    def message_id(self) -> str:
        """Deterministic: sha256(key|version|user|seq|direction[|generation])."""
        direction = "entered" if self.entered else "exited"
        text = (
            f"{self.audience_key}|{self.audience_version}|{self.profile_key}|{self.seq}|{direction}"
        )
        if self.generation:
            text += f"|{self.generation}"
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass(slots=True)
class TraitChange:
    """A new value of one computed trait of one profile (treat as immutable)."""

    trait_key: str
    trait_version: int
    trait_name: str
    profile_key: str
    value: Any
    at_ms: int
    seq: int
    effective_at_ms: int
    trigger: str
    trigger_message_id: str | None
    generation: int = 0

    def __init__(  # written out: the one `dataclass` generates runs interpreted under mypyc
        self,
        trait_key: str,
        trait_version: int,
        trait_name: str,
        profile_key: str,
        value: Any,
        at_ms: int,
        seq: int,
        effective_at_ms: int,
        trigger: str,
        trigger_message_id: str | None,
        generation: int = 0,
    ) -> None:
        self.trait_key = trait_key
        self.trait_version = trait_version
        self.trait_name = trait_name
        self.profile_key = profile_key
        self.value = value
        self.at_ms = at_ms
        self.seq = seq
        self.effective_at_ms = effective_at_ms
        self.trigger = trigger
        self.trigger_message_id = trigger_message_id
        self.generation = generation

    @property
    def message_id(self) -> str:
        """Deterministic: sha256(key|version|user|seq|computed[|generation])."""
        text = f"{self.trait_key}|{self.trait_version}|{self.profile_key}|{self.seq}|computed"
        if self.generation:
            text += f"|{self.generation}"
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass(slots=True)
class Deletion:
    """A profile deleted (SPEC §4): destinations are told to delete it too (`User Deleted`,
    after the `Audience Exited` of the same deletion). Every delete record that is applied
    makes one, whether or not the engine held state for the id (a destination may hold
    data the engine no longer has). A deletion cascading to an anonymous id linked to
    the deleted user makes its own, for the anonymous id, with `linked_to` the user."""

    profile_key: str
    anonymous: bool
    at_ms: int
    trigger_message_id: str  # the delete record's messageId ("" when it had none)
    linked_to: str | None = None
    generation: int = 0  # of the profile deleted (non-zero: it was recreated once)

    @property
    def message_id(self) -> str:
        """Deterministic: sha256(deleted|profile|generation|delete record's messageId, or
        its time when it had none): a replay of the same log gives the same id."""
        cause = self.trigger_message_id or str(self.at_ms)
        text = f"deleted|{self.profile_key}|{self.generation}|{cause}"
        return hashlib.sha256(text.encode()).hexdigest()


Output = Transition | TraitChange | Deletion


Control = tuple[str, dict[str, Any]]  # (Kafka key, record) to produce to the events topic

# Identity links refused (SPEC §4/§11), dead-lettered to `events-dlq` by the runtime:
MERGE_REFUSED: Final = "merge_refused"  # the other id is a known user, or linked to another user
MERGE_LIMIT: Final = "merge_limit"  # the user already has MAX_ALIASES links


class Refusal(NamedTuple):
    """An event whose identity link was refused: dead-lettered (a copy; the event's own
    data still counts for the profile that sent it — only the link is refused)."""

    reason: str  # MERGE_REFUSED | MERGE_LIMIT
    detail: str
    key: str  # the Kafka key of the refused event (its profile key)
    record: dict[str, Any]  # the refused event as it was sent


@final
class StepResult:
    """What `step` did (treat as immutable; a native class: a NamedTuple's constructor
    runs interpreted under mypyc)."""

    def __init__(
        self,
        state: UserState,
        transitions: list[Output],
        next_wake_ms: int,
        duplicate: bool,
        controls: tuple[Control, ...] = (),
        erase: bool = False,
        refused: tuple[Refusal, ...] = (),
    ) -> None:
        self.state = state
        self.transitions = transitions
        self.next_wake_ms = next_wake_ms
        self.duplicate = duplicate
        self.controls = controls  # identity records to send (SPEC §4)
        self.erase = erase  # the profile was deleted: remove its state
        self.refused = refused  # events to dead-letter: links refused

    def but(self, transitions: list[Output], controls: tuple[Control, ...]) -> StepResult:
        """A copy with other transitions and controls."""
        return StepResult(
            self.state,
            transitions,
            self.next_wake_ms,
            self.duplicate,
            controls,
            self.erase,
            self.refused,
        )

    def __repr__(self) -> str:
        return (
            f"StepResult(state={self.state!r}, transitions={self.transitions!r}, "
            f"next_wake_ms={self.next_wake_ms}, duplicate={self.duplicate}, "
            f"controls={self.controls!r}, erase={self.erase}, refused={self.refused!r})"
        )


def _is_duplicate(state: UserState, event: Event, now: int) -> bool:
    """Whether the profile counted the event's messageId within 24 h of its clock `now`
    (however many events came between: see `SeenIds`); if not, it is remembered. A
    duplicate still moves the memory's clock (not the profile's): what is remembered
    depends on the log alone."""
    if event.message_id is None:
        return False
    return _seen_before(state, state.seen, message_hash(event.message_id), now)


def _seen_before(state: UserState, seen: SeenIds, digest: int, now: int) -> bool:
    seen.advance(now)
    forgotten = seen.remember(digest)
    if forgotten > 0:
        state.drop("recent_ids")  # DEDUP_MAX_IDS within 24 h: the oldest is forgotten
    return forgotten < 0


def _fold_traits(state: UserState, event: Event) -> bool:
    """Latest value per trait by event time (an identify older than a trait's value
    leaves it, and fills the traits it lacks).
    Values and names outside the bounds of `state.py` are not stored (counted)."""
    incoming: Any = event.traits if event.type == "identify" else None
    context_traits = event.context.get("traits")
    if incoming is None and context_traits is None:
        return False  # (most events)
    changed = False
    ts = event.timestamp_ms
    traits, times = state.traits, state.trait_times
    for source in (context_traits, incoming):
        if not isinstance(source, dict):
            continue
        for name, value in source.items():
            # Per trait, the value of the latest event time wins, whatever the arrival
            # order (SPEC §11); a repeated value still moves its time.
            at = times.get(name)
            if at is None:
                at = state.traits_at_ms if name in traits else -1
            if ts < at:
                continue
            if traits.get(name, ...) != value:
                if not _admit_trait(state, name, value):
                    continue
                traits[name] = value
                changed = True
            times[name] = ts
    if changed and ts > state.traits_at_ms:
        state.traits_at_ms = ts
    return changed


def _admit_trait(state: UserState, name: str, value: Any) -> bool:
    """Whether `value` may be stored as trait `name` (new or changed); counts a refusal.

    Cheap on the hot path: called only for a value that differs from the stored one;
    only dicts, lists and strings of more than 10 characters are measured, and all
    traits only when a value over SMALL_TRAIT_BYTES is to be stored."""
    traits = state.traits
    if name not in traits:
        if len(traits) >= MAX_TRAITS:
            state.drop("traits")
            return False
        if not string_fits(name, MAX_TRAIT_NAME_BYTES):
            state.drop("trait_name_size")
            return False
    kind = type(value)
    if kind is float:
        if not math.isfinite(value):  # the codec would write null
            state.drop("non_finite_number")
            return False
        return True
    if kind is int:
        if not INT64_MIN <= value <= _UINT64_MAX:
            state.drop("non_finite_number")
            return False
        return True
    if value is None or kind is bool or (kind is str and len(value) <= 10):
        return True
    size = json_size(value)
    if size > MAX_TRAIT_VALUE_BYTES:
        state.drop("trait_value_size")
        return False
    if size > SMALL_TRAIT_BYTES:
        total = json_size(traits) + size
        old = traits.get(name, ...)
        total -= json_size(old) if old is not ... else -(json_size(name) + 1)
        if total > MAX_TRAITS_BYTES:
            state.drop("traits_size")
            return False
    return True


def _evaluate(
    state: UserState,
    catalog: Catalog,
    profile_key: str,
    now: int,
    touched: int,
    out: list[Output],
    trigger: str,
    trigger_id: str | None,
    effective_at: int,
    touched_traits: int = 0,
    everything: bool = False,
) -> None:
    """Re-judge the audiences `touched` (a bit mask of positions; `everything`: all, and
    all computed traits), those due by `now`, and the dependents of those that changed,
    in dependency order. Computed traits (`touched_traits`, a bit mask of places in
    `catalog.trait_order`, and those due) are judged first: audiences comparing a trait
    that changed are re-judged too."""
    state.profile_key = profile_key  # (random_bucket reads it; transient)
    stale_wake = False
    if catalog.trait_order:
        affected, stale_wake = _judge_traits(
            state,
            catalog,
            profile_key,
            now,
            catalog.all_traits if everything else touched_traits,
            not everything,
            out,
            trigger,
            trigger_id,
            effective_at,
        )
        touched |= affected
    audiences = catalog.audiences
    members = state.members
    if everything:
        pending = catalog.all_audiences
    else:
        if state.wake_ms <= now:
            index = catalog.index
            for key, due in members.items():
                if due.wake_ms <= now:
                    position = index.get(key)
                    if position is not None:
                        touched |= 1 << position
        pending = touched
    frozen = catalog.frozen_mask  # zero unless a backfill is pending
    if frozen:
        pending &= ~frozen  # neither judged nor announced; its membership and wake stay
    if not pending:
        if stale_wake:
            _refresh_wake(state, catalog)
        return
    dependents = catalog.dependents_masks
    anonymous = state.anonymous
    generation = state.generation
    first = len(out) if catalog.exclusive_mask else -1  # (priority lists: see _exits_first)
    # Dependents come later in dependency order: walking the lowest bit first judges
    # every audience after the ones it refers to, and each once.
    while pending:
        lowest = pending & -pending
        pending ^= lowest
        position = lowest.bit_length() - 1
        audience = audiences[position]
        key = audience.key
        membership = members.get(key)
        value, change = audience.root.evaluate(state, now)
        if anonymous and not audience.include_anonymous:
            value = False
        wake = change if now < change < NEVER else NEVER  # a deadline past NEVER never comes
        if membership is None:
            if not value and wake == NEVER:
                continue  # nothing to remember: keeps state small for non-members
            membership = members[key] = Membership()
        if wake != membership.wake_ms:
            if wake < state.wake_ms:
                state.wake_ms = wake
            elif membership.wake_ms <= state.wake_ms:
                stale_wake = True  # the earliest wake moved later: recompute below
            membership.wake_ms = wake
        if value == membership.member:
            continue
        membership.member = value
        membership.since_ms = now
        membership.seq += 1
        holdout = audience.holdout
        out.append(
            Transition(
                key,
                audience.version,
                audience.name,
                profile_key,
                value,
                now,
                membership.seq,
                effective_at,
                trigger,
                trigger_id,
                generation,
                holdout is not None and holdout.holds(profile_key),
            )
        )
        more = dependents[position]
        if more:
            pending |= more & ~frozen
    if first >= 0 and len(out) - first > 1:
        _exits_first(out, first, catalog)
    if stale_wake:
        _refresh_wake(state, catalog)


def _exits_first(out: list[Output], first: int, catalog: Catalog) -> None:
    """Within one judging pass, the transitions of each priority list's audiences in
    `out[first:]` are put exits first (a move reads Exited of the old audience, then
    Entered of the new one, whichever way it goes), each group in dependency order —
    in the places those transitions held, other outputs staying where they are."""
    lists = catalog.priority_of
    places: dict[str, list[int]] = {}
    for place in range(first, len(out)):
        output = out[place]
        if isinstance(output, Transition):
            list_key = lists.get(output.audience_key)
            if list_key is not None:
                places.setdefault(list_key, []).append(place)
    for group in places.values():
        if len(group) < 2:
            continue
        moved = [out[p] for p in group]
        ordered = [t for t in moved if isinstance(t, Transition) and not t.entered]
        ordered += [t for t in moved if isinstance(t, Transition) and t.entered]
        for place, output in zip(group, ordered, strict=True):
            out[place] = output


def _refresh_wake(state: UserState, catalog: Catalog) -> None:
    """The profile's earliest wake; frozen audiences and traits (a pending backfill) do
    not count: they would be due again and again with nothing to judge."""
    if catalog.pending:
        state.refresh_wake(catalog.frozen_audiences, catalog.frozen_traits)
    else:
        state.refresh_wake()


def _judge_traits(
    state: UserState,
    catalog: Catalog,
    profile_key: str,
    now: int,
    keys: int,
    with_due: bool,
    out: list[Output],
    trigger: str,
    trigger_id: str | None,
    effective_at: int,
) -> tuple[int, bool]:
    """Recompute traits `keys` (a bit mask of places in `catalog.trait_order`) and, if
    `with_due`, those due; announce changed values. Returns the audiences comparing a
    changed trait (a bit mask of positions), and whether the earliest wake may have
    moved later."""
    computed = state.computed
    if with_due and state.wake_ms <= now:  # (no trait is due before the profile's wake)
        places = catalog.trait_places
        for key, due in computed.items():
            if due[2] and due[2] <= now:
                place = places.get(key)
                if place is not None:
                    keys |= 1 << place
    keys &= ~catalog.frozen_traits_mask  # zero unless a backfill is pending
    affected = 0
    stale = False
    order = catalog.trait_order
    while keys:
        lowest = keys & -keys
        keys ^= lowest
        place = lowest.bit_length() - 1
        trait = order[place]
        key = trait.key
        value, change = trait.value(state, now)
        wake = change if now < change < NEVER else 0  # stored as 0 = never
        found = computed.get(key)
        if found is None:
            if wake == 0 and is_empty_value(trait.kind, value):
                continue  # nothing to announce or remember
            entry: list[Any] = [None, 0, 0]
            computed[key] = entry
            changed = not is_empty_value(trait.kind, value)
        else:
            entry = found
            changed = entry[0] != value or type(entry[0]) is not type(value)
        if wake != entry[2]:
            if wake and wake < state.wake_ms:
                state.wake_ms = wake
            elif entry[2] and entry[2] <= state.wake_ms:
                stale = True
            entry[2] = wake
        if not changed or (state.anonymous and not trait.include_anonymous):
            continue  # (anonymous: announced once the profile merges into a user)
        entry[0] = value
        entry[1] += 1
        out.append(
            TraitChange(
                trait_key=key,
                trait_version=trait.version,
                trait_name=trait.name,
                profile_key=profile_key,
                value=value,
                at_ms=now,
                seq=entry[1],
                effective_at_ms=effective_at,
                trigger=trigger,
                trigger_message_id=trigger_id,
                generation=state.generation,
            )
        )
        affected |= catalog.trait_dependents_masks[place]
    return affected, stale


def _fire_due(
    state: UserState, catalog: Catalog, profile_key: str, until: int, out: list[Output]
) -> None:
    """Deliver every deadline <= `until`, each at its own time."""
    if catalog.pending:
        _refresh_wake(state, catalog)  # (a decoded state's wake may be a frozen one)
    while (wake := state.wake_ms) <= until:
        now = max(state.clock_ms, wake)
        state.clock_ms = now
        _evaluate(state, catalog, profile_key, now, 0, out, "deadline", None, now)
        if state.wake_ms <= now:  # cannot happen for catalog audiences; never spin on data
            break


def step(
    state: UserState | None, item: Event | Tick, catalog: Catalog, profile_key: str
) -> StepResult:
    """Fold one input into a profile. Never raises on data."""
    if catalog.account_positions:  # (empty unless an account audience exists)
        return _with_accounts(state, item, catalog, profile_key)
    return _step(state, item, catalog, profile_key)


def _step(
    state: UserState | None, item: Event | Tick, catalog: Catalog, profile_key: str
) -> StepResult:
    if isinstance(item, Event) and item.type in CONTROL_TYPES:
        return _control(state, item, catalog, profile_key)
    if state is not None and state.merged_into is not None:
        if isinstance(item, Tick):
            return StepResult(state, [], NEVER, False)
        if item.user_id is None:
            return _forward(state, item)
        # The id is a user's own (events keyed by it carry it as userId): the stub made
        # when it was linked before it was known forwards nothing of the user's. The
        # profile starts afresh (nothing had been handed over: the link found no state).
        state = None
    transitions: list[Output] = []
    fresh = state is None or not state.catalog_fingerprint
    if state is None:
        anonymous = isinstance(item, Event) and item.user_id is None
        state = UserState(anonymous=anonymous)
    if fresh:
        state.catalog_fingerprint = catalog.fingerprint
    elif state.catalog_fingerprint != catalog.fingerprint:
        _adopt_catalog(state, catalog, profile_key, transitions)
    if isinstance(item, Tick):
        _fire_due(state, catalog, profile_key, item.at_ms, transitions)
        return StepResult(state, transitions, state.wake_ms, False)

    event = item
    ts = event.timestamp_ms
    _fire_due(state, catalog, profile_key, ts, transitions)
    now = max(state.clock_ms, ts)
    if _is_duplicate(state, event, now):
        return StepResult(state, transitions, state.wake_ms, True)
    state.clock_ms = now
    # A new profile, or one that just became a known user, is judged on every
    # audience ("did not perform X" holds at once; include_anonymous changes).
    everything = fresh
    if state.anonymous and event.user_id is not None:
        state.anonymous = False
        everything = True
    touched = 0  # audiences to re-judge (bit mask of positions)
    touched_traits = 0  # computed traits to recompute (bit mask of places)
    route = route_of(event.type, event.name)
    plan = catalog.routes.get(route, catalog.unrouted) if route is not None else catalog.unrouted
    for dispatch in plan:
        if dispatch.tracker.update(state, event, now):
            touched |= dispatch.audiences
            touched_traits |= dispatch.traits
    if _fold_traits(state, event):
        touched |= catalog.trait_audiences_mask
    _evaluate(
        state,
        catalog,
        profile_key,
        now,
        touched,
        transitions,
        "event",
        event.message_id,
        ts,
        touched_traits,
        everything,
    )
    link = event.link_id
    if link is None or link in state.aliases:
        return StepResult(state, transitions, state.wake_ms, False)
    if len(state.aliases) >= MAX_ALIASES:
        state.drop("aliases")
        refusal = Refusal(
            MERGE_LIMIT,
            f"{profile_key!r} already has {MAX_ALIASES} identity links; {link!r} is not merged",
            profile_key,
            event.raw,
        )
        return StepResult(state, transitions, state.wake_ms, False, refused=(refusal,))
    if not string_fits(link, MAX_ALIAS_ID_BYTES):
        state.drop("alias_id_size")
        return StepResult(state, transitions, state.wake_ms, False)
    state.aliases[link] = 0  # requested: the link's own worker answers (state or refusal)
    controls = ((link, merge_request(link, profile_key, ts, event.raw)),)
    return StepResult(state, transitions, state.wake_ms, False, controls)


def _admit_alias(state: UserState, link: str) -> bool:
    """A profile takes at most MAX_ALIASES links (SPEC §11), of ids of bounded size."""
    if len(state.aliases) >= MAX_ALIASES:
        state.drop("aliases")
        return False
    if not string_fits(link, MAX_ALIAS_ID_BYTES):
        state.drop("alias_id_size")
        return False
    return True


def _adopt_catalog(state: UserState, catalog: Catalog, profile_key: str, out: list[Output]) -> None:
    """New, edited or deleted definitions: judge every audience and trait once.

    Members of a deleted audience are told so (`Audience Exited`, trigger
    "deleted"); unchanged members of edited audiences hear nothing. Audiences and
    traits a pending backfill freezes keep their memberships, values and the data of
    their trackers: they are judged when the full catalog is adopted."""
    if ACCOUNT_DATA in state.trackers:  # an account: judged by its own rules
        _adopt_account_catalog(state, catalog, profile_key, out)
        return
    now = state.clock_ms
    for key, membership in list(state.members.items()):
        if key in catalog.index:
            continue
        retired = catalog.retired.get(key)
        if membership.member and retired is not None:
            _exit(state, membership, key, retired, profile_key, now, "deleted", None, out)
        del state.members[key]
    for key in [k for k in state.computed if k not in catalog.traits]:
        del state.computed[key]
    for tracker_id in [t for t in state.trackers if t not in catalog.trackers]:
        del state.trackers[tracker_id]  # nothing reads it any more
    if not catalog.pending:
        state.history_seen = None  # no backfill runs: its memory is done with
    _refresh_wake(state, catalog)
    state.catalog_fingerprint = catalog.fingerprint
    _evaluate(state, catalog, profile_key, now, 0, out, "definition", None, now, everything=True)


def fold_history(
    state: UserState, event: Event, catalog: Catalog, tracker_ids: frozenset[str]
) -> bool:
    """Fold a past event into trackers `tracker_ids` only — a backfill of new trackers,
    running as a second cursor over the log while live events flow with
    `catalog.with_pending(tracker_ids)` — judging nothing and emitting nothing. Returns
    whether the state changed. Never raises on data.

    `catalog` may be the full or the pending catalog (both hold every tracker). The
    trackers see the event at its own time, as they would have when it was live (for
    a profile whose events are in time order, exactly so); the profile's clock, traits
    and memberships are left alone. Duplicates are dropped as `step` drops them, with a
    memory of the run's own (`UserState.history_seen`, see `_history_memory`), whose
    clock is the latest event time of the history so far: a re-sent event in the log is
    folded once (only the ids of events these trackers take are remembered: a copy is
    expected to be the same event).
    Control records and forwarding stubs of merged profiles fold nothing. What a bound
    drops is counted in `state.dropped`, as in `step`."""
    if state.merged_into is not None or event.type in CONTROL_TYPES:
        return False
    now = event.timestamp_ms
    history = _history_memory(state, tracker_ids)
    before_s = history.latest_s
    history.advance(now)  # (every event moves its clock, as every event moves the profile's)
    changed = history.latest_s != before_s
    route = route_of(event.type, event.name)
    folded: list[Tracker] = []
    for tracker in catalog.trackers.values():  # (in catalog order: deterministic)
        if tracker.id not in tracker_ids:
            continue
        events = tracker.events
        if (route is not None and route in events) or ALL_EVENTS in events:
            folded.append(tracker)
    if not folded:
        return changed
    if event.message_id is not None:
        if _seen_before(state, history, message_hash(event.message_id), now):
            return changed
        changed = True
    for tracker in folded:
        changed = tracker.update(state, event, now) or changed
    return changed


def _history_memory(state: UserState, tracker_ids: frozenset[str]) -> SeenIds:
    """The backfill's messageId memory of this profile, tagged with the trackers it is
    for. A run that goes on for some of its trackers (the catalog changed meanwhile:
    `Backfills.plan`) keeps it; a run for other trackers reads the log from its start
    again: it starts afresh."""
    tag = ",".join(sorted(tracker_ids))
    history = state.history_seen
    if history is not None and history.tag != tag:
        if tracker_ids <= frozenset(history.tag.split(",")):
            history.tag = tag  # (the same run, for fewer trackers)
        else:
            history = None
    if history is None:
        history = state.history_seen = SeenIds(tag=tag)
    return history


# -- identity and control records (SPEC §4) -------------------------------------------------


def merge_request(
    link: str, user_id: str, at_ms: int, event: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Asks the worker of profile `link` to hand its state over to `user_id`. It carries
    the linking `event`, which that worker dead-letters if it refuses the link."""
    properties: dict[str, Any] = {"into": user_id}
    if event is not None:
        properties["event"] = event
    return {
        "type": "merge",
        "stage": "request",
        "anonymousId": link,
        "messageId": f"merge-request:{link}:{user_id}",
        "timestamp": format_iso(at_ms),
        "properties": properties,
    }


def _merge_refused(link: str, user_id: str, at_ms: int) -> dict[str, Any]:
    """Tells `user_id`'s worker that `link` will not be merged: it forgets the request."""
    return {
        "type": "merge",
        "stage": "refused",
        "userId": user_id,
        "messageId": f"merge-refused:{link}:{user_id}",
        "timestamp": format_iso(at_ms),
        "properties": {"from": link},
    }


def _delete_linked(link: str, user_id: str, at_ms: int) -> dict[str, Any]:
    """Deletes the anonymous profile `link` merged into the deleted `user_id` (its
    forwarding stub): its later events are dropped instead of recreating the user."""
    return {
        "type": "delete",
        "anonymousId": link,
        "messageId": f"delete-linked:{link}:{user_id}",
        "timestamp": format_iso(at_ms),
        "properties": {"linkedTo": user_id},
    }


def _merge_state(link: str, user_id: str, snapshot: list[Any] | None, at_ms: int) -> dict[str, Any]:
    return {
        "type": "merge",
        "stage": "state",
        "userId": user_id,
        "messageId": f"merge-state:{link}:{user_id}",
        "timestamp": format_iso(at_ms),
        "properties": {"from": link, "state": snapshot},
    }


def _exit_all(
    state: UserState,
    catalog: Catalog,
    profile_key: str,
    now: int,
    trigger: str,
    trigger_id: str | None,
    out: list[Output],
    group_id: str | None = None,
) -> None:
    for key, membership in state.members.items():
        if not membership.member:
            continue
        audience = catalog.audience(key)
        known = (audience.version, audience.name) if audience else catalog.retired.get(key)
        holdout = audience.holdout if audience else None
        _exit(
            state,
            membership,
            key,
            known or (0, key),
            profile_key,
            now,
            trigger,
            trigger_id,
            out,
            holdout is not None and holdout.holds(profile_key),
            group_id,
        )


def _exit(
    state: UserState,
    membership: Membership,
    key: str,
    audience: tuple[int, str],
    profile_key: str,
    now: int,
    trigger: str,
    trigger_id: str | None,
    out: list[Output],
    holdout: bool = False,
    group_id: str | None = None,
) -> None:
    """`Audience Exited` for a member, outside of judging (deletions, merges); `group_id`
    for an account's profile."""
    version, name = audience
    membership.member = False
    membership.seq += 1
    out.append(
        Transition(
            key,
            version,
            name,
            profile_key,
            False,
            now,
            membership.seq,
            now,
            trigger,
            trigger_id,
            state.generation,
            holdout,
            group_id,
        )
    )


def _forward(state: UserState, event: Event) -> StepResult:
    """An event of a profile merged into a user: re-sent as the user's."""
    assert state.merged_into is not None
    raw = dict(event.raw)
    raw["userId"] = state.merged_into
    return StepResult(state, [], NEVER, False, ((state.merged_into, raw),))


def _control(
    state: UserState | None, event: Event, catalog: Catalog, profile_key: str
) -> StepResult:
    out: list[Output] = []
    ts = event.timestamp_ms
    now = max(state.clock_ms, ts) if state is not None else ts
    if event.type == "delete":
        linked_to = event.properties.get("linkedTo")
        if linked_to is not None and state is not None and state.merged_into != linked_to:
            # (a deletion cascading from a user: only a stub that forwards to that user is
            # the user's; an id refused or released since is somebody else's)
            return _unchanged(state)
        cascade: tuple[Control, ...] = ()
        anonymous = event.user_id is None
        generation = 0
        if state is not None:
            _exit_all(state, catalog, profile_key, now, "deleted", event.message_id, out)
            cascade = tuple((link, _delete_linked(link, profile_key, ts)) for link in state.aliases)
            anonymous, generation = state.anonymous, state.generation
        linked = linked_to if isinstance(linked_to, str) and linked_to else None
        out.append(
            Deletion(profile_key, anonymous, now, event.message_id or "", linked, generation)
        )
        erased = UserState(anonymous=anonymous)  # (not kept: the outputs render with it)
        return StepResult(erased, out, NEVER, False, cascade, erase=True)
    if event.type == "unsuppress":
        if state is not None:
            return StepResult(state, out, state.wake_ms, False)
        reborn = UserState(anonymous=event.user_id is None)
        reborn.generation = ts
        reborn.clock_ms = ts
        return StepResult(reborn, out, NEVER, False)
    stage = event.raw.get("stage")
    properties = event.properties
    if stage == "request":
        into = properties.get("into")
        if not isinstance(into, str) or not into:
            return _unchanged(state)
        if state is not None:
            if state.merged_into == into:
                return _unchanged(state)  # a repeated request
            if state.merged_into is not None:
                return _refuse(state, event, profile_key, into, "is linked to another user")
            if not state.anonymous:  # SPEC §11: two known users are never merged
                return _refuse(state, event, profile_key, into, "is a known user")
        stub = UserState(anonymous=state.anonymous if state is not None else True)
        stub.merged_into = into
        stub.catalog_fingerprint = catalog.fingerprint
        controls: tuple[Control, ...] = ()
        if state is not None:
            stub.clock_ms = now
            _exit_all(state, catalog, profile_key, now, "merge", event.message_id, out)
            snapshot = state.to_json()
            controls = ((into, _merge_state(profile_key, into, snapshot, ts)),)
        return StepResult(stub, out, NEVER, False, controls)
    if stage == "refused":
        source = properties.get("from")
        if state is not None and isinstance(source, str) and state.aliases.get(source) == 0:
            del state.aliases[source]  # the link never happened: it takes no place
        return _unchanged(state)
    if stage == "state":
        source = properties.get("from")
        if not isinstance(source, str) or (state is not None and state.aliases.get(source) == 1):
            return _unchanged(state)
        other = _snapshot(properties.get("state"))
        if state is None:
            state = UserState()
            state.catalog_fingerprint = catalog.fingerprint
        elif state.catalog_fingerprint != catalog.fingerprint:
            _adopt_catalog(state, catalog, profile_key, out)
        if source not in state.aliases and not _admit_alias(state, source):
            return StepResult(state, out, state.wake_ms, False)  # not requested by this profile
        # The merged profile's clock is the later of both: the same result whether the
        # hand-over arrives before or after the anonymous profile's last events.
        until = max(ts, other.clock_ms) if other is not None else ts
        _fire_due(state, catalog, profile_key, until, out)
        now = max(state.clock_ms, until)
        state.clock_ms = now
        state.aliases[source] = 1
        state.anonymous = False
        if other is not None:
            merged = _merged(state, other, catalog, profile_key, now, event.message_id, out)
            if merged is not None:
                return StepResult(merged, out, merged.wake_ms, False)
        _evaluate(
            state,
            catalog,
            profile_key,
            now,
            0,
            out,
            "merge",
            event.message_id,
            now,
            everything=True,
        )
        return StepResult(state, out, state.wake_ms, False)
    return _unchanged(state)


def _refuse(state: UserState, event: Event, profile_key: str, into: str, why: str) -> StepResult:
    """A merge request the profile it is for refuses: nothing moves, nobody exits; the
    linking event is dead-lettered and the requesting user forgets the link."""
    carried = event.properties.get("event")
    record = carried if isinstance(carried, dict) else event.raw
    refusal = Refusal(
        MERGE_REFUSED, f"{profile_key!r} {why}: not merged into {into!r}", into, record
    )
    controls = ((into, _merge_refused(profile_key, into, event.timestamp_ms)),)
    return StepResult(state, [], state.wake_ms, False, controls, refused=(refusal,))


_UNREADABLE = (ValueError, TypeError, IndexError, KeyError, AttributeError)


def _snapshot(carried: Any) -> UserState | None:
    """The profile a merge record carries, or None when it is unreadable (the link is
    still recorded). Its clock must be a time the core can work with."""
    if not isinstance(carried, list):
        return None
    try:
        other = UserState.from_json(carried)
    except _UNREADABLE:
        return None
    clock = other.clock_ms
    if type(clock) is not int or not 0 <= clock < NEVER or type(other.traits_at_ms) is not int:
        return None
    parts = (other.traits, other.trait_times, other.trackers, other.aliases)
    return other if all(type(part) is dict for part in parts) else None


def _merged(
    state: UserState,
    other: UserState,
    catalog: Catalog,
    profile_key: str,
    now: int,
    trigger_id: str | None,
    out: list[Output],
) -> UserState | None:
    """A copy of `state` with `other` absorbed and judged, or None if the carried data
    cannot be merged or judged (a merge record is data: it never makes `step` raise;
    its link is still recorded). Merges are rare: the copy costs nothing that matters.

    Only what the merge step reads is checked: a carried tracker that is not of its
    tracker's shape may still fail a later step, which the runtime then quarantines."""
    merged = UserState.from_json(orjson.loads(state.encode()))
    merged.dropped = state.dropped
    _refresh_wake(merged, catalog)  # (from_json counts frozen deadlines too)
    judged: list[Output] = []
    try:
        _absorb(merged, other, catalog, now)
        _evaluate(
            merged, catalog, profile_key, now, 0, judged, "merge", trigger_id, now, everything=True
        )
        merged.encode()
    except _UNREADABLE:
        state.dropped = merged.dropped
        return None
    out.extend(judged)
    return merged


def _unchanged(state: UserState | None) -> StepResult:
    # (no profile yet: an empty one that is no known user — nobody's events made it)
    state = state if state is not None else UserState(anonymous=True)
    return StepResult(state, [], state.wake_ms, False)


def _absorb(state: UserState, other: UserState, catalog: Catalog, now: int) -> None:
    """Fold an anonymous profile's history into the user's (the later value of each
    trait wins; counts add up; windows, funnels, devices and aggregates combine), within
    the bounds of `state.py`."""
    for name, value in other.traits.items():
        theirs = other.trait_times.get(name, other.traits_at_ms)
        if name not in state.traits or theirs > state.trait_times.get(name, state.traits_at_ms):
            if state.traits.get(name, ...) != value and not _admit_trait(state, name, value):
                continue
            state.traits[name] = value  # the later value of each trait wins
            state.trait_times[name] = theirs
    state.traits_at_ms = max(state.traits_at_ms, other.traits_at_ms)
    for tracker_id, data in other.trackers.items():
        mine = state.trackers.get(tracker_id)
        tracker = catalog.trackers.get(tracker_id)
        if mine is None:
            state.trackers[tracker_id] = data
        elif tracker is not None:
            state.trackers[tracker_id] = tracker.merge(mine, data, now, state)
    forgotten = state.seen.union(other.seen)  # either profile's ids count once
    state.seen.advance(now)
    if forgotten:
        state.drop("recent_ids", forgotten)
    for alias in other.aliases:
        if alias in state.aliases or _admit_alias(state, alias):
            state.aliases[alias] = 1


# -- account audiences (SPEC §3 "subject": "account"; definitions/accounts.py) ---------------

MAX_ACCOUNT_USERS: Final = 1000  # users one account remembers (linked or unlinked); more: dropped


def _predicates(state: UserState | None, hidden: dict[str, str]) -> dict[str, bool]:
    """A user's values of the hidden per-user predicates (only the true ones)."""
    if state is None:
        return {}
    members = state.members
    found: dict[str, bool] = {}
    for key in hidden:
        membership = members.get(key)
        if membership is not None and membership.member:
            found[key] = True
    return found


def _account_member_record(
    group_id: str,
    user: str,
    order: tuple[int, int],
    linked: bool,
    values: dict[str, bool],
    at_ms: int,
) -> dict[str, Any]:
    """Tells account `group_id` what user `user` now is for it: linked or not, and the
    value of every hidden predicate. `seq` orders the user's records: the account keeps
    the latest, so a replayed (re-sent) record changes nothing."""
    generation, seq = order
    return {
        "type": "account",
        "stage": "member",
        "userId": ACCOUNT_PREFIX + group_id,
        "groupId": group_id,
        "messageId": f"account-member:{group_id}:{user}:{generation}:{seq}",
        "timestamp": format_iso(at_ms),
        "properties": {
            "user": user,
            "seq": [generation, seq],
            "linked": linked,
            "values": values,
        },
    }


def _account_traits_record(
    group_id: str, user: str, traits: dict[str, Any], at_ms: int, cause: str
) -> dict[str, Any]:
    """Forwards the traits of a `group` call to its account (latest by event time wins)."""
    return {
        "type": "account",
        "stage": "traits",
        "userId": ACCOUNT_PREFIX + group_id,
        "groupId": group_id,
        "messageId": f"account-traits:{group_id}:{cause}",
        "timestamp": format_iso(at_ms),
        "properties": {"user": user, "traits": traits},
    }


def _with_accounts(
    state: UserState | None, item: Event | Tick, catalog: Catalog, profile_key: str
) -> StepResult:
    """`step` while account audiences exist. An account's own records and profile are
    judged by the account rules; for a user, `_step` runs as always, the hidden
    predicates' transitions are kept out of the outputs, and every change of the user's
    links or predicate values becomes a record for each account concerned."""
    if isinstance(item, Event) and item.type == "account":
        return _account_record(state, item, catalog, profile_key)
    if state is not None and ACCOUNT_DATA in state.trackers:
        out: list[Output] = []
        if isinstance(item, Event) and item.type == "delete":
            return _delete_account(state, item, catalog, profile_key)
        if state.catalog_fingerprint != catalog.fingerprint:
            _adopt_account_catalog(state, catalog, profile_key, out)
        return StepResult(state, out, NEVER, False)
    hidden = catalog.account_hidden
    before = user_groups(state)
    linked_before: dict[str, int] = dict(before.get("g", {}))
    sent: int = before.get("n", 0)
    generation = state.generation if state is not None else 0
    values_before = _predicates(state, hidden)
    result = _step(state, item, catalog, profile_key)
    after_state = result.state
    gone = result.erase or after_state.merged_into is not None
    linked_after: dict[str, int] = {} if gone else dict(user_groups(after_state).get("g", {}))
    values_after: dict[str, bool] = {} if gone else _predicates(after_state, hidden)
    transitions = result.transitions
    if any(isinstance(t, Transition) and t.audience_key in hidden for t in transitions):
        transitions = [
            t for t in transitions if not (isinstance(t, Transition) and t.audience_key in hidden)
        ]
    if not linked_before and not linked_after:
        if transitions is result.transitions:
            return result
        return result.but(transitions, result.controls)
    at = item.at_ms if isinstance(item, Tick) else item.timestamp_ms
    if not gone:
        at = max(at, after_state.clock_ms)
    # The values changed when the last hidden predicate did: a deadline's own time, not
    # the moment a sweep noticed it (the account's transition is then exact and replays
    # alike whenever the sweep runs).
    changed_at = -1
    for change in result.transitions:
        if isinstance(change, Transition) and change.audience_key in hidden:
            changed_at = max(changed_at, change.at_ms)
    if changed_at >= 0:
        at = changed_at
    controls = list(result.controls)
    full = {key: key in values_after for key in hidden}
    for group_id in sorted(linked_before):
        if group_id not in linked_after:
            sent += 1
            controls.append(
                (
                    ACCOUNT_PREFIX + group_id,
                    _account_member_record(
                        group_id, profile_key, (generation, sent), False, {}, at
                    ),
                )
            )
    told: list[str] = []
    for group_id in sorted(linked_after):
        # a link the account has not heard of (new, or found by a backfill), or new values
        if (
            not linked_after[group_id]
            or group_id not in linked_before
            or (values_after != values_before)
        ):
            told.append(group_id)
            sent += 1
            controls.append(
                (
                    ACCOUNT_PREFIX + group_id,
                    _account_member_record(
                        group_id, profile_key, (after_state.generation, sent), True, full, at
                    ),
                )
            )
    if isinstance(item, Event) and not result.duplicate:
        found = group_of(item)
        if found is not None and not found[1] and found[0] in linked_after:
            traits = {k: v for k, v in item.traits.items() if k != "removed"}
            if traits:
                cause = item.message_id or f"{profile_key}:{item.timestamp_ms}"
                controls.append(
                    (
                        ACCOUNT_PREFIX + found[0],
                        _account_traits_record(
                            found[0], profile_key, traits, item.timestamp_ms, cause
                        ),
                    )
                )
    if not gone and len(controls) > len(result.controls):
        data = after_state.trackers.get(GROUPS_DATA)
        if isinstance(data, dict):
            data["n"] = sent
            for group_id in told:
                data["g"][group_id] = 1
    return result.but(transitions, tuple(controls))


def _delete_account(
    state: UserState, event: Event, catalog: Catalog, profile_key: str
) -> StepResult:
    """Deleting an account's profile (`DELETE /v1/users/group:{groupId}`): it exits its
    account audiences and its state is erased (its users' later records are dropped
    while the key is suppressed, as for a user). No `User Deleted`: no destination holds
    a user of that id."""
    out: list[Output] = []
    now = max(state.clock_ms, event.timestamp_ms)
    group_id = profile_key[len(ACCOUNT_PREFIX) :]
    _exit_all(state, catalog, profile_key, now, "deleted", event.message_id, out, group_id)
    return StepResult(UserState(), out, NEVER, False, erase=True)


def _account_record(
    state: UserState | None, event: Event, catalog: Catalog, profile_key: str
) -> StepResult:
    """A record of a user for its account (`_account_member_record`, `_account_traits_record`):
    the account keeps each user's latest values and its group traits, and judges its
    audiences. Never raises on data."""
    if state is not None and ACCOUNT_DATA not in state.trackers:
        return _unchanged(state)  # a user whose own id begins with "group:": not an account
    out: list[Output] = []
    if state is None:
        state = UserState()
        state.trackers[ACCOUNT_DATA] = {"u": {}}
        state.catalog_fingerprint = catalog.fingerprint
        changed = False
    elif state.catalog_fingerprint != catalog.fingerprint:
        _adopt_account_catalog(state, catalog, profile_key, out)
        changed = False
    else:
        changed = False
    ts = event.timestamp_ms
    now = max(state.clock_ms, ts)
    state.clock_ms = now
    stage = event.raw.get("stage")
    properties = event.properties
    if stage == "member":
        changed = _apply_member(state, properties)
    elif stage == "traits":
        traits = properties.get("traits")
        if isinstance(traits, dict):
            changed = _fold_group_traits(state, traits, ts)
    if changed:
        _judge_accounts(state, catalog, profile_key, now, out, event.message_id)
    return StepResult(state, out, NEVER, False)


def _apply_member(state: UserState, properties: dict[str, Any]) -> bool:
    user = properties.get("user")
    order = properties.get("seq")
    values = properties.get("values")
    linked = properties.get("linked") is True
    if (
        not isinstance(user, str)
        or not isinstance(order, list)
        or len(order) != 2
        or not all(type(part) is int for part in order)
        or not isinstance(values, dict)
    ):
        return False
    users: dict[str, Any] = state.trackers[ACCOUNT_DATA]["u"]
    old = users.get(user)
    if old is not None and [old[0], old[1]] >= order:
        return False  # a record seen before (a replay), or older than the one kept
    if old is None and (
        len(users) >= MAX_ACCOUNT_USERS or not string_fits(user, MAX_ALIAS_ID_BYTES)
    ):
        state.drop("account_users")
        return False
    kept = {k: True for k, v in values.items() if v is True} if linked else None
    users[user] = [order[0], order[1], kept]
    return old is None or old[2] != kept


def _fold_group_traits(state: UserState, traits: dict[str, Any], ts: int) -> bool:
    """The account's group traits: per trait, the value of the latest event time."""
    changed = False
    values, times = state.traits, state.trait_times
    for name, value in traits.items():
        if ts < times.get(name, -1):
            continue
        if values.get(name, ...) != value:
            if not _admit_trait(state, name, value):
                continue
            values[name] = value
            changed = True
        times[name] = ts
    if changed and ts > state.traits_at_ms:
        state.traits_at_ms = ts
    return changed


def _judge_accounts(
    state: UserState,
    catalog: Catalog,
    profile_key: str,
    now: int,
    out: list[Output],
    trigger_id: str | None,
    trigger: str = "account",
) -> None:
    """Judge every account audience of an account's profile; announce the changes."""
    group_id = profile_key[len(ACCOUNT_PREFIX) :]
    members = state.members
    frozen = catalog.frozen_mask
    linked: tuple[str, ...] | None = None
    for position in catalog.account_positions:
        if frozen >> position & 1:
            continue
        audience = catalog.audiences[position]
        key = audience.key
        value, _change = audience.root.evaluate(state, now)
        membership = members.get(key)
        if membership is None:
            if not value:
                continue
            membership = members[key] = Membership()
        if value == membership.member:
            continue
        membership.member = value
        membership.since_ms = now
        membership.seq += 1
        if linked is None:
            users = linked_users(state) or {}
            linked = tuple(sorted(u for u, entry in users.items() if entry[2] is not None))
        holdout = audience.holdout  # (SPEC §3: a stable share of the accounts, by groupId)
        out.append(
            Transition(
                key,
                audience.version,
                audience.name,
                profile_key,
                value,
                now,
                membership.seq,
                now,
                trigger,
                trigger_id,
                state.generation,
                holdout is not None and holdout.holds(profile_key),
                group_id=group_id,
                users=linked,
            )
        )


def _adopt_account_catalog(
    state: UserState, catalog: Catalog, profile_key: str, out: list[Output]
) -> None:
    """New, edited or deleted definitions, for an account: members of a deleted account
    audience exit; every account audience is judged (unchanged members hear nothing)."""
    now = state.clock_ms
    group_id = profile_key[len(ACCOUNT_PREFIX) :]
    for key, membership in list(state.members.items()):
        if key in catalog.index:
            continue
        retired = catalog.retired.get(key)
        if membership.member and retired is not None:
            membership.member = False
            membership.seq += 1
            version, name = retired
            out.append(
                Transition(
                    key,
                    version,
                    name,
                    profile_key,
                    False,
                    now,
                    membership.seq,
                    now,
                    "deleted",
                    None,
                    state.generation,
                    group_id=group_id,
                    users=tuple(
                        sorted(
                            u for u, e in (linked_users(state) or {}).items() if e[2] is not None
                        )
                    ),
                )
            )
        del state.members[key]
    state.catalog_fingerprint = catalog.fingerprint
    state.wake_ms = NEVER
    _judge_accounts(state, catalog, profile_key, now, out, None, "definition")
