"""Names of the definition language and walks over condition trees.

Validation (`validate.py`), compilation (`catalog.py`) and computed traits
(`traits.py`) all need these; they live here, below all three, so that no
module of the core imports another in a circle.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

CONDITIONS = (
    "all",
    "any",
    "not",
    "performed",
    "trait",
    "in_audience",
    "sequence",
    "page_viewed",
    "screen_viewed",
    "device",
    "computed",
    "account",  # only in definitions with "subject": "account" (accounts.py)
    "random_bucket",
)
# Kinds of computed traits (SPEC §3).
KINDS = (
    "count",
    "sum",
    "avg",
    "min",
    "max",
    "first",
    "last",
    "most_frequent",
    "unique_list",
    "unique_count",
)
NUMERIC_KINDS = frozenset({"sum", "avg", "min", "max"})


PRIORITY_LIST = "priority_list"  # the `kind` of a priority list (SPEC §3)


def is_trait_definition(doc: Mapping[str, Any]) -> bool:
    """Computed traits share the definitions topic; they have `kind`, not `condition`
    (a priority list has `kind` too, and is no computed trait)."""
    return "kind" in doc and doc["kind"] != PRIORITY_LIST


def is_priority_list(doc: Mapping[str, Any]) -> bool:
    """A priority list (`"kind": "priority_list"`): an audience-like definition without
    a condition, making its listed audiences exclusive (see `priority.py`)."""
    return doc.get("kind") == PRIORITY_LIST


def leaf_values(condition: Any, leaf: str, pick: Callable[[Any], str]) -> set[str]:
    """`pick(body)` of every `leaf` condition in a (valid) condition tree."""
    found: set[str] = set()
    stack = [condition]
    while stack:
        node = stack.pop()
        ((name, body),) = node.items()
        if name in ("all", "any"):
            stack.extend(body)
        elif name == "not":
            stack.append(body)
        elif name == "account":  # the user condition of an account audience
            stack.extend(body[q] for q in ("any", "all", "none") if q in body)
        elif name == leaf:
            found.add(pick(body))
    return found


def audience_references(condition: Any) -> set[str]:
    """Keys of the audiences a (valid) condition refers to with in_audience."""
    return leaf_values(condition, "in_audience", str)


def trait_references(condition: Any) -> set[str]:
    """Keys of the computed traits a (valid) audience condition compares."""
    return leaf_values(condition, "computed", lambda body: str(body["name"]))
