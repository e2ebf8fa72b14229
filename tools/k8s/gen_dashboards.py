"""Generate Conveyor's Grafana dashboards (provisioned JSON) from one description.

Run ``.venv/bin/python tools/k8s/gen_dashboards.py`` after editing this file; it rewrites
``deploy/k8s/components/monitoring/dashboards/*.json`` (committed, shipped as ConfigMaps by the
monitoring component). ``--check`` exits 1 when the committed JSON differs from what it would write
(tests/unit/test_k8s_dashboards.py runs it).

Conventions (docs: ecosystem notes 2.1): fixed ``uid``, ``"id": null``, a ``datasource`` variable
that every panel uses as ``${datasource}``, a ``namespace`` variable, ``$__rate_interval`` in
``rate()``/``increase()``, no ``__inputs`` (provisioning does not resolve them). Leader-refreshed
scheduler gauges are read from the leader's series only.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "deploy" / "k8s" / "components" / "monitoring" / "dashboards"

NS = 'namespace="$namespace"'
LEADER = '(conveyor_scheduler_leader{namespace="$namespace"} == 1)'
"""Series of the current scheduler leader (for gauges only the leader refreshes)."""
GLOBAL = 'scope="global"'


@dataclass
class Target:
    expr: str
    legend: str


@dataclass
class Panel:
    title: str
    targets: list[Target]
    unit: str = "short"
    kind: str = "timeseries"
    description: str = ""
    width: int = 12
    stack: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Row:
    title: str
    panels: list[Panel]


def q(expr: str, legend: str = "") -> Target:
    return Target(expr=expr, legend=legend)


def leader_only(metric: str, matchers: str = "") -> str:
    sel = f"{metric}{{{NS}{',' + matchers if matchers else ''}}}"
    return f"({sel} and on (namespace, pod) {LEADER})"


def quantiles(metric: str, by: str = "", extra: str = "") -> list[Target]:
    group = f"le{', ' + by if by else ''}"
    sel = f"{metric}_bucket{{{NS}{',' + extra if extra else ''}}}"
    label = f" {{{{{by}}}}}" if by else ""
    return [
        q(
            f"histogram_quantile({p}, sum by ({group}) (rate({sel}[$__rate_interval])))",
            f"p{int(p * 100)}{label}",
        )
        for p in (0.5, 0.95, 0.99)
    ]


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


DASHBOARDS = {
    "conveyor-overview": ("Conveyor / Overview", overview),
    "conveyor-provider": ("Conveyor / Provider", provider),
    "conveyor-delivery": ("Conveyor / Delivery", delivery),
}

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def panel_json(panel: Panel, pid: int, x: int, y: int) -> dict[str, Any]:
    targets = [
        {
            "datasource": DATASOURCE,
            "expr": t.expr,
            "legendFormat": t.legend or "__auto",
            "range": True,
            "refId": chr(ord("A") + i),
        }
        for i, t in enumerate(panel.targets)
    ]
    defaults: dict[str, Any] = {"unit": panel.unit}
    if panel.kind == "timeseries":
        defaults["custom"] = {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 10,
            "showPoints": "never",
            "stacking": {"mode": "normal" if panel.stack else "none", "group": "A"},
        }
    out: dict[str, Any] = {
        "id": pid,
        "type": panel.kind,
        "title": panel.title,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}}
        if panel.kind == "timeseries"
        else {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}},
        "targets": targets,
    }
    if panel.description:
        out["description"] = panel.description
    out.update(panel.extra)
    return out


def dashboard_json(uid: str, title: str, rows: list[Row]) -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    pid = 1
    y = 0
    for row in rows:
        panels.append(
            {
                "id": pid,
                "type": "row",
                "title": row.title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        pid += 1
        y += 1
        x = 0
        for panel in row.panels:
            if x + panel.width > 24:
                x = 0
                y += 8
            panels.append(panel_json(panel, pid, x, y))
            pid += 1
            x += panel.width
        y += 8
    return {
        "uid": uid,
        "id": None,
        "title": title,
        "tags": ["conveyor"],
        "timezone": "browser",
        "schemaVersion": 41,
        "version": 1,
        "editable": False,
        "graphTooltip": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "links": [
            {
                "type": "dashboards",
                "tags": ["conveyor"],
                "title": "Conveyor",
                "asDropdown": True,
                "includeVars": True,
                "keepTime": True,
            }
        ],
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "refresh": 1,
                    "regex": "",
                },
                {
                    "name": "namespace",
                    "label": "Namespace",
                    "type": "query",
                    "datasource": DATASOURCE,
                    "query": {
                        "query": "label_values(conveyor_grpc_server_handled_total, namespace)",
                        "refId": "namespace",
                    },
                    "definition": "label_values(conveyor_grpc_server_handled_total, namespace)",
                    "current": {},
                    "hide": 0,
                    "refresh": 2,
                    "sort": 1,
                    "includeAll": False,
                    "multi": False,
                },
            ]
        },
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {
        f"{uid}.json": json.dumps(dashboard_json(uid, title, build()), indent=2) + "\n"
        for uid, (title, build) in DASHBOARDS.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="fail when the committed JSON is stale"
    )
    args = parser.parse_args(argv)
    stale = []
    for name, text in render().items():
        path = OUT / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        sys.stderr.write(
            f"stale dashboards (run tools/k8s/gen_dashboards.py): {', '.join(stale)}\n"
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
