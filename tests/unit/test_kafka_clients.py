"""Consumer-group names are a contract with operators (committed offsets, lag dashboards,
ACLs): renaming one makes a sink send everything again. Pinned here."""

from __future__ import annotations

from audiences.adapters.kafka.clients import KafkaClients
from audiences.adapters.settings import Settings


def test_the_sinks_and_the_dlq_replay_keep_their_group_names() -> None:
    clients = KafkaClients(Settings(app_id="shop"))
    assert clients.sink_group("braze") == "shop-sink-braze"
    assert clients.dlq_replay_group("braze") == "shop-dlq-replay-braze"
