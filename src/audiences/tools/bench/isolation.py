"""Settings for one bench contender or run: nothing shared with the others."""

from __future__ import annotations

from pathlib import Path

from audiences.adapters.settings import Settings


def isolated_settings(
    base: Settings, app_id: str, events_topic: str, partitions: int, data_dir: Path
) -> Settings:
    """`base` with its own app id, input topic, data dir and every other topic named after
    `app_id` (contenders and runs never share a topic or a consumer group)."""
    return base.replace(
        app_id=app_id,
        events_topic=events_topic,
        audience_events_topic=f"{app_id}-audience-events",
        definitions_topic=f"{app_id}-definitions",
        events_dlq_topic=f"{app_id}-events-dlq",
        audience_events_dlq_topic=f"{app_id}-audience-events-dlq",
        partitions=partitions,
        data_dir=str(data_dir),
    )
