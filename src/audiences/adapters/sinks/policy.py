"""Retry policy and rate limit, shared by every sink (pure: clocks and randomness injected).

- `classify`: 2xx delivered; connection errors, timeouts, 408, 429 and 5xx
  retriable; any other status is final (dead-lettered at once) — 3xx
  included: redirects are never followed. (401/403 and 410 are final here
  too; the `Deliverer` pauses or stops the destination on them instead.)
- `backoff_s`: exponential with "equal jitter" — half the exponential step,
  plus a random half — so retries spread out yet always grow.
- `retry_after_s`: the `Retry-After` header, seconds or an HTTP date.
- `TokenBucket`: `rate` tokens per second, bursts up to `burst`; `reserve`
  returns how long the caller must wait (reservations queue fairly), and
  `block_until` stops everyone until a time (a 429's Retry-After holds the
  whole destination, not one request).
"""

from __future__ import annotations

import email.utils
import random
from enum import Enum

RETRIABLE_STATUSES = frozenset({408, 429})
# Refusals of our credentials, not of a message: the destination pauses (`Deliverer`).
AUTH_FAILURES = frozenset({401, 403})
GONE = 410  # the endpoint is no more: the destination stops


def is_redirect(status: int | None) -> bool:
    """A 3xx: never followed (a POST redirected is re-sent as a body-less GET by most
    clients, and the 2xx it gets would count as delivered); a failure, final."""
    return status is not None and 300 <= status < 400


def refuses_the_request(status: int | None) -> bool:
    """A final answer about the request (URL, credentials) rather than its messages: a
    batch is not worth re-sending message by message."""
    return is_redirect(status) or status in AUTH_FAILURES or status == GONE


class Verdict(Enum):
    DELIVERED = "delivered"
    RETRY = "retry"
    REJECTED = "rejected"


def classify(status: int | None, retriable: bool = True) -> Verdict:
    """`status` None = no HTTP answer: a connection error or timeout (retriable), or
    a failure the transport knows to be permanent (`retriable=False`)."""
    if status is None:
        return Verdict.RETRY if retriable else Verdict.REJECTED
    if status in RETRIABLE_STATUSES or status >= 500:
        return Verdict.RETRY
    if 200 <= status < 300:
        return Verdict.DELIVERED
    return Verdict.REJECTED


def backoff_s(
    attempt: int, initial_s: float, max_s: float, rng: random.Random | None = None
) -> float:
    """Delay before retry number `attempt` (1 = first retry)."""
    step = min(max_s, initial_s * 2.0 ** max(0, attempt - 1))
    uniform = rng.random() if rng is not None else random.random()
    return step / 2 + uniform * step / 2


def retry_after_s(value: str | None, now_s: float) -> float | None:
    """Seconds to wait from a `Retry-After` header (delta-seconds or HTTP-date)."""
    if not value:
        return None
    text = value.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now_s)


class TokenBucket:
    """A token bucket in caller-supplied time (seconds, monotonic)."""

    def __init__(self, rate_per_s: float | None, burst: float | None = None, now: float = 0.0):
        self.rate = rate_per_s
        self.capacity = burst if burst is not None else max(1.0, rate_per_s or 1.0)
        self.tokens = self.capacity
        self.updated = now
        self.blocked_until = 0.0

    def reserve(self, now: float, cost: float = 1.0) -> float:
        """Take `cost` tokens; returns the seconds to wait before using them."""
        blocked = max(0.0, self.blocked_until - now)
        if self.rate is None:
            return blocked
        if now > self.updated:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
        self.tokens -= cost
        deficit_s = -self.tokens / self.rate if self.tokens < 0 else 0.0
        return max(blocked, deficit_s)

    def block_until(self, when: float) -> None:
        self.blocked_until = max(self.blocked_until, when)
