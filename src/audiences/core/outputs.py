"""Output events of `audience-events` (SPEC §5), rendered from transitions."""

from __future__ import annotations

from typing import Any

from audiences.core.evaluator import Transition
from audiences.core.events import format_iso

CONTACT_TRAITS = ("email", "phone")


def render_transition(
    transition: Transition, traits: dict[str, Any], *, anonymous: bool = False
) -> dict[str, Any]:
    """The Segment-Spec track message announcing one membership change.

    Anonymous profiles (audiences with `include_anonymous`) carry `anonymousId`."""
    key = transition.audience_key
    timestamp = format_iso(transition.at_ms)
    context_traits = {name: traits[name] for name in CONTACT_TRAITS if traits.get(name)}
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
