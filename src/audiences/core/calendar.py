"""Calendar-day windows (SPEC §3): `"within": {"calendar_days": N, "timezone": TZ}`.

At time t the window holds the current local day of t in the IANA time zone TZ and
the N - 1 days before it: it starts at the first instant of local date(t) - (N - 1)
and moves at each local midnight. Days are local days, so across a DST change a
day lasts 23 or 25 hours; the arithmetic goes through `zoneinfo`, never through
fixed offsets.

The first instant of a local day is its midnight; where a zone skips midnight (a
DST gap at 00:00) it is the end of the gap, and where midnight occurs twice (a
fall-back at 00:00) the first occurrence.

An event at `ts` counts at every t in [ts, leave_ms(ts)): it leaves the window at
the midnight that starts local date(ts) + N. Times are UTC epoch milliseconds.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from audiences.core.durations import parse_duration_ms
from audiences.errors import DefinitionError

MAX_CALENDAR_DAYS: Final = 3650
DAY_MS: Final = 86_400_000
_ZONES: dict[str, ZoneInfo] = {}  # name -> zone (names are validated before they get here)
_MAX_ZONES: Final = 1024
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MIN_MS: Final = -62_135_596_800_000 + (MAX_CALENDAR_DAYS + 2) * DAY_MS  # room for N days before
_MAX_MS: Final = 253_402_300_799_999 - (MAX_CALENDAR_DAYS + 2) * DAY_MS  # room for N days after


def zone(name: str) -> ZoneInfo:
    """The ZoneInfo of an IANA name (cached); raises KeyError for an unknown one."""
    found = _ZONES.get(name)
    if found is not None:
        return found
    if not is_zone_name(name) or name not in _known_names():
        raise KeyError(name)
    try:
        found = ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise KeyError(name) from None
    if len(_ZONES) >= _MAX_ZONES:
        _ZONES.clear()
    _ZONES[name] = found
    return found


def is_zone_name(name: str) -> bool:
    """A well-formed IANA zone key: no path tricks, no empty parts (zoneinfo opens files)."""
    if not name or len(name) > 64 or name.startswith("/") or "\\" in name:
        return False
    return all(part and part not in (".", "..") for part in name.split("/")) and all(
        c.isalnum() or c in "/_-+" for c in name
    )


_KNOWN: list[frozenset[str]] = []  # (computed once: it walks the zone database)


def _known_names() -> frozenset[str]:
    """Every IANA name this system knows, exactly as spelled (the same answer on every
    file system, case-insensitive or not)."""
    if not _KNOWN:
        _KNOWN.append(frozenset(available_timezones()))
    return _KNOWN[0]


def zone_names() -> list[str]:
    """Every IANA name this system knows, sorted (for suggestions)."""
    return sorted(_known_names())


def _clamp(t_ms: int) -> int:
    return _MIN_MS if t_ms < _MIN_MS else _MAX_MS if t_ms > _MAX_MS else t_ms


def local_date(t_ms: int, tz: ZoneInfo) -> date:
    """The date in `tz` at `t_ms`."""
    return (_EPOCH + timedelta(milliseconds=_clamp(t_ms))).astimezone(tz).date()


def day_start_ms(day: date, tz: ZoneInfo) -> int:
    """The first instant of local `day` in `tz`, in UTC milliseconds."""
    local = datetime(day.year, day.month, day.day, tzinfo=tz)  # fold=0
    instant = local.astimezone(UTC)
    # fold=0: in a gap (no local midnight) the instant the gap ends; for a repeated
    # midnight, its first occurrence.
    delta = instant - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def window_start(t_ms: int, days: int, tz: ZoneInfo) -> int:
    """Start of the window of `days` calendar days at `t_ms`: the first instant of
    local date(t) - (days - 1)."""
    return day_start_ms(local_date(t_ms, tz) - timedelta(days=days - 1), tz)


def next_boundary(t_ms: int, tz: ZoneInfo) -> int:
    """The first local midnight after `t_ms` (where the window next moves)."""
    return day_start_ms(local_date(t_ms, tz) + timedelta(days=1), tz)


def leave_ms(ts: int, days: int, tz: ZoneInfo) -> int:
    """When an event at `ts` leaves a window of `days` calendar days: the first instant
    of local date(ts) + days."""
    return day_start_ms(local_date(ts, tz) + timedelta(days=days), tz)


@dataclass(frozen=True, slots=True)
class CalendarWindow:
    """A compiled `{"calendar_days": N, "timezone": TZ}`."""

    days: int
    timezone: str
    tz: ZoneInfo

    @property
    def horizon_ms(self) -> int:
        """History that covers the window at any time: N + 1 days (days of 25 hours)."""
        return (self.days + 1) * DAY_MS

    def start(self, t_ms: int) -> int:
        return window_start(t_ms, self.days, self.tz)

    def leave(self, ts: int) -> int:
        return leave_ms(ts, self.days, self.tz)

    def day_start(self, ts: int) -> int:
        """The first instant of the local day of `ts`."""
        return day_start_ms(local_date(ts, self.tz), self.tz)

    def describe(self, t_ms: int) -> dict[str, Any]:
        """The window at `t_ms` for people (explain)."""
        first = local_date(t_ms, self.tz) - timedelta(days=self.days - 1)
        return {
            "calendar_days": self.days,
            "timezone": self.timezone,
            "first_day": first.isoformat(),
            "last_day": local_date(t_ms, self.tz).isoformat(),
            "window_start_ms": day_start_ms(first, self.tz),
            "moves_at_ms": next_boundary(t_ms, self.tz),
        }


def calendar_window(within: Any) -> CalendarWindow | None:
    """The calendar window of a (validated) `within`, or None for a duration."""
    if not isinstance(within, Mapping):
        return None
    name = str(within["timezone"])
    return CalendarWindow(int(within["calendar_days"]), name, zone(name))


def horizon_ms(within: Any) -> int:
    """History a (validated) `within`, a duration or a calendar window, needs kept."""
    window = calendar_window(within)
    if window is not None:
        return window.horizon_ms
    return parse_duration_ms(within) or 0


CALENDAR_FIELDS = ("calendar_days", "timezone")


def validate_calendar_window(obj: Mapping[str, Any], path: str) -> None:
    """Raise DefinitionError (JSON path, what was expected, a suggestion) unless `obj`
    is `{"calendar_days": 1..MAX_CALENDAR_DAYS, "timezone": a known IANA name}`."""
    for name in obj:
        if name not in CALENDAR_FIELDS:
            raise DefinitionError(
                f"{path}.{name}",
                f"unknown field; expected one of {', '.join(CALENDAR_FIELDS)}",
                _suggest(str(name), CALENDAR_FIELDS),
            )
    days = obj.get("calendar_days")
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_CALENDAR_DAYS:
        raise DefinitionError(
            f"{path}.calendar_days",
            f"expected an integer from 1 to {MAX_CALENDAR_DAYS} (days), got {days!r}",
        )
    tz_name = obj.get("timezone")
    if not isinstance(tz_name, str) or not tz_name:
        raise DefinitionError(
            f"{path}.timezone",
            f"expected an IANA time zone like 'Europe/Berlin', got {str(tz_name)[:80]!r}",
        )
    try:
        zone(tz_name)
    except KeyError:
        raise DefinitionError(
            f"{path}.timezone",
            f"unknown time zone {tz_name[:80]!r}; expected an IANA name like 'Europe/Berlin'",
            _suggest_zone(tz_name),
        ) from None


def _suggest_zone(name: str) -> str | None:
    names = zone_names()
    by_lower = {n.lower(): n for n in names}
    if name.lower() in by_lower:  # only the case differs
        return by_lower[name.lower()]
    matches = difflib.get_close_matches(name[:64], names, n=1, cutoff=0.6)
    return matches[0] if matches else None


def _suggest(word: str, options: tuple[str, ...]) -> str | None:
    matches = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return matches[0] if matches else None
