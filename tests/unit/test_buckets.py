"""Random buckets and holdouts (SPEC §3): validation, evaluation, outputs, explain,
preview, the statistics of the hash, and replay determinism."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from factories import (
    T0,
    Cluster,
    S,
    audience,
    catalog_of,
    event_dict,
    feed,
    make_event,
    run,
    summary,
)

from audiences.core.definitions import validate_definition
from audiences.core.definitions.buckets import BUCKETS, Holdout, bucket_of
from audiences.core.evaluator import Transition
from audiences.core.explain import explain
from audiences.core.oracle import bucket as oracle_bucket
from audiences.core.oracle import in_holdout
from audiences.core.outputs import render_output
from audiences.core.state import UserState
from audiences.errors import DefinitionError

SPLIT = audience("split", {"random_bucket": {"lt": 5000}})
HELD = audience(
    "buyers",
    {"performed": {"event": "Order Completed"}},
    holdout={"percent": 20},
)

# -- the hash --------------------------------------------------------------------------------


def reference_bucket(salt: str, user: str) -> int:
    digest = hashlib.sha256(f"{salt}|{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 10000


def test_the_bucket_is_the_documented_hash_and_never_changes() -> None:
    # Pinned: a change of the formula would move every profile to another bucket.
    assert bucket_of("split", "u1") == 8672
    assert bucket_of("cart_abandoners:holdout", "u1") == 1573
    assert bucket_of("s", "é") == 5521
    for n in range(200):
        user = f"user-{n}"
        assert bucket_of("salt", user) == reference_bucket("salt", user)
        assert bucket_of("salt", user) == oracle_bucket("salt", user)
    assert bucket_of("s", "\ud800") == bucket_of("s", "\ud800")  # a lone surrogate: no raise


IDS = [f"user-{n}" for n in range(100_000)]  # fixed ids: the statistics never flake


def chi_square(observed: list[int], expected: float) -> float:
    return sum((o - expected) ** 2 / expected for o in observed)


# Critical values of the chi-square distribution at 99.9 % (computed with the regularised
# lower incomplete gamma function; chi2.ppf(0.999, df) in SciPy).
CHI2_999 = {9: 27.877, 81: 126.083, 99: 148.230}


@pytest.mark.parametrize("salt", ["split", "cart_abandoners:holdout", "x"])
def test_buckets_are_uniform_over_100k_ids(salt: str) -> None:
    bins = [0] * 100
    for user in IDS:
        bins[bucket_of(salt, user) // 100] += 1
    assert chi_square(bins, len(IDS) / 100) < CHI2_999[99], bins
    tens = [sum(bins[i : i + 10]) for i in range(0, 100, 10)]
    assert chi_square(tens, len(IDS) / 10) < CHI2_999[9], tens


def test_buckets_of_two_salts_are_independent() -> None:
    """Chi-square test of independence on the 10 x 10 table of deciles under the
    random_bucket salt (the key) and the holdout salt (key:holdout)."""
    table = [[0] * 10 for _ in range(10)]
    for user in IDS:
        table[bucket_of("split", user) // 1000][bucket_of("split:holdout", user) // 1000] += 1
    rows = [sum(row) for row in table]
    cols = [sum(table[r][c] for r in range(10)) for c in range(10)]
    total = len(IDS)
    statistic = sum(
        (table[r][c] - rows[r] * cols[c] / total) ** 2 / (rows[r] * cols[c] / total)
        for r in range(10)
        for c in range(10)
    )
    assert statistic < CHI2_999[81], table


def test_a_holdout_takes_its_share_of_ids() -> None:
    for percent, salt in ((10, "a:holdout"), (2.5, "b"), (50, "c"), (0.01, "d"), (99.99, "e")):
        holdout = Holdout(percent, salt)
        share = sum(holdout.holds(user) for user in IDS) / len(IDS)
        # binomial: within 5 standard deviations, deterministic for these ids
        sigma = (percent / 100 * (1 - percent / 100) / len(IDS)) ** 0.5
        assert abs(share - percent / 100) < 5 * sigma + 1e-5, (percent, share)


# -- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("patch", "path", "suggestion"),
    [
        ({"condition": {"random_bucket": 5000}}, "$.condition.random_bucket", None),
        ({"condition": {"random_bucket": {}}}, "$.condition.random_bucket", None),
        ({"condition": {"random_bucket": {"lte": 10}}}, "$.condition.random_bucket.lte", "lt"),
        ({"condition": {"random_bucket": {"lt": 10001}}}, "$.condition.random_bucket.lt", None),
        ({"condition": {"random_bucket": {"lt": -1}}}, "$.condition.random_bucket.lt", None),
        ({"condition": {"random_bucket": {"lt": 50.5}}}, "$.condition.random_bucket.lt", None),
        ({"condition": {"random_bucket": {"lt": True}}}, "$.condition.random_bucket.lt", None),
        ({"condition": {"random_bucket": {"gte": "1"}}}, "$.condition.random_bucket.gte", None),
        (
            {"condition": {"random_bucket": {"gte": 500, "lt": 500}}},
            "$.condition.random_bucket",
            None,
        ),
        (
            {"condition": {"all": [{"performed": {"event": "A"}}, {"random_bukcet": {"lt": 1}}]}},
            "$.condition.all[1].random_bukcet",
            "random_bucket",
        ),
        ({"salt": 7}, "$.salt", None),
        ({"salt": ""}, "$.salt", None),
        ({"salt": "s" * 201}, "$.salt", None),
        ({"holdout": 10}, "$.holdout", None),
        ({"holdout": {}}, "$.holdout.percent", None),
        ({"holdout": {"precent": 10}}, "$.holdout.precent", "percent"),
        ({"holdout": {"percent": 0}}, "$.holdout.percent", None),
        ({"holdout": {"percent": 100}}, "$.holdout.percent", None),
        ({"holdout": {"percent": -5}}, "$.holdout.percent", None),
        ({"holdout": {"percent": "10"}}, "$.holdout.percent", None),
        ({"holdout": {"percent": True}}, "$.holdout.percent", None),
        ({"holdout": {"percent": float("nan")}}, "$.holdout.percent", None),
        ({"holdout": {"percent": 12.345}}, "$.holdout.percent", None),
        ({"holdout": {"percent": 10, "salt": 3}}, "$.holdout.salt", None),
        ({"holdout": {"percent": 10, "salt": None}}, "$.holdout.salt", None),
    ],
)
def test_invalid_buckets_and_holdouts_name_the_path(
    patch: dict[str, Any], path: str, suggestion: str | None
) -> None:
    doc = {**SPLIT, **patch}
    with pytest.raises(DefinitionError) as caught:
        validate_definition(doc)
    assert caught.value.path == path, str(caught.value)
    assert caught.value.suggestion == suggestion


def test_valid_buckets_and_holdouts() -> None:
    for doc in (
        SPLIT,
        audience("a", {"random_bucket": {"gte": 0, "lt": 10000}}),
        audience("b", {"random_bucket": {"gte": 9999}}, salt="exp-42"),
        audience("c", {"not": {"random_bucket": {"lt": 1}}}, holdout={"percent": 0.01}),
        audience("d", {"performed": {"event": "A"}}, holdout={"percent": 99.99, "salt": "s"}),
        audience("e", {"performed": {"event": "A"}}, holdout={"percent": 12.5}),
    ):
        assert validate_definition(doc) == doc


def test_computed_traits_take_no_salt_or_holdout() -> None:
    trait = {"key": "orders", "kind": "count", "event": "Order Completed"}
    for field, value in (("salt", "s"), ("holdout", {"percent": 10})):
        with pytest.raises(DefinitionError) as caught:
            validate_definition({**trait, field: value})
        assert caught.value.path == f"$.{field}"


# -- evaluation -------------------------------------------------------------------------------


def first_seen(catalog: Any, user: str, ts: int = T0, **fields: Any) -> list[Any]:
    return run(catalog, [make_event(ts=ts, userId=user, event="App Opened", **fields)], user)


def test_a_profile_is_in_the_split_when_its_bucket_is_in_range() -> None:
    catalog = catalog_of(
        SPLIT,
        audience("upper", {"random_bucket": {"gte": 2500, "lt": 7500}}),
        audience("salted", {"random_bucket": {"lt": 5000}}, salt="exp-1"),
    )
    entered: dict[str, set[str]] = {"split": set(), "upper": set(), "salted": set()}
    users = [f"u{n}" for n in range(400)]
    for user in users:
        for t in run(catalog, [make_event(ts=T0, userId=user)], user):
            assert isinstance(t, Transition) and t.entered and t.at_ms == T0
            entered[t.audience_key].add(user)
    assert entered["split"] == {u for u in users if reference_bucket("split", u) < 5000}
    assert entered["upper"] == {u for u in users if 2500 <= reference_bucket("upper", u) < 7500}
    assert entered["salted"] == {u for u in users if reference_bucket("exp-1", u) < 5000}
    assert entered["split"] != entered["salted"]  # the salt, not the key, decides
    assert 150 < len(entered["split"]) < 250


def test_the_bucket_needs_no_tracker_and_events_never_move_it() -> None:
    both = audience(
        "treated_buyers",
        {"all": [{"performed": {"event": "Order Completed"}}, {"random_bucket": {"lt": 5000}}]},
    )
    catalog = catalog_of(SPLIT, both)
    split = catalog.audience("split")
    assert split is not None and split.tracker_ids == frozenset()
    bit = 1 << catalog.index["split"]  # no event's plan re-judges it: no per-event work
    plans = [*catalog.routes.values(), catalog.unrouted]
    assert plans and not any(d.audiences & bit for plan in plans for d in plan)
    assert any(d.audiences & (1 << catalog.index["treated_buyers"]) for p in plans for d in p)
    inside = next(
        u for u in (f"u{n}" for n in range(100)) if reference_bucket("treated_buyers", u) < 5000
    )
    outside = next(
        u for u in (f"u{n}" for n in range(100)) if reference_bucket("treated_buyers", u) >= 5000
    )
    for user, expected in ((inside, True), (outside, False)):
        items = [
            make_event(ts=T0, userId=user, event="App Opened"),
            make_event(ts=T0 + S, userId=user, event="Order Completed"),
            make_event(ts=T0 + 2 * S, userId=user, event="Order Completed"),
        ]
        moves = [m for m in summary(run(catalog, items, user)) if m[0] == "treated_buyers"]
        assert moves == ([("treated_buyers", "entered", T0 + S)] if expected else [])


def test_anonymous_profiles_are_bucketed_by_their_anonymous_id() -> None:
    catalog = catalog_of(
        audience("anon_split", {"random_bucket": {"lt": 5000}}, include_anonymous=True)
    )
    ids = [f"a{n}" for n in range(60)]
    got = set()
    for anon in ids:
        items = [event_dict(ts=T0, userId=None, anonymousId=anon)]
        if any(isinstance(t, Transition) for t in run(catalog, items, anon)):
            got.add(anon)
    assert got == {a for a in ids if reference_bucket("anon_split", a) < 5000}


def test_editing_the_salt_re_judges_members_without_a_storm() -> None:
    v1 = catalog_of(SPLIT)
    v2 = catalog_of({**SPLIT, "salt": "second"}, version=2)
    for n in range(80):
        user = f"u{n}"
        state, before = feed(v1, [make_event(ts=T0, userId=user)], user)
        assert state is not None
        state, after = feed(v2, [make_event(ts=T0 + S, userId=user)], user, state)
        was = reference_bucket("split", user) < 5000
        now = reference_bucket("second", user) < 5000
        assert [t.entered for t in before if isinstance(t, Transition)] == ([True] if was else [])
        expected = [] if was == now else [now]
        assert [t.entered for t in after if isinstance(t, Transition)] == expected


# -- holdouts ---------------------------------------------------------------------------------


def test_holdout_members_enter_and_exit_flagged_and_others_unflagged() -> None:
    catalog = catalog_of(
        {
            **HELD,
            "condition": {"performed": {"event": "Order Completed", "within": "1h"}},
        }
    )
    flags: dict[bool, int] = {True: 0, False: 0}
    for n in range(300):
        user = f"u{n}"
        expected = in_holdout(HELD, user)
        items = [make_event(ts=T0, userId=user, event="Order Completed")]
        state, outputs = feed(catalog, items, user)
        assert state is not None
        _, later = feed(catalog, [make_event(ts=T0 + 2 * 3600 * S, userId=user)], user, state)
        transitions = [t for t in [*outputs, *later] if isinstance(t, Transition)]
        assert [t.entered for t in transitions] == [True, False]
        for t in transitions:
            assert t.holdout is expected
            properties = render_output(t, {}, space_id="spa")["properties"]
            if expected:
                assert properties["holdout"] is True
            else:
                assert "holdout" not in properties
        flags[expected] += 1
    assert 30 < flags[True] < 90  # ~20 % of 300


def test_the_holdout_flag_never_changes_the_message_id() -> None:
    plain = catalog_of({k: v for k, v in HELD.items() if k != "holdout"})
    held = catalog_of(HELD)
    for n in range(40):
        user = f"u{n}"
        items = [make_event(ts=T0, userId=user, event="Order Completed", messageId=f"m{n}")]
        a = [t.message_id for t in run(plain, items, user)]
        b = [t.message_id for t in run(held, items, user)]
        assert a == b and len(a) == 1


def test_the_holdout_salt_decides_and_deletion_exits_are_flagged_too() -> None:
    salted = {**HELD, "holdout": {"percent": 50, "salt": "shared"}}
    catalog = catalog_of(salted)
    cluster = Cluster(catalog)
    users = [f"u{n}" for n in range(40)]
    for user in users:
        cluster.send(event_dict(ts=T0, userId=user, event="Order Completed"))
        cluster.send(
            {"type": "delete", "userId": user, "messageId": f"del-{user}", "timestamp": T0 + S}
        )
    transitions = [o for _key, o in cluster.outputs if isinstance(o, Transition)]
    assert len(transitions) == 2 * len(users)
    for t in transitions:
        assert t.holdout is (reference_bucket("shared", t.profile_key) < 5000)
    assert {t.trigger for t in transitions if not t.entered} == {"deleted"}


def test_replaying_the_same_log_gives_the_same_ids_and_holdout_flags() -> None:
    catalog = catalog_of(
        HELD,
        SPLIT,
        audience(
            "recent_split",
            {
                "all": [
                    {"performed": {"event": "Order Completed", "within": "1h"}},
                    {"random_bucket": {"gte": 3000}},
                ]
            },
            holdout={"percent": 30},
        ),
    )
    log: list[dict[str, Any]] = []
    for n in range(60):
        user = f"u{n % 20}"
        event = "Order Completed" if n % 3 else "App Opened"
        log.append(event_dict(ts=T0 + n * 10 * 60 * S, userId=user, event=event, messageId=f"m{n}"))

    def play() -> list[tuple[str, str, bool, bool]]:
        cluster = Cluster(catalog)
        for record in log:
            cluster.send(record)
        cluster.tick_until(T0 + 30 * 3600 * S)
        return [
            (o.message_id, o.audience_key, o.entered, o.holdout)
            for _key, o in cluster.outputs
            if isinstance(o, Transition)
        ]

    first = play()
    assert first == play()
    assert {holdout for *_rest, holdout in first} == {True, False}
    assert any(not entered for _id, _key, entered, _h in first)


# -- explain and preview ----------------------------------------------------------------------


def test_explain_shows_the_bucket_the_bounds_and_the_holdout() -> None:
    doc = audience("split", {"random_bucket": {"gte": 1000, "lt": 5000}}, holdout={"percent": 10})
    catalog = catalog_of(doc)
    for user in ("u1", "u2", "u3", "u4"):
        state, _ = feed(catalog, [make_event(ts=T0, userId=user)], user)
        assert state is not None
        report = explain(state, catalog, "split", T0, user)
        node = report["condition"]
        bucket = reference_bucket("split", user)
        assert node["condition"] == "random_bucket"
        assert (node["bucket"], node["gte"], node["lt"], node["salt"]) == (
            bucket,
            1000,
            5000,
            "split",
        )
        assert node["value"] is (1000 <= bucket < 5000) is report["member"]
        held = reference_bucket("split:holdout", user)
        assert report["holdout"] == {
            "percent": 10.0,
            "salt": "split:holdout",
            "bucket": held,
            "in_holdout": held < 1000,
        }
        assert report["holdout"]["in_holdout"] is in_holdout(doc, user)
    plain = catalog_of(SPLIT)
    state, _ = feed(plain, [make_event(ts=T0, userId="u1")], "u1")
    assert state is not None
    assert "holdout" not in explain(state, plain, "split", T0, "u1")


def test_preview_of_a_split_counts_the_profiles_in_range() -> None:
    from audiences.core.preview import preview

    buyers = audience("buyers", {"performed": {"event": "Order Completed"}})
    v1 = catalog_of(buyers)
    profiles: list[tuple[str, UserState]] = []
    for n in range(50):
        user = f"u{n}"
        state, _ = feed(v1, [make_event(ts=T0, userId=user, event="Order Completed")], user)
        assert state is not None
        profiles.append((user, UserState.decode(state.encode())))
    definitions = {"buyers": (validate_definition(buyers), 1)}
    proposal = validate_definition(
        audience("split", {"all": [{"in_audience": "buyers"}, {"random_bucket": {"lt": 3000}}]})
    )
    report = preview(proposal, definitions, profiles, sample_size=100)
    expected = sorted(u for u, _ in profiles if reference_bucket("split", u) < 3000)
    assert sorted(report.would_enter) == expected
    assert report.size == len(expected) == report.entering
    assert 5 < len(expected) < 30


def test_bucket_constants() -> None:
    assert BUCKETS == 10_000


def id_in_bucket(salt: str, wanted: int) -> str:
    """An id whose bucket under `salt` is exactly `wanted` (searched; deterministic)."""
    return next(f"b{n}" for n in range(1_000_000) if reference_bucket(salt, f"b{n}") == wanted)


def test_bounds_are_gte_inclusive_and_lt_exclusive() -> None:
    catalog = catalog_of(audience("band", {"random_bucket": {"gte": 4000, "lt": 4002}}))
    for bucket, member in ((3999, False), (4000, True), (4001, True), (4002, False)):
        user = id_in_bucket("band", bucket)
        moves = summary(run(catalog, [make_event(ts=T0, userId=user)], user))
        assert moves == ([("band", "entered", T0)] if member else []), bucket


def test_the_holdout_is_the_buckets_below_percent_times_100() -> None:
    doc = audience("buyers", {"performed": {"event": "A"}}, holdout={"percent": 12.34})
    catalog = catalog_of(doc)
    for bucket, held in ((1233, True), (1234, False), (0, True), (9999, False)):
        user = id_in_bucket("buyers:holdout", bucket)
        [entered] = run(catalog, [make_event(ts=T0, userId=user, event="A")], user)
        assert isinstance(entered, Transition)
        assert entered.holdout is held is in_holdout(doc, user), bucket


# -- the published JSON schemas -----------------------------------------------------------------


def test_the_schemas_accept_buckets_and_holdouts_as_the_validator_does() -> None:
    from test_schemas import errors

    good = [
        audience("a", {"random_bucket": {"lt": 5000}}, salt="exp-1"),
        audience("b", {"not": {"random_bucket": {"gte": 10, "lt": 20}}}),
        audience("c", {"performed": {"event": "A"}}, holdout={"percent": 12.34, "salt": "s"}),
    ]
    for doc in good:
        validate_definition(doc)
        assert errors("definition.json", doc) == [], doc
    bad = [
        audience("a", {"random_bucket": {"lt": 10001}}),
        audience("a", {"random_bucket": {}}),
        audience("a", {"random_bucket": {"lte": 5}}),
        audience("a", {"random_bucket": {"lt": 5}}, salt=""),
        audience("a", {"random_bucket": {"lt": 5}}, holdout={"percent": 100}),
        audience("a", {"random_bucket": {"lt": 5}}, holdout={"percent": 0}),
        audience("a", {"random_bucket": {"lt": 5}}, holdout={"salt": "s"}),
        audience("a", {"random_bucket": {"lt": 5}}, holdout={"percent": 5, "x": 1}),
    ]
    for doc in bad:
        assert errors("definition.json", doc), doc
        with pytest.raises(DefinitionError):
            validate_definition(doc)


def test_rendered_holdout_outputs_match_the_output_schema() -> None:
    from test_schemas import errors

    catalog = catalog_of(HELD)
    user = next(u for u in (f"u{n}" for n in range(100)) if in_holdout(HELD, u))
    [entered] = run(catalog, [make_event(ts=T0, userId=user, event="Order Completed")], user)
    message = render_output(entered, {}, space_id="spa_1")
    assert message["properties"]["holdout"] is True
    assert errors("output/audience-event.json", message) == []
    message["properties"]["holdout"] = False  # only ever present as true
    assert errors("output/audience-event.json", message)


def test_the_demo_holds_out_a_tenth_of_its_cart_abandoners() -> None:
    from audiences.core.definitions import build_catalog
    from audiences.tools.demo.runner import demo_definitions

    docs = {doc["key"]: validate_definition(doc) for doc in demo_definitions(1000)}
    assert docs["cart_abandoners"]["holdout"] == {"percent": 10}
    catalog = build_catalog({key: (doc, 1) for key, doc in docs.items()})
    held = catalog.audience("cart_abandoners")
    assert held is not None and held.holdout is not None and held.holdout.threshold == 1000
    assert all(a.holdout is None for a in catalog.audiences if a.key != "cart_abandoners")


def test_a_priority_move_carries_each_audiences_own_holdout_flag() -> None:
    """A split inside a priority list: each transition is flagged by its own
    audience's holdout, so a move between a held-out and a sent audience leaves
    destinations consistent (they see the audience the user is sent for)."""
    vip = audience(
        "vip", {"trait": {"name": "plan", "op": "eq", "value": "pro"}}, holdout={"percent": 50}
    )
    active = audience("active", {"performed": {"event": "Login"}}, holdout={"percent": 50})
    listed = {"key": "winback", "kind": "priority_list", "audiences": ["vip", "active"]}
    catalog = catalog_of(vip, active, listed)
    seen = set()
    for n in range(40):
        user = f"u{n}"
        items = [
            make_event(ts=T0, event="Login", userId=user),
            make_event(ts=T0 + S, type="identify", event=None, userId=user, traits={"plan": "pro"}),
        ]
        out = [t for t in run(catalog, items, user) if isinstance(t, Transition)]
        assert summary(out) == [
            ("active", "entered", T0),
            ("active", "exited", T0 + S),
            ("vip", "entered", T0 + S),
        ]
        for t in out:
            doc = vip if t.audience_key == "vip" else active
            assert t.holdout is in_holdout(doc, user)
        seen.add((out[0].holdout, out[2].holdout))
    assert len(seen) == 4  # every combination of the two independent holdouts occurred
