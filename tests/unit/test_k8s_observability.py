"""Dashboards, alert rules and autoscaling queries: PromQL that parses and names real metrics.

Every PromQL expression shipped (Grafana panels, PrometheusRule alerts, KEDA triggers,
prometheus-adapter rules) is parsed with ``promql-parser`` (which also type-checks, e.g. ``rate`` of
an instant vector fails), and every metric it selects must be one the services export: the names are
collected by building each service's metrics classes on a fresh ``CollectorRegistry``. The only
outside metrics allowed are kube-state-metrics' ``kube_*`` (replicas panel).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from prometheus_client import CollectorRegistry

from conveyor_common.metrics import KafkaMetrics, RpcMetrics
from conveyor_notifier.metrics import NotifierMetrics
from conveyor_provider_adapter.metrics import AdapterMetrics
from conveyor_scheduler.groups.service import GroupMetrics
from conveyor_scheduler.metrics import SchedulerMetrics

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
MONITORING = K8S / "components" / "monitoring"
DASHBOARDS = sorted((MONITORING / "dashboards").glob("*.json"))
EXTERNAL_PREFIXES = ("kube_",)
"""Metrics from outside Conveyor that a panel may use (kube-state-metrics)."""
EXTERNAL_NAMES = frozenset({"up"})
"""Prometheus's own per-target series (alerts on Conveyor's targets, by the PodMonitors' job)."""
GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "${datasource}": "prometheus",
}


@cache
def exported_metrics() -> frozenset[str]:
    """Every sample name the services can export (counters ``_total``, histograms ``_bucket``...)."""
    registry = CollectorRegistry()
    RpcMetrics(registry, "test")
    KafkaMetrics(registry, "test")
    SchedulerMetrics(registry)
    GroupMetrics(registry)
    AdapterMetrics(registry)
    NotifierMetrics(registry)
    names: set[str] = set()
    for family in registry.collect():
        if family.type == "counter":
            names |= {f"{family.name}_total", f"{family.name}_created"}
        elif family.type == "histogram":
            names |= {f"{family.name}_{s}" for s in ("bucket", "sum", "count", "created")}
        elif family.type == "summary":
            names |= {family.name, f"{family.name}_sum", f"{family.name}_count"}
        else:
            names.add(family.name)
    return frozenset(names)


def selectors(expr: str) -> list[tuple[str, dict[str, str]]]:
    """(metric name, equality matchers) of every vector selector; raises ValueError if it does not parse."""
    for var, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(var, value)
    found: list[tuple[str, dict[str, str]]] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            matchers = {m.name: m.value for m in node.matchers.matchers}
            found.append((node.name or matchers.get("__name__", ""), matchers))

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


def unknown_metrics(expr: str) -> list[str]:
    return [
        name
        for name, _ in selectors(expr)
        if name not in exported_metrics()
        and not name.startswith(EXTERNAL_PREFIXES)
        and name not in EXTERNAL_NAMES
    ]


def test_the_metric_catalogue_is_real() -> None:
    names = exported_metrics()
    assert "conveyor_kafka_consumer_lag" in names
    assert "conveyor_scheduler_queue_wait_seconds_bucket" in names
    assert "conveyor_adapter_rate_limited_total" in names
    assert unknown_metrics("sum(rate(conveyor_no_such_metric_total[5m]))") == [
        "conveyor_no_such_metric_total"
    ]
    with pytest.raises(ValueError, match=r"expected type matrix"):
        selectors("rate(conveyor_scheduler_leader)")


# --------------------------------------------------------------------------------------------------
# Grafana dashboards


def test_dashboards_are_generated_from_the_committed_description() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "k8s" / "gen_dashboards.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_is_provisionable(path: Path) -> None:
    board = json.loads(path.read_text())
    assert board["uid"] == path.stem, "a fixed uid, equal to the file name"
    assert board["id"] is None
    assert "__inputs" not in board, "exported-for-sharing JSON does not provision"
    assert "DS_PROMETHEUS" not in path.read_text()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource"
    assert ds["query"] == "prometheus"
    assert "namespace" in variables
    graphs = [p for p in panels(board) if p["type"] != "row"]
    assert len(graphs) >= 6
    for panel in graphs:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids are unique"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_queries_parse_and_name_exported_metrics(path: Path) -> None:
    board = json.loads(path.read_text())
    for panel in panels(board):
        for target in panel.get("targets", []):
            expr = target["expr"]
            try:
                unknown = unknown_metrics(expr)
            except ValueError as exc:
                pytest.fail(f"{panel['title']}: {expr}: {exc}")
            assert not unknown, f"{panel['title']}: not exported: {unknown}"
            for window in re.findall(r"\[([^\]]+)\]", expr):
                assert window == "$__rate_interval", f"{panel['title']}: use $__rate_interval"
            for name, matchers in selectors(expr):
                if not name.startswith(EXTERNAL_PREFIXES):
                    assert matchers.get("namespace") == "$namespace", f"{panel['title']}: {expr}"


def test_dashboards_cover_what_the_issue_asks_for() -> None:
    exprs = {
        p.stem: " ".join(
            t["expr"]
            for panel in panels(json.loads(p.read_text()))
            for t in panel.get("targets", [])
        )
        for p in DASHBOARDS
    }
    assert set(exprs) == {"conveyor-overview", "conveyor-provider", "conveyor-delivery"}
    wanted = {
        "conveyor-overview": [
            "conveyor_scheduler_dispatched_total",  # throughput
            "sum by (priority)",  # queue depth by priority
            "conveyor_scheduler_slot_limit",  # slots against limits
            "conveyor_scheduler_queue_wait_seconds_bucket",  # latencies
            "conveyor_grpc_server_handling_seconds_bucket",
            "grpc_code",  # errors
        ],
        "conveyor-provider": [
            "conveyor_adapter_predictions_in_flight",
            "conveyor_adapter_rate_limited_total",
            "conveyor_adapter_webhooks_total",
        ],
        "conveyor-delivery": [
            "conveyor_notifier_active_watchers",
            "conveyor_notifier_deliveries_total",
        ],
    }
    for uid, needles in wanted.items():
        for needle in needles:
            assert needle in exprs[uid], f"{uid}: {needle}"


def test_dashboards_ship_as_sidecar_configmaps() -> None:
    doc = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())
    files = set()
    for gen in doc["configMapGenerator"]:
        assert gen["options"]["labels"] == {"grafana_dashboard": "1"}
        assert gen["options"]["disableNameSuffixHash"] is True
        files |= set(gen["files"])
    assert files == {f"dashboards/{p.name}" for p in DASHBOARDS}


# --------------------------------------------------------------------------------------------------
# Alert rules (promtool runs them in tests/integration/test_k8s_promtool.py)


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    return [r for g in doc["spec"]["groups"] for r in g["rules"] if "alert" in r]


def test_alerts_cover_the_issue_and_link_their_runbook() -> None:
    rules = alert_rules()
    names = {r["alert"] for r in rules}
    assert {
        "ConveyorTasksDeadLettered",
        "ConveyorOldestWaitingTaskTooOld",
        "ConveyorOutboxLag",
        "ConveyorNoSchedulerLeader",
        "ConveyorSlotsSaturated",
        "ConveyorProvider429Streak",
        "ConveyorWebhookSignatureFailures",
        "ConveyorConsumerLagHigh",
        # issue 16: availability, ratios, provider errors, SLO burn rates, database pool
        "ConveyorTargetDown",
        "ConveyorPodCrashLooping",
        "ConveyorAdmissionRejectionRatioHigh",
        "ConveyorProviderCreateFailures",
        "ConveyorProviderServerErrors",
        "ConveyorTaskFailureRatioHigh",
        "ConveyorSubmitLatencyBudgetBurn",
        "ConveyorSubmitLatencyBudgetSlowBurn",
        "ConveyorDispatchLatencyBudgetBurn",
        "ConveyorDispatchLatencyBudgetSlowBurn",
        "ConveyorDatabasePoolSaturated",
    } <= names
    runbooks = (ROOT / "docs" / "runbooks.md").read_text()
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
        for h in re.findall(r"^## (.+)$", runbooks, flags=re.M)
    }
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert rule["annotations"]["description"], rule["alert"]
        url = rule["annotations"]["runbook_url"]
        page, _, anchor = url.partition("#")
        assert page == "docs/runbooks.md", rule["alert"]
        assert anchor == rule["alert"].lower(), rule["alert"]
        assert anchor in anchors, f"docs/runbooks.md has no section {rule['alert']}"


def test_no_scheduler_leader_is_the_sum_of_the_leader_gauge_for_a_minute() -> None:
    rule = next(r for r in alert_rules() if r["alert"] == "ConveyorNoSchedulerLeader")
    assert rule["for"] == "1m"
    assert "sum by (namespace) (conveyor_scheduler_leader)" in rule["expr"]
    assert "absent(" not in rule["expr"], "absent() cannot say which namespace lost its leader"
    assert "== 0" in rule["expr"]


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_alert_expressions_parse_and_name_exported_metrics(rule: dict[str, Any]) -> None:
    assert not unknown_metrics(rule["expr"])
    for name, matchers in selectors(rule["expr"]):
        assert "namespace" not in matchers, f"{name}: no namespace in an alert (any namespace)"
        if name == "up":
            assert matchers.get("job", "").startswith("conveyor-"), "only Conveyor's targets"
        if name.startswith(EXTERNAL_PREFIXES):
            assert 'and on (namespace, pod) up{job=~"conveyor-' in rule["expr"], (
                f"{name}: joined with Conveyor's targets"
            )


def aggregations(expr: str) -> list[Any]:
    found: list[Any] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.AggregateExpr):
            found.append(node)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_alert_aggregations_keep_the_namespace(rule: dict[str, Any]) -> None:
    """Every aggregation groups by namespace: one alert per installation, with its namespace."""
    aggs = aggregations(rule["expr"])
    assert aggs, rule["alert"]
    for agg in aggs:
        modifier = agg.modifier
        assert modifier is not None, f"{rule['alert']}: {agg} aggregates the namespaces away"
        assert "without" not in str(modifier).lower()
        assert "namespace" in modifier.labels, f"{rule['alert']}: {agg}"


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    tests = yaml.safe_load((MONITORING / "rules" / "alerts.test.yaml").read_text())["tests"]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    names = {r["alert"] for r in alert_rules()}
    assert names == firing, f"no firing test: {sorted(names - firing)}"
    assert names == quiet, f"no quiet test: {sorted(names - quiet)}"


# --------------------------------------------------------------------------------------------------
# Autoscaling queries: KEDA triggers == prometheus-adapter rules expanded for the HPAs


def scaled_objects() -> list[dict[str, Any]]:
    path = K8S / "components" / "autoscaling-keda" / "scaledobjects.yaml"
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def hpas() -> list[dict[str, Any]]:
    path = K8S / "components" / "autoscaling-hpa" / "hpas.yaml"
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def adapter_rules() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(
        (K8S / "monitoring" / "prometheus-adapter-rules.yaml").read_text()
    )
    return doc


def canonical(expr: str) -> str:
    """The expression as promql-parser prints it, label matchers sorted (order does not matter)."""

    def sort_braces(m: re.Match[str]) -> str:
        return "{" + ",".join(sorted(p.strip() for p in m.group(1).split(",") if p.strip())) + "}"

    return re.sub(r"\{([^{}]*)\}", sort_braces, str(promql_parser.parse(expr)))


def expand(
    rule: dict[str, Any], namespace: str, selector: dict[str, str], pods: bool = False
) -> str:
    """prometheus-adapter's metricsQuery template for one HPA metric request."""
    metric = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)", rule["seriesQuery"])
    assert metric is not None
    matchers = [f'namespace="{namespace}"'] + [f'{k}="{v}"' for k, v in selector.items()]
    if pods:
        matchers.append('pod=~"gateway-.*"')
    template: str = rule["metricsQuery"]
    return (
        template.replace("<<.Series>>", metric.group(1))
        .replace("<<.LabelMatchers>>", ",".join(matchers))
        .replace("<<.GroupBy>>", "pod")
    )


def test_keda_and_hpa_flavours_scale_on_the_same_queries_and_targets() -> None:
    rules = adapter_rules()["rules"]
    external = {r["name"]["as"]: r for r in rules["external"]}
    custom = {r["name"]["as"]: r for r in rules["custom"]}
    by_target = {h["spec"]["scaleTargetRef"]["name"]: h for h in hpas()}
    for so in scaled_objects():
        target = so["spec"]["scaleTargetRef"]["name"]
        hpa = by_target[target]
        assert so["spec"]["minReplicaCount"] == hpa["spec"]["minReplicas"]
        assert so["spec"]["maxReplicaCount"] == hpa["spec"]["maxReplicas"]
        assert (
            so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
            == hpa["spec"]["behavior"]
        )
        triggers = so["spec"]["triggers"]
        assert len(triggers) == len(hpa["spec"]["metrics"])
        for trigger, metric in zip(triggers, hpa["spec"]["metrics"], strict=True):
            query = trigger["metadata"]["query"]
            assert not unknown_metrics(query), query
            if metric["type"] == "External":
                spec = metric["external"]
                rule = external[spec["metric"]["name"]]
                expanded = expand(
                    rule, "NAMESPACE", spec["metric"].get("selector", {}).get("matchLabels", {})
                )
                assert canonical(expanded) == canonical(query), (target, expanded, query)
            else:
                spec = metric["pods"]
                rule = custom[spec["metric"]["name"]]
                expanded = expand(rule, "NAMESPACE", {}, pods=True)
                # Per pod in the HPA, the total in KEDA: same series, same window.
                assert {n for n, _ in selectors(expanded)} == {n for n, _ in selectors(query)}
                assert re.findall(r"\[\w+\]", expanded) == re.findall(r"\[\w+\]", query)
                assert 'service="gateway"' in expanded
            assert spec["target"]["type"] == "AverageValue"
            assert float(spec["target"]["averageValue"]) == float(trigger["metadata"]["threshold"])


def test_adapter_rules_select_exported_series() -> None:
    rules = adapter_rules()["rules"]
    assert rules["default"] is False
    for rule in rules["custom"] + rules["external"]:
        assert not unknown_metrics(rule["seriesQuery"]), rule["seriesQuery"]
        assert re.fullmatch(rule["name"]["matches"], selectors(rule["seriesQuery"])[0][0])


# --------------------------------------------------------------------------------------------------
# Every query has data from the start


def all_queries() -> list[tuple[str, str]]:
    out = [
        (f"{p.stem} {panel['title']}", t["expr"])
        for p in DASHBOARDS
        for panel in panels(json.loads(p.read_text()))
        for t in panel.get("targets", [])
    ]
    out += [(r["alert"], r["expr"]) for r in alert_rules()]
    return out


def test_the_dashboards_hold_at_least_the_65_queries_and_all_name_exported_metrics() -> None:
    dashboard_queries = [q for q in all_queries() if q[0].startswith("conveyor-")]
    assert len(dashboard_queries) >= 65
    for where, expr in dashboard_queries:
        assert not unknown_metrics(expr), where


STARTS_EMPTY = (
    # gRPC and Kafka series are born per method / topic on first use (conveyor_common), and these
    # adapter label values are only known at run time (the storage backend, outcome x source).
    "conveyor_grpc_",
    "conveyor_kafka_",
    "conveyor_adapter_output_copy_bytes",
    "conveyor_adapter_output_copy_files",
    "conveyor_adapter_results_published",
    "conveyor_db_pool_",
)


def test_every_counter_a_query_rates_has_a_series_before_its_first_event() -> None:
    """The pre-initialised label sets: a counter series born with its first increment is invisible
    to rate()/increase() for that increment, so the first 429 or rejection would show nothing."""
    registry = CollectorRegistry()
    SchedulerMetrics(registry)
    GroupMetrics(registry)
    AdapterMetrics(registry)
    NotifierMetrics(registry)
    samples = [s for family in registry.collect() for s in family.samples]
    checked = 0
    for where, expr in all_queries():
        for name, matchers in selectors(expr):
            if name.startswith(STARTS_EMPTY) or not name.startswith("conveyor_"):
                continue
            if not name.endswith(("_total", "_bucket")):
                continue
            wanted = {
                k: v
                for k, v in matchers.items()
                if k not in ("namespace", "__name__") and not v.startswith(("$", "^"))
            }
            found = [
                s
                for s in samples
                if s.name == name and all(s.labels.get(k) == v for k, v in wanted.items())
            ]
            if "le" in wanted or any("|" in v for v in wanted.values()):
                found = found or [s for s in samples if s.name == name]
            assert found, f"{where}: {name}{wanted} has no series until its first event"
            checked += 1
    assert checked >= 40
