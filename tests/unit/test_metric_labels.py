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
