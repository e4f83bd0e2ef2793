"""Definitions that cannot crash or hang a worker (SPEC §11): size limits with JSON paths,
checked without recursion; patterns that run in linear time (RE2, the wildcard matcher);
the apply path compiles with the workers' compiler; a worker leaves out what it cannot use.
"""

from __future__ import annotations

import re
from typing import Any

import orjson
import pytest
from factories import T0, audience, catalog_of, make_event, run
from hypothesis import given, settings
from hypothesis import strategies as st

from audiences.adapters.metrics import DEFINITIONS_REJECTED
from audiences.adapters.stream.definitions import DefinitionsLog, DefinitionsWriter
from audiences.core.definitions import check_references, compile_definition, validate_definition
from audiences.core.definitions.limits import MAX_DEPTH, MAX_JSON_DEPTH, MAX_NODES
from audiences.core.evaluator import Transition
from audiences.core.operators import (
    MAX_PATTERN_BYTES,
    Wildcard,
    compile_predicate,
    wildcard_regex,
)
from audiences.errors import DefinitionError

LEAF = {"performed": {"event": "Order Completed"}}


def rejected(doc: Any) -> DefinitionError:
    with pytest.raises(DefinitionError) as info:
        validate_definition(doc)
    return info.value


def nested_not(levels: int) -> dict[str, Any]:
    """A condition `levels` deep: `not` around `not` ... around a leaf (built without
    recursion, so it can be as deep as a test likes)."""
    condition: dict[str, Any] = LEAF
    for _ in range(levels - 1):
        condition = {"not": condition}
    return condition


def not_json(levels: int, key: str = "deep") -> bytes:
    """`nested_not(levels)` as a stored record (orjson writes no more than 255 levels)."""
    text = orjson.dumps(LEAF).decode()
    for _ in range(levels - 1):
        text = '{"not": ' + text + "}"
    return f'{{"key": "{key}", "version": 1, "condition": {text}}}'.encode()


def nested_all(levels: int) -> dict[str, Any]:
    condition: dict[str, Any] = LEAF
    for _ in range(levels - 1):
        condition = {"all": [condition]}
    return condition


# -- depth --------------------------------------------------------------------------------


def test_conditions_32_levels_deep_are_accepted_and_compile() -> None:
    for condition in (nested_not(MAX_DEPTH), nested_all(MAX_DEPTH)):
        doc = validate_definition(audience("deep", condition))
        assert compile_definition(doc, {}).audience("deep") is not None
    assert MAX_DEPTH == 32


def test_a_condition_33_levels_deep_is_rejected_with_the_path_of_level_33() -> None:
    error = rejected(audience("deep", nested_not(33)))
    assert error.reason == "limits"
    assert error.path == "$.condition" + ".not" * 32
    assert "deeper than 32 levels" in error.message

    error = rejected(audience("deep", nested_all(33)))
    assert error.path == "$.condition" + ".all[0]" * 32


def test_a_document_100000_levels_deep_is_rejected_without_recursion() -> None:
    error = rejected(audience("deep", nested_not(100_000)))
    assert error.reason == "limits"
    assert error.path == "$.condition" + ".not" * 32

    value: Any = "x"
    for _ in range(100_000):
        value = [value]
    error = rejected(audience("deep", {"trait": {"name": "t", "op": "eq", "value": value}}))
    assert error.reason == "limits"
    assert error.path.startswith("$.condition.trait.value[0][0]")
    assert f"deeper than {MAX_JSON_DEPTH} levels of JSON" in error.message


def test_the_600_deep_condition_of_the_probe_never_reaches_the_compiler() -> None:
    error = rejected(audience("deep", nested_not(600)))
    assert error.path == "$.condition" + ".not" * 32


# -- nodes --------------------------------------------------------------------------------


def test_1000_nodes_are_accepted_and_1001_rejected_with_the_path_of_the_last() -> None:
    leaves = [{"performed": {"event": f"E{i}"}} for i in range(MAX_NODES)]
    doc = validate_definition(audience("wide", {"any": leaves[:-1]}))  # any + 999 = 1000
    assert compile_definition(doc, {}).audience("wide") is not None

    error = rejected(audience("wide", {"any": leaves}))
    assert error.reason == "limits"
    assert error.path == "$.condition.any[999]"
    assert "more than 1000 nodes" in error.message
    assert MAX_NODES == 1000


def test_filters_and_sequence_steps_count_as_nodes() -> None:
    filters = [{"property": f"p{i}", "op": "exists"} for i in range(MAX_NODES)]
    error = rejected(audience("f", {"performed": {"event": "E", "where": filters}}))
    assert error.path == "$.condition.performed.where[999]"  # node 1001: the condition is node 1

    steps = [{"event": f"S{i}"} for i in range(MAX_NODES)]
    error = rejected(audience("s", {"sequence": {"steps": steps}}))
    assert error.path == "$.condition.sequence.steps[999]"

    trait_doc = {"key": "t", "kind": "count", "event": "E", "where": filters + filters[:1]}
    assert rejected(trait_doc).path == "$.where[1000]"


# -- pattern size -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("condition_of", "path"),
    [
        (
            lambda p: {"trait": {"name": "email", "op": "matches", "value": p}},
            "$.condition.trait.value",
        ),
        (
            lambda p: {
                "performed": {
                    "event": "E",
                    "where": [{"property": "p", "op": "contains", "value": p}],
                }
            },
            "$.condition.performed.where[0].value",
        ),
        (
            lambda p: {"trait": {"name": "email", "op": "not_contains", "value": p}},
            "$.condition.trait.value",
        ),
        (lambda p: {"page_viewed": {"url": p}}, "$.condition.page_viewed.url"),
    ],
)
def test_patterns_over_1024_utf8_bytes_are_rejected_with_their_path(
    condition_of: Any, path: str
) -> None:
    fits = "é" * (MAX_PATTERN_BYTES // 2)  # 512 characters, 1024 bytes
    validate_definition(audience("p", condition_of(fits)))
    error = rejected(audience("p", condition_of(fits + "a")))  # 513 characters, 1025 bytes
    assert (error.path, error.reason) == (path, "limits")
    assert "1025 bytes" in error.message


# -- patterns RE2 cannot run --------------------------------------------------------------


@pytest.mark.parametrize("pattern", [r"(a)\1", r"foo(?=bar)", r"(?<!x)y", r"a++", r"(?x) a"])
def test_a_regex_re2_cannot_run_is_rejected_with_its_path(pattern: str) -> None:
    condition = {"trait": {"name": "email", "op": "matches", "value": pattern}}
    error = rejected(audience("r", condition))
    assert (error.path, error.reason) == ("$.condition.trait.value", "pattern")
    assert "RE2" in error.message


def test_pathological_patterns_on_32_kb_inputs_finish_with_the_right_answers() -> None:
    """Backtracking engines take exponential or high-polynomial time on these (74 s for
    400 characters, 3.5 s for 27); RE2 and the wildcard matcher are linear."""
    many_a = "a" * 32_768
    contains = compile_predicate("contains", "*a*a*a*b")
    assert contains(many_a, T0) is False
    assert contains(many_a + "b", T0) is True
    assert contains("b" + many_a, T0) is False
    nested = compile_predicate("matches", "^(a+)+$")
    assert nested(many_a + "!", T0) is False
    assert nested(many_a, T0) is True
    url = Wildcard("*a*a*a*b", anchored=True)
    assert url.test(many_a) is False and url.test(many_a + "b") is True


def test_pathological_patterns_in_an_audience_are_judged_on_32_kb_properties() -> None:
    catalog = catalog_of(
        audience(
            "glob",
            {
                "performed": {
                    "event": "Search",
                    "where": [{"property": "q", "op": "contains", "value": "*a*a*a*b"}],
                }
            },
        ),
        audience("url", {"page_viewed": {"url": "*a*a*a*b"}}),
        audience(
            "regex",
            {
                "performed": {
                    "event": "Search",
                    "where": [{"property": "q", "op": "matches", "value": "^(a+)+$"}],
                }
            },
        ),
    )
    many_a = "a" * 32_768
    out = run(
        catalog,
        [
            make_event(ts=T0, event="Search", properties={"q": many_a + "!"}),
            make_event(ts=T0 + 1, event="Search", properties={"q": many_a + "b"}),
            make_event(ts=T0 + 2, event="Search", properties={"q": many_a}),
            make_event(ts=T0 + 3, type="page", event=None, properties={"url": many_a}),
            make_event(ts=T0 + 4, type="page", event=None, properties={"url": many_a + "b"}),
        ],
    )
    entered = [(o.audience_key, o.at_ms) for o in out if isinstance(o, Transition) and o.entered]
    assert entered == [("glob", T0 + 1), ("regex", T0 + 2), ("url", T0 + 4)]


def test_regex_dialect_is_re2() -> None:
    assert compile_predicate("matches", r"^\d{3}-\d{4}$")("555-1234", T0)
    assert not compile_predicate("matches", "a$")("a\n", T0)  # $: end of text only
    assert compile_predicate("matches", "(?i)GMAIL")("x@gmail.com", T0)
    assert compile_predicate("matches", "^.$")("é", T0)  # characters, not bytes


# -- the wildcard matcher against two independent implementations ----------------------------


def _reference(pattern: str, anchored: bool) -> re.Pattern[str]:
    """The wildcard language on Python's `re` (full match with \\Z: `$` would also match
    before a final newline). Fine for the tiny inputs of the property test."""
    body = "|".join(
        "".join(".*" if c == "*" else ".+" if c == "+" else re.escape(c) for c in alternative)
        for alternative in pattern.split("|")
    )
    return re.compile(rf"\A(?:{body})\Z" if anchored else f"(?:{body})", re.DOTALL)


@settings(max_examples=600, deadline=None)
@given(
    pattern=st.text(alphabet="ab*+|", max_size=9),
    text=st.text(alphabet="ab\n", max_size=10),
    anchored=st.booleans(),
)
def test_wildcard_matcher_agrees_with_re_and_re2(pattern: str, text: str, anchored: bool) -> None:
    expected = _reference(pattern, anchored).search(text) is not None
    assert Wildcard(pattern, anchored=anchored).test(text) is expected
    re2_pattern = wildcard_regex(pattern, anchored=anchored)
    assert (re2_pattern.search(text) is not None) is expected


# -- the apply path (CLI and API) compiles; the workers leave out what they cannot use --------


class _Producer:
    def __init__(self) -> None:
        self.produced: list[tuple[str, bytes, bytes | None]] = []

    def produce(self, topic: str, key: bytes, value: bytes | None, on_delivery: Any) -> None:
        self.produced.append((topic, key, value))

    def flush(self, _timeout: float) -> int:
        return 0


@pytest.mark.parametrize(
    ("doc", "path", "reason"),
    [
        (audience("deep", nested_not(40)), "$.condition" + ".not" * 32, "limits"),
        (
            audience("re", {"trait": {"name": "e", "op": "matches", "value": r"(a)\1"}}),
            "$.condition.trait.value",
            "pattern",
        ),
        (audience("ref", {"in_audience": "missing"}), "$.condition", "invalid"),
    ],
)
def test_the_writer_refuses_before_writing_anything(doc: Any, path: str, reason: str) -> None:
    producer = _Producer()
    writer = DefinitionsWriter("defs", producer)  # type: ignore[arg-type]
    good = audience("good", LEAF)
    with pytest.raises(DefinitionError) as info:
        writer.put([good, doc], {}, T0)
    assert (info.value.path, info.value.reason) == (path, reason)
    assert producer.produced == []


class _Record:
    def __init__(self, key: str, value: bytes | None, offset: int) -> None:
        self._key, self._value, self._offset = key.encode(), value, offset

    def key(self) -> bytes:
        return self._key

    def value(self) -> bytes | None:
        return self._value

    def offset(self) -> int:
        return self._offset


def _count(key: str, reason: str) -> float:
    return DEFINITIONS_REJECTED.labels(key=key, reason=reason)._value.get()


def test_the_definitions_log_leaves_out_what_it_cannot_use_and_counts_it() -> None:
    log = DefinitionsLog("defs", consumer=None, producer=None)  # type: ignore[arg-type]
    good = {**audience("good", LEAF), "version": 1}
    deep_json = ("[" * 2000 + "]" * 2000).encode()
    records = {
        "good": orjson.dumps(good),
        "deep": not_json(600),
        "backref": orjson.dumps(
            audience("backref", {"trait": {"name": "e", "op": "matches", "value": r"(a)\1"}})
        ),
        "wide": orjson.dumps(audience("wide", {"any": [LEAF] * (MAX_NODES + 5)})),
        "garbage": deep_json,
    }
    reasons = {"deep": "limits", "backref": "pattern", "wide": "limits", "garbage": "undecodable"}
    before = {key: _count(key, reason) for key, reason in reasons.items()}
    for offset, (key, value) in enumerate(records.items()):
        log._apply(_Record(key, value, offset))  # type: ignore[arg-type]
    assert set(log.definitions) == {"good"}
    for key, reason in reasons.items():
        assert _count(key, reason) == before[key] + 1, key
    catalog = log._build_isolating(list(records))
    assert [a.key for a in catalog.audiences] == ["good"]

    # A bad version replaces a good one: the key is left out, not kept at its old version
    # (a fresh worker reading the compacted topic could not know the old one).
    log._apply(_Record("good", not_json(40, "good"), 10))  # type: ignore[arg-type]
    assert log.definitions == {}
    assert "good" not in log.retired  # not a deletion: members hear no exit

    # ... and undoes no deletion: the members of a deleted audience are still told.
    log._apply(_Record("gone", orjson.dumps({**audience("gone", LEAF), "version": 3}), 11))  # type: ignore[arg-type]
    log._apply(_Record("gone", None, 12))  # type: ignore[arg-type]
    log._apply(_Record("gone", b"{not json", 13))  # type: ignore[arg-type]
    assert log.retired["gone"] == (3, "gone")


def test_a_long_chain_of_audience_references_validates_and_compiles_without_recursion() -> None:
    """Each definition is small, but 3,000 audiences each in the next one used to be
    ordered (and searched for cycles) recursively: a RecursionError in every worker."""
    chain = {"a2999": (validate_definition(audience("a2999", LEAF)), 1)}
    for i in range(2999):
        chain[f"a{i}"] = (validate_definition(audience(f"a{i}", {"in_audience": f"a{i + 1}"})), 1)
    first = validate_definition(audience("first", {"in_audience": "a0"}))
    check_references(first, {key: doc for key, (doc, _) in chain.items()})
    catalog = compile_definition(first, chain)
    assert [a.key for a in catalog.audiences] == [f"a{i}" for i in range(2999, -1, -1)] + ["first"]

    looping = validate_definition(audience("a2999", {"in_audience": "a0"}))
    others = {key: doc for key, (doc, _) in chain.items() if key != "a2999"}
    with pytest.raises(DefinitionError) as info:
        check_references(looping, others)
    assert info.value.message.startswith("in_audience forms a cycle: a0 -> a1 -> a2 -> ")
    looped = {**chain, "a2999": (looping, 1)}
    with pytest.raises(DefinitionError) as info:  # the workers leave the whole loop out
        compile_definition(first, looped)
    assert info.value.message == "refers to missing audience 'a0'"
