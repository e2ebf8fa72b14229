"""The dashboards' model and its Grafana JSON: targets, panels, rows, query helpers (quantiles, the
leader's series only) and the rendering of a dashboard.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
