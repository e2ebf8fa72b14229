"""Labelled counters exist at 0 from the start, so ``rate()`` and ``increase()`` count the first
event after a start (a series born with its first increment shows no increase for it)."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from conveyor_common.standard_webhooks import RejectReason
from conveyor_notifier.metrics import NotifierMetrics
from conveyor_provider_adapter.metrics import AdapterMetrics
from conveyor_scheduler.metrics import SchedulerMetrics

NOT_ENUMERABLE = {
    # Label values only known at run time: the storage backend configured, outcome x source.
    "conveyor_adapter_output_copy_bytes",
    "conveyor_adapter_output_copy_files",
    "conveyor_adapter_results_published",
}


@pytest.mark.parametrize("cls", [SchedulerMetrics, AdapterMetrics, NotifierMetrics])
def test_every_labelled_counter_has_its_series_at_zero(cls: type) -> None:
    registry = CollectorRegistry()
    cls(registry)
    checked = 0
    for family in registry.collect():
        if family.type != "counter" or family.name in NOT_ENUMERABLE:
            continue
        totals = [s for s in family.samples if s.name.endswith("_total")]
        assert totals, f"{family.name}: no series before the first event"
        assert all(s.value == 0 for s in totals), family.name
        checked += 1
    assert checked >= 3


def test_the_label_values_alerts_and_dashboards_select_exist() -> None:
    registry = CollectorRegistry()
    SchedulerMetrics(registry)
    AdapterMetrics(registry)
    NotifierMetrics(registry)

    def has(name: str, **labels: str) -> bool:
        return registry.get_sample_value(name, labels) == 0

    for reason in ("queue", "waiting", "submit_rate", "tenant"):
        assert has("conveyor_scheduler_admission_rejections_total", reason=reason)
    for status in ("succeeded", "failed", "canceled", "dead_lettered"):
        assert has("conveyor_scheduler_terminal_total", status=status)
    assert has("conveyor_adapter_rate_limited_total", call="create")
    for outcome in ("created", "client_error", "ambiguous", "unreachable", "rate_limited"):
        assert has("conveyor_adapter_creates_total", outcome=outcome)
    for reason in RejectReason:
        assert has("conveyor_adapter_webhooks_rejected_total", reason=reason.value)
    for reason in ("host_not_allowed", "too_large", "http", "storage"):
        assert has("conveyor_adapter_output_copy_failures_total", reason=reason)
    assert has("conveyor_notifier_provider_throttled_seconds", provider="replicate")
    assert has("conveyor_notifier_deliveries_total", outcome="failed")
    assert has("conveyor_scheduler_dead_lettered_total")


def test_the_pool_families_are_declared_without_an_engine() -> None:
    registry = CollectorRegistry()
    SchedulerMetrics(registry)
    names = {f.name for f in registry.collect()}
    assert {
        "conveyor_db_pool_size",
        "conveyor_db_pool_checked_out",
        "conveyor_db_pool_overflow",
        "conveyor_db_pool_wait_seconds",
        "conveyor_db_pool_timeouts",
    } <= names
