"""Every metric labelled by partition is one the runtime removes when a partition leaves
the worker (metrics.PARTITION_SERIES); labels stay bounded (never user ids)."""

from __future__ import annotations

from prometheus_client.metrics import MetricWrapperBase

from audiences.adapters import metrics


def declared() -> dict[str, MetricWrapperBase]:
    return {
        name: value for name, value in vars(metrics).items() if isinstance(value, MetricWrapperBase)
    }


def test_every_partition_labelled_metric_is_removed_on_revoke() -> None:
    labelled = {name for name, metric in declared().items() if "partition" in metric._labelnames}
    assert {"CONSUMER_LAG", "STATE_USERS"} <= labelled
    removed = {id(metric) for metric in metrics.PARTITION_SERIES}
    for name in labelled:
        assert id(declared()[name]) in removed, f"{name} is not in metrics.PARTITION_SERIES"
    for metric in metrics.PARTITION_SERIES:  # removed by the partition number alone
        assert metric._labelnames == ("partition",)


def test_no_label_names_a_user() -> None:
    for name, metric in declared().items():
        assert not {"user", "user_id", "userId", "anonymous_id"} & set(metric._labelnames), name


def test_cached_children_are_the_metrics_own_and_never_of_a_removable_metric() -> None:
    children = metrics.Children(metrics.TRANSITIONS)
    child = children("test_children_audience", "entered")
    assert children("test_children_audience", "entered") is child
    assert child is metrics.TRANSITIONS.labels("test_children_audience", "entered")
    before = metrics.TRANSITIONS.labels("test_children_audience", "entered")._value.get()
    children("test_children_audience", "entered").inc(3)
    assert metrics.TRANSITIONS.labels("test_children_audience", "entered")._value.get() == (
        before + 3
    )
    # a series that is removed (partitions leaving, audiences deleted) must not be cached
    removable = {id(metric) for metric in (*metrics.PARTITION_SERIES, metrics.AUDIENCE_SIZE)}
    for value in vars(metrics).values():
        if isinstance(value, metrics.Children):
            assert id(value._metric) not in removable
