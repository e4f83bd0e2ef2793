"""PII hashing for destinations with `hash_pii: true` (SPEC §6).

`email` and `phone` are sent as the SHA-256 hex digest of the trimmed,
lower-cased value, the normalisation ad platforms match on; a value that is
already a 64-hex digest passes through unchanged.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

PII_TRAITS = ("email", "phone")
_DIGEST = re.compile(r"^[0-9a-fA-F]{64}$")


def hash_pii(value: str) -> str:
    """SHA-256 hex of the trimmed, lower-cased value; 64-hex digests pass through."""
    if _DIGEST.match(value):
        return value
    return hashlib.sha256(value.strip().lower().encode()).hexdigest()


def contact_traits(traits: Any, hashed: bool) -> dict[str, Any]:
    """The `email` / `phone` of `traits` that are set, hashed when asked to."""
    if not isinstance(traits, dict):
        return {}
    out: dict[str, Any] = {}
    for name in PII_TRAITS:
        value = traits.get(name)
        if value:
            out[name] = hash_pii(value) if hashed and isinstance(value, str) else value
    return out
