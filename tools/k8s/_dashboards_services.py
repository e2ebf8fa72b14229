"""The provider dashboard (creates, throttling, webhooks, reconciles) and the client-delivery dashboard
(webhook deliveries, endpoints, backlog).
"""

from __future__ import annotations

from _dashboards_model import NS, Panel, Row, q, quantiles


def provider() -> list[Row]:
    return [
        Row(
            "Predictions",
            [
                Panel(
                    "Predictions in flight by submit state",
                    [
                        q(
                            f"max by (state) (conveyor_adapter_predictions_in_flight{{{NS}}})",
                            "{{state}}",
                        )
                    ],
                    stack=True,
                    description="Attempts at the provider, from the scheduler's ListInFlight.",
                ),
                Panel(
                    "Dispatch backlog and adapter replicas",
                    [
                        q(
                            f'max(conveyor_adapter_predictions_in_flight{{{NS},state="dispatched"}})',
                            "dispatched, not begun",
                        ),
                        q(
                            "sum(max by (partition) (conveyor_kafka_consumer_lag"
                            f'{{{NS},group="provider-adapter",topic="conveyor.provider.v1.commands"}}))',
                            "commands lag",
                        ),
                        q(
                            'count(count by (pod) (conveyor_kafka_consumer_lag{namespace="$namespace",group="provider-adapter"}))',
                            "adapter replicas consuming",
                        ),
                    ],
                    description="The signals the provider-adapter autoscaler uses (20 per replica each).",
                ),
                Panel(
                    "Creates by outcome",
                    [
                        q(
                            f"sum by (outcome) (rate(conveyor_adapter_creates_total{{{NS}}}[$__rate_interval]))",
                            "{{outcome}}",
                        )
                    ],
                    unit="ops",
                ),
                Panel(
                    "Create latency", quantiles("conveyor_adapter_create_seconds", "form"), unit="s"
                ),
            ],
        ),
        Row(
            "Rate limits",
            [
                Panel(
                    "429 answers by call",
                    [
                        q(
                            f"sum by (call) (rate(conveyor_adapter_rate_limited_total{{{NS}}}[$__rate_interval]))",
                            "{{call}}",
                        )
                    ],
                    unit="ops",
                ),
                Panel(
                    "Time creates spent waiting for the rate limiter",
                    [
                        q(
                            f"sum(rate(conveyor_adapter_create_wait_seconds_total{{{NS}}}[$__rate_interval]))",
                            "seconds waited per second",
                        )
                    ],
                ),
            ],
        ),
        Row(
            "Webhooks",
            [
                Panel(
                    "Webhook deliveries by outcome",
                    [
                        q(
                            f"sum by (outcome) (rate(conveyor_adapter_webhooks_total{{{NS}}}[$__rate_interval]))",
                            "{{outcome}}",
                        )
                    ],
                    unit="ops",
                ),
                Panel(
                    "Rejected webhooks by reason",
                    [
                        q(
                            f"sum by (reason) (rate(conveyor_adapter_webhooks_rejected_total{{{NS}}}[$__rate_interval]))",
                            "{{reason}}",
                        )
                    ],
                    unit="ops",
                ),
                Panel(
                    "Webhook queue depth",
                    [q(f"sum by (pod) (conveyor_adapter_webhook_queue_depth{{{NS}}})", "{{pod}}")],
                ),
                Panel(
                    "Results published by outcome and source",
                    [
                        q(
                            f"sum by (outcome, source) (rate(conveyor_adapter_results_published_total{{{NS}}}[$__rate_interval]))",
                            "{{outcome}} ({{source}})",
                        ),
                        q(
                            f"sum(rate(conveyor_adapter_result_publish_failures_total{{{NS}}}[$__rate_interval]))",
                            "publish failures",
                        ),
                    ],
                    unit="ops",
                ),
            ],
        ),
        Row(
            "Reconciler, cancels and outputs",
            [
                Panel(
                    "Reconciler actions and cancels",
                    [
                        q(
                            f"sum by (action) (rate(conveyor_adapter_reconcile_actions_total{{{NS}}}[$__rate_interval]))",
                            "reconcile {{action}}",
                        ),
                        q(
                            f"sum by (outcome) (rate(conveyor_adapter_cancels_total{{{NS}}}[$__rate_interval]))",
                            "cancel {{outcome}}",
                        ),
                    ],
                    unit="ops",
                ),
                Panel(
                    "Output copies",
                    [
                        q(
                            f"sum by (backend) (rate(conveyor_adapter_output_copy_bytes_total{{{NS}}}[$__rate_interval]))",
                            "bytes/s {{backend}}",
                        ),
                        q(
                            f"sum by (reason) (rate(conveyor_adapter_output_copy_failures_total{{{NS}}}[$__rate_interval]))",
                            "failures {{reason}}",
                        ),
                    ],
                ),
            ],
        ),
    ]


def delivery() -> list[Row]:
    return [
        Row(
            "Watchers",
            [
                Panel(
                    "Active watchers by scope",
                    [q(f"sum by (scope) (conveyor_notifier_active_watchers{{{NS}}})", "{{scope}}")],
                    stack=True,
                ),
                Panel(
                    "Watch events and ended streams",
                    [
                        q(
                            f"sum by (outcome) (rate(conveyor_notifier_watch_events_total{{{NS}}}[$__rate_interval]))",
                            "events {{outcome}}",
                        ),
                        q(
                            f"sum by (reason) (rate(conveyor_notifier_watch_streams_ended_total{{{NS}}}[$__rate_interval]))",
                            "ended {{reason}}",
                        ),
                    ],
                    unit="ops",
                ),
                Panel(
                    "Task events lag (watch broadcast and webhook group)",
                    [
                        q(
                            "sum by (group) (max by (group, partition) (conveyor_kafka_consumer_lag"
                            f'{{{NS},topic="conveyor.tasks.v1.events"}}))',
                            "{{group}}",
                        )
                    ],
                    width=24,
                ),
            ],
        ),
        Row(
            "Webhook deliveries",
            [
                Panel(
                    "Delivery attempts by outcome",
                    [
                        q(
                            f"sum by (outcome) (rate(conveyor_notifier_deliveries_total{{{NS}}}[$__rate_interval]))",
                            "{{outcome}}",
                        ),
                        q(
                            f"sum(rate(conveyor_notifier_deliveries_enqueued_total{{{NS}}}[$__rate_interval]))",
                            "enqueued",
                        ),
                    ],
                    unit="ops",
                ),
                Panel(
                    "Delivery backlog",
                    [
                        q(
                            f"max by (state) (conveyor_notifier_delivery_backlog{{{NS}}})",
                            "{{state}}",
                        ),
                        q(
                            f"max(conveyor_notifier_delivery_oldest_due_seconds{{{NS}}})",
                            "oldest due (s)",
                        ),
                    ],
                ),
                Panel(
                    "Attempt duration", quantiles("conveyor_notifier_delivery_seconds"), unit="s"
                ),
                Panel(
                    "Event to delivery",
                    quantiles("conveyor_notifier_delivery_lag_seconds"),
                    unit="s",
                ),
                Panel(
                    "Disabled endpoints",
                    [q(f"max(conveyor_notifier_disabled_endpoints{{{NS}}})", "disabled")],
                    kind="stat",
                    width=6,
                ),
                Panel(
                    "Provider throttled for",
                    [
                        q(
                            f"max by (provider) (conveyor_notifier_provider_throttled_seconds{{{NS}}})",
                            "{{provider}}",
                        )
                    ],
                    unit="s",
                    kind="stat",
                    width=6,
                ),
                Panel(
                    "Operations alerts",
                    [
                        q(
                            f"sum by (kind, outcome) (increase(conveyor_notifier_ops_alerts_total{{{NS}}}[$__rate_interval]))",
                            "{{kind}} {{outcome}}",
                        )
                    ],
                ),
            ],
        ),
    ]
