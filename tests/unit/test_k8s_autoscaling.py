"""Autoscaling: consumer-lag driven HPAs respect partitions and leave the scheduler fixed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conveyor_common import topics
from tests.unit.k8s_support import ALL, label, named, of_kind, render

# --------------------------------------------------------------------------------------------------
# Autoscaling


def consumed_topic(query: str) -> str | None:
    found = re.search(r'topic="([^"]+)"', query)
    return found.group(1) if found else None


@pytest.mark.parametrize(
    "path",
    [
        p
        for p in ALL
        if any(o["kind"] in ("ScaledObject", "HorizontalPodAutoscaler") for o in render(p))
    ],
    ids=lambda p: label(p),
)
def test_autoscalers_respect_partitions_behaviour_and_leave_the_scheduler_fixed(path: Path) -> None:
    objs = render(path)
    scalers = of_kind(objs, "ScaledObject") + of_kind(objs, "HorizontalPodAutoscaler")
    targets = {s["spec"]["scaleTargetRef"]["name"] for s in scalers}
    assert targets == {"gateway", "provider-adapter", "notifier"}, (
        "the scheduler is never autoscaled"
    )
    assert named(objs, "Deployment", "scheduler")["spec"]["replicas"] >= 2
    for s in scalers:
        name = s["metadata"]["name"]
        if s["kind"] == "ScaledObject":
            lo, hi = s["spec"]["minReplicaCount"], s["spec"]["maxReplicaCount"]
            behavior = s["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
            queries = [t["metadata"]["query"] for t in s["spec"]["triggers"]]
        else:
            lo, hi = s["spec"]["minReplicas"], s["spec"]["maxReplicas"]
            behavior = s["spec"]["behavior"]
            queries = [
                str(m["external"]["metric"].get("selector", {}).get("matchLabels", {}))
                for m in s["spec"]["metrics"]
                if m["type"] == "External"
            ]
            queries = [q.replace("': '", '="').replace("'", '"') for q in queries]
        assert 1 <= lo <= hi
        for q in queries:
            topic = consumed_topic(q)
            if topic is not None:
                assert hi <= topics.all_topics()[topic], (
                    f"{name}: {hi} replicas > partitions of {topic}"
                )
        if name in ("provider-adapter", "notifier"):
            assert hi <= min(
                topics.PARTITIONS[topics.PROVIDER_COMMANDS], topics.PARTITIONS[topics.TASK_EVENTS]
            )
        up, down = behavior["scaleUp"], behavior["scaleDown"]
        assert up["stabilizationWindowSeconds"] == 0
        assert {"type": "Percent", "value": 100, "periodSeconds": 15} in up["policies"]
        assert down["stabilizationWindowSeconds"] == 300
        assert down["policies"] == [{"type": "Percent", "value": 50, "periodSeconds": 60}]
        dep = named(objs, "Deployment", s["spec"]["scaleTargetRef"]["name"])
        assert "replicas" not in dep["spec"], f"{name}: the autoscaler owns spec.replicas"
