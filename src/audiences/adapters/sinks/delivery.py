"""The delivery machinery every sink shares: render, rate-limit, send, retry, give up.

`Deliverer.deliver(messages)` takes output messages in topic order and returns
one `Outcome` per message. Requests go out one after another in rendering
order, so a user's messages arrive in order. Per request:
- wait for the destination's token bucket (and for any `Retry-After` block);
- send through the `Transport` (aiohttp, or a Kafka producer);
- 2xx: delivered (and 404 for a deletion: the destination has no such user,
  which is what the deletion asked for). Connection error, timeout, 408, 429, 5xx: retry after an
  exponential backoff with jitter — or exactly the server's `Retry-After`,
  which also holds every other request to this destination — until the
  oldest message of the batch is older than `max_retry_age` (then
  `retries_exhausted`). Any other status: `rejected`, at once.
- A rejected request that carried several messages is retried one message at
  a time, so only the messages the destination refuses are dead-lettered
  (not after a 3xx, 401/403 or 410: those refuse the request, not a message).
- 3xx: redirects are never followed (the transport sends with
  `allow_redirects=False`); the messages are dead-lettered (`rejected`) with
  the status and the `Location` in the error.
- 401/403 pause the destination: nothing is dead-lettered, the request is
  held and re-sent every `auth_probe_interval_s` (the probe) until the
  destination takes it; meanwhile every other request to it (other lanes)
  waits; gauge `audiences_destination_paused` = 1 and a WARNING. Time spent
  paused does not count towards `max_retry_age`.
- 410 stops the destination: gauge `audiences_destination_stopped` = 1, an
  ERROR, `DestinationGone` raised to the caller (the sink holds the messages,
  uncommitted, in Kafka) and nothing is sent to it any more.
- A message the destination would drop whatever we do (`Rendered.refused`,
  e.g. a Segment event over 32 KB) is dead-lettered (`too_large`), unsent.
(`hold_auth_failures=False`, for `dlq replay`: 401/403/410 are plain
rejections, dead-lettered again without splitting.)
- A 2xx may still refuse some objects (Braze `errors[]`, Customer.io v2 batch
  `errors[]`): `answers.failed_items` names their messages, which are
  dead-lettered (`rejected`); the others are delivered. A 429 without
  `Retry-After` waits for what the vendor's headers say (Braze
  `X-RateLimit-Reset`, `answers.rate_limit_wait_s`), else the backoff.

Dead-lettering itself (the DLQ record) is the caller's job (`dlq.py`): it must
be durable before the input offset is committed.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from audiences.adapters import metrics
from audiences.adapters.sinks.answers import failed_items, rate_limit_wait_s
from audiences.adapters.sinks.config import AUDIENCE_KEY, Destination
from audiences.adapters.sinks.policy import (
    AUTH_FAILURES,
    GONE,
    TokenBucket,
    Verdict,
    backoff_s,
    classify,
    is_redirect,
    refuses_the_request,
    retry_after_s,
)
from audiences.adapters.sinks.render import Request, render_requests, webhook_headers

log = logging.getLogger(__name__)
EXCERPT_CHARS = 500


@dataclass(frozen=True)
class Response:
    """What one attempt got back. `status` None = no HTTP answer (see `retriable`)."""

    status: int | None
    body: str = ""  # an excerpt
    retry_after: str | None = None
    error: str = ""
    retriable: bool = True
    location: str | None = None  # a 3xx's Location header
    content: str = ""  # a 2xx body, whole (bounded): per-item errors (answers.py)
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case names


class DestinationGone(Exception):
    """The destination answered 410 Gone: it is stopped (nothing more is sent)."""


class Transport(Protocol):
    """Sends one rendered request (`SinkTransport` implementations live in transport.py)."""

    async def send(self, request: Request, headers: list[tuple[str, str]]) -> Response: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class Outcome:
    kind: str  # delivered | skipped | dead
    reason: str = ""  # dead: rejected | retries_exhausted | invalid_message | too_large
    status: int | None = None
    response: str = ""
    error: str = ""


DELIVERED = Outcome("delivered")
SKIPPED = Outcome("skipped")


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class Deliverer:
    """Delivery to one destination; safe to share between concurrent callers (lanes)."""

    def __init__(
        self,
        destination: Destination,
        transport: Transport,
        *,
        wall_ms: Callable[[], int] = wall_clock_ms,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        rng: random.Random | None = None,
        hold_auth_failures: bool = True,
    ) -> None:
        self.destination = destination
        self.transport = transport
        self.wall_ms = wall_ms
        self.monotonic = monotonic
        self.sleep = sleep
        self.rng = rng or random.Random()
        self.bucket = TokenBucket(destination.rate_limit_per_s, now=monotonic())
        self.hold_auth_failures = hold_auth_failures
        self.paused = False  # by a 401/403, until a probe is accepted
        self.stopped = False  # by a 410, for good
        self._prober: asyncio.Task[Any] | None = None  # re-sends its request; others wait
        self._no_probe = asyncio.Event()
        self._no_probe.set()
        name = destination.name
        self._paused_gauge = metrics.DESTINATION_PAUSED.labels(destination=name)
        self._stopped_gauge = metrics.DESTINATION_STOPPED.labels(destination=name)
        if hold_auth_failures:
            self._paused_gauge.set(0)
            self._stopped_gauge.set(0)
        self._request_duration = metrics.SINK_REQUEST_DURATION.labels(destination=name)
        self._lag = metrics.SINK_DELIVERY_LAG.labels(destination=name)
        self._retries = metrics.SINK_RETRIES.labels(destination=name)
        self._outcomes = {
            kind: metrics.SINK_DELIVERIES.labels(destination=name, outcome=kind)
            for kind in ("delivered", "skipped", "dead_lettered")
        }

    async def deliver(
        self, messages: Sequence[dict[str, Any]], first_seen_ms: int
    ) -> list[Outcome]:
        """Deliver `messages` (in order); `first_seen_ms` starts the give-up clock."""
        if self.stopped:
            raise DestinationGone(self.destination.name)
        rendered = render_requests(self.destination, messages)
        outcomes: list[Outcome | None] = [None] * len(messages)
        for index in rendered.skipped:
            outcomes[index] = SKIPPED
        for _index, audience in rendered.holdout:  # (a label only for an audience key)
            label = audience if AUDIENCE_KEY.match(audience) else "invalid"
            metrics.HOLDOUT_SKIPPED.labels(destination=self.destination.name, audience=label).inc()
        for index, why in rendered.refused:
            outcomes[index] = Outcome("dead", "too_large", error=why)
        for request in rendered.requests:
            outcome, refused = await self._send(request, first_seen_ms)
            if (
                outcome.kind == "dead"
                and outcome.reason == "rejected"
                and len(request.indexes) > 1
                and not refuses_the_request(outcome.status)
            ):
                for index in request.indexes:
                    single = render_requests(self.destination, [messages[index]]).requests
                    result = DELIVERED
                    for one in single:
                        result, alone = await self._send(one, first_seen_ms)
                        result = alone.get(0, result)
                        if result.kind == "dead":
                            break
                    _record(outcomes, index, result)
                continue
            for index in request.indexes:
                _record(outcomes, index, refused.get(index, outcome))
        final = [o or DELIVERED for o in outcomes]
        delivered = sum(1 for o in final if o.kind == "delivered")
        if delivered:
            self._outcomes["delivered"].inc(delivered)
            self._lag.observe(max(0.0, (self.wall_ms() - first_seen_ms) / 1000))
        skipped = sum(1 for o in final if o.kind == "skipped")
        if skipped:
            self._outcomes["skipped"].inc(skipped)
        dead = len(final) - delivered - skipped
        if dead:
            self._outcomes["dead_lettered"].inc(dead)
        return final

    async def _send(
        self, request: Request, first_seen_ms: int
    ) -> tuple[Outcome, dict[int, Outcome]]:
        """The request's outcome, and the messages a 2xx answer still refused (answers.py)."""
        destination = self.destination
        attempt = 0
        held_ms = 0  # time spent paused: not counted towards max_retry_age
        while True:
            if self.stopped:
                raise DestinationGone(destination.name)
            if self._prober is not None and not self._holds_probe():
                before = self.wall_ms()  # paused: another caller holds the probe
                while self._prober is not None:
                    await self._no_probe.wait()
                held_ms += self.wall_ms() - before
                continue
            wait = self.bucket.reserve(self.monotonic())
            if wait > 0:
                await self.sleep(wait)
            headers = webhook_headers(destination, request, self.wall_ms() // 1000)
            started = self.monotonic()
            response = await self.transport.send(request, headers)
            self._request_duration.observe(self.monotonic() - started)
            if self.hold_auth_failures:
                if response.status in AUTH_FAILURES:
                    if self._prober is not None and not self._holds_probe():
                        continue  # paused meanwhile by another caller: wait for its probe
                    if self._prober is None:
                        self._start_probe(response)
                    else:
                        log.info(
                            "%s: still refused (%s); next probe in %.0f s",
                            destination.name,
                            response.status,
                            destination.auth_probe_interval_s,
                        )
                    before = self.wall_ms()
                    await self.sleep(destination.auth_probe_interval_s)
                    held_ms += self.wall_ms() - before
                    continue
                if self._holds_probe():
                    self._end_probe()
                    self._resume(response)
                elif self.paused and self._prober is None:  # the prober was cancelled
                    self._resume(response)
                if response.status == GONE:
                    self._stop(response)
                    raise DestinationGone(destination.name)
            verdict = classify(response.status, response.retriable)
            if response.status == 404 and request.absent_ok:
                verdict = Verdict.DELIVERED
            if verdict is Verdict.DELIVERED:
                return DELIVERED, self._refused(request, response)
            if verdict is Verdict.REJECTED:
                log.warning(
                    "%s: %s %s rejected: %s %s",
                    destination.name,
                    request.method,
                    _where(request),
                    response.status,
                    response.error or response.body[:200],
                )
                if is_redirect(response.status):
                    return _redirected(response), {}
                return _dead("rejected", response), {}
            attempt += 1
            after = retry_after_s(response.retry_after, self.wall_ms() / 1000)
            if after is None:  # vendor headers: Braze's X-RateLimit-Reset
                after = rate_limit_wait_s(
                    destination.type, response.status, response.headers, self.wall_ms() / 1000
                )
            if after is not None:
                delay = after
                self.bucket.block_until(self.monotonic() + after)
            else:
                delay = backoff_s(
                    attempt, destination.retry_initial_s, destination.retry_max_s, self.rng
                )
            age_ms = self.wall_ms() - first_seen_ms - held_ms
            if age_ms + delay * 1000 > destination.max_retry_age_ms:
                log.warning(
                    "%s: giving up after %d attempts (%.0f s old): %s",
                    destination.name,
                    attempt,
                    age_ms / 1000,
                    response.status or response.error,
                )
                return _dead("retries_exhausted", response), {}
            self._retries.inc()
            log.info(
                "%s: attempt %d failed (%s), retrying in %.2f s",
                destination.name,
                attempt,
                response.status or response.error,
                delay,
            )
            await self.sleep(delay)

    def _refused(self, request: Request, response: Response) -> dict[int, Outcome]:
        failures = failed_items(self.destination.type, request.objects, response.content)
        for index, why in failures.items():  # a line per refused message, as for a 4xx
            log.warning(
                "%s: message %d refused in a %s answer: %s",
                self.destination.name,
                index,
                response.status,
                why,
            )
        return {
            index: Outcome("dead", "rejected", response.status, response.body[:EXCERPT_CHARS], why)
            for index, why in failures.items()
        }

    def _holds_probe(self) -> bool:
        return self._prober is not None and self._prober is asyncio.current_task()

    def _start_probe(self, response: Response) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._prober = task
        self._no_probe.clear()
        # a prober cancelled mid-probe (its partition revoked) hands the probe on
        task.add_done_callback(self._prober_done)
        if self.paused:
            return  # a previous prober was cancelled (a rebalance): already alerted
        self.paused = True
        self._paused_gauge.set(1)
        log.warning(
            "%s: PAUSED: the destination refuses our credentials (%s %s); holding its "
            "messages (nothing dead-lettered) and probing every %.0f s until it accepts",
            self.destination.name,
            response.status,
            (response.error or response.body)[:200],
            self.destination.auth_probe_interval_s,
        )

    def _prober_done(self, task: asyncio.Task[Any]) -> None:
        if self._prober is task:
            self._end_probe()

    def _end_probe(self) -> None:
        if self._prober is not None:
            self._prober.remove_done_callback(self._prober_done)
        self._prober = None
        self._no_probe.set()

    def _resume(self, response: Response) -> None:
        self.paused = False
        self._paused_gauge.set(0)
        log.warning(
            "%s: resumed: the destination answered %s to the probe",
            self.destination.name,
            response.status or response.error,
        )

    def _stop(self, response: Response) -> None:
        self.stopped = True
        self._stopped_gauge.set(1)
        log.error(
            "%s: STOPPED: the destination answered 410 Gone (%s); nothing more is sent to it "
            "and its messages stay in Kafka: fix its configuration and restart the worker",
            self.destination.name,
            (response.error or response.body)[:200],
        )


def _redirected(response: Response) -> Outcome:
    where = response.location or "(no Location header)"
    error = (
        f"redirected ({response.status}) to {where}: redirects are not followed; "
        "set the destination's url to the final address"
    )
    return Outcome(
        "dead", "rejected", response.status, response.body[:EXCERPT_CHARS], error[:EXCERPT_CHARS]
    )


def _dead(reason: str, response: Response) -> Outcome:
    return Outcome(
        "dead",
        reason,
        response.status,
        response.body[:EXCERPT_CHARS],
        response.error[:EXCERPT_CHARS],
    )


def _record(outcomes: list[Outcome | None], index: int, outcome: Outcome) -> None:
    """A message carried by several requests is dead if any of them died (first one wins)."""
    current = outcomes[index]
    if current is None or (current.kind == "delivered" and outcome.kind == "dead"):
        outcomes[index] = outcome


def _where(request: Request) -> str:
    return request.url.split("?", 1)[0]
