"""Retry policy, token bucket and the shared Deliverer, on a fake clock and transport (no I/O)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from audiences.adapters.sinks.config import Destination, parse_destinations
from audiences.adapters.sinks.delivery import Deliverer, Response
from audiences.adapters.sinks.policy import (
    TokenBucket,
    Verdict,
    backoff_s,
    classify,
    retry_after_s,
)
from audiences.adapters.sinks.render import Request
from shared import deleted_message, output_message


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (200, Verdict.DELIVERED),
        (201, Verdict.DELIVERED),
        (204, Verdict.DELIVERED),
        (None, Verdict.RETRY),
        (408, Verdict.RETRY),
        (429, Verdict.RETRY),
        (500, Verdict.RETRY),
        (503, Verdict.RETRY),
        (400, Verdict.REJECTED),
        (401, Verdict.REJECTED),
        (404, Verdict.REJECTED),
        (413, Verdict.REJECTED),
        (302, Verdict.REJECTED),
    ],
)
def test_classify(status: int | None, verdict: Verdict) -> None:
    assert classify(status) is verdict


def test_permanent_transport_failures_are_rejected() -> None:
    assert classify(None, retriable=False) is Verdict.REJECTED


def test_backoff_grows_exponentially_with_jitter_up_to_the_cap() -> None:
    rng = random.Random(7)
    delays = [[backoff_s(n, 0.5, 8.0, rng) for n in range(1, 8)] for _ in range(50)]
    for run in delays:
        for n, delay in enumerate(run, start=1):
            step = min(8.0, 0.5 * 2 ** (n - 1))
            assert step / 2 <= delay <= step
    assert len({round(run[2], 6) for run in delays}) > 40  # jittered, not synchronised


def test_retry_after_seconds_and_http_date() -> None:
    assert retry_after_s("2", now_s=0) == 2.0
    assert retry_after_s("0.5", now_s=0) == 0.5
    assert retry_after_s("Wed, 21 Oct 2015 07:28:10 GMT", now_s=1445412480) == 10.0
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT", now_s=1445412490) == 0.0
    assert retry_after_s(None, 0) is None and retry_after_s("soon", 0) is None


def test_token_bucket_spaces_requests_at_the_rate_after_the_burst() -> None:
    bucket = TokenBucket(rate_per_s=2.0, now=0.0)  # burst = 2
    waits = [bucket.reserve(0.0) for _ in range(5)]
    assert waits == [0.0, 0.0, 0.5, 1.0, 1.5]
    assert bucket.reserve(10.0) == 0.0  # refilled
    unlimited = TokenBucket(None)
    assert [unlimited.reserve(0.0) for _ in range(100)] == [0.0] * 100


def test_token_bucket_block_holds_every_caller() -> None:
    bucket = TokenBucket(None)
    bucket.block_until(5.0)
    assert bucket.reserve(3.0) == 2.0
    assert bucket.reserve(6.0) == 0.0


class FakeTime:
    """A wall clock and monotonic clock that `sleep` advances instantly."""

    def __init__(self) -> None:
        self.now = 1_000_000.0
        self.sleeps: list[float] = []

    def wall_ms(self) -> int:
        return int(self.now * 1000)

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class Script:
    """A transport answering from a script of statuses (then 200), recording each request."""

    def __init__(
        self,
        answers: list[Response],
        time: FakeTime,
        reject: Callable[[Request], bool] | None = None,
    ):
        self.answers = list(answers)
        self.time = time
        self.reject = reject
        self.calls: list[tuple[float, Request, dict[str, str]]] = []

    async def send(self, request: Request, headers: list[tuple[str, str]]) -> Response:
        self.calls.append((self.time.now, request, dict(headers)))
        if self.reject is not None and self.reject(request):
            return Response(400, '{"error":"bad user"}')
        return self.answers.pop(0) if self.answers else Response(200)

    async def close(self) -> None:
        pass


def make(
    dest: dict[str, Any], answers: list[Response], hold_auth_failures: bool = True
) -> tuple[Deliverer, Script, FakeTime]:
    destination: Destination = parse_destinations([{"name": "d", **dest}], {})[0]
    time = FakeTime()
    script = Script(answers, time)
    deliverer = Deliverer(
        destination,
        script,
        wall_ms=time.wall_ms,
        monotonic=time.monotonic,
        sleep=time.sleep,
        rng=random.Random(1),
        hold_auth_failures=hold_auth_failures,
    )
    return deliverer, script, time


HOOK = {"type": "webhook", "url": "http://h", "retry_initial_s": 1.0, "retry_max_s": 30.0}


def test_retries_5xx_and_timeouts_with_backoff_then_delivers() -> None:
    deliverer, script, time = make(
        HOOK, [Response(500), Response(None, error="timeout"), Response(503)]
    )
    outcomes = asyncio.run(deliverer.deliver([output_message("u1")], time.wall_ms()))
    assert [o.kind for o in outcomes] == ["delivered"]
    assert len(script.calls) == 4
    assert len(time.sleeps) == 3
    for n, delay in enumerate(time.sleeps, start=1):
        assert 2 ** (n - 1) / 2 <= delay <= 2 ** (n - 1)
    # every attempt is the same message, re-signed with a fresh timestamp
    assert len({c[1].body for c in script.calls}) == 1
    assert [c[2]["webhook-timestamp"] for c in script.calls] == [
        str(int(t)) for t, _, _ in script.calls
    ]


def test_retry_after_is_honoured_exactly() -> None:
    deliverer, script, time = make(HOOK, [Response(429, retry_after="7")])
    asyncio.run(deliverer.deliver([output_message("u1")], time.wall_ms()))
    (t1, _, _), (t2, _, _) = script.calls
    assert t2 - t1 == 7.0


def test_rejection_is_final_and_carries_status_and_body() -> None:
    deliverer, script, time = make(HOOK, [Response(400, '{"error":"bad"}')])
    [outcome] = asyncio.run(deliverer.deliver([output_message("u1")], time.wall_ms()))
    assert (outcome.kind, outcome.reason, outcome.status) == ("dead", "rejected", 400)
    assert outcome.response == '{"error":"bad"}'
    assert len(script.calls) == 1 and time.sleeps == []


def test_gives_up_at_max_retry_age_counted_from_first_seen() -> None:
    deliverer, script, time = make({**HOOK, "max_retry_age": "1m"}, [Response(503)] * 1000)
    [outcome] = asyncio.run(deliverer.deliver([output_message("u1")], time.wall_ms() - 30_000))
    assert (outcome.kind, outcome.reason, outcome.status) == ("dead", "retries_exhausted", 503)
    assert time.now - 1_000_000.0 <= 30.0  # never waited past the age
    assert len(script.calls) > 3


def test_a_rejected_batch_is_split_so_only_refused_messages_die() -> None:
    deliverer, script, time = make({**HOOK, "batch_size": 10}, [])

    def refuses_u2(request: Request) -> bool:
        body = orjson.loads(request.body)
        return any(m["userId"] == "u2" for m in (body if isinstance(body, list) else [body]))

    script.reject = refuses_u2
    messages = [output_message(f"u{i}") for i in range(4)]
    outcomes = asyncio.run(deliverer.deliver(messages, time.wall_ms()))
    assert [o.kind for o in outcomes] == ["delivered", "delivered", "dead", "delivered"]
    assert [len(orjson.loads(c[1].body)) for c in script.calls] == [4, 1, 1, 1, 1]


def test_rate_limit_spaces_requests() -> None:
    deliverer, script, time = make({**HOOK, "rate_limit_per_s": 2}, [])
    asyncio.run(deliverer.deliver([output_message(f"u{i}") for i in range(6)], time.wall_ms()))
    times = [c[0] - 1_000_000.0 for c in script.calls]
    assert times == [0.0, 0.0, 0.5, 1.0, 1.5, 2.0]


def test_skipped_messages_are_not_sent() -> None:
    deliverer, script, _time = make({**HOOK, "audiences": ["vip"]}, [])
    outcomes = asyncio.run(
        deliverer.deliver([output_message("u1"), output_message("u2", audience="vip")], 0)
    )
    assert [o.kind for o in outcomes] == ["skipped", "delivered"]
    assert len(script.calls) == 1


def test_metrics_per_destination() -> None:
    from prometheus_client import REGISTRY

    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, {"destination": "metered", **labels}) or 0.0

    deliverer, _script, time = make(
        {**HOOK, "name": "metered", "audiences": ["cart_abandoners"]},
        [Response(503), Response(200), Response(400, "no")],
    )
    outcomes = asyncio.run(
        deliverer.deliver(
            [output_message("u1"), output_message("u2"), output_message("u3", audience="x")],
            time.wall_ms() - 2000,
        )
    )
    assert [o.kind for o in outcomes] == ["delivered", "dead", "skipped"]
    assert value("audiences_sink_deliveries_total", outcome="delivered") == 1
    assert value("audiences_sink_deliveries_total", outcome="dead_lettered") == 1
    assert value("audiences_sink_deliveries_total", outcome="skipped") == 1
    assert value("audiences_sink_retries_total") == 1
    assert value("audiences_sink_request_duration_seconds_count") == 3
    assert value("audiences_sink_delivery_lag_seconds_count") == 1
    assert value("audiences_sink_delivery_lag_seconds_sum") >= 2.0


def test_404_on_a_deletion_is_delivered_but_on_anything_else_rejected() -> None:
    braze = {"type": "braze", "url": "http://b", "api_key": "k"}
    deliverer, _, time = make(braze, [Response(404, '{"message":"not found"}')])
    outcomes = asyncio.run(deliverer.deliver([deleted_message("u1")], time.wall_ms()))
    assert [o.kind for o in outcomes] == ["delivered"]
    deliverer, _, time = make(braze, [Response(404, '{"message":"not found"}')])
    [outcome] = asyncio.run(deliverer.deliver([output_message("u1")], time.wall_ms()))
    assert (outcome.kind, outcome.reason, outcome.status) == ("dead", "rejected", 404)
    deliverer, _, time = make(HOOK, [Response(404, "")])
    [outcome] = asyncio.run(deliverer.deliver([deleted_message("u1")], time.wall_ms()))
    assert outcome.kind == "dead"  # a webhook URL that is not there is no deleted user


def test_a_deletion_is_retried_on_5xx_like_any_message() -> None:
    cio = {"type": "customerio", "site_id": "s", "api_key": "k", "retry_initial_s": 1.0}
    deliverer, script, time = make(cio, [Response(503), Response(500)])
    outcomes = asyncio.run(deliverer.deliver([deleted_message("u1")], time.wall_ms()))
    assert [o.kind for o in outcomes] == ["delivered"]
    assert [call[1].method for call in script.calls] == ["DELETE"] * 3
    assert len(time.sleeps) == 2


# -- responses read as the APIs mean them (SPEC §6) --------------------------------------------


def gauge(name: str, destination: str) -> float | None:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, {"destination": destination})


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_a_final_failure_naming_the_location_and_the_batch_is_not_split(
    status: int,
) -> None:
    moved = Response(status, "", location="https://new.example.com/hook")
    deliverer, script, time = make({**HOOK, "batch_size": 10}, [moved])
    messages = [output_message(f"u{i}") for i in range(3)]
    outcomes = asyncio.run(deliverer.deliver(messages, time.wall_ms()))
    assert [(o.kind, o.reason, o.status) for o in outcomes] == [("dead", "rejected", status)] * 3
    assert "https://new.example.com/hook" in outcomes[0].error
    assert f"redirected ({status})" in outcomes[0].error
    assert len(script.calls) == 1 and time.sleeps == []  # neither retried nor split


def test_a_redirect_without_location_says_so() -> None:
    deliverer, _, time = make(HOOK, [Response(302)])
    [outcome] = asyncio.run(deliverer.deliver([output_message("u1")], time.wall_ms()))
    assert "no Location header" in outcome.error


@pytest.mark.parametrize("status", [401, 403])
def test_an_auth_failure_pauses_the_destination_and_a_probe_resumes_it(
    status: int, caplog: pytest.LogCaptureFixture
) -> None:
    name = f"paused-{status}"
    refused = Response(status, '{"message":"Invalid API Key"}')
    deliverer, script, time = make(
        {**HOOK, "name": name, "batch_size": 10, "auth_probe_interval_s": 30},
        [refused, refused, refused],
    )
    seen: list[float | None] = []
    original = time.sleep

    async def sleep(seconds: float) -> None:
        seen.append(gauge("audiences_destination_paused", name))
        await original(seconds)

    deliverer.sleep = sleep
    messages = [output_message(f"u{i}") for i in range(3)]
    with caplog.at_level("WARNING"):
        outcomes = asyncio.run(deliverer.deliver(messages, time.wall_ms()))
    assert [o.kind for o in outcomes] == ["delivered"] * 3  # nothing dead-lettered
    # the held batch, as one request, re-sent every 30 s until taken (never split)
    assert [len(orjson.loads(c[1].body)) for c in script.calls] == [3, 3, 3, 3]
    assert [c[0] - 1_000_000.0 for c in script.calls] == [0.0, 30.0, 60.0, 90.0]
    assert seen == [1.0, 1.0, 1.0]  # paused while probing
    assert gauge("audiences_destination_paused", name) == 0.0  # resumed
    paused = [r for r in caplog.records if "PAUSED" in r.getMessage()]
    assert len(paused) == 1 and paused[0].levelname == "WARNING"
    assert name in paused[0].getMessage() and str(status) in paused[0].getMessage()
    assert any("resumed" in r.getMessage() for r in caplog.records)


def test_time_paused_does_not_count_towards_max_retry_age() -> None:
    refused = Response(401)
    deliverer, script, time = make(
        {**HOOK, "max_retry_age": "1m", "auth_probe_interval_s": 60},
        [refused] * 10 + [Response(503)],
    )
    [outcome] = asyncio.run(deliverer.deliver([output_message("u1")], time.wall_ms()))
    assert outcome.kind == "delivered"  # 10 minutes paused, then a 503 is still retried
    assert [c[0] - 1_000_000.0 for c in script.calls][:11] == [60.0 * n for n in range(11)]
    assert len(script.calls) == 12


def test_while_paused_only_the_probe_is_sent_and_every_caller_waits_for_it() -> None:
    """Two lanes sharing a destination: one is refused and probes; the other sends nothing
    until the probe is accepted, then both deliver."""
    destination = parse_destinations([{"name": "shared", **HOOK, "auth_probe_interval_s": 10}], {})[
        0
    ]
    time = FakeTime()
    revoked_until = time.now + 35  # the key is fixed 35 s in

    class Revocable(Script):
        async def send(self, request: Request, headers: list[tuple[str, str]]) -> Response:
            self.calls.append((self.time.now, request, dict(headers)))
            await asyncio.sleep(0)  # a real transport yields while the request is in flight
            return Response(401) if self.time.now < revoked_until else Response(200)

    async def sleep(seconds: float) -> None:
        await time.sleep(seconds)
        await asyncio.sleep(0)

    transport = Revocable([], time)
    deliverer = Deliverer(
        destination, transport, wall_ms=time.wall_ms, monotonic=time.monotonic, sleep=sleep
    )

    async def both() -> list[list[Any]]:
        return await asyncio.gather(
            deliverer.deliver([output_message("a")], time.wall_ms()),
            deliverer.deliver([output_message("b")], time.wall_ms()),
        )

    first, second = asyncio.run(both())
    assert [o.kind for o in first + second] == ["delivered", "delivered"]
    users = [(t - 1_000_000.0, orjson.loads(r.body)["userId"]) for t, r, _ in transport.calls]
    # both in flight when the key was revoked; then a's probe alone every 10 s; then b
    assert users == [
        (0.0, "a"),
        (0.0, "b"),
        (10.0, "a"),
        (20.0, "a"),
        (30.0, "a"),
        (40.0, "a"),
        (40.0, "b"),
    ]
    assert not deliverer.paused


def test_410_stops_the_destination_for_good(caplog: pytest.LogCaptureFixture) -> None:
    from audiences.adapters.sinks.delivery import DestinationGone

    deliverer, script, time = make(
        {**HOOK, "name": "gone", "batch_size": 10}, [Response(410, '{"error":"gone"}')]
    )
    messages = [output_message(f"u{i}") for i in range(3)]
    with caplog.at_level("ERROR"), pytest.raises(DestinationGone):
        asyncio.run(deliverer.deliver(messages, time.wall_ms()))
    assert len(script.calls) == 1  # not split, not retried
    assert gauge("audiences_destination_stopped", "gone") == 1.0
    [record] = [r for r in caplog.records if "STOPPED" in r.getMessage()]
    assert record.levelname == "ERROR" and "gone" in record.getMessage()
    with pytest.raises(DestinationGone):  # and nothing is sent any more
        asyncio.run(deliverer.deliver(messages, time.wall_ms()))
    assert len(script.calls) == 1
    assert gauge("audiences_sink_deliveries_total", "gone") is None  # nothing counted dead


def test_without_holding_auth_failures_they_are_rejections_of_the_whole_batch() -> None:
    """`dlq replay`: a 401/410 dead-letters again (replayable later), without a split."""
    for status in (401, 403, 410):
        deliverer, script, time = make(
            {**HOOK, "batch_size": 10}, [Response(status)], hold_auth_failures=False
        )
        messages = [output_message(f"u{i}") for i in range(3)]
        outcomes = asyncio.run(deliverer.deliver(messages, time.wall_ms()))
        assert [(o.kind, o.status) for o in outcomes] == [("dead", status)] * 3
        assert len(script.calls) == 1


def test_a_segment_event_over_32_kb_is_dead_lettered_unsent() -> None:
    segment = {"type": "segment", "write_key": "wk"}
    deliverer, script, time = make(segment, [])
    small, huge = output_message("u1"), output_message("u2")
    huge["properties"] = {**huge["properties"], "padding": "x" * 40_000}
    outcomes = asyncio.run(deliverer.deliver([small, huge], time.wall_ms()))
    assert [(o.kind, o.reason) for o in outcomes] == [("delivered", ""), ("dead", "too_large")]
    assert "32768" in outcomes[1].error
    [(_, request, _)] = script.calls
    assert [m["userId"] for m in orjson.loads(request.body)["batch"]] == ["u1"]


BRAZE = {"type": "braze", "url": "http://b", "api_key": "k", "retry_initial_s": 1.0}


def braze_errors(*entries: tuple[str, int, str]) -> Response:
    errors = [{"type": kind, "input_array": array, "index": i} for array, i, kind in entries]
    body = orjson.dumps({"message": "success", "errors": errors}).decode()
    return Response(201, body[:500], content=body)


def test_braze_errors_in_a_2xx_dead_letter_exactly_the_objects_they_index() -> None:
    messages = [output_message("u0"), output_message("u1", seq=1), output_message("u1", seq=2)]
    messages.append(output_message("u2"))
    # attributes[1] is u1's one object (two messages); events[3] is u2's event
    answer = braze_errors(
        ("attributes", 1, "'external_id' or 'braze_id' or 'user_alias' is required"),
        ("events", 3, "event name is invalid"),
    )
    deliverer, script, time = make(BRAZE, [answer])
    outcomes = asyncio.run(deliverer.deliver(messages, time.wall_ms()))
    assert [o.kind for o in outcomes] == ["delivered", "dead", "dead", "dead"]
    assert len(script.calls) == 1  # a 2xx is never resent
    assert {(o.reason, o.status) for o in outcomes[1:]} == {("rejected", 201)}
    assert "user_alias' is required (attributes[1])" in outcomes[1].error
    assert outcomes[1].error == outcomes[2].error
    assert outcomes[3].error == "braze: event name is invalid (events[3])"


@pytest.mark.parametrize(
    "content",
    [
        "",
        "not json",
        '{"message": "success", "errors": "nope"}',
        '{"message": "success", "errors": [7, {"index": "1"}, {"input_array": "events"}]}',
        '{"message": "success", "errors": [{"input_array": "events", "index": 99}]}',
        '{"message": "success", "errors": [{"input_array": "purchases", "index": 0}]}',
        '{"message": "success", "errors": [{"input_array": "events", "index": true}]}',
        "[1, 2]",
    ],
)
def test_braze_answers_that_name_no_object_of_the_request_deliver(content: str) -> None:
    deliverer, _, time = make(BRAZE, [Response(201, content[:500], content=content)])
    outcomes = asyncio.run(
        deliverer.deliver([output_message("u0"), output_message("u1")], time.wall_ms())
    )
    assert [o.kind for o in outcomes] == ["delivered", "delivered"]


def test_braze_429_waits_until_x_ratelimit_reset() -> None:
    deliverer, script, time = make(BRAZE, [])
    reset = str(int(time.now) + 12)
    script.answers = [Response(429, headers={"x-ratelimit-reset": reset})]
    asyncio.run(deliverer.deliver([output_message("u1")], time.wall_ms()))
    (t1, _, _), (t2, _, _) = script.calls
    assert t2 - t1 == 12.0
    # Retry-After wins when both are there; a reset in the past means now
    deliverer, script, time = make(BRAZE, [])
    script.answers = [
        Response(429, retry_after="3", headers={"x-ratelimit-reset": str(int(time.now) + 50)}),
        Response(429, headers={"x-ratelimit-reset": str(int(time.now) - 50)}),
        Response(429, headers={"x-ratelimit-reset": "soon"}),  # unreadable: the backoff
    ]
    asyncio.run(deliverer.deliver([output_message("u1")], time.wall_ms()))
    assert time.sleeps[:2] == [3.0, 0.0]
    assert 2.0 <= time.sleeps[2] <= 4.0  # the backoff of attempt 3 (jittered)
    # only Braze's header: a webhook's X-RateLimit-Reset is no promise
    deliverer, script, time = make(HOOK, [])
    script.answers = [Response(429, headers={"x-ratelimit-reset": str(int(time.now) + 50)})]
    asyncio.run(deliverer.deliver([output_message("u1")], time.wall_ms()))
    assert time.sleeps[0] <= 1.0


def test_x_ratelimit_reset_holds_every_request_to_the_destination() -> None:
    deliverer, script, time = make({**BRAZE, "batch_size": 1}, [])
    script.answers = [Response(429, headers={"x-ratelimit-reset": str(int(time.now) + 5)})]
    asyncio.run(deliverer.deliver([output_message("u1")], time.wall_ms()))
    assert deliverer.bucket.blocked_until == time.now  # held until the reset


def test_customerio_batch_errors_dead_letter_exactly_their_items() -> None:
    cio = {"type": "customerio", "site_id": "s", "api_key": "k", "batch_size": 10}
    errors = [{"batch_index": 3, "reason": "invalid", "field": "name", "message": "bad name"}]
    content = orjson.dumps({"errors": errors}).decode()
    deliverer, script, time = make(cio, [Response(207, content, content=content)])
    messages = [output_message(f"u{i}") for i in range(3)]
    outcomes = asyncio.run(deliverer.deliver(messages, time.wall_ms()))
    # items: u0 identify, u0 event, u1 identify, u1 event (3), u2 ...
    assert [o.kind for o in outcomes] == ["delivered", "dead", "delivered"]
    assert outcomes[1].error == "customerio: bad name (batch[3])"
    assert outcomes[1].status == 207 and len(script.calls) == 1
