"""Validation of definition documents with JSON-path errors and suggestions.

`validate_definition` checks one document's limits (`limits.py`) and shape, and
compiles its patterns with the engines the compiler uses; `check_references`
checks it against the other definitions (unknown audiences, cycles). Both raise
`DefinitionError` whose message names the JSON path, what was expected and,
for a misspelled key, the closest known one.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from audiences.core.calendar import validate_calendar_window
from audiences.core.definitions.accounts import validate_account_condition
from audiences.core.definitions.buckets import (
    validate_holdout,
    validate_random_bucket,
    validate_salt,
)
from audiences.core.definitions.language import (
    CONDITIONS,
    KINDS,
    audience_references,
    is_priority_list,
    trait_references,
)
from audiences.core.definitions.language import (
    is_trait_definition as is_trait_definition,  # re-exported: adapters import it from here
)
from audiences.core.definitions.limits import check_limits
from audiences.core.definitions.priority import (
    check_priority_references,
    priority_edges,
    validate_priority_list,
)
from audiences.core.durations import parse_duration_ms
from audiences.core.events import parse_iso_ms
from audiences.core.operators import (
    DURATION_OPERATORS,
    OPERATORS,
    UNARY_OPERATORS,
    PatternError,
    Wildcard,
    compile_predicate,
)
from audiences.errors import DefinitionError

KEY_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
AUDIENCE_FIELDS = (
    "key",
    "name",
    "description",
    "condition",
    "include_anonymous",
    "backfill",
    "version",
    "created_at",
    "subject",
    "salt",
    "holdout",
)
SUBJECTS = ("user", "account")
TRAIT_DEFINITION_FIELDS = (
    "key",
    "name",
    "description",
    "kind",
    "event",
    "property",
    "where",
    "within",
    "backfill",
    "version",
    "created_at",
    "include_anonymous",
)
DEVICE_FIELDS = ("type", "push_enabled")
DEVICE_TYPES = ("ios", "android", "web", "any")
PAGE_FIELDS = ("url", "name", "where", "times", "within")
SCREEN_FIELDS = ("name", "where", "times", "within")
COUNT_OPS = ("eq", "gte", "gt", "lte", "lt")
PERFORMED_FIELDS = ("event", "where", "times", "within", "between")
STEP_FIELDS = ("event", "where", "within")
SEQUENCE_FIELDS = ("steps", "then", "then_not", "match_on", "active_for")
FILTER_FIELDS = ("property", "op", "value")
TRAIT_FIELDS = ("name", "op", "value")


def _suggest(word: str, options: Iterable[str]) -> str | None:
    matches = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return matches[0] if matches else None


def _check_fields(obj: Mapping[str, Any], allowed: tuple[str, ...], path: str) -> None:
    for name in obj:
        if name not in allowed:
            raise DefinitionError(
                f"{path}.{name}",
                f"unknown field; expected one of {', '.join(allowed)}",
                _suggest(name, allowed),
            )


def _object(value: Any, path: str, what: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise DefinitionError(path, f"expected {what} (a JSON object), got {_type(value)}")
    return value


def _type(value: Any) -> str:
    return {
        bool: "boolean",
        int: "number",
        float: "number",
        str: "string",
        list: "array",
        dict: "object",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _duration(value: Any, path: str) -> int:
    ms = parse_duration_ms(value)
    if ms is None or ms <= 0:
        raise DefinitionError(
            path, f"expected a duration like '2h' (<int><s|m|h|d|w>), got {value!r}"
        )
    return ms


def _window(value: Any, path: str) -> None:
    """A `within` of performed / page_viewed / screen_viewed / a computed trait: a
    duration or a calendar window `{"calendar_days": N, "timezone": TZ}`."""
    if isinstance(value, dict):
        validate_calendar_window(value, path)
    else:
        _duration(value, path)


def _string(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise DefinitionError(path, f"expected a non-empty string, got {_type(value)}")
    return value


def validate_filters(value: Any, path: str) -> None:
    if not isinstance(value, list):
        raise DefinitionError(path, f"expected a list of filters, got {_type(value)}")
    for index, item in enumerate(value):
        item_path = f"{path}[{index}]"
        obj = _object(item, item_path, "a filter {property, op, value}")
        _check_fields(obj, FILTER_FIELDS, item_path)
        _string(obj.get("property"), f"{item_path}.property")
        validate_operator(obj, item_path)


def validate_operator(obj: Mapping[str, Any], path: str) -> None:
    op = obj.get("op")
    if op not in OPERATORS:
        raise DefinitionError(
            f"{path}.op",
            f"expected an operator ({', '.join(OPERATORS)}), got {op!r}",
            _suggest(str(op), OPERATORS),
        )
    value = obj.get("value")
    if op in UNARY_OPERATORS:
        return
    if "value" not in obj:
        raise DefinitionError(f"{path}.value", f"operator {op!r} needs a value")
    if op in ("gt", "gte", "lt", "lte") and (
        isinstance(value, bool) or not isinstance(value, int | float | str)
    ):
        raise DefinitionError(f"{path}.value", f"operator {op!r} needs a number or a string")
    if op in ("in", "not_in") and not isinstance(value, list):
        raise DefinitionError(f"{path}.value", f"operator {op!r} needs an array")
    if op in ("contains", "not_contains", "starts_with", "ends_with", "matches") and not isinstance(
        value, str
    ):
        raise DefinitionError(f"{path}.value", f"operator {op!r} needs a string")
    if op in ("contains", "not_contains", "matches"):
        try:  # the compiler's own pattern engines: RE2, the wildcard matcher
            compile_predicate(op, value)
        except PatternError as exc:
            raise _pattern_error(f"{path}.value", exc) from None
    if op in ("before", "after") and parse_iso_ms(value) is None:
        raise DefinitionError(f"{path}.value", f"operator {op!r} needs an ISO-8601 date")
    if op in DURATION_OPERATORS:
        _duration(value, f"{path}.value")


def _pattern_error(path: str, exc: PatternError) -> DefinitionError:
    reason = "limits" if exc.reason == "pattern_size" else "pattern"
    return DefinitionError(path, exc.message, reason=reason)


def _times(value: Any, path: str) -> None:
    obj = _object(value, path, 'a count comparison like {"gte": 3}')
    if len(obj) != 1:
        raise DefinitionError(path, "expected exactly one of eq, gte, gt, lte, lt")
    ((op, number),) = obj.items()
    if op not in COUNT_OPS:
        raise DefinitionError(
            f"{path}.{op}", "expected one of eq, gte, gt, lte, lt", _suggest(op, COUNT_OPS)
        )
    if isinstance(number, bool) or not isinstance(number, int) or number < 0:
        raise DefinitionError(f"{path}.{op}", f"expected a non-negative integer, got {number!r}")


def _event_filter(value: Any, path: str, fields: tuple[str, ...]) -> Mapping[str, Any]:
    obj = _object(value, path, "an event filter {event, where?, within?}")
    _check_fields(obj, fields, path)
    _string(obj.get("event"), f"{path}.event")
    if "where" in obj:
        validate_filters(obj["where"], f"{path}.where")
    if "within" in obj and "between" in fields:  # `performed`: a calendar window too
        _window(obj["within"], f"{path}.within")
    elif "within" in obj:  # funnel steps and follow-ups: a duration
        _duration(obj["within"], f"{path}.within")
    return obj


def validate_condition(value: Any, path: str) -> None:
    obj = _object(value, path, "a condition")
    if len(obj) != 1:
        raise DefinitionError(
            path,
            f"a condition object has exactly one key (one of {', '.join(CONDITIONS)}), "
            f"got {len(obj)}: {', '.join(obj) or 'none'}",
        )
    ((name, body),) = obj.items()
    here = f"{path}.{name}"
    if name not in CONDITIONS:
        raise DefinitionError(
            here,
            f"unknown condition; expected one of {', '.join(CONDITIONS)}",
            _suggest(name, CONDITIONS),
        )
    if name in ("all", "any"):
        if not isinstance(body, list) or not body:
            raise DefinitionError(
                here, f"expected a non-empty list of conditions, got {_type(body)}"
            )
        for index, child in enumerate(body):
            validate_condition(child, f"{here}[{index}]")
    elif name == "not":
        validate_condition(body, here)
    elif name == "performed":
        _counted(_event_filter(body, here, PERFORMED_FIELDS), here)
    elif name in ("page_viewed", "screen_viewed"):
        view = _object(body, here, "a view filter {url?, name?, where?, times?, within?}")
        _check_fields(view, PAGE_FIELDS if name == "page_viewed" else SCREEN_FIELDS, here)
        for field in ("url", "name"):
            if field in view:
                _string(view[field], f"{here}.{field}")
        if "url" in view:
            try:
                Wildcard(view["url"], anchored=True)
            except PatternError as exc:
                raise _pattern_error(f"{here}.url", exc) from None
        if "where" in view:
            validate_filters(view["where"], f"{here}.where")
        if "within" in view:
            _window(view["within"], f"{here}.within")
        _counted(view, here)
    elif name == "device":
        device = _object(body, here, "a device condition {type, push_enabled?}")
        _check_fields(device, DEVICE_FIELDS, here)
        if device.get("type") not in DEVICE_TYPES:
            raise DefinitionError(
                f"{here}.type",
                f"expected one of {', '.join(DEVICE_TYPES)}, got {device.get('type')!r}",
                _suggest(str(device.get("type")), DEVICE_TYPES),
            )
        if "push_enabled" in device and not isinstance(device["push_enabled"], bool):
            raise DefinitionError(f"{here}.push_enabled", "expected true or false")
    elif name == "computed":
        computed = _object(body, here, "a computed-trait comparison {name, op, value}")
        _check_fields(computed, TRAIT_FIELDS, here)
        name_value = computed.get("name")
        if not isinstance(name_value, str) or not KEY_PATTERN.match(name_value):
            raise DefinitionError(
                f"{here}.name", f"expected a computed trait key, got {name_value!r}"
            )
        validate_operator(computed, here)
    elif name == "trait":
        trait = _object(body, here, "a trait condition {name, op, value}")
        _check_fields(trait, TRAIT_FIELDS, here)
        _string(trait.get("name"), f"{here}.name")
        validate_operator(trait, here)
    elif name == "account":
        raise DefinitionError(
            here, 'account conditions are only allowed in definitions with "subject": "account"'
        )
    elif name == "random_bucket":
        validate_random_bucket(body, here)
    elif name == "in_audience":
        if not isinstance(body, str) or not KEY_PATTERN.match(body):
            raise DefinitionError(here, f"expected an audience key, got {body!r}")
    elif name == "sequence":
        seq = _object(body, here, "a sequence {steps, then?, then_not?, match_on?, active_for?}")
        _check_fields(seq, SEQUENCE_FIELDS, here)
        steps = seq.get("steps")
        if not isinstance(steps, list) or not steps:
            raise DefinitionError(f"{here}.steps", "expected a non-empty list of event filters")
        for index, step in enumerate(steps):
            _event_filter(step, f"{here}.steps[{index}]", STEP_FIELDS)
        if "then" in seq and "then_not" in seq:
            raise DefinitionError(f"{here}.then_not", "use either then or then_not, not both")
        for follow in ("then", "then_not"):
            if follow in seq:
                follow_up = _event_filter(seq[follow], f"{here}.{follow}", STEP_FIELDS)
                if "within" not in follow_up:
                    raise DefinitionError(f"{here}.{follow}.within", "a follow-up needs a within")
        if "match_on" in seq:
            _string(seq["match_on"], f"{here}.match_on")
        if "active_for" in seq:
            _duration(seq["active_for"], f"{here}.active_for")


def _counted(obj: Mapping[str, Any], here: str) -> None:
    """`times` and `between` of performed/page_viewed/screen_viewed."""
    if "times" in obj:
        _times(obj["times"], f"{here}.times")
    if "between" in obj:
        between = obj["between"]
        if "within" in obj:
            raise DefinitionError(f"{here}.between", "use either within or between, not both")
        if not isinstance(between, list) or len(between) != 2:
            raise DefinitionError(f"{here}.between", 'expected [D1, D2], e.g. ["7d", "30d"]')
        near = _duration(between[0], f"{here}.between[0]")
        far = _duration(between[1], f"{here}.between[1]")
        if near >= far:
            raise DefinitionError(f"{here}.between", "expected D1 < D2")


def _validate_trait(obj: Mapping[str, Any]) -> None:
    _check_fields(obj, TRAIT_DEFINITION_FIELDS, "$")
    kind = obj.get("kind")
    if kind not in KINDS:
        raise DefinitionError(
            "$.kind",
            f"expected one of {', '.join(KINDS)}, got {kind!r}",
            _suggest(str(kind), KINDS),
        )
    _string(obj.get("event"), "$.event")
    if kind != "count":
        if "property" not in obj:
            raise DefinitionError("$.property", f"a {kind} trait needs a property path")
        _string(obj["property"], "$.property")
    elif "property" in obj:
        _string(obj["property"], "$.property")
    if "where" in obj:
        validate_filters(obj["where"], "$.where")
    if "within" in obj:
        _window(obj["within"], "$.within")


def validate_definition(doc: Any) -> dict[str, Any]:
    """Check an audience or computed-trait document; returns it (as a dict) or raises
    DefinitionError."""
    obj = _object(doc, "$", "a definition")
    check_limits(obj)  # first: what follows recurses, and compiles patterns
    key = obj.get("key")
    if is_trait_definition(obj):
        _validate_trait(obj)
    elif is_priority_list(obj):
        validate_priority_list(obj)
    else:
        _check_fields(obj, AUDIENCE_FIELDS, "$")
    if not isinstance(key, str) or not KEY_PATTERN.match(key):
        raise DefinitionError(
            "$.key", f"expected a key matching {KEY_PATTERN.pattern}, got {key!r}"
        )
    if "created_at" in obj and parse_iso_ms(obj["created_at"]) is None:
        raise DefinitionError("$.created_at", "expected an ISO-8601 time")
    for field in ("name", "description"):
        if field in obj and not isinstance(obj[field], str):
            raise DefinitionError(f"$.{field}", f"expected a string, got {_type(obj[field])}")
    for field in ("include_anonymous", "backfill"):
        if field in obj and not isinstance(obj[field], bool):
            raise DefinitionError(f"$.{field}", f"expected true or false, got {_type(obj[field])}")
    if "version" in obj and (
        isinstance(obj["version"], bool) or not isinstance(obj["version"], int)
    ):
        raise DefinitionError("$.version", f"expected an integer, got {_type(obj['version'])}")
    if is_trait_definition(obj) or is_priority_list(obj):
        return dict(obj)
    if "condition" not in obj:
        raise DefinitionError("$.condition", "a definition needs a condition")
    subject = obj.get("subject", "user")
    if subject not in SUBJECTS:
        raise DefinitionError(
            "$.subject",
            f"expected one of {', '.join(SUBJECTS)}, got {subject!r}",
            _suggest(str(subject), SUBJECTS),
        )
    if subject == "account":
        validate_account_condition(
            obj["condition"], "$.condition", validate_condition, validate_operator, _suggest
        )
    else:
        validate_condition(obj["condition"], "$.condition")
    if "salt" in obj:
        validate_salt(obj["salt"], "$.salt")
    if "holdout" in obj:
        validate_holdout(obj["holdout"], "$.holdout")
    return dict(obj)


def find_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """A cycle of audience keys in `graph` (key -> referenced keys), or None.

    Depth-first with an explicit stack: a chain of thousands of audiences, each
    referring to the next, is walked without recursion."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in sorted(graph):
        if root in state:
            continue
        state[root] = 1
        trail: list[str] = [root]
        pending: list[Iterator[str]] = [iter(sorted(graph.get(root, ())))]
        while pending:
            ref = next(pending[-1], None)
            if ref is None:
                pending.pop()
                state[trail.pop()] = 2
            elif state.get(ref) == 1:
                return [*trail[trail.index(ref) :], ref]
            elif state.get(ref) is None and ref in graph:
                state[ref] = 1
                trail.append(ref)
                pending.append(iter(sorted(graph.get(ref, ()))))
    return None


def check_references(doc: Mapping[str, Any], existing: Mapping[str, Mapping[str, Any]]) -> None:
    """Reject unknown in_audience / computed keys and reference cycles, given the other
    definitions (audiences and computed traits share one key space)."""
    other = existing.get(doc["key"])
    if other is not None and _kind_of(other) != _kind_of(doc):
        raise DefinitionError("$.key", f"{doc['key']!r} is already {_kind_of(other)}")
    if is_trait_definition(doc):
        return
    if is_priority_list(doc):
        check_priority_references(doc, existing)
        _check_cycles(doc, existing, "$.audiences")
        return
    traits = {key for key, d in existing.items() if is_trait_definition(d)}
    for ref in sorted(trait_references(doc["condition"])):
        if ref not in traits:
            raise DefinitionError(
                "$.condition",
                f"computed refers to unknown computed trait {ref!r}",
                _suggest(ref, traits),
            )
    lists = {k for k, d in existing.items() if is_priority_list(d)}
    existing = {k: d for k, d in existing.items() if not is_trait_definition(d)}
    refs = audience_references(doc["condition"])
    known = set(existing) - lists | {doc["key"]}
    for ref in sorted(refs):
        if ref in lists:
            raise DefinitionError(
                "$.condition",
                f"in_audience refers to priority list {ref!r}; refer to one of its audiences",
            )
        if ref not in known:
            raise DefinitionError(
                "$.condition",
                f"in_audience refers to unknown audience {ref!r}",
                _suggest(ref, known),
            )
    _check_cycles(doc, existing, "$.condition")


def _kind_of(doc: Mapping[str, Any]) -> str:
    if is_trait_definition(doc):
        return "a computed trait"
    return "a priority list" if is_priority_list(doc) else "an audience"


def _check_cycles(
    doc: Mapping[str, Any], existing: Mapping[str, Mapping[str, Any]], path: str
) -> None:
    """No cycle through `in_audience` and priority lists (an audience listed after K
    depends on K) once `doc` replaces its key in `existing` (audiences and lists)."""
    documents = {k: d for k, d in existing.items() if not is_trait_definition(d)}
    documents[doc["key"]] = doc
    graph = {
        key: audience_references(other["condition"])
        for key, other in documents.items()
        if not is_priority_list(other)
    }
    for key, higher in priority_edges(documents).items():
        graph.setdefault(key, set()).update(higher)
    cycle = find_cycle(graph)
    if cycle:
        what = "in_audience" if path == "$.condition" else "the priority list"
        raise DefinitionError(path, f"{what} forms a cycle: " + " -> ".join(cycle))
