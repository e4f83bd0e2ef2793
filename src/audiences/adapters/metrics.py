"""Every Prometheus metric of the engine, declared once (DESIGN conventions).

Labels are bounded: event type, invalid reason, audience key, direction,
partition, destination — never user ids.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from prometheus_client import Counter, Gauge, Histogram

from audiences import __version__

Metric = TypeVar("Metric", Counter, Gauge, Histogram)


class Children(Generic[Metric]):
    """A labelled metric's children by their label values, each looked up once, for the
    per-batch paths: prometheus-client's `labels()` validates the values and takes a lock
    on every call (4% of the live loop, py-spy at 26k events/s). Only for metrics whose
    series are never removed (a removed child would stay cached, and stop being exported)."""

    def __init__(self, metric: Metric) -> None:
        self._metric: Metric = metric
        self._children: dict[tuple[str, ...], Metric] = {}

    def __call__(self, *values: str) -> Metric:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


EVENTS_IN = Counter(
    "audiences_events_in", "Valid input events evaluated, by Segment type", ["type"]
)
EVENTS_INVALID = Counter(
    "audiences_events_invalid", "Input records sent to the DLQ, by reason", ["reason"]
)
EVENTS_DUPLICATE = Counter(
    "audiences_events_duplicate", "Events dropped as duplicate messageIds within 24 h"
)
EVENTS_SUPPRESSED = Counter(
    "audiences_events_suppressed", "Events dropped because their user was deleted"
)
TRANSITIONS = Counter(
    "audiences_transitions", "Membership transitions emitted", ["audience", "direction"]
)
EVENTS_IN_BY_TYPE = Children(EVENTS_IN)
TRANSITIONS_BY_AUDIENCE = Children(TRANSITIONS)
AUDIENCE_SIZE = Gauge(
    "audiences_audience_size", "Current members per audience on this worker", ["audience"]
)
BATCH_DURATION = Histogram(
    "audiences_batch_duration_seconds",
    "Time to evaluate one consumed batch (durability: audiences_checkpoint_duration_seconds)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
PROCESSING_LATENCY = Histogram(
    "audiences_processing_latency_seconds",
    "Per batch: from the Kafka timestamp of its oldest input record to its outputs being "
    "produced (event -> output latency, queueing in Kafka included)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 30.0),
)
DEADLINE_LATENESS = Histogram(
    "audiences_deadline_lateness_seconds",
    "Wall-clock delay between a deadline and its evaluation",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0),
)
CHECKPOINT_DURATION = Histogram(
    "audiences_checkpoint_duration_seconds",
    "Time from sealing an interval to its landing: outputs acknowledged, changelog "
    "transaction, store, offsets (on a thread of its own: the loop evaluates meanwhile)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
MISROUTED_EVENTS = Counter(
    "audiences_misrouted_events",
    "Records found on an `events` partition that does not own their profile (a producer "
    "not partitioning by murmur2 of the key), forwarded to the owner",
)
STATE_DROPPED = Counter(
    "audiences_state_dropped",
    "Parts of per-profile state dropped to keep it bounded (traits, timestamps, aliases, ...)",
    ["what"],
)
PROFILES_QUARANTINED = Counter(
    "audiences_profiles_quarantined",
    "Profiles that could not be evaluated (undecodable state, failing deadline or re-judging)",
    ["reason"],
)
DEFINITIONS_REJECTED = Counter(
    "audiences_definitions_rejected",
    "Definitions read from the definitions topic that are not evaluated (written around "
    "the API, or by an older version): undecodable, invalid, limits, pattern, uncompilable",
    ["key", "reason"],
)
RECOVERY_RECORDS = Counter(
    "audiences_recovery_records", "Changelog records read to restore partitions"
)
CONSUMER_LAG = Gauge("audiences_consumer_lag", "Records behind the end of `events`", ["partition"])
STATE_USERS = Gauge("audiences_state_users", "Profiles held in the state store", ["partition"])
# Every metric labelled by `partition` (of `events`): the runtime removes a partition's
# series when the partition leaves the worker (revoked, lost or fenced).
PARTITION_SERIES = (CONSUMER_LAG, STATE_USERS)
BUILD_INFO = Gauge("audiences_build_info", "Build information", ["version"])
BUILD_INFO.labels(version=__version__).set(1)

# -- collector (SPEC §7) -----------------------------------------------------------------
COLLECTOR_REQUESTS = Counter(
    "audiences_collector_requests",
    "Collector HTTP requests by endpoint (track, ..., batch, unknown) and status code",
    ["endpoint", "status"],
)
COLLECTOR_EVENTS = Counter(
    "audiences_collector_events",
    "Events the collector got acknowledged by Kafka, by Segment type",
    ["type"],
)
COLLECTOR_INVALID = Counter(
    "audiences_collector_invalid_events",
    "Items the collector dead-lettered to events-dlq instead of producing them (the request "
    "is still answered 200), by reason; also counted in audiences_events_invalid_total",
    ["reason"],
)
COLLECTOR_RATE_LIMITED = Counter(
    "audiences_collector_rate_limited",
    "Collector requests refused with 429 because their write key's rate limit was spent",
)
COLLECTOR_INFLIGHT_EVENTS = Gauge(
    "audiences_collector_inflight_events", "Events produced and not yet acknowledged by Kafka"
)
COLLECTOR_INFLIGHT_BYTES = Gauge(
    "audiences_collector_inflight_bytes", "Bytes of events produced and not yet acknowledged"
)
COLLECTOR_REQUEST_DURATION = Histogram(
    "audiences_collector_request_duration_seconds",
    "Time from a request's arrival to its answer (including Kafka's acknowledgement)",
    ["endpoint"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
)

# -- destination sinks (label `destination` = the configured name) ----------------------------
HOLDOUT_SKIPPED = Counter(
    "audiences_holdout_skipped",
    "Holdout outputs (properties.holdout: true) a destination skipped, by audience",
    ["destination", "audience"],
)
SINK_DELIVERIES = Counter(
    "audiences_sink_deliveries",
    "Output messages handled by a destination, by outcome (delivered, dead_lettered, skipped)",
    ["destination", "outcome"],
)
SINK_REQUEST_DURATION = Histogram(
    "audiences_sink_request_duration_seconds",
    "Duration of one request (attempt) to a destination",
    ["destination"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
SINK_DELIVERY_LAG = Histogram(
    "audiences_sink_delivery_lag_seconds",
    "Time from a transition's record on audience-events to its delivery (retries included)",
    ["destination"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 300.0, 3600.0),
)
SINK_RETRIES = Counter(
    "audiences_sink_retries",
    "Retried requests (connection errors, timeouts, 408, 429, 5xx)",
    ["destination"],
)
SINK_QUEUE_DEPTH = Gauge(
    "audiences_sink_queue_depth",
    "Messages consumed for a destination and not yet delivered or dead-lettered",
    ["destination"],
)
SINK_DLQ = Counter(
    "audiences_sink_dlq",
    "Messages a destination sent to audience-events-dlq, by reason",
    ["destination", "reason"],
)
DESTINATION_PAUSED = Gauge(
    "audiences_destination_paused",
    "1 while a destination is paused because it refuses our credentials (401/403): its "
    "messages are held (not dead-lettered) and a request is re-sent every "
    "auth_probe_interval_s until accepted",
    ["destination"],
)
DESTINATION_STOPPED = Gauge(
    "audiences_destination_stopped",
    "1 once a destination answered 410 Gone: nothing more is sent to it until the "
    "configuration is fixed and the worker restarted (its messages stay in Kafka)",
    ["destination"],
)
