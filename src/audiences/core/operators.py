"""Comparison operators of the definition language, compiled once per filter.

Every predicate takes `(actual, now_ms)` and returns a bool; type mismatches
(a number against a string, a bool against a number) are false, never errors.

Patterns run in time linear in the input (SPEC §11), whatever the pattern:
- `matches` is a regular expression in RE2 syntax, run by RE2 (`google-re2`): no
  backreferences, no lookaround, no possessive quantifiers; a pattern RE2 cannot
  compile raises `PatternError` when the predicate is compiled (at apply time);
- wildcard patterns (`contains`/`not_contains`, page URLs) run on `Wildcard`, a
  greedy matcher over the pattern's literal pieces with `str.find` (no backtracking:
  O(len(text) * len(pattern)) at worst, one C-level scan per piece in practice).
  `wildcard_regex`, the same language translated to RE2, is an independent
  implementation the oracle uses.
Both kinds of pattern are at most MAX_PATTERN_BYTES long (UTF-8).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, final

import re2

from audiences.core.durations import parse_duration_ms
from audiences.core.events import parse_iso_ms
from audiences.core.state import NEVER

Predicate = Callable[[Any, int], bool]

OPERATORS: Final = (
    "eq",
    "neq",
    "gt",
    "gte",
    "lt",
    "lte",
    "in",
    "not_in",
    "contains",
    "not_contains",
    "starts_with",
    "ends_with",
    "matches",
    "exists",
    "not_exists",
    "before",
    "after",
    "within_last",
    "not_within_last",
)
UNARY_OPERATORS = frozenset({"exists", "not_exists"})
DURATION_OPERATORS = frozenset({"within_last", "not_within_last"})


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return type(value).__name__


def _equal(actual: Any, expected: Any) -> bool:
    return _kind(actual) == _kind(expected) and actual == expected


MAX_PATTERN_BYTES: Final = 1024  # a `matches` regex or a wildcard pattern, UTF-8 encoded
_RE2_OPTIONS: Any = re2.Options()
_RE2_OPTIONS.log_errors = False  # a refused pattern is reported to the caller, not on stderr
_RE2_OPTIONS.never_capture = True  # `matches` asks whether, never where
_RE2: Any = re2._re2.RE2
_UNANCHORED: Any = re2._re2.RE2.Anchor.UNANCHORED
_WILDCARD_OPTIONS: Any = re2.Options()
_WILDCARD_OPTIONS.log_errors = False


class PatternError(ValueError):
    """A pattern that cannot run in linear time or is too long. `reason` is a short label:
    `pattern_size` or `regex`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def check_pattern_size(pattern: str) -> None:
    size = len(pattern.encode("utf-8", "surrogatepass"))
    if size > MAX_PATTERN_BYTES:
        raise PatternError(
            "pattern_size", f"pattern of {size} bytes; at most {MAX_PATTERN_BYTES} (UTF-8)"
        )


@final
class Regex:
    """A `matches` pattern compiled by RE2: `search` runs in time linear in the text.

    It calls the RE2 binding of `google-re2` directly (`re2._re2.RE2.Match`, what the
    package's `re`-like wrapper calls), without capture groups: a search is one call
    returning a span, several times cheaper than the wrapper's match objects."""

    __slots__ = ("_match", "pattern")

    def __init__(self, pattern: str) -> None:
        check_pattern_size(pattern)
        try:
            compiled = _RE2(pattern.encode("utf-8"), _RE2_OPTIONS)
        except ValueError:  # a lone surrogate: not text
            raise PatternError("regex", "the pattern is not valid UTF-8") from None
        if not compiled.ok():
            detail = compiled.error()
            if isinstance(detail, bytes):
                detail = detail.decode("utf-8", "replace")
            raise PatternError(
                "regex",
                f"not a regular expression RE2 can run ({detail}); RE2 syntax has no "
                "backreferences, lookaround or possessive quantifiers",
            )
        self._match: Any = compiled.Match
        self.pattern = pattern

    def search(self, text: str) -> bool:
        """Whether the pattern matches somewhere in `text`."""
        data = text.encode("utf-8", "surrogatepass")
        span: tuple[int, int] = self._match(_UNANCHORED, data, 0, len(data))[0]
        return span[0] >= 0


def compile_regex(pattern: str) -> Regex:
    """`pattern` compiled by RE2; PatternError if RE2 cannot run it (backreferences,
    lookaround, ...) or it is too long."""
    return Regex(pattern)


def wildcard_regex(pattern: str, *, anchored: bool) -> Any:
    """The wildcard language as an RE2 regex (the oracle's implementation; the engine runs
    `Wildcard`): `*` = any run of characters, `+` = one or more, `|` separates
    alternatives, everything else is literal."""
    alternatives = []
    for alternative in pattern.split("|"):
        parts = []
        for char in alternative:
            if char == "*":
                parts.append(".*")
            elif char == "+":
                parts.append(".+")
            else:
                parts.append(re2.escape(char))
        alternatives.append("".join(parts))
    body = "(?s)(?:" + "|".join(alternatives) + ")"
    return re2.compile(("^" + body + "$") if anchored else body, _WILDCARD_OPTIONS)


# Shapes of a wildcard alternative: one piece anywhere / at the start / at the end / the
# whole text; anything else.
_IN: Final = 0
_PREFIX: Final = 1
_SUFFIX: Final = 2
_EQUAL: Final = 3
_GENERAL: Final = 4


@final
class _Alternative:
    """One `|` alternative: literal pieces separated by runs of `*`/`+`.

    `lead`/`trail`: the least number of characters the run before the first piece /
    after the last one matches (-1: no run there, the piece is at the edge of the text;
    an unanchored pattern has a run of at least 0 at both edges). `gaps[i]`: the least
    the run between pieces i and i+1 matches (`+` counts one, `*` none; every run is
    unbounded above). With no piece, `lead` is the whole pattern's run (-1: empty).
    `shape` names the common one-piece cases, tested with one string method.
    """

    __slots__ = ("gaps", "lead", "piece", "pieces", "shape", "trail")

    def __init__(self, text: str, anchored: bool) -> None:
        pieces: list[str] = []
        runs: list[int] = []  # least length of the run before each piece, then the last
        literal: list[str] = []
        run = -1
        for char in text:
            if char == "*" or char == "+":
                if literal:
                    pieces.append("".join(literal))
                    literal = []
                run = max(run, 0) + (1 if char == "+" else 0)
            else:
                if not literal:
                    runs.append(run)
                    run = -1
                literal.append(char)
        if literal:
            pieces.append("".join(literal))
        runs.append(run)
        self.pieces = tuple(pieces)
        self.gaps = tuple(runs[1:-1])
        self.lead = runs[0] if anchored else max(runs[0], 0)
        self.trail = runs[-1] if anchored else max(runs[-1], 0)
        self.piece = pieces[0] if len(pieces) == 1 else ""
        shape = _GENERAL
        if len(pieces) == 1 and self.lead <= 0 and self.trail <= 0:
            shape = (_EQUAL, _PREFIX, _SUFFIX, _IN)[(self.lead + 1) * 2 + self.trail + 1]
        self.shape = shape

    def fits(self, text: str) -> bool:
        """Whether the alternative matches `text` (all of it where the edges have no run).

        Greedy and backtracking-free: each piece is placed at its leftmost occurrence
        after the previous one (and the least gap). Every run is unbounded above, so the
        leftmost place leaves the most room for the rest: if any placement fits, this
        one does. One `str.find` per piece: O(len(text) * len(pattern)) at worst."""
        lead, trail, pieces = self.lead, self.trail, self.pieces
        n = len(text)
        count = len(pieces)
        if count == 0:
            return n == 0 if lead < 0 else n >= lead
        pos, first = 0, 0
        if lead < 0:
            if not text.startswith(pieces[0]):
                return False
            pos, first = len(pieces[0]), 1
        end, last = n, count
        if trail < 0:
            if first == count:  # one piece at both edges: the whole text
                return pos == n
            if not text.endswith(pieces[-1]):
                return False
            end, last = n - len(pieces[-1]), count - 1
        for index in range(first, last):
            least = lead if index == 0 else self.gaps[index - 1]
            at = text.find(pieces[index], pos + least, end)
            if at < 0:
                return False
            pos = at + len(pieces[index])
        if last == count:
            return end - pos >= trail
        # the run before the piece kept at the end
        return end - pos >= (lead if last == 0 else self.gaps[last - 1])


@final
class Wildcard:
    """A compiled wildcard pattern (SPEC §3): `*` any run of characters, `+` one or
    more, `|` between alternatives, every other character literal. `anchored`: the
    pattern must match the whole text (URL patterns); otherwise a part (`contains`)."""

    __slots__ = ("alternatives", "anchored", "literals")

    def __init__(self, pattern: str, *, anchored: bool) -> None:
        check_pattern_size(pattern)
        self.anchored = anchored
        self.alternatives = tuple(_Alternative(a, anchored) for a in pattern.split("|"))
        # Substrings only (`contains` of plain text, `*x*` URLs): the common case.
        plain = all(a.shape == _IN for a in self.alternatives)
        self.literals: tuple[str, ...] | None = (
            tuple(a.piece for a in self.alternatives) if plain else None
        )

    def test(self, text: str) -> bool:
        literals = self.literals
        if literals is not None:
            for literal in literals:  # noqa: SIM110 (no generator per event)
                if literal in text:
                    return True
            return False
        for alternative in self.alternatives:
            shape = alternative.shape
            if shape == _IN:
                found = alternative.piece in text
            elif shape == _PREFIX:
                found = text.startswith(alternative.piece)
            elif shape == _SUFFIX:
                found = text.endswith(alternative.piece)
            elif shape == _EQUAL:
                found = text == alternative.piece
            else:
                found = alternative.fits(text)
            if found:
                return True
        return False


def compile_wildcard(pattern: str, *, anchored: bool) -> Wildcard:
    return Wildcard(pattern, anchored=anchored)


def compile_predicate(op: str, expected: Any) -> Predicate:
    """A predicate for `op` against `expected` (validated by the definition compiler)."""
    if op == "eq":
        return lambda a, _now: _equal(a, expected)
    if op == "neq":
        return lambda a, _now: a is None or (_kind(a) == _kind(expected) and a != expected)
    if op in ("gt", "gte", "lt", "lte"):
        kind = _kind(expected)
        if kind not in ("number", "string"):
            return lambda _a, _now: False
        compare: Callable[[Any, Any], bool] = {
            "gt": lambda a, e: a > e,
            "gte": lambda a, e: a >= e,
            "lt": lambda a, e: a < e,
            "lte": lambda a, e: a <= e,
        }[op]
        return lambda a, _now: _kind(a) == kind and compare(a, expected)
    if op in ("in", "not_in"):
        options = list(expected)
        if all(isinstance(o, str) for o in options):
            strings = frozenset(options)  # the common case: one hash lookup

            def member(a: Any, _now: int) -> bool:
                return isinstance(a, str) and a in strings

        else:

            def member(a: Any, _now: int) -> bool:
                return any(_equal(a, o) for o in options)

        if op == "in":
            return member
        return lambda a, now: not member(a, now)
    if op in ("contains", "not_contains"):
        wildcard = Wildcard(str(expected), anchored=False)

        def contains(a: Any, _now: int) -> bool:
            if isinstance(a, str):
                return wildcard.test(a)
            if isinstance(a, list):
                return any(_equal(item, expected) for item in a)
            return False

        if op == "contains":
            return contains
        return lambda a, now: a is None or (isinstance(a, str | list) and not contains(a, now))
    if op == "starts_with":
        return lambda a, _now: isinstance(a, str) and a.startswith(expected)
    if op == "ends_with":
        return lambda a, _now: isinstance(a, str) and a.endswith(expected)
    if op == "matches":
        regex = compile_regex(str(expected))
        return lambda a, _now: isinstance(a, str) and regex.search(a)
    if op == "exists":
        return lambda a, _now: a is not None
    if op == "not_exists":
        return lambda a, _now: a is None
    if op in ("before", "after"):
        bound = parse_iso_ms(expected)
        assert bound is not None  # validated at compile time

        def dated(a: Any, _now: int) -> bool:
            ms = parse_iso_ms(a) if isinstance(a, str) else None
            if ms is None:
                return False
            return ms < bound if op == "before" else ms > bound

        return dated
    if op in DURATION_OPERATORS:
        window = parse_duration_ms(expected)
        assert window is not None  # validated at compile time

        def recent(a: Any, now: int) -> bool:
            ms = parse_iso_ms(a) if isinstance(a, str) else None
            if ms is None:
                return False
            inside = now - window < ms <= now
            return inside if op == "within_last" else not inside

        return recent
    raise ValueError(f"unknown operator {op!r}")


def predicate_change_ms(op: str, expected: Any, actual: Any, now_ms: int) -> int | None:
    """When a relative-time predicate on `actual` next changes value with no new input
    (None: never, including a time at or beyond NEVER)."""
    if op not in DURATION_OPERATORS:
        return None
    window = parse_duration_ms(expected)
    ms = parse_iso_ms(actual) if isinstance(actual, str) else None
    if window is None or ms is None:
        return None
    for edge in (ms, ms + window):
        if edge > now_ms:
            return edge if edge < NEVER else None
    return None
