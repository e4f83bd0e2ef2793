"""Output events of `audience-events` (SPEC §5), rendered from transitions."""

from __future__ import annotations

from typing import Any

from audiences.core.evaluator import Output, TraitChange, Transition
from audiences.core.events import format_iso

CONTACT_TRAITS = ("email", "phone")


def render_output(
    output: Output, traits: dict[str, Any], *, anonymous: bool = False
) -> dict[str, Any]:
    """The output message of a membership change or of a computed-trait change."""
    if isinstance(output, TraitChange):
        return render_trait_change(output, traits, anonymous=anonymous)
    return render_transition(output, traits, anonymous=anonymous)


def render_trait_change(
    change: TraitChange, traits: dict[str, Any], *, anonymous: bool = False
) -> dict[str, Any]:
    """`Trait Computed` (SPEC §5): `properties: {"trait_key": K, K: value}`."""
    key = change.trait_key
    timestamp = format_iso(change.at_ms)
    reason: dict[str, Any] = {"trigger": change.trigger}
    if change.trigger_message_id:
        reason["messageId"] = change.trigger_message_id
    return {
        "type": "track",
        "event": "Trait Computed",
        ("anonymousId" if anonymous else "userId"): change.profile_key,
        "messageId": change.message_id,
        "timestamp": timestamp,
        "properties": {
            "trait_key": key,
            key: change.value,
            "trait_name": change.trait_name,
            "trait_version": change.trait_version,
            "effective_at": timestamp
            if change.effective_at_ms == change.at_ms
            else format_iso(change.effective_at_ms),
            "reason": reason,
        },
        "context": {
            "traits": _contact_traits(traits),
            "audiences": {
                "computation_class": "trait",
                "computation_key": key,
                "version": change.trait_version,
            },
        },
    }


def _contact_traits(traits: dict[str, Any]) -> dict[str, Any]:
    return {name: traits[name] for name in CONTACT_TRAITS if traits.get(name)}


def render_transition(
    transition: Transition, traits: dict[str, Any], *, anonymous: bool = False
) -> dict[str, Any]:
    """The Segment-Spec track message announcing one membership change.

    Anonymous profiles (audiences with `include_anonymous`) carry `anonymousId`."""
    key = transition.audience_key
    timestamp = format_iso(transition.at_ms)
    context_traits = _contact_traits(traits)
    reason: dict[str, Any] = {"trigger": transition.trigger}
    if transition.trigger_message_id:
        reason["messageId"] = transition.trigger_message_id
    return {
        "type": "track",
        "event": "Audience Entered" if transition.entered else "Audience Exited",
        ("anonymousId" if anonymous else "userId"): transition.profile_key,
        "messageId": transition.message_id,
        "timestamp": timestamp,
        "properties": {
            "audience_key": key,
            key: transition.entered,
            "audience_name": transition.audience_name,
            "audience_version": transition.audience_version,
            "effective_at": timestamp
            if transition.effective_at_ms == transition.at_ms
            else format_iso(transition.effective_at_ms),
            "reason": reason,
        },
        "context": {
            "traits": context_traits,
            "audiences": {
                "computation_class": "audience",
                "computation_key": key,
                "version": transition.audience_version,
            },
        },
    }
