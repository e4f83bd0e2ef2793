"""Size limits of a definition (SPEC §11), checked before anything else reads it.

A definition is untrusted input that every worker compiles, so its size is bounded:
- conditions nest at most MAX_DEPTH levels (`$.condition` is level 1; each `all`,
  `any` or `not` adds one);
- it has at most MAX_NODES nodes: every condition, sequence step or follow-up
  (`then`/`then_not`) and `where` filter counts as one;
- no JSON value in it nests deeper than MAX_JSON_DEPTH (filter values are arbitrary
  JSON; deeper ones could not even be written back as JSON);
- patterns (`matches`, `contains`/`not_contains`, page URLs) are at most
  MAX_PATTERN_BYTES long: `operators.check_pattern_size`, called by validation.

`check_limits` walks the document with an explicit stack, never recursing, and stops
at the first node over a limit: a document nested 100,000 deep is refused as cheaply
as one nested 33 deep. Validation (`validate.py`, recursive) and compilation run only
on documents that passed it.
"""

from __future__ import annotations

from typing import Any, Final

from audiences.errors import DefinitionError

MAX_DEPTH: Final = 32
MAX_NODES: Final = 1000
MAX_JSON_DEPTH: Final = 100
_COMPOSITES = ("all", "any")
_NODE_LISTS = ("where", "steps")  # each item a node
_NODE_OBJECTS = ("then", "then_not")


def _limit(path: str, message: str) -> DefinitionError:
    return DefinitionError(path, message, reason="limits")


def check_limits(doc: Any) -> None:
    """Raise DefinitionError (reason `limits`, with the JSON path of the first offending
    node) when `doc` is over a limit; any other shape problem is left to validation."""
    if not isinstance(doc, dict):
        return
    nodes = 0
    # Containers still to visit: (value, JSON path, JSON depth, condition level: 0 where
    # no condition is expected, node: whether a dict there counts as a node).
    stack: list[tuple[Any, str, int, int, bool]] = [(doc, "$", 1, 0, False)]
    while stack:
        value, path, depth, level, node = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise _limit(path, f"nested deeper than {MAX_JSON_DEPTH} levels of JSON")
        found: list[tuple[Any, str, int, int, bool]] = []
        if isinstance(value, list):
            for index, item in enumerate(value):
                if isinstance(item, dict | list):
                    found.append((item, f"{path}[{index}]", depth + 1, 0, False))
            stack.extend(reversed(found))
            continue
        if level > MAX_DEPTH:
            raise _limit(path, f"conditions nested deeper than {MAX_DEPTH} levels")
        if level or node:
            nodes += 1
            if nodes > MAX_NODES:
                raise _limit(
                    path, f"more than {MAX_NODES} nodes (conditions, sequence steps, filters)"
                )
        assert isinstance(value, dict)
        for name, child in value.items():
            if not isinstance(child, dict | list):
                continue
            here = f"{path}.{name}"
            if level and name in _COMPOSITES and isinstance(child, list):
                for index, item in enumerate(child):
                    if isinstance(item, dict | list):
                        found.append((item, f"{here}[{index}]", depth + 2, level + 1, False))
            elif level and name == "not":
                found.append((child, here, depth + 1, level + 1, False))
            elif depth == 1 and name == "condition":
                found.append((child, here, depth + 1, 1, False))
            elif name in _NODE_LISTS and isinstance(child, list):
                for index, item in enumerate(child):
                    if isinstance(item, dict | list):
                        found.append((item, f"{here}[{index}]", depth + 2, 0, True))
            else:
                found.append((child, here, depth + 1, 0, name in _NODE_OBJECTS))
        stack.extend(reversed(found))
