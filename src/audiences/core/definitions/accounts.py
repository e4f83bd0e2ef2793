"""Account audiences (SPEC §3 `"subject": "account"`): validation, compilation, nodes.

An account definition's condition is built from `{"account": {"any"|"all"|"none": c}}`
and `{"account": {"trait": {name, op, value}}}` (group traits), composed with
all/any/not. Each inner user condition `c` becomes a *hidden* per-user audience (key
`{key}.{n}`, n in pre-order; `.` never occurs in a key, so it cannot collide): users
judge it as any audience but announce nothing; the evaluator sends its value to the
account's profile (`group:{groupId}`) as a control record, and the account's profile
judges the account audience from the member values it holds (`ACCOUNT_DATA`).

Quantifiers over the users linked to the account: `any` — at least one satisfies c;
`all` — at least one user is linked and every one satisfies c (`all` over zero users is
false); `none` — no linked user satisfies c (true for an account with no users left).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final, final

from audiences.core.definitions.conditions import (
    ALL_EVENTS,
    AllNode,
    AnyNode,
    Node,
    NotNode,
    Tracker,
    TraitNode,
)
from audiences.core.events import Event
from audiences.core.state import NEVER, UserState, string_fits
from audiences.errors import DefinitionError

ACCOUNT: Final = "account"  # the `subject` of account definitions
ACCOUNT_PREFIX: Final = "group:"  # profile key of an account: group:{groupId}
ACCOUNT_DATA: Final = "@account"  # state.trackers entry of an account profile: {"u": {user: [...]}}
# state.trackers entry of a user: {"g": {groupId: 1 if its account was told, else 0}, "n": seq}
GROUPS_DATA: Final = "@groups"
QUANTIFIERS = ("any", "all", "none")
ACCOUNT_FIELDS = ("any", "all", "none", "trait")
TRAIT_FIELDS = ("name", "op", "value")
TIME_RELATIVE_OPS = ("within_last", "not_within_last")


def is_account_definition(doc: Mapping[str, Any]) -> bool:
    return doc.get("subject") == ACCOUNT


def hidden_key(key: str, n: int) -> str:
    return f"{key}.{n}"


def account_parts(condition: Any) -> list[tuple[str, Any]]:
    """(quantifier, c) of every `{"account": {"any"|"all"|"none": c}}` of a (valid)
    account condition, in pre-order: the n-th is hidden audience `{key}.{n}`."""
    found: list[tuple[str, Any]] = []
    stack = [condition]
    while stack:
        node = stack.pop()
        ((name, body),) = node.items()
        if name in ("all", "any"):
            stack.extend(reversed(body))
        elif name == "not":
            stack.append(body)
        elif name == ACCOUNT:
            ((quantifier, inner),) = body.items()
            if quantifier in QUANTIFIERS:
                found.append((quantifier, inner))
    return found


def validate_account_condition(
    value: Any,
    path: str,
    validate_user_condition: Callable[[Any, str], None],
    validate_operator: Callable[[Mapping[str, Any], str], None],
    suggest: Callable[[str, tuple[str, ...]], str | None],
) -> None:
    """The top of an account definition's condition: all/any/not over `account` leaves."""
    if not isinstance(value, Mapping) or len(value) != 1:
        raise DefinitionError(
            path, "expected one condition object: all, any, not or account (subject: account)"
        )
    ((name, body),) = value.items()
    here = f"{path}.{name}"
    if name in ("all", "any"):
        if not isinstance(body, list) or not body:
            raise DefinitionError(here, "expected a non-empty list of conditions")
        for index, child in enumerate(body):
            validate_account_condition(
                child, f"{here}[{index}]", validate_user_condition, validate_operator, suggest
            )
        return
    if name == "not":
        validate_account_condition(body, here, validate_user_condition, validate_operator, suggest)
        return
    if name != ACCOUNT:
        raise DefinitionError(
            here,
            "an account definition's condition is made of all/any/not and "
            '{"account": {"any"|"all"|"none": c}} or {"account": {"trait": {…}}}; '
            f'put user conditions such as {name!r} inside {{"account": {{"any": …}}}}',
        )
    if not isinstance(body, Mapping) or len(body) != 1:
        raise DefinitionError(
            here, "expected exactly one of any, all, none (a user condition) or trait"
        )
    ((field, inner),) = body.items()
    if field not in ACCOUNT_FIELDS:
        raise DefinitionError(
            f"{here}.{field}",
            f"unknown field; expected one of {', '.join(ACCOUNT_FIELDS)}",
            suggest(field, ACCOUNT_FIELDS),
        )
    if field in QUANTIFIERS:
        validate_user_condition(inner, f"{here}.{field}")
        return
    trait_here = f"{here}.trait"
    if not isinstance(inner, Mapping):
        raise DefinitionError(trait_here, "expected a group trait condition {name, op, value}")
    for extra in inner:
        if extra not in TRAIT_FIELDS:
            raise DefinitionError(
                f"{trait_here}.{extra}",
                f"unknown field; expected one of {', '.join(TRAIT_FIELDS)}",
                suggest(str(extra), TRAIT_FIELDS),
            )
    if not isinstance(inner.get("name"), str) or not inner["name"]:
        raise DefinitionError(f"{trait_here}.name", "expected a group trait name")
    validate_operator(inner, trait_here)
    if inner.get("op") in TIME_RELATIVE_OPS:
        raise DefinitionError(
            f"{trait_here}.op",
            "time-relative operators are not supported on group traits "
            "(an account is judged when one of its users reports)",
        )


# -- nodes ---------------------------------------------------------------------------------


def linked_users(state: UserState) -> dict[str, Any] | None:
    """An account profile's users: user -> [generation, seq, {hidden key: bool} or None
    (unlinked)]; None for a profile that is not an account."""
    data = state.trackers.get(ACCOUNT_DATA)
    if not isinstance(data, dict):
        return None
    users = data.get("u")
    return users if isinstance(users, dict) else None


@final
class AccountRoot(Node):
    """The root of an account audience: false on every profile that is not an account
    (users judge every audience of the catalog; account audiences are never theirs)."""

    def __init__(self, child: Node) -> None:
        self.child = child

    def evaluate(self, state: UserState, now: int) -> tuple[bool, int]:
        if ACCOUNT_DATA not in state.trackers:
            return False, NEVER
        value, _change = self.child.evaluate(state, now)
        return value, NEVER

    def explain(self, state: UserState, now: int) -> dict[str, Any]:
        """The tree, with what the account holds: group traits and its users' values of
        every hidden predicate (which users decided it)."""
        tree = self.child.explain(state, now)
        users = linked_users(state)
        if users is None:
            tree["account"] = None  # not an account's profile: an account audience is false
            return tree
        tree["account"] = {
            "group_traits": dict(state.traits),
            "users": {
                user: sorted(entry[2])
                for user, entry in sorted(users.items())
                if entry[2] is not None
            },
            "unlinked": sorted(user for user, entry in users.items() if entry[2] is None),
        }
        return tree


@final
class AccountUsersNode(Node):
    """`{"account": {"any"|"all"|"none": c}}`: over the member values users sent."""

    def __init__(self, quantifier: str, hidden: str) -> None:
        self.quantifier = quantifier
        self.hidden = hidden

    def evaluate(self, state: UserState, now: int) -> tuple[bool, int]:
        users = linked_users(state)
        if users is None:
            return False, NEVER
        linked = 0
        holding = 0
        for entry in users.values():
            values = entry[2]
            if values is None:
                continue
            linked += 1
            if values.get(self.hidden) is True:
                holding += 1
        if self.quantifier == "any":
            return holding > 0, NEVER
        if self.quantifier == "all":
            return linked > 0 and holding == linked, NEVER
        return holding == 0, NEVER

    def evidence(self, state: UserState, now: int) -> dict[str, Any]:
        users = linked_users(state) or {}
        members = {
            user: entry[2].get(self.hidden) is True
            for user, entry in sorted(users.items())
            if entry[2] is not None
        }
        return {"quantifier": self.quantifier, "predicate": self.hidden, "users": members}


@final
class GroupTraitNode(Node):
    """`{"account": {"trait": …}}`: the account's group traits (kept as its traits)."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self.trait = TraitNode(spec)

    def evaluate(self, state: UserState, now: int) -> tuple[bool, int]:
        value, _change = self.trait.evaluate(state, now)
        return value, NEVER

    def evidence(self, state: UserState, now: int) -> dict[str, Any]:
        return self.trait.evidence(state, now)


def compile_account(key: str, condition: Mapping[str, Any]) -> Node:
    """The node of an account definition's (valid) condition; hidden audiences numbered
    as `account_parts` numbers them."""
    counter = [0]

    def build(cond: Mapping[str, Any]) -> Node:
        ((name, body),) = cond.items()
        node: Node
        if name == "all":
            node = AllNode([build(c) for c in body])
        elif name == "any":
            node = AnyNode([build(c) for c in body])
        elif name == "not":
            node = NotNode(build(body))
        else:
            ((field, inner),) = body.items()
            if field == "trait":
                node = GroupTraitNode(inner)
            else:
                node = AccountUsersNode(field, hidden_key(key, counter[0]))
                counter[0] += 1
        node.condition = cond
        return node

    root = AccountRoot(build(condition))
    root.condition = condition
    return root


# -- the user side: links to accounts -------------------------------------------------------

MAX_GROUPS: Final = 100  # accounts one user may be linked to (more are dropped and counted)
MAX_GROUP_ID_BYTES: Final = 256


def group_of(event: Event) -> tuple[str, bool] | None:
    """(groupId, removed) of a `group` event, or None when it names no usable account."""
    if event.type != "group":
        return None
    group_id = event.raw.get("groupId")
    if isinstance(group_id, int) and not isinstance(group_id, bool):
        group_id = str(group_id)
    if not isinstance(group_id, str) or not group_id:
        return None
    return group_id, event.traits.get("removed") is True


def user_groups(state: UserState | None) -> dict[str, Any]:
    """A user's links: {"g": {groupId: 1 once the account was told of the link, 0 before
    (a link found by a backfill, or just made)}, "n": records sent so far}, or {}."""
    if state is None:
        return {}
    data = state.trackers.get(GROUPS_DATA)
    return data if isinstance(data, dict) else {}


@final
class GroupTracker(Tracker):
    """Which accounts a user is linked to (`group` calls; `traits.removed: true` unlinks).
    In the catalog only while an account audience exists: it sees every event (a `group`
    call has no route) and returns at once for all but `group` calls."""

    def __init__(self) -> None:
        self.id = GROUPS_DATA
        self.events = frozenset({ALL_EVENTS})

    def update(self, state: UserState, event: Event, now: int) -> bool:
        if event.type != "group":
            return False
        found = group_of(event)
        if found is None:
            return False
        group_id, removed = found
        data = state.trackers.get(GROUPS_DATA)
        if not isinstance(data, dict):
            if removed:
                return False
            data = state.trackers[GROUPS_DATA] = {"g": {}, "n": 0}
        groups: dict[str, int] = data["g"]
        if removed:
            return groups.pop(group_id, None) is not None
        if group_id in groups:
            return False
        if len(groups) >= MAX_GROUPS:
            state.drop("groups")
            return False
        if not string_fits(group_id, MAX_GROUP_ID_BYTES):
            state.drop("group_id_size")
            return False
        groups[group_id] = 0  # the account is told by the step (evaluator._with_accounts)
        return True

    def merge(self, mine: Any, other: Any, now: int, state: UserState) -> Any:
        """Both profiles' links (an anonymous profile's accounts become the user's)."""
        groups = dict(mine.get("g", {})) if isinstance(mine, dict) else {}
        theirs = other.get("g", {}) if isinstance(other, dict) else {}
        if isinstance(theirs, dict):
            for group_id in sorted(theirs):
                if group_id not in groups and len(groups) < MAX_GROUPS:
                    groups[group_id] = 0  # (the user tells the account: a new member)
        count = mine.get("n", 0) if isinstance(mine, dict) else 0
        return {"g": groups, "n": count}
