"""Random buckets and holdouts (SPEC §3): a stable number 0-9999 per profile and salt.

    bucket(salt, id) = int.from_bytes(sha256(f"{salt}|{id}" as UTF-8)[:8], "big") % 10000

`id` is the profile's key: its userId, or for an anonymous profile (audiences with
`include_anonymous`) its anonymousId. The same id and salt give the same bucket on every
worker, process and replay; different salts give independent buckets (SHA-256).

- `{"random_bucket": {"gte": A?, "lt": B?}}` holds when A <= bucket < B (A default 0,
  B default 10000), with the definition's `salt` (default its `key`). A node with no
  tracker: the bucket is a function of the profile's key only, so no event updates
  anything for it; the audience is judged when the profile is (new profiles, edits of
  the catalog, and any input that touches the audience's other conditions).
- `"holdout": {"percent": P, "salt": S?}` (P in steps of 0.01): a would-be member whose
  bucket under S (default f"{key}:holdout") is below P * 100 is in the holdout — it enters and exits
  as every member does, and its transitions carry `properties.holdout: true`
  (`Transition.holdout`); destinations skip them (adapters/sinks/render.py).

Validation lives here too (`validate.py` calls it): JSON-path errors, did-you-mean.
"""

from __future__ import annotations

import difflib
import hashlib
import math
from collections.abc import Mapping
from typing import Any, Final, final

from audiences.core.definitions.conditions import Node
from audiences.core.state import NEVER, UserState
from audiences.errors import DefinitionError

BUCKETS: Final = 10_000
MAX_SALT_CHARS: Final = 200
HOLDOUT_SALT_SUFFIX: Final = ":holdout"
RANDOM_BUCKET_FIELDS = ("gte", "lt")
HOLDOUT_FIELDS = ("percent", "salt")


def bucket_of(salt: str, profile_key: str) -> int:
    """The profile's bucket, 0 to BUCKETS - 1, under `salt` (the formula above)."""
    text = f"{salt}|{profile_key}".encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big") % BUCKETS


def definition_salt(doc: Mapping[str, Any]) -> str:
    """The salt of a definition's `random_bucket` conditions: `salt`, else its key."""
    salt = doc.get("salt")
    return salt if isinstance(salt, str) and salt else str(doc.get("key", ""))


@final
class Holdout:
    """The holdout of an audience: profiles whose bucket under `salt` is below
    `percent` * 100 (validated to whole hundredths: an exact integer threshold)."""

    __slots__ = ("percent", "salt", "threshold")

    def __init__(self, percent: float, salt: str) -> None:
        self.percent = percent
        self.salt = salt
        self.threshold: int = round(percent * 100)

    def bucket(self, profile_key: str) -> int:
        return bucket_of(self.salt, profile_key)

    def holds(self, profile_key: str) -> bool:
        return bucket_of(self.salt, profile_key) < self.threshold


def holdout_of(doc: Mapping[str, Any]) -> Holdout | None:
    """The (validated) definition's holdout, or None."""
    spec = doc.get("holdout")
    if not isinstance(spec, dict):
        return None
    salt = spec.get("salt")
    if not isinstance(salt, str) or not salt:
        salt = f"{doc.get('key', '')}{HOLDOUT_SALT_SUFFIX}"
    return Holdout(float(spec["percent"]), salt)


@final
class RandomBucketNode(Node):
    """`{"random_bucket": {"gte": A?, "lt": B?}}`: A <= bucket < B, constant per profile."""

    def __init__(self, spec: Mapping[str, Any], salt: str) -> None:
        self.salt = salt
        self.gte: int = int(spec.get("gte", 0))
        self.lt: int = int(spec.get("lt", BUCKETS))

    def evaluate(self, state: UserState, now: int) -> tuple[bool, int]:
        bucket = bucket_of(self.salt, state.profile_key)
        return self.gte <= bucket < self.lt, NEVER

    def evidence(self, state: UserState, now: int) -> dict[str, Any]:
        return {
            "bucket": bucket_of(self.salt, state.profile_key),
            "gte": self.gte,
            "lt": self.lt,
            "salt": self.salt,
            "profile": state.profile_key,
        }


# -- validation --------------------------------------------------------------------------------


def _type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "null" if value is None else type(value).__name__


def _unknown_fields(obj: Mapping[str, Any], allowed: tuple[str, ...], path: str) -> None:
    for name in obj:
        if name not in allowed:
            close = difflib.get_close_matches(str(name), list(allowed), n=1, cutoff=0.6)
            raise DefinitionError(
                f"{path}.{name}",
                f"unknown field; expected one of {', '.join(allowed)}",
                close[0] if close else None,
            )


def validate_salt(value: Any, path: str) -> None:
    if not isinstance(value, str) or not value:
        raise DefinitionError(path, f"expected a non-empty string, got {_type(value)}")
    if len(value) > MAX_SALT_CHARS:
        raise DefinitionError(
            path, f"expected at most {MAX_SALT_CHARS} characters, got {len(value)}", reason="limits"
        )


def validate_random_bucket(body: Any, path: str) -> None:
    """`{"gte": A?, "lt": B?}`: integers 0-10000, at least one, A < B."""
    if not isinstance(body, dict):
        raise DefinitionError(
            path, f'expected a bucket range like {{"lt": 5000}} (a JSON object), got {_type(body)}'
        )
    _unknown_fields(body, RANDOM_BUCKET_FIELDS, path)
    if not body:
        raise DefinitionError(path, "expected gte, lt or both (buckets are 0 to 9999)")
    for name in RANDOM_BUCKET_FIELDS:
        if name not in body:
            continue
        value = body[name]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= BUCKETS:
            raise DefinitionError(
                f"{path}.{name}", f"expected an integer from 0 to {BUCKETS}, got {value!r}"
            )
    if "gte" in body and "lt" in body and body["gte"] >= body["lt"]:
        raise DefinitionError(path, "expected gte < lt (the range would be empty)")


def validate_holdout(body: Any, path: str) -> None:
    """`{"percent": P, "salt": S?}` with 0 < P < 100."""
    if not isinstance(body, dict):
        raise DefinitionError(
            path, f'expected a holdout like {{"percent": 10}} (a JSON object), got {_type(body)}'
        )
    _unknown_fields(body, HOLDOUT_FIELDS, path)
    if "percent" not in body:
        raise DefinitionError(f"{path}.percent", "a holdout needs a percent (0 < percent < 100)")
    percent = body["percent"]
    if (
        isinstance(percent, bool)
        or not isinstance(percent, int | float)
        or not math.isfinite(percent)
        or not 0 < percent < 100
    ):
        raise DefinitionError(
            f"{path}.percent",
            f"expected a number greater than 0 and less than 100, got {percent!r}",
        )
    if abs(percent * 100 - round(percent * 100)) > 1e-6:
        raise DefinitionError(
            f"{path}.percent", f"expected at most two decimals (steps of 0.01), got {percent!r}"
        )
    if "salt" in body:
        validate_salt(body["salt"], f"{path}.salt")
