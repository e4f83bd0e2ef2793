"""Output events of `audience-events` (SPEC §5), rendered from transitions."""

from __future__ import annotations

from typing import Any

from audiences.core.evaluator import Deletion, Output, TraitChange, Transition
from audiences.core.events import format_iso

CONTACT_TRAITS = ("email", "phone")
USER_DELETED = "User Deleted"


def render_output(
    output: Output, traits: dict[str, Any], *, anonymous: bool = False
) -> dict[str, Any]:
    """The output message of a membership change, a computed-trait change or a deletion."""
    if isinstance(output, TraitChange):
        return render_trait_change(output, traits, anonymous=anonymous)
    if isinstance(output, Deletion):
        return render_deletion(output)
    return render_transition(output, traits, anonymous=anonymous)


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
    transition: Transition, traits: dict[str, Any], *, anonymous: bool = False
) -> dict[str, Any]:
    """The Segment-Spec track message announcing one membership change.

    Anonymous profiles (audiences with `include_anonymous`) carry `anonymousId`."""
    key = transition.audience_key
    return _message(
        transition,
        "Audience Entered" if transition.entered else "Audience Exited",
        {
            "audience_key": key,
            key: transition.entered,
            "audience_name": transition.audience_name,
            "audience_version": transition.audience_version,
        },
        ("audience", key, transition.audience_version),
        traits,
        anonymous,
    )


def render_trait_change(
    change: TraitChange, traits: dict[str, Any], *, anonymous: bool = False
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
        ("trait", key, change.trait_version),
        traits,
        anonymous,
    )


def _message(
    output: Transition | TraitChange,
    event: str,
    properties: dict[str, Any],
    computation: tuple[str, str, int],
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
    computation_class, computation_key, version = computation
    return {
        "type": "track",
        "event": event,
        ("anonymousId" if anonymous else "userId"): output.profile_key,
        "messageId": output.message_id,
        "timestamp": timestamp,
        "properties": properties,
        "context": {
            "traits": {name: traits[name] for name in CONTACT_TRAITS if traits.get(name)},
            "audiences": {
                "computation_class": computation_class,
                "computation_key": computation_key,
                "version": version,
            },
        },
    }
