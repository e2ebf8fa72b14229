"""Smoke test of bench/pipeline_bench.py: its ``--quick`` mode end to end, so the bench cannot rot.

It runs the script as ``make bench`` does (a subprocess with its own devstack: durable PostgreSQL, Kafka,
then the ``make up`` shape of the system, twice) on the quick mode's tiny loads (about a minute) and
checks that every scenario produced its figures from real measurements. No figure is compared with a
performance bound: the machine is shared and the load is tiny.
"""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from conveyor_common import topics

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import _stages  # noqa: E402

GROUPS = {"scheduler-1", "scheduler-2", "adapter", "notifier", "gateway", "postgres", "kafka"}


def positive(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


@pytest.mark.timeout(240)
def test_pipeline_bench_quick_mode_measures_every_scenario(tmp_path: Path) -> None:
    out = tmp_path / "pipeline.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "pipeline_bench.py"), "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=230,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    scenarios = result["scenarios"]

    # Work-through: tasks completed in the window, every process group accounted.
    wt = scenarios["work_through"]
    assert wt["completed_in_window"] > 0
    assert positive(result["work_through_tps"])
    assert positive(result["cpu_ms_per_task"])
    assert set(result["cpu_ms_per_task_by_process"]) == GROUPS
    assert math.isclose(
        sum(result["cpu_ms_per_task_by_process"].values()), result["cpu_ms_per_task"], rel_tol=0.01
    )
    assert positive(result["fake_cpu_ms_per_task"])
    assert wt["drained"] is True
    assert list(wt["terminal_types"]) == ["TASK_EVENT_TYPE_SUCCEEDED"]
    assert wt["terminal_types"]["TASK_EVENT_TYPE_SUCCEEDED"] >= wt["completed_total"]
    # Work counted per task in the same window: every hop of the path shows up.
    work = result["work_per_task"]
    assert positive(work["pg_transactions"])
    assert set(work["kafka_records_by_topic"]) == {
        topics.TASK_EVENTS,
        topics.PROVIDER_COMMANDS,
        topics.PROVIDER_RESULTS,
    }
    assert all(positive(v) for v in work["kafka_records_by_topic"].values())
    calls = work["grpc_calls_by_method"]
    assert positive(calls.get("gateway/SubmitTask"))
    assert any(m.startswith("scheduler/BeginSubmit") for m in calls)
    # A create is recorded by its results (ADR 0003), not a CompleteSubmit round trip.
    assert not any(m.startswith("scheduler/CompleteSubmit") for m in calls)

    # Hung creates: the loop went on around the hung creates, and every task finished.
    hung = scenarios["hung_creates"]
    assert hung["hung_create_rate"] > 0
    assert hung["completed_in_window"] > 0
    assert hung["drained"] is True
    assert positive(result["work_through_tps_with_hung_creates"])

    # Latency: every paced task seen terminal on the watch and matched to its prediction's run.
    latency = scenarios["latency"]
    for phase in ("warmup", "at_5_per_s", "at_100_per_s"):
        figures = latency[phase]
        assert figures["n"] == figures["submitted"] > 0
        assert figures["not_measured"] == 0
        assert figures["run_time_p50_ms"] >= 0
    stages = latency["at_5_per_s_stages_ms"]  # every stage of the path found for these tasks
    assert stages["n"] == latency["at_5_per_s"]["submitted"]
    assert positive(stages["total_ms"])
    assert all(f"{a}_to_{b}_ms" in stages for a, b in itertools.pairwise(_stages.POINTS))
    assert positive(result["added_latency_p50_ms_at_5tps"])
    assert positive(result["added_latency_p99_ms_at_100tps"])

    # Refill: every task ran once at the fake; finishes paired with later creates.
    refill = scenarios["refill"]
    assert refill["completed"] == refill["tasks"] == refill["creates"]
    assert refill["warmup_completed"] == refill["warmup_tasks"] > 0  # not among the measured
    assert refill["pairs"]["n"] > 0
    assert result["refill_p99_ms"] >= result["refill_p50_ms"] >= 0

    # Priority: the urgent task was created at the fake after the whole backlog was dispatched.
    priority = scenarios["priority"]
    assert priority["lower_bound"] is False
    assert priority["backlog_all_dispatched_after_s"] > 0
    assert positive(result["priority_under_backlog_s"])

    # BullMQ: measured when Redis and the harness are installed, else a clear skip entry.
    peer = result["bullmq"]
    if "skipped" in peer:
        assert peer["skipped"]
        assert result["ratio_work_through_vs_bullmq"] is None
    else:
        assert positive(peer["jobs_per_s"])
        assert positive(peer["cpu_ms_per_job"])
        assert positive(result["ratio_work_through_vs_bullmq"])
        assert positive(result["ratio_cpu_per_task_vs_bullmq"])
