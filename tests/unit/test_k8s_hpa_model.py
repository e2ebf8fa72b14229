"""The HPA algorithm of bench/autoscaling_demo.py against the Kubernetes rules it reproduces.

AverageValue: ``ceil(value / target)`` unless within the 10 % tolerance of the current replicas;
several metrics: the largest proposal; scale-up limited by the policies per period (selectPolicy Max:
the most permissive), scale-down held by the stabilization window (the highest recommendation in it)
and limited to -50 % per period.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "autoscaling_demo", ROOT / "bench" / "autoscaling_demo.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["autoscaling_demo"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def model(demo: ModuleType) -> Any:
    scaler = demo.load_scaler()
    behavior = demo.Behavior.from_manifest(scaler.behavior)
    return demo.HpaModel(scaler.min_replicas, scaler.max_replicas, scaler.thresholds, behavior)


def test_the_demo_reads_the_manifest(demo: ModuleType) -> None:
    scaler = demo.load_scaler()
    assert scaler.names == ("dispatch-backlog", "commands-lag")
    assert scaler.thresholds == (20.0, 20.0)
    assert (scaler.min_replicas, scaler.max_replicas) == (1, 6)
    assert scaler.adapter_rule_queries == scaler.queries, "HPA flavour = KEDA flavour, verbatim"
    behavior = demo.Behavior.from_manifest(scaler.behavior, 4.0)
    assert behavior.down.stabilization == 75.0
    assert behavior.up.policies[0].period == 3.75


def test_average_value_proposal_with_tolerance(model: Any) -> None:
    assert model.proposal(1, [100.0, 0.0]) == 5
    assert model.proposal(3, [0.0, 101.0]) == 6, "the larger of the two metrics"
    assert model.proposal(1, [21.0, 0.0]) == 1, "within 10 % of 1 x 20: no change"
    assert model.proposal(1, [23.0, 0.0]) == 2
    assert model.proposal(4, [0.0, 0.0]) == 0


def test_scale_up_is_fast_but_rate_limited_per_period(model: Any) -> None:
    # +100 % or +4 pods per 15 s, whichever is more: 1 -> 5, not 6, in the first period.
    proposal, desired = model.desired(0.0, 1, [200.0, 0.0])
    assert (proposal, desired) == (10, 5)
    model.record(0.0, desired - 1)
    assert model.desired(10.0, 5, [200.0, 0.0]) == (10, 5), "still inside the 15 s period"
    assert model.desired(16.0, 5, [200.0, 0.0]) == (10, 6), "capped at maxReplicas (6 partitions)"


def test_scale_down_waits_for_the_window_then_halves(model: Any) -> None:
    t = 0.0
    for _ in range(4):
        assert model.desired(t, 6, [120.0, 0.0])[1] == 6
        t += 15
    last_high = t - 15
    # The backlog is gone: the 300 s window still holds the earlier recommendation of 6.
    while t < last_high + 300:
        assert model.desired(t, 6, [0.0, 0.0]) == (0, 6)
        t += 15
    # Out of the window: -50 % per 60 s.
    _, desired = model.desired(t, 6, [0.0, 0.0])
    assert desired == 3
    model.record(t, desired - 6)
    assert model.desired(t + 30, 3, [0.0, 0.0])[1] == 3, "one step per 60 s period"
    _, desired = model.desired(t + 61, 3, [0.0, 0.0])
    assert desired == 1, "floor(3 * 0.5) = 1 = minReplicas"
