"""The Horizontal Pod Autoscaler's algorithm, reproduced for the autoscaling demo: scaling policies and
behaviour read from the KEDA ScaledObject, tolerance, stabilization windows and rate limits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent


SCALED_OBJECTS = ROOT / "deploy" / "k8s" / "components" / "autoscaling-keda" / "scaledobjects.yaml"


ADAPTER_RULES = ROOT / "deploy" / "k8s" / "monitoring" / "prometheus-adapter-rules.yaml"


NAMESPACE = "conveyor"


TARGET = "provider-adapter"


@dataclass(frozen=True)
class Policy:
    """One scaling policy: ``type`` Pods or Percent, ``value`` per ``period`` seconds."""

    type: str
    value: int
    period: float


@dataclass(frozen=True)
class Rules:
    """HPAScalingRules of one direction."""

    stabilization: float
    select: str
    policies: tuple[Policy, ...]


@dataclass(frozen=True)
class Behavior:
    """scaleUp and scaleDown rules."""

    up: Rules
    down: Rules

    @staticmethod
    def from_manifest(doc: dict[str, Any], time_scale: float = 1.0) -> Behavior:
        """From a ``behavior`` mapping; every period and window divided by ``time_scale``."""

        def rules(d: dict[str, Any]) -> Rules:
            return Rules(
                stabilization=float(d.get("stabilizationWindowSeconds", 0)) / time_scale,
                select=str(d.get("selectPolicy", "Max")),
                policies=tuple(
                    Policy(p["type"], int(p["value"]), float(p["periodSeconds"]) / time_scale)
                    for p in d["policies"]
                ),
            )

        return Behavior(up=rules(doc["scaleUp"]), down=rules(doc["scaleDown"]))


@dataclass
class HpaModel:
    """Desired replicas from metric values, as the HPA controller computes them."""

    min_replicas: int
    max_replicas: int
    targets: Sequence[float]
    """AverageValue target of each metric (per replica)."""
    behavior: Behavior
    tolerance: float = 0.1
    recommendations: list[tuple[float, int]] = field(default_factory=list)
    events: list[tuple[float, int]] = field(default_factory=list)
    """(time, replica change) of the scale operations done."""

    def proposal(self, current: int, values: Sequence[float]) -> int:
        """Replicas the metrics ask for (max over metrics), before behaviour and bounds."""
        best = 0
        for value, target in zip(values, self.targets, strict=True):
            if current > 0 and abs(value / (target * current) - 1.0) <= self.tolerance:
                wanted = current
            else:
                wanted = math.ceil(value / target)
            best = max(best, wanted)
        return best

    def _stabilize(self, now: float, current: int, desired: int) -> int:
        up_cut = now - self.behavior.up.stabilization
        down_cut = now - self.behavior.down.stabilization
        up_rec, down_rec = desired, desired
        for stamp, rec in self.recommendations:
            if stamp > up_cut:
                up_rec = min(up_rec, rec)
            if stamp > down_cut:
                down_rec = max(down_rec, rec)
        keep = max(self.behavior.up.stabilization, self.behavior.down.stabilization)
        self.recommendations = [(s, r) for s, r in self.recommendations if s > now - keep]
        self.recommendations.append((now, desired))
        recommendation = current
        recommendation = max(recommendation, up_rec)
        return min(recommendation, down_rec)

    def _changed(self, now: float, period: float, sign: int) -> int:
        return sum(
            abs(c) for s, c in self.events if s > now - period and (c > 0) == (sign > 0) and c != 0
        )

    def _up_limit(self, now: float, current: int) -> int:
        rules = self.behavior.up
        if rules.select == "Disabled":
            return current
        limits = []
        for p in rules.policies:
            start = current - self._changed(now, p.period, +1) + self._changed(now, p.period, -1)
            if p.type == "Pods":
                limits.append(start + p.value)
            else:
                limits.append(math.ceil(start * (1 + p.value / 100)))
        return max(limits) if rules.select == "Max" else min(limits)

    def _down_limit(self, now: float, current: int) -> int:
        rules = self.behavior.down
        if rules.select == "Disabled":
            return current
        limits = []
        for p in rules.policies:
            start = current - self._changed(now, p.period, +1) + self._changed(now, p.period, -1)
            if p.type == "Pods":
                limits.append(start - p.value)
            else:
                limits.append(int(start * (1 - p.value / 100)))
        # For scaling down, the policy allowing the biggest change gives the lowest count.
        return min(limits) if rules.select == "Max" else max(limits)

    def desired(self, now: float, current: int, values: Sequence[float]) -> tuple[int, int]:
        """(proposal from the metrics, replicas after stabilization, rate limits and bounds)."""
        proposal = self.proposal(current, values)
        wanted = self._stabilize(now, current, proposal)
        if wanted > current:
            limit = max(self._up_limit(now, current), current)
            wanted = min(wanted, limit, self.max_replicas)
        elif wanted < current:
            limit = min(self._down_limit(now, current), current)
            wanted = max(wanted, limit, self.min_replicas)
        wanted = min(max(wanted, self.min_replicas), self.max_replicas)
        return proposal, wanted

    def record(self, now: float, change: int) -> None:
        """Remember a scale operation (rate policies count them per period)."""
        if change:
            self.events.append((now, change))
            horizon = max(
                [p.period for p in self.behavior.up.policies + self.behavior.down.policies]
            )
            self.events = [(s, c) for s, c in self.events if s > now - horizon]


@dataclass(frozen=True)
class Scaler:
    """The provider adapter's ScaledObject, and the HPA-flavour queries for the same metrics."""

    names: tuple[str, ...]
    queries: tuple[str, ...]
    thresholds: tuple[float, ...]
    min_replicas: int
    max_replicas: int
    behavior: dict[str, Any]
    adapter_rule_queries: tuple[str, ...]


HPAS = ROOT / "deploy" / "k8s" / "components" / "autoscaling-hpa" / "hpas.yaml"


def load_scaler() -> Scaler:
    """Read the provider-adapter ScaledObject; expand the prometheus-adapter rules its HPA twin uses."""
    docs = [d for d in yaml.safe_load_all(SCALED_OBJECTS.read_text()) if d]
    (so,) = [d for d in docs if d["spec"]["scaleTargetRef"]["name"] == TARGET]
    triggers = so["spec"]["triggers"]
    hpas = [d for d in yaml.safe_load_all(HPAS.read_text()) if d]
    (hpa,) = [d for d in hpas if d["spec"]["scaleTargetRef"]["name"] == TARGET]
    rules = {
        r["name"]["as"]: r for r in yaml.safe_load(ADAPTER_RULES.read_text())["rules"]["external"]
    }
    expanded = []
    for metric in hpa["spec"]["metrics"]:
        spec = metric["external"]["metric"]
        rule = rules[spec["name"]]
        series = rule["seriesQuery"].split("{", 1)[0]
        labels = [f'namespace="{NAMESPACE}"'] + [
            f'{k}="{v}"' for k, v in spec.get("selector", {}).get("matchLabels", {}).items()
        ]
        expanded.append(
            rule["metricsQuery"]
            .replace("<<.Series>>", series)
            .replace("<<.LabelMatchers>>", ",".join(labels))
        )
    return Scaler(
        names=tuple(t["name"] for t in triggers),
        # The component's queries carry a placeholder kustomize replaces with the namespace.
        queries=tuple(
            t["metadata"]["query"].replace('namespace="NAMESPACE"', f'namespace="{NAMESPACE}"')
            for t in triggers
        ),
        thresholds=tuple(float(t["metadata"]["threshold"]) for t in triggers),
        min_replicas=int(so["spec"]["minReplicaCount"]),
        max_replicas=int(so["spec"]["maxReplicaCount"]),
        behavior=so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"],
        adapter_rule_queries=tuple(expanded),
    )
