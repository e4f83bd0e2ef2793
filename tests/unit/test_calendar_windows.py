"""Calendar-day windows (SPEC §3): the arithmetic across the 2026 DST changes of
Europe/Berlin and America/New_York, evaluation by `step` (transitions at local
midnights, with an injected clock: ticks), computed traits, explain, validation."""

from __future__ import annotations

from typing import Any

import pytest
from factories import D, H, M, audience, catalog_of, feed, iso, make_event, run, summary
from factories import trait_values as values_of
from hypothesis import given, settings
from hypothesis import strategies as st

from audiences.core.calendar import (
    day_start_ms,
    leave_ms,
    local_date,
    next_boundary,
    window_start,
    zone,
)
from audiences.core.definitions import build_catalog, validate_definition
from audiences.core.definitions.conditions import PerformedTracker
from audiences.core.evaluator import Tick, step
from audiences.core.events import parse_iso_ms
from audiences.core.explain import explain
from audiences.core.state import NEVER
from audiences.errors import DefinitionError

BERLIN = zone("Europe/Berlin")
NEW_YORK = zone("America/New_York")


def utc(text: str) -> int:
    ms = parse_iso_ms(text)
    assert ms is not None
    return ms


# Local midnights around the changes, written out by hand (offsets from the tz database):
# Berlin: 29 Mar 2026 02:00 CET -> 03:00 CEST (a 23-hour day); 25 Oct 03:00 -> 02:00 (25 h).
BERLIN_MAR_28 = utc("2026-03-27T23:00:00Z")
BERLIN_MAR_29 = utc("2026-03-28T23:00:00Z")  # 00:00 CET
BERLIN_MAR_30 = utc("2026-03-29T22:00:00Z")  # 00:00 CEST, 23 h later
BERLIN_OCT_24 = utc("2026-10-23T22:00:00Z")
BERLIN_OCT_25 = utc("2026-10-24T22:00:00Z")  # 00:00 CEST
BERLIN_OCT_26 = utc("2026-10-25T23:00:00Z")  # 00:00 CET, 25 h later
BERLIN_OCT_27 = utc("2026-10-26T23:00:00Z")
# New York: 8 Mar 2026 02:00 EST -> 03:00 EDT (23 h); 1 Nov 02:00 EDT -> 01:00 EST (25 h).
NY_MAR_8 = utc("2026-03-08T05:00:00Z")  # 00:00 EST
NY_MAR_9 = utc("2026-03-09T04:00:00Z")  # 00:00 EDT
NY_OCT_31 = utc("2026-10-31T04:00:00Z")
NY_NOV_1 = utc("2026-11-01T04:00:00Z")  # 00:00 EDT
NY_NOV_2 = utc("2026-11-02T05:00:00Z")  # 00:00 EST
NY_NOV_3 = utc("2026-11-03T05:00:00Z")


# -- arithmetic ------------------------------------------------------------------------


def test_the_days_of_the_changes_last_23_and_25_hours() -> None:
    assert BERLIN_MAR_30 - BERLIN_MAR_29 == 23 * H
    assert BERLIN_OCT_26 - BERLIN_OCT_25 == 25 * H
    assert NY_MAR_9 - NY_MAR_8 == 23 * H
    assert NY_NOV_2 - NY_NOV_1 == 25 * H


@pytest.mark.parametrize(
    ("tz_name", "t", "days", "start", "boundary"),
    [
        # Berlin, spring forward: every instant of 29 Mar (23 h long)
        ("Europe/Berlin", BERLIN_MAR_29, 1, BERLIN_MAR_29, BERLIN_MAR_30),
        ("Europe/Berlin", utc("2026-03-29T00:59:59.999Z"), 1, BERLIN_MAR_29, BERLIN_MAR_30),
        ("Europe/Berlin", utc("2026-03-29T01:00:00Z"), 1, BERLIN_MAR_29, BERLIN_MAR_30),
        ("Europe/Berlin", BERLIN_MAR_30 - 1, 1, BERLIN_MAR_29, BERLIN_MAR_30),
        ("Europe/Berlin", BERLIN_MAR_30 - 1, 2, BERLIN_MAR_28, BERLIN_MAR_30),
        ("Europe/Berlin", BERLIN_MAR_30, 1, BERLIN_MAR_30, utc("2026-03-30T22:00:00Z")),
        ("Europe/Berlin", BERLIN_MAR_30, 3, BERLIN_MAR_28, utc("2026-03-30T22:00:00Z")),
        # Berlin, fall back: 25 Oct is 25 h long, 02:00-03:00 happens twice
        ("Europe/Berlin", BERLIN_OCT_25, 1, BERLIN_OCT_25, BERLIN_OCT_26),
        ("Europe/Berlin", utc("2026-10-25T00:30:00Z"), 1, BERLIN_OCT_25, BERLIN_OCT_26),
        ("Europe/Berlin", utc("2026-10-25T01:30:00Z"), 1, BERLIN_OCT_25, BERLIN_OCT_26),
        ("Europe/Berlin", BERLIN_OCT_26 - 1, 2, BERLIN_OCT_24, BERLIN_OCT_26),
        ("Europe/Berlin", BERLIN_OCT_26, 2, BERLIN_OCT_25, BERLIN_OCT_27),
        ("Europe/Berlin", BERLIN_OCT_27, 3, BERLIN_OCT_25, utc("2026-10-27T23:00:00Z")),
        # New York
        ("America/New_York", NY_MAR_8, 1, NY_MAR_8, NY_MAR_9),
        ("America/New_York", utc("2026-03-08T07:00:00Z"), 1, NY_MAR_8, NY_MAR_9),  # 03:00 EDT
        ("America/New_York", NY_MAR_9 - 1, 1, NY_MAR_8, NY_MAR_9),
        ("America/New_York", NY_MAR_9, 2, NY_MAR_8, utc("2026-03-10T04:00:00Z")),
        ("America/New_York", utc("2026-11-01T05:30:00Z"), 1, NY_NOV_1, NY_NOV_2),  # 01:30 EDT
        ("America/New_York", utc("2026-11-01T06:30:00Z"), 1, NY_NOV_1, NY_NOV_2),  # 01:30 EST
        ("America/New_York", NY_NOV_2 - 1, 2, NY_OCT_31, NY_NOV_2),
        ("America/New_York", NY_NOV_2, 2, NY_NOV_1, NY_NOV_3),
        ("America/New_York", NY_NOV_3 - 1, 3, NY_OCT_31, NY_NOV_3),
    ],
)
def test_window_start_and_next_boundary_are_exact_to_the_millisecond(
    tz_name: str, t: int, days: int, start: int, boundary: int
) -> None:
    tz = zone(tz_name)
    assert window_start(t, days, tz) == start
    assert next_boundary(t, tz) == boundary


def test_an_event_leaves_at_the_midnight_that_starts_its_date_plus_n() -> None:
    # an event at 23:59:59.999 CET of 28 Mar, a 2-day window: in on 28 and 29 Mar
    ts = BERLIN_MAR_29 - 1
    assert leave_ms(ts, 2, BERLIN) == BERLIN_MAR_30
    assert leave_ms(ts, 1, BERLIN) == BERLIN_MAR_29
    assert leave_ms(utc("2026-10-25T01:30:00Z"), 1, BERLIN) == BERLIN_OCT_26
    assert leave_ms(utc("2026-11-01T05:30:00Z"), 2, NEW_YORK) == NY_NOV_3
    assert day_start_ms(local_date(utc("2026-03-08T12:00:00Z"), NEW_YORK), NEW_YORK) == NY_MAR_8


def test_a_midnight_inside_a_gap_starts_the_day_when_the_gap_ends() -> None:
    # America/Havana springs forward at 00:00 -> 01:00 (8 Mar 2026): 8 Mar starts at 01:00 CDT
    havana = zone("America/Havana")
    assert window_start(utc("2026-03-08T12:00:00Z"), 1, havana) == utc("2026-03-08T05:00:00Z")
    assert next_boundary(utc("2026-03-07T12:00:00Z"), havana) == utc("2026-03-08T05:00:00Z")


# -- evaluation ------------------------------------------------------------------------


def calendar(days: int, tz: str = "Europe/Berlin") -> dict[str, Any]:
    return {"calendar_days": days, "timezone": tz}


def checkout(ts: int) -> Any:
    return make_event(ts=ts, event="Checkout Started")


def test_membership_ends_exactly_at_the_local_midnight_after_a_23_hour_day() -> None:
    catalog = catalog_of(
        audience("today", {"performed": {"event": "Checkout Started", "within": calendar(1)}})
    )
    late_evening = utc("2026-03-29T21:30:00Z")  # 23:30 CEST on 29 Mar
    result = step(None, checkout(late_evening), catalog, "u1")
    assert summary(result.transitions) == [("today", "entered", late_evening)]
    assert result.next_wake_ms == BERLIN_MAR_30  # the clock moves to local midnight
    assert run(catalog, [Tick(BERLIN_MAR_30 - 1)], state=result.state) == []
    exited = run(catalog, [Tick(BERLIN_MAR_30)], state=result.state)
    assert summary(exited) == [("today", "exited", BERLIN_MAR_30)]


def test_times_in_n_calendar_days_across_the_new_york_fall_back() -> None:
    catalog = catalog_of(
        audience(
            "twice",
            {
                "performed": {
                    "event": "Checkout Started",
                    "times": {"gte": 2},
                    "within": calendar(2, "America/New_York"),
                }
            },
        )
    )
    first, second = utc("2026-11-01T03:30:00Z"), utc("2026-11-01T06:30:00Z")  # 31 Oct, 1 Nov
    state, outputs = feed(catalog, [checkout(first), checkout(second)])
    assert summary(outputs) == [("twice", "entered", second)]
    # the 31 Oct event leaves when 2 Nov starts: 1 Nov lasts 25 hours
    assert state is not None and state.wake_ms == NY_NOV_2 == NY_NOV_1 + 25 * H
    assert run(catalog, [Tick(NY_NOV_2 - 1)], state=state) == []
    assert summary(run(catalog, [Tick(NY_NOV_2)], state=state)) == [("twice", "exited", NY_NOV_2)]


def test_not_performed_today_returns_at_the_next_local_midnight() -> None:
    catalog = catalog_of(
        audience(
            "quiet",
            {"not": {"performed": {"event": "Checkout Started", "within": calendar(1)}}},
        )
    )
    morning = utc("2026-10-25T06:00:00Z")  # 07:00 CET on the 25-hour 25 Oct
    state, outputs = feed(catalog, [make_event(ts=BERLIN_OCT_25 + H, event="App Opened")])
    assert summary(outputs) == [("quiet", "entered", BERLIN_OCT_25 + H)]
    state, outputs = feed(catalog, [checkout(morning)], state=state)
    assert summary(outputs) == [("quiet", "exited", morning)]
    assert state is not None and state.wake_ms == BERLIN_OCT_26
    state, outputs = feed(catalog, [Tick(BERLIN_OCT_26)], state=state)
    assert summary(outputs) == [("quiet", "entered", BERLIN_OCT_26)]
    assert state is not None and state.wake_ms == NEVER


def test_a_late_event_of_a_day_already_out_of_the_window_changes_nothing() -> None:
    catalog = catalog_of(
        audience("today", {"performed": {"event": "Checkout Started", "within": calendar(1)}})
    )
    state, _ = feed(catalog, [make_event(ts=BERLIN_MAR_30 + H, event="App Opened")])
    late = make_event(ts=BERLIN_MAR_30 - H, event="Checkout Started")  # yesterday, local
    state, outputs = feed(catalog, [late], state=state)
    assert outputs == []


def test_page_and_screen_views_take_calendar_windows() -> None:
    catalog = catalog_of(
        audience(
            "pricing_today",
            {"page_viewed": {"url": "*/pricing", "within": calendar(1, "America/New_York")}},
        ),
        audience(
            "home_2d",
            {"screen_viewed": {"name": "Home", "within": calendar(2, "America/New_York")}},
        ),
    )
    at = utc("2026-03-08T20:00:00Z")  # 16:00 EDT on the 23-hour 8 Mar
    page = make_event(ts=at, type="page", event=None, properties={"url": "https://x/pricing"})
    screen = make_event(ts=at, type="screen", event=None, name="Home")
    _, outputs = feed(catalog, [page, screen, Tick(utc("2026-03-10T12:00:00Z"))])
    assert summary(outputs) == [
        ("pricing_today", "entered", at),
        ("home_2d", "entered", at),
        ("pricing_today", "exited", NY_MAR_9),
        ("home_2d", "exited", utc("2026-03-10T04:00:00Z")),
    ]


def test_fixed_and_calendar_windows_of_one_event_share_a_tracker_kept_n_plus_1_days() -> None:
    catalog = catalog_of(
        audience("a", {"performed": {"event": "Checkout Started", "within": "1d"}}),
        audience("b", {"performed": {"event": "Checkout Started", "within": calendar(3)}}),
    )
    (tracker,) = catalog.trackers.values()
    assert isinstance(tracker, PerformedTracker)
    assert tracker.horizon_ms == 4 * D
    state, _ = feed(catalog, [checkout(BERLIN_MAR_28 + H), checkout(BERLIN_MAR_30 + 49 * H)])
    assert state is not None  # the first (kept 4 days) is still there 3 days later
    assert state.trackers[tracker.id] == [BERLIN_MAR_28 + H, BERLIN_MAR_30 + 49 * H]


def test_the_same_history_replays_to_the_same_transitions_and_message_ids() -> None:
    catalog = catalog_of(
        audience(
            "today", {"performed": {"event": "Checkout Started", "within": calendar(1, "UTC")}}
        ),
        {"key": "n2", "kind": "count", "event": "Checkout Started", "within": calendar(2)},
    )
    history: list[Any] = [checkout(BERLIN_OCT_25 + n * 7 * H) for n in range(6)]
    history.append(Tick(BERLIN_OCT_27 + 2 * D))
    first, second = run(catalog, history), run(catalog, history)
    assert len(first) > 6
    assert [o.message_id for o in first] == [o.message_id for o in second]
    assert first == second


# -- computed traits --------------------------------------------------------------------


def test_a_computed_count_over_calendar_days_drops_at_local_midnights() -> None:
    trait = {"key": "checkouts_2d", "kind": "count", "event": "Checkout Started"}
    catalog = catalog_of({**trait, "within": calendar(2)})
    events = [checkout(BERLIN_OCT_24 + 20 * H), checkout(BERLIN_OCT_25 + 24 * H)]
    assert BERLIN_OCT_25 + 24 * H < BERLIN_OCT_26  # (25 Oct lasts 25 h)
    _, outputs = feed(catalog, [*events, Tick(BERLIN_OCT_26), Tick(BERLIN_OCT_27)])
    assert values_of(outputs) == [
        ("checkouts_2d", 1, BERLIN_OCT_24 + 20 * H),
        ("checkouts_2d", 2, BERLIN_OCT_25 + 24 * H),
        ("checkouts_2d", 1, BERLIN_OCT_26),  # 24 Oct left
        ("checkouts_2d", 0, BERLIN_OCT_27),  # 25 Oct left
    ]


def test_a_computed_sum_over_calendar_days_keeps_one_bucket_per_local_day() -> None:
    doc = {
        "key": "spent_3d",
        "kind": "sum",
        "event": "Order Completed",
        "property": "properties.revenue",
        "within": calendar(3, "America/New_York"),
    }
    catalog = catalog_of(doc)
    orders = [
        make_event(ts=ts, event="Order Completed", properties={"revenue": amount})
        for ts, amount in [
            (utc("2026-11-01T05:30:00Z"), 10),  # 01:30 EDT, 1 Nov
            (utc("2026-11-01T06:30:00Z"), 5),  # 01:30 EST, 1 Nov (the repeated hour)
            (utc("2026-11-02T12:00:00Z"), 1),
        ]
    ]
    state, outputs = feed(catalog, [*orders, Tick(utc("2026-11-04T05:00:00Z"))])
    assert values_of(outputs)[-1] == ("spent_3d", 1, utc("2026-11-04T05:00:00Z"))
    assert state is not None
    trait = catalog.traits["spent_3d"]
    # one bucket per local day, keyed by its midnight (both 01:30s are 1 Nov); 1 Nov's left
    assert state.trackers[trait.id] == [[NY_NOV_1, 15], [NY_NOV_2, 1]]
    assert [v for _k, v, _at in values_of(outputs)] == [10, 15, 16, 1]


# -- explain ---------------------------------------------------------------------------


def test_explain_shows_the_calendar_days_the_timezone_and_the_window_start() -> None:
    catalog = catalog_of(
        audience("recent", {"performed": {"event": "Checkout Started", "within": calendar(2)}})
    )
    state, _ = feed(catalog, [checkout(BERLIN_MAR_29 + 2 * H)])
    assert state is not None
    why = explain(state, catalog, "recent", BERLIN_MAR_30 + H)
    node = why["condition"]
    assert (node["value"], node["count"]) == (True, 1)
    assert node["window"] == {
        "calendar_days": 2,
        "timezone": "Europe/Berlin",
        "first_day": "2026-03-29",
        "last_day": "2026-03-30",
        "window_start_ms": BERLIN_MAR_29,
        "window_start": iso(BERLIN_MAR_29),
        "moves_at_ms": utc("2026-03-30T22:00:00Z"),
        "moves_at": iso(utc("2026-03-30T22:00:00Z")),
    }
    assert node["changes_at"] == iso(utc("2026-03-30T22:00:00Z"))


# -- validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("within", "path", "message", "suggestion"),
    [
        ({"calendar_days": 7, "timezone": "Europe/Berln"}, ".timezone", "unknown time", "Berlin"),
        ({"calendar_days": 7, "timezone": "europe/berlin"}, ".timezone", "unknown", "Berlin"),
        ({"calendar_days": 7, "timezone": "../../etc/passwd"}, ".timezone", "unknown", None),
        ({"calendar_days": 7, "timezone": 3}, ".timezone", "IANA", None),
        ({"calendar_days": 7}, ".timezone", "IANA", None),
        ({"calendar_days": 0, "timezone": "UTC"}, ".calendar_days", "1 to 3650", None),
        ({"calendar_days": 3651, "timezone": "UTC"}, ".calendar_days", "1 to 3650", None),
        ({"calendar_days": 1.5, "timezone": "UTC"}, ".calendar_days", "integer", None),
        ({"calendar_days": True, "timezone": "UTC"}, ".calendar_days", "integer", None),
        ({"calendar_dayz": 7, "timezone": "UTC"}, ".calendar_dayz", "unknown field", "days"),
    ],
)
def test_invalid_calendar_windows_are_rejected_with_their_path(
    within: Any, path: str, message: str, suggestion: str | None
) -> None:
    for doc, prefix in [
        (audience("a", {"performed": {"event": "X", "within": within}}), "$.condition.performed"),
        (audience("a", {"page_viewed": {"within": within}}), "$.condition.page_viewed"),
        ({"key": "t", "kind": "count", "event": "X", "within": within}, "$"),
    ]:
        with pytest.raises(DefinitionError) as caught:
            validate_definition(doc)
        assert caught.value.path == f"{prefix}.within{path}"
        assert message in str(caught.value)
        if suggestion is None:
            assert "did you mean" not in str(caught.value)
        else:
            assert suggestion in (caught.value.suggestion or "")


def test_a_funnel_step_takes_no_calendar_window() -> None:
    doc = audience(
        "f",
        {
            "sequence": {
                "steps": [{"event": "X", "within": {"calendar_days": 1, "timezone": "UTC"}}]
            }
        },
    )
    with pytest.raises(DefinitionError) as caught:
        validate_definition(doc)
    assert caught.value.path == "$.condition.sequence.steps[0].within"


def test_valid_calendar_windows_compile() -> None:
    docs = [
        audience("a", {"performed": {"event": "X", "within": calendar(3650, "Asia/Kolkata")}}),
        {"key": "t", "kind": "unique_count", "event": "X", "property": "p", "within": calendar(1)},
    ]
    catalog = build_catalog({d["key"]: (validate_definition(d), 1) for d in docs})
    assert set(catalog.index) == {"a"} and set(catalog.traits) == {"t"}


def test_preview_judges_a_calendar_window_on_stored_profiles() -> None:
    from audiences.core.preview import preview

    fixed = audience("recent", {"performed": {"event": "Checkout Started", "within": "3d"}})
    stored = catalog_of(fixed)
    late_evening = utc("2026-03-29T21:30:00Z")  # 23:30 CEST on 29 Mar
    profiles = []
    for user, clock in [("today", late_evening), ("past_midnight", BERLIN_MAR_30 + 30 * M)]:
        items = [checkout(late_evening), make_event(ts=clock, event="App Opened", userId=user)]
        state, _ = feed(stored, items, user=user)
        assert state is not None
        profiles.append((user, state))
    doc = validate_definition(
        audience("today", {"performed": {"event": "Checkout Started", "within": calendar(1)}})
    )
    report = preview(doc, {"recent": (validate_definition(fixed), 1)}, profiles)
    assert (report.size, report.entering, report.would_enter) == (1, 1, ["today"])


# -- hostile input ---------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=80),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["calendar_days", "timezone", "days", "tz"]), json_values, max_size=3
    )
    | st.fixed_dictionaries(
        {
            "calendar_days": st.integers(-5, 4000) | json_values,
            "timezone": st.sampled_from(
                ["UTC", "Europe/Berlin", "../x", "/etc/localtime", "", "Europe/", "Etc/GMT+5"]
            )
            | st.text(max_size=300),
        }
    )
)
def test_any_within_object_is_accepted_or_refused_with_a_path_never_crashes(within: Any) -> None:
    doc = audience("a", {"performed": {"event": "Checkout Started", "within": within}})
    try:
        checked = validate_definition(doc)
    except DefinitionError as exc:
        assert exc.path.startswith("$.condition.performed.within")
        return
    catalog = build_catalog({"a": (checked, 1)})  # what validation accepts compiles and runs
    assert step(None, checkout(BERLIN_MAR_29), catalog, "u1").transitions


@pytest.mark.parametrize("ts", [-(2**62), -1, 0, 2**62, 253_402_300_799_999])
def test_extreme_event_times_never_raise(ts: int) -> None:
    for tz in (BERLIN, NEW_YORK, zone("Pacific/Kiritimati"), zone("Etc/GMT+12")):
        assert window_start(ts, 3650, tz) <= next_boundary(ts, tz)
        assert leave_ms(ts, 3650, tz) > window_start(ts, 3650, tz)
