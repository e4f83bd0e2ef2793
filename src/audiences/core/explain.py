"""Why a profile is (or is not) in an audience: the condition tree with each node's
value, when it may change, and the events, traits or memberships that decided it.

Every value comes from the compiled nodes' own `evaluate` — the code `step`
runs — on a copy of the profile, so an explanation can never disagree with
the engine.
"""

from __future__ import annotations

from typing import Any

from audiences.core.definitions import Catalog
from audiences.core.definitions.buckets import Holdout
from audiences.core.events import format_iso
from audiences.core.state import NEVER, UserState


def explain(
    state: UserState,
    catalog: Catalog,
    audience_key: str,
    now: int,
    profile_key: str | None = None,
) -> dict[str, Any]:
    """Raises KeyError for an audience the catalog does not evaluate. `profile_key`: the
    profile's userId (or anonymousId), which `random_bucket` and holdouts hash."""
    audience = catalog.audience(audience_key)
    if audience is None:
        raise KeyError(audience_key)
    profile = UserState.decode(state.encode())  # nodes read only, but never risk the live one
    if profile_key is not None:
        profile.profile_key = profile_key
    at = max(now, profile.clock_ms)
    membership = profile.members.get(audience_key)
    tree = _with_iso(audience.root.explain(profile, at))
    anonymous_excluded = profile.anonymous and not audience.include_anonymous
    return {
        "audience": audience_key,
        "version": audience.version,
        "at": format_iso(at),
        "member": bool(membership and membership.member),
        "member_since": format_iso(membership.since_ms) if membership else None,
        "next_check": format_iso(membership.wake_ms)
        if membership and membership.wake_ms < NEVER
        else None,
        "value": tree["value"] and not anonymous_excluded,
        "anonymous_excluded": anonymous_excluded,
        "condition": tree,
        **_holdout(audience.holdout, profile.profile_key),
    }


def _holdout(holdout: Holdout | None, profile_key: str) -> dict[str, Any]:
    """The profile's place in the audience's holdout (SPEC §3), if it has one."""
    if holdout is None:
        return {}
    bucket = holdout.bucket(profile_key)
    return {
        "holdout": {
            "percent": holdout.percent,
            "salt": holdout.salt,
            "bucket": bucket,
            "in_holdout": bucket < holdout.threshold,
        }
    }


def _with_iso(node: Any) -> Any:
    """Adds ISO-8601 twins of `*_ms` times (the API's readers are people)."""
    if isinstance(node, list):
        return [_with_iso(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        out[key] = _with_iso(value)
        if key.endswith("_ms") and key != "definition":
            stem = key[:-3]
            if isinstance(value, int):
                out[stem] = format_iso(value)
            elif isinstance(value, list) and all(isinstance(v, int) for v in value):
                out[stem] = [format_iso(v) for v in value]
    return out
