"""The headers of an `events-dlq` record (SPEC §1), written by the evaluator (a record it
cannot use) and by the collector (an item it cannot turn into an event): one shape for
every dead letter of input.

The value is the original bytes (the collector's: the item as the client sent it, less
`writeKey`); the headers say why and where it came from. A record that never reached a
topic (the collector's) has an empty `source_topic` and `-1` as partition and offset.
"""

from __future__ import annotations

MAX_ERROR_BYTES = 2000  # a readable line, not a dump of the input


def dead_letter_headers(
    reason: str,
    detail: str,
    source_topic: str = "",
    source_partition: int = -1,
    source_offset: int = -1,
) -> list[tuple[str, bytes]]:
    """`error` (one readable line), `error_reason` (a bounded code, the metric's label) and
    the source of the record."""
    return [
        ("error", detail.encode("utf-8", "replace")[:MAX_ERROR_BYTES]),
        ("error_reason", reason.encode()),
        ("source_topic", source_topic.encode()),
        ("source_partition", str(source_partition).encode()),
        ("source_offset", str(source_offset).encode()),
    ]
