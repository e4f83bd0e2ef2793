"""Destinations and account audiences (SPEC §5/§6): Segment `group` calls (`mode:
[group]`), webhooks and Kafka the output itself; Braze and Customer.io skip them."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson
import pytest

from audiences.adapters.sinks.config import Destination, parse_destinations
from audiences.adapters.sinks.render import render_requests
from audiences.core.evaluator import Transition
from audiences.core.outputs import render_output
from audiences.errors import DestinationConfigError

T0 = 1_767_225_600_000


def destination(**raw: Any) -> Destination:
    return parse_destinations([{"name": "d", **raw}], {})[0]


def account_message(users: tuple[str, ...], entered: bool = True) -> dict[str, Any]:
    transition = Transition(
        "active_shops",
        2,
        "Active shops",
        "group:shop1",
        entered,
        T0,
        1,
        T0,
        "account",
        None,
        0,
        group_id="shop1",
        users=users,
    )
    return render_output(transition, {}, space_id="space")


def test_segment_group_mode_sends_a_group_call_per_linked_user() -> None:
    segment = destination(type="segment", write_key="wk", mode=["track", "group"])
    message = account_message(("u1", "u2"))
    assert message["properties"]["linked_users"] == ["u1", "u2"]
    rendered = render_requests(segment, [message])
    [request] = rendered.requests
    assert request.indexes == (0,)
    batch = orjson.loads(request.body)["batch"]
    assert [(m["type"], m["userId"], m["groupId"], m["traits"]) for m in batch] == [
        ("group", "u1", "shop1", {"active_shops": True}),
        ("group", "u2", "shop1", {"active_shops": True}),
    ]  # no track: Segment needs a user id for one
    expected = hashlib.sha256(f"{message['messageId']}|group|u1".encode()).hexdigest()
    assert batch[0]["messageId"] == expected
    assert batch[0]["context"]["personas"]["computation_class"] == "account_audience"


def test_segment_group_call_of_an_account_without_users_is_anonymous() -> None:
    segment = destination(type="segment", write_key="wk", mode="group")
    [request] = render_requests(segment, [account_message((), entered=False)]).requests
    [call] = orjson.loads(request.body)["batch"]
    assert call["anonymousId"] == "group:shop1" and call["traits"] == {"active_shops": False}


def test_destinations_without_a_way_to_send_an_account_skip_it() -> None:
    segment = destination(type="segment", write_key="wk")  # track only: needs a user
    rendered = render_requests(segment, [account_message(("u1",))])
    assert rendered.requests == [] and rendered.skipped == (0,)
    for per_user in (
        destination(type="braze", url="https://b", api_key="k"),
        destination(type="customerio", site_id="s", api_key="k"),
    ):
        rendered = render_requests(per_user, [account_message(())])  # nobody linked
        assert rendered.requests == [] and rendered.skipped == (0,)


def test_braze_sets_the_account_audience_on_each_linked_user() -> None:
    braze = destination(type="braze", url="https://b", api_key="k")
    user_output = {**account_message(()), "userId": "u9"}
    del user_output["groupId"]
    messages = [account_message(("u1", "u2")), user_output]
    [request] = render_requests(braze, messages).requests
    assert request.indexes == (0, 1)
    body = orjson.loads(request.body)
    assert body["attributes"] == [
        {"external_id": "u1", "active_shops": True},
        {"external_id": "u2", "active_shops": True},
        {"external_id": "u9", "active_shops": True},
    ]
    assert [(e["external_id"], e["properties"].get("groupId")) for e in body["events"]] == [
        ("u1", "shop1"),
        ("u2", "shop1"),
        ("u9", None),
    ]
    # an object Braze refuses dead-letters the output it came from
    assert request.objects["attributes"] == ((0,), (0,), (1,))
    assert request.objects["events"] == ((0,), (0,), (1,))


def test_customerio_sets_the_account_audience_on_each_linked_user() -> None:
    cio = destination(type="customerio", site_id="s", api_key="k")
    requests = render_requests(cio, [account_message(("u1", "u2"), entered=False)]).requests
    assert [(r.method, r.url.rsplit("/customers/", 1)[1]) for r in requests] == [
        ("PUT", "u1"),
        ("POST", "u1/events"),
        ("PUT", "u2"),
        ("POST", "u2/events"),
    ]
    assert all(r.indexes == (0,) for r in requests)
    assert orjson.loads(requests[0].body) == {"active_shops": False}
    first, second = (orjson.loads(r.body)["id"] for r in (requests[1], requests[3]))
    assert first != second  # Customer.io dedupes on the id: one per user


def test_webhooks_and_kafka_carry_the_account_output_keyed_by_the_account() -> None:
    message = account_message(("u1",))
    [request] = render_requests(destination(type="kafka", topic="out"), [message]).requests
    [(key, value)] = request.records
    assert key == b"group:shop1" and orjson.loads(value) == message
    [hook] = render_requests(destination(type="webhook", url="http://h"), [message]).requests
    assert orjson.loads(hook.body) == message


def test_group_mode_is_for_segment_only() -> None:
    with pytest.raises(DestinationConfigError):
        destination(type="braze", url="https://b", api_key="k", mode=["group"])
    assert destination(type="segment", write_key="wk", mode="both").modes == ("track", "identify")


def test_a_held_out_account_is_skipped_and_counted_once_per_output() -> None:
    braze = destination(type="braze", url="https://b", api_key="k")
    message = account_message(("u1", "u2"))
    message["properties"]["holdout"] = True
    rendered = render_requests(braze, [message])
    assert rendered.requests == [] and rendered.skipped == (0,)
    assert rendered.holdout == ((0, "active_shops"),)
