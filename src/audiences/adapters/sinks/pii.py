"""PII hashing for destinations with `hash_pii: true` (SPEC §6).

Values are normalised the way ad platforms normalise their match keys, then
sent as the SHA-256 hex digest; a value that is already a 64-hex digest
passes through unchanged.

- `email`: trimmed and lower-cased.
- `phone`: parsed with `phonenumbers` (Google's libphonenumber), numbers
  without a country code read in the destination's `phone_region` (default
  US), and hashed as its E.164 digits **without the '+'**: "(415) 555-2671"
  and "+1 415 555 2671" both hash "14155552671". That is Meta's documented
  `ph` normalisation (country code included, symbols such as '+' removed;
  Snap and TikTok ask the same). Google's Customer Match asks for E.164 with
  the '+' ("+14155552671"), so these digests do not match Google's; one key
  cannot match both, and the digits form is the one most platforms share.
- with hashing on, a phone given as a JSON integer is read as its digits;
  any other value that is not a string (a list, an object, a float) is left
  out rather than sent in clear.
- a phone that does not parse as a possible number is hashed as its digits
  alone (what a platform's own "digits only" rule makes of it), or, holding
  no digit at all, as its trimmed, lower-cased text (so garbage values stay
  distinct instead of all hashing the empty string).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import phonenumbers

PII_TRAITS = ("email", "phone")
DEFAULT_PHONE_REGION = "US"
_DIGEST = re.compile(r"^[0-9a-fA-F]{64}$")
_NON_DIGITS = re.compile(r"\D+")
MAX_PHONE_CHARS = 250  # longer is no phone number: not handed to the parser


def hash_pii(value: str) -> str:
    """SHA-256 hex of the trimmed, lower-cased value; 64-hex digests pass through."""
    if _DIGEST.match(value):
        return value
    return _sha256(value.strip().lower())


def normalise_phone(value: str, region: str = DEFAULT_PHONE_REGION) -> str:
    """The E.164 digits of a phone number (no '+'), or its digits when it does not parse."""
    text = value.strip()
    if len(text) <= MAX_PHONE_CHARS:
        try:
            number = phonenumbers.parse(text, region)
        except phonenumbers.NumberParseException:
            number = None
        if number is not None and phonenumbers.is_possible_number(number):
            e164 = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
            return e164.removeprefix("+")
    digits = _NON_DIGITS.sub("", text)
    return digits or text.lower()


def hash_phone(value: str, region: str = DEFAULT_PHONE_REGION) -> str:
    """SHA-256 hex of `normalise_phone(value, region)`; 64-hex digests pass through."""
    if _DIGEST.match(value.strip()):
        return value.strip()
    return _sha256(normalise_phone(value, region))


def contact_traits(
    traits: Any, hashed: bool, phone_region: str = DEFAULT_PHONE_REGION
) -> dict[str, Any]:
    """The `email` / `phone` of `traits` that are set, hashed when asked to."""
    if not isinstance(traits, dict):
        return {}
    out: dict[str, Any] = {}
    for name in PII_TRAITS:
        value = traits.get(name)
        if not value:
            continue
        if hashed:
            if name == "phone" and isinstance(value, int) and not isinstance(value, bool):
                value = str(value)  # a phone sent as a JSON number
            if not isinstance(value, str):
                continue  # never sent in clear when hashing is asked for
            value = hash_phone(value, phone_region) if name == "phone" else hash_pii(value)
        out[name] = value
    return out


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
