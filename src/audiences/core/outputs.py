"""Output events of `audience-events` (SPEC §5), rendered from transitions.

Membership and trait messages carry `context.personas` as Segment Engage writes it, so
Segment Actions audience destinations (which map `computation_key`,
`computation_class`, `computation_id` and `space_id` from there) take them unchanged.
The space is the caller's (the runtime passes `AUDIENCES_SPACE_ID`, else the app id):
the core reads no setting. `context` never enters a `messageId`.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import Any, Final

from audiences.core.evaluator import Deletion, Output, TraitChange, Transition
from audiences.core.events import format_iso

CONTACT_TRAITS = ("email", "phone")
USER_DELETED: Final = "User Deleted"
AUDIENCE: Final = "audience"  # computation_class of an audience (Segment Engage's names)
COMPUTED_TRAIT: Final = "computed_trait"
ACCOUNT_AUDIENCE: Final = "account_audience"  # an account audience's transitions (SPEC §5)


@lru_cache(maxsize=4096)
def computation_id(space_id: str, computation_class: str, key: str) -> str:
    """The stable id of a definition in a space: the same for every version of it, on
    every worker and replay; distinct across spaces and classes (32 hex digits)."""
    return hashlib.sha256(f"{space_id}|{computation_class}|{key}".encode()).hexdigest()[:32]


def personas(space_id: str, computation_class: str, key: str) -> dict[str, str]:
    """`context.personas` of an output (SPEC §5)."""
    return {
        "computation_class": computation_class,
        "computation_key": key,
        "computation_id": computation_id(space_id, computation_class, key),
        "space_id": space_id,
        "namespace": space_id,
    }


def render_output(
    output: Output, traits: dict[str, Any], *, space_id: str, anonymous: bool = False
) -> dict[str, Any]:
    """The output message of a membership change, a computed-trait change or a deletion."""
    if isinstance(output, TraitChange):
        return render_trait_change(output, traits, space_id=space_id, anonymous=anonymous)
    if isinstance(output, Deletion):
        return render_deletion(output)
    return render_transition(output, traits, space_id=space_id, anonymous=anonymous)


def render_deletion(deletion: Deletion) -> dict[str, Any]:
    """`User Deleted` (SPEC §4/§6): the Segment-Spec track message telling destinations
    to delete the profile. It carries no traits (the engine just erased them); an
    anonymous id deleted because it was linked to a deleted user names that user in
    `properties.linkedTo`."""
    reason: dict[str, Any] = {"trigger": "deleted"}
    if deletion.trigger_message_id:
        reason["messageId"] = deletion.trigger_message_id
    properties: dict[str, Any] = {"reason": reason}
    if deletion.linked_to is not None:
        properties["linkedTo"] = deletion.linked_to
    timestamp = format_iso(deletion.at_ms)
    properties["effective_at"] = timestamp
    return {
        "type": "track",
        "event": USER_DELETED,
        ("anonymousId" if deletion.anonymous else "userId"): deletion.profile_key,
        "messageId": deletion.message_id,
        "timestamp": timestamp,
        "properties": properties,
        "context": {"traits": {}},
    }


def render_transition(
    transition: Transition, traits: dict[str, Any], *, space_id: str, anonymous: bool = False
) -> dict[str, Any]:
    """The Segment-Spec track message announcing one membership change.

    Anonymous profiles (audiences with `include_anonymous`) carry `anonymousId`; an
    account audience's transitions carry `groupId` instead of a user id."""
    key = transition.audience_key
    if transition.group_id is not None:
        message = _message(
            transition,
            "Audience Entered" if transition.entered else "Audience Exited",
            {
                "audience_key": key,
                key: transition.entered,
                "audience_name": transition.audience_name,
                "audience_version": transition.audience_version,
                "linked_users": list(transition.users),
            },
            personas(space_id, ACCOUNT_AUDIENCE, key),
            {},
            False,
        )
        del message["userId"]
        message["groupId"] = transition.group_id
        if transition.holdout:  # (SPEC §3 `holdout`: destinations skip it)
            message["properties"]["holdout"] = True
        return message
    properties: dict[str, Any] = {
        "audience_key": key,
        key: transition.entered,
        "audience_name": transition.audience_name,
        "audience_version": transition.audience_version,
    }
    if transition.holdout:  # (absent for everyone else: SPEC §3 `holdout`)
        properties["holdout"] = True
    return _message(
        transition,
        "Audience Entered" if transition.entered else "Audience Exited",
        properties,
        personas(space_id, AUDIENCE, key),
        traits,
        anonymous,
    )


def render_trait_change(
    change: TraitChange, traits: dict[str, Any], *, space_id: str, anonymous: bool = False
) -> dict[str, Any]:
    """`Trait Computed` (SPEC §5): `properties: {"trait_key": K, K: value}`."""
    key = change.trait_key
    return _message(
        change,
        "Trait Computed",
        {
            "trait_key": key,
            key: change.value,
            "trait_name": change.trait_name,
            "trait_version": change.trait_version,
        },
        personas(space_id, COMPUTED_TRAIT, key),
        traits,
        anonymous,
    )


def _message(
    output: Transition | TraitChange,
    event: str,
    properties: dict[str, Any],
    computation: dict[str, str],
    traits: dict[str, Any],
    anonymous: bool,
) -> dict[str, Any]:
    timestamp = format_iso(output.at_ms)
    reason: dict[str, Any] = {"trigger": output.trigger}
    if output.trigger_message_id:
        reason["messageId"] = output.trigger_message_id
    properties["effective_at"] = (
        timestamp if output.effective_at_ms == output.at_ms else format_iso(output.effective_at_ms)
    )
    properties["reason"] = reason
    return {
        "type": "track",
        "event": event,
        ("anonymousId" if anonymous else "userId"): output.profile_key,
        "messageId": output.message_id,
        "timestamp": timestamp,
        "properties": properties,
        "context": {
            "traits": {name: traits[name] for name in CONTACT_TRAITS if traits.get(name)},
            "personas": computation,
        },
    }
