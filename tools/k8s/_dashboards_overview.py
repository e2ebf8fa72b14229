"""The overview dashboard: queue, admission, dispatch, limits, task outcomes, latency and the leader."""

from __future__ import annotations

from _dashboards_model import GLOBAL, NS, Panel, Row, leader_only, q, quantiles


def overview() -> list[Row]:
    return [
        Row(
            "Throughput",
            [
                Panel(
                    "Tasks submitted, dispatched and finished",
                    [
                        q(
                            f"sum(rate(conveyor_scheduler_submitted_total{{{NS}}}[$__rate_interval]))",
                            "submitted",
                        ),
                        q(
                            f"sum(rate(conveyor_scheduler_dispatched_total{{{NS}}}[$__rate_interval]))",
                            "dispatched",
                        ),
                        q(
                            f"sum by (status) (rate(conveyor_scheduler_terminal_total{{{NS}}}[$__rate_interval]))",
                            "{{status}}",
                        ),
                    ],
                    unit="ops",
                ),
                Panel(
                    "Retries, dead letters and admission rejections",
                    [
                        q(
                            f"sum(rate(conveyor_scheduler_retries_total{{{NS}}}[$__rate_interval]))",
                            "retries",
                        ),
                        q(
                            f"sum(rate(conveyor_scheduler_dead_lettered_total{{{NS}}}[$__rate_interval]))",
                            "dead-lettered",
                        ),
                        q(
                            f"sum(rate(conveyor_scheduler_expired_total{{{NS}}}[$__rate_interval]))",
                            "expired",
                        ),
                        q(
                            f"sum by (reason) (rate(conveyor_scheduler_admission_rejections_total{{{NS}}}[$__rate_interval]))",
                            "rejected: {{reason}}",
                        ),
                    ],
                    unit="ops",
                ),
            ],
        ),
        Row(
            "Queue and slots",
            [
                Panel(
                    "Queue depth by priority",
                    [
                        q(
                            f"sum by (priority) ({leader_only('conveyor_scheduler_queue_depth')})",
                            "{{priority}}",
                        )
                    ],
                    stack=True,
                    description="Queued tasks by priority class, as refreshed by the scheduler leader.",
                ),
                Panel(
                    "Queue depth by kind",
                    [
                        q(
                            f"sum by (kind) ({leader_only('conveyor_scheduler_queue_depth')})",
                            "{{kind}}",
                        )
                    ],
                    stack=True,
                ),
                Panel(
                    "Slots in use against limits",
                    [
                        q(
                            f"max by (scope) ({leader_only('conveyor_scheduler_active_slots')})",
                            "in use {{scope}}",
                        ),
                        q(
                            f"max by (scope) ({leader_only('conveyor_scheduler_slot_limit')})",
                            "limit {{scope}}",
                        ),
                    ],
                    description="Slot-cost weighted concurrency per scope (global, kind:<k>, model:<m>).",
                ),
                Panel(
                    "Global slot saturation",
                    [
                        q(
                            f"max({leader_only('conveyor_scheduler_active_slots', GLOBAL)})"
                            f" / max({leader_only('conveyor_scheduler_slot_limit', GLOBAL)})",
                            "used / limit",
                        )
                    ],
                    unit="percentunit",
                    kind="gauge",
                    width=6,
                ),
                Panel(
                    "Scheduler leader",
                    [q(f"sum(conveyor_scheduler_leader{{{NS}}})", "replicas leading")],
                    kind="stat",
                    width=6,
                    description="Must be 1. 0 for a minute fires ConveyorNoSchedulerLeader.",
                ),
            ],
        ),
        Row(
            "Latency",
            [
                Panel(
                    "Queue wait (enqueue to dispatch)",
                    quantiles("conveyor_scheduler_queue_wait_seconds"),
                    unit="s",
                ),
                Panel(
                    "Dispatch cycle",
                    quantiles("conveyor_scheduler_dispatch_cycle_seconds"),
                    unit="s",
                ),
                Panel(
                    "gRPC handling time p95 by service",
                    [
                        q(
                            "histogram_quantile(0.95, sum by (le, service) "
                            f"(rate(conveyor_grpc_server_handling_seconds_bucket{{{NS}}}[$__rate_interval])))",
                            "{{service}}",
                        )
                    ],
                    unit="s",
                ),
                Panel(
                    "Database pool (scheduler)",
                    [
                        q(
                            f"sum by (pod) (conveyor_db_pool_checked_out{{{NS}}})",
                            "in use {{pod}}",
                        ),
                        q(
                            f"max(conveyor_db_pool_size{{{NS}}} + conveyor_db_pool_max_overflow{{{NS}}})",
                            "pool + overflow",
                        ),
                        q(
                            "histogram_quantile(0.99, sum by (le) "
                            f"(rate(conveyor_db_pool_wait_seconds_bucket{{{NS}}}[$__rate_interval])))",
                            "checkout wait p99 (s)",
                        ),
                        q(
                            f"sum(rate(conveyor_db_pool_timeouts_total{{{NS}}}[$__rate_interval]))",
                            "checkout timeouts/s",
                        ),
                    ],
                    description="Connections each scheduler replica holds against its pool, and how long checkouts wait.",
                ),
                Panel(
                    "Outbox: oldest unpublished row and pending rows",
                    [
                        q(f"max(conveyor_scheduler_outbox_lag_seconds{{{NS}}})", "lag (s)"),
                        q(f"max(conveyor_scheduler_outbox_pending{{{NS}}})", "pending rows"),
                        q(
                            f"sum(rate(conveyor_scheduler_outbox_published_total{{{NS}}}[$__rate_interval]))",
                            "published/s",
                        ),
                    ],
                ),
            ],
        ),
        Row(
            "Errors",
            [
                Panel(
                    "gRPC calls by service and code",
                    [
                        q(
                            f"sum by (service, grpc_code) (rate(conveyor_grpc_server_handled_total{{{NS}}}[$__rate_interval]))",
                            "{{service}} {{grpc_code}}",
                        )
                    ],
                    unit="reqps",
                ),
                Panel(
                    "gRPC server errors by method",
                    [
                        q(
                            "sum by (service, grpc_method, grpc_code) (rate(conveyor_grpc_server_handled_total"
                            f'{{{NS},grpc_code=~"UNKNOWN|INTERNAL|UNAVAILABLE|DEADLINE_EXCEEDED|DATA_LOSS"}}'
                            "[$__rate_interval]))",
                            "{{service}} {{grpc_method}} {{grpc_code}}",
                        )
                    ],
                    unit="reqps",
                ),
                Panel(
                    "Kafka records by outcome",
                    [
                        q(
                            f"sum by (service, outcome) (rate(conveyor_kafka_consumed_total{{{NS}}}[$__rate_interval]))",
                            "{{service}} {{outcome}}",
                        )
                    ],
                    unit="ops",
                ),
                Panel(
                    "Consumer lag by group and topic",
                    [
                        q(
                            "sum by (group, topic) (max by (group, topic, partition) "
                            f"(conveyor_kafka_consumer_lag{{{NS}}}))",
                            "{{group}} {{topic}}",
                        )
                    ],
                ),
            ],
        ),
        Row(
            "Task groups",
            [
                Panel(
                    "Groups by status and children created",
                    [
                        q(
                            f"max by (status) (conveyor_scheduler_groups{{{NS}}})",
                            "groups {{status}}",
                        ),
                        q(
                            f"sum(rate(conveyor_scheduler_group_children_created_total{{{NS}}}[$__rate_interval]))",
                            "children created /s",
                        ),
                        q(
                            f"sum(rate(conveyor_scheduler_group_follow_ups_total{{{NS}}}[$__rate_interval]))",
                            "follow-ups /s",
                        ),
                    ],
                    description="Groups by status (every scheduler replica reports the same "
                    "table count; max shows it once), children admitted and fan-in follow-ups "
                    "submitted per second.",
                ),
                Panel(
                    "Mean progress of running groups",
                    [
                        q(
                            f"max(conveyor_scheduler_groups_running_progress_percent{{{NS}}})",
                            "mean progress",
                        )
                    ],
                    unit="percent",
                    description="Aggregate progress (children done, weighted by each child's "
                    "progress) averaged over the running groups.",
                ),
            ],
        ),
        Row(
            "Autoscaling",
            [
                Panel(
                    "Replicas desired and current (kube-state-metrics)",
                    [
                        q(
                            f"max by (horizontalpodautoscaler) (kube_horizontalpodautoscaler_status_desired_replicas{{{NS}}})",
                            "desired {{horizontalpodautoscaler}}",
                        ),
                        q(
                            f"max by (horizontalpodautoscaler) (kube_horizontalpodautoscaler_status_current_replicas{{{NS}}})",
                            "current {{horizontalpodautoscaler}}",
                        ),
                    ],
                    width=24,
                ),
            ],
        ),
    ]
