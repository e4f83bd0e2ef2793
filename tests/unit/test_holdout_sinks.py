"""Destinations skip holdout outputs (SPEC §3 `holdout`), count them, and a `kafka`
destination forwards them when its config says `include_holdout: true`."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from prometheus_client import REGISTRY

from audiences.adapters.sinks.config import parse_destinations
from audiences.adapters.sinks.delivery import Deliverer, Response
from audiences.adapters.sinks.render import Request, render_requests
from audiences.errors import DestinationConfigError
from shared import output_message

TYPES: dict[str, dict[str, Any]] = {
    "webhook": {"url": "http://h"},
    "braze": {"url": "http://b", "api_key": "k"},
    "customerio": {"site_id": "s", "api_key": "k"},
    "segment": {"write_key": "w"},
    "kafka": {"topic": "copy"},
}


def destination(kind: str, **extra: Any) -> Any:
    return parse_destinations([{"name": f"d-{kind}", "type": kind, **TYPES[kind], **extra}], {})[0]


def carried(requests: list[Request]) -> set[int]:
    return {index for request in requests for index in request.indexes}


@pytest.mark.parametrize("kind", sorted(TYPES))
def test_every_destination_skips_holdout_outputs(kind: str) -> None:
    messages = [
        output_message("u1", holdout=True),
        output_message("u2"),
        output_message("u3", entered=False, seq=2, holdout=True),
    ]
    assert messages[0]["properties"]["holdout"] is True
    assert "holdout" not in messages[1]["properties"]
    rendered = render_requests(destination(kind), messages)
    assert carried(rendered.requests) == {1}
    assert set(rendered.skipped) == {0, 2}
    assert rendered.holdout == ((0, "cart_abandoners"), (2, "cart_abandoners"))


def test_a_kafka_destination_with_include_holdout_forwards_them() -> None:
    messages = [output_message("u1", holdout=True), output_message("u2")]
    rendered = render_requests(destination("kafka", include_holdout=True), messages)
    assert carried(rendered.requests) == {0, 1}
    assert rendered.skipped == () and rendered.holdout == ()


def test_holdouts_of_audiences_a_destination_does_not_select_are_not_counted() -> None:
    messages = [output_message("u1", audience="vip", holdout=True)]
    rendered = render_requests(destination("webhook", audiences=["cart_abandoners"]), messages)
    assert rendered.skipped == (0,) and rendered.holdout == ()


@pytest.mark.parametrize(
    ("kind", "value", "why"),
    [
        ("kafka", "yes", "include_holdout"),
        ("kafka", 1, "include_holdout"),
        ("webhook", True, "include_holdout"),
        ("segment", True, "include_holdout"),
    ],
)
def test_include_holdout_is_a_boolean_of_kafka_destinations_only(
    kind: str, value: Any, why: str
) -> None:
    with pytest.raises(DestinationConfigError) as caught:
        destination(kind, include_holdout=value)
    assert why in str(caught.value)


def test_defaults_leave_holdouts_out() -> None:
    assert destination("kafka").include_holdout is False
    assert destination("kafka", include_holdout=True).include_holdout is True


class Recorder:
    def __init__(self) -> None:
        self.requests: list[Request] = []

    async def send(self, request: Request, headers: list[tuple[str, str]]) -> Response:
        self.requests.append(request)
        return Response(200)

    async def close(self) -> None:
        pass


def test_the_deliverer_skips_and_counts_holdouts_per_destination_and_audience() -> None:
    def count(name: str, audience: str) -> float:
        labels = {"destination": name, "audience": audience}
        return REGISTRY.get_sample_value("audiences_holdout_skipped_total", labels) or 0.0

    hook = parse_destinations([{"name": "held-hook", "type": "webhook", "url": "http://h"}], {})[0]
    transport = Recorder()
    deliverer = Deliverer(hook, transport, rng=random.Random(1))
    messages = [
        output_message("u1", holdout=True),
        output_message("u2"),
        output_message("u3", audience="vip", holdout=True),
        output_message("u4", audience="vip", holdout=True),
    ]
    outcomes = asyncio.run(deliverer.deliver(messages, 0))
    assert [o.kind for o in outcomes] == ["skipped", "delivered", "skipped", "skipped"]
    assert [r.indexes for r in transport.requests] == [(1,)]  # u2's message alone was sent
    assert count("held-hook", "cart_abandoners") == 1
    assert count("held-hook", "vip") == 2


def test_the_destinations_schema_takes_include_holdout_on_kafka_only() -> None:
    from test_sink_config import SCHEMA

    kafka = {"name": "copy", "type": "kafka", "topic": "t"}
    assert list(SCHEMA.iter_errors([{**kafka, "include_holdout": True}])) == []
    assert list(SCHEMA.iter_errors([{**kafka, "include_holdout": "yes"}]))
    hook = {"name": "hook", "type": "webhook", "url": "http://h", "include_holdout": True}
    assert list(SCHEMA.iter_errors([hook]))
