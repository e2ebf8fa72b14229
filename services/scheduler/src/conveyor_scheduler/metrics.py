"""Prometheus metrics of the scheduler (``conveyor_scheduler_*``), on an injected registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from conveyor_common.metrics import LATENCY_BUCKETS, WAIT_BUCKETS


class SchedulerMetrics:
    """Dashboards and autoscaling signals."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.queue_depth = Gauge(
            "conveyor_scheduler_queue_depth",
            "Queued tasks by kind and priority class (refreshed by the leader).",
            ["kind", "priority"],
            registry=registry,
        )
        self.active_slots = Gauge(
            "conveyor_scheduler_active_slots",
            "Slots held by dispatched or running tasks, by scope (global, kind:<k>, model:<m>).",
            ["scope"],
            registry=registry,
        )
        self.slot_limit = Gauge(
            "conveyor_scheduler_slot_limit",
            "Slot limit by scope (global, kind:<k>, model:<m>).",
            ["scope"],
            registry=registry,
        )
        self.queue_wait = Histogram(
            "conveyor_scheduler_queue_wait_seconds",
            "Time from enqueue (or retry backoff end) to dispatch.",
            ["kind"],
            buckets=WAIT_BUCKETS,
            registry=registry,
        )
        self.dispatch_latency = Histogram(
            "conveyor_scheduler_dispatch_cycle_seconds",
            "Duration of a dispatch cycle that dispatched something (wake-up to commit).",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.submit_group_size = Histogram(
            "conveyor_scheduler_submit_group_size",
            "Single submits committed together by one group-commit transaction.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=registry,
        )
        self.submit_group_seconds = Histogram(
            "conveyor_scheduler_submit_group_seconds",
            "Duration of one group-commit transaction (begin to commit).",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.dispatched = Counter(
            "conveyor_scheduler_dispatched_total",
            "Tasks dispatched, by kind.",
            ["kind"],
            registry=registry,
        )
        self.retries = Counter(
            "conveyor_scheduler_retries_total", "Retries scheduled.", registry=registry
        )
        self.dead_lettered = Counter(
            "conveyor_scheduler_dead_lettered_total", "Tasks dead-lettered.", registry=registry
        )
        self.terminal = Counter(
            "conveyor_scheduler_terminal_total",
            "Tasks reaching a terminal status, by status.",
            ["status"],
            registry=registry,
        )
        self.admission_rejected = Counter(
            "conveyor_scheduler_admission_rejections_total",
            "Submits rejected by admission control, by subject kind.",
            ["reason"],
            registry=registry,
        )
        self.submitted = Counter(
            "conveyor_scheduler_submitted_total",
            "Tasks admitted (deduplicated submits excluded).",
            registry=registry,
        )
        self.outbox_pending = Gauge(
            "conveyor_scheduler_outbox_pending",
            "Unpublished outbox rows seen by the relay's last pass.",
            registry=registry,
        )
        self.outbox_lag = Gauge(
            "conveyor_scheduler_outbox_lag_seconds",
            "Age of the oldest unpublished outbox row.",
            registry=registry,
        )
        self.outbox_published = Counter(
            "conveyor_scheduler_outbox_published_total",
            "Outbox records published.",
            registry=registry,
        )
        self.leader = Gauge(
            "conveyor_scheduler_leader", "1 when this replica is the leader.", registry=registry
        )
        self.results_applied = Counter(
            "conveyor_scheduler_results_total",
            "Provider results consumed, by outcome.",
            ["outcome"],
            registry=registry,
        )
        self.rescued = Counter(
            "conveyor_scheduler_rescued_dispatches_total",
            "DispatchTask commands re-emitted because no adapter confirmed them in time.",
            registry=registry,
        )
        self.expired = Counter(
            "conveyor_scheduler_expired_total",
            "Tasks expired before dispatch.",
            registry=registry,
        )
