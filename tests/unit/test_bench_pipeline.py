"""The pure parts of bench/pipeline_bench.py: percentiles, CPU accounting from /proc-like data, the
pairing of the fake's ledger events (refill, run times, added latency), the latency's stage medians."""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import _counts, _measure, _peers, _stages  # noqa: E402
from bench._measure import CpuTarget, ProcStat  # noqa: E402


def stat_line(
    pid: int,
    ppid: int,
    utime: int,
    stime: int = 0,
    cutime: int = 0,
    cstime: int = 0,
    comm: str = "p",
) -> str:
    """A /proc/<pid>/stat line with the given times (fields 14-17) and filler elsewhere."""
    fields = ["S", str(ppid)] + ["0"] * 9 + [str(utime), str(stime), str(cutime), str(cstime)]
    fields += ["20", "0", "1", "0", "12345"] + ["0"] * 30
    return f"{pid} ({comm}) " + " ".join(fields) + "\n"


def snap(*lines: str) -> dict[int, ProcStat]:
    stats = [_measure.parse_stat(line) for line in lines]
    return {s.pid: s for s in stats}


# --- percentile ---------------------------------------------------------------------------


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert _measure.percentile(values, 50) == 51.0
    assert _measure.percentile(values, 99) == 100.0
    assert _measure.percentile(values, 0) == 1.0
    assert _measure.percentile(values, 100) == 100.0
    assert _measure.percentile([3.0, 1.0, 2.0], 50) == 2.0  # unsorted input


def test_percentile_empty_and_out_of_range() -> None:
    assert math.isnan(_measure.percentile([], 50))
    with pytest.raises(ValueError, match=r"within 0\.\.100"):
        _measure.percentile([1.0], 101)


def test_summarize_ms_rounds_and_counts() -> None:
    summary = _measure.summarize_ms([10.04, 20.0, 30.0, 40.0])
    assert summary == {"n": 4, "p50_ms": 30.0, "p90_ms": 40.0, "p99_ms": 40.0, "max_ms": 40.0}


# --- /proc parsing and CPU accounting -----------------------------------------------------


def test_parse_stat_takes_times_after_the_last_parenthesis() -> None:
    stat = _measure.parse_stat(stat_line(42, 7, 100, 20, 3, 4, comm="post (gres) x"))
    assert stat == ProcStat(
        pid=42, ppid=7, comm="post (gres) x", utime=100, stime=20, cutime=3, cstime=4
    )
    assert stat.own == 120
    assert stat.reaped == 7
    with pytest.raises(ValueError, match="not a /proc stat line"):
        _measure.parse_stat("garbage")


def test_tree_ticks_counts_live_children_and_reaped_ones_once() -> None:
    # postmaster 10 with backends 11 and 12; 13 is unrelated; 14 is a grandchild (under 12).
    before = snap(
        stat_line(10, 1, 100, 50, cutime=30, cstime=10),
        stat_line(11, 10, 40, 10),
        stat_line(12, 10, 20, 5),
        stat_line(13, 1, 999),
        stat_line(14, 12, 7),
    )
    assert _measure.descendants(before, 10) == {10, 11, 12, 14}
    assert _measure.tree_ticks(before, 10) == 100 + 50 + 30 + 10 + 40 + 10 + 20 + 5 + 7
    # Backend 11 used 5 more ticks, exited and was reaped: its 55 ticks move to the postmaster's
    # cutime/cstime; the postmaster itself used 2 more; 12 and 14 used nothing more.
    after = snap(
        stat_line(10, 1, 102, 50, cutime=30 + 45, cstime=10 + 10),
        stat_line(12, 10, 20, 5),
        stat_line(13, 1, 5000),
        stat_line(14, 12, 7),
    )
    before_ticks = _measure.group_ticks(before, [CpuTarget("postgres", 10)])
    after_ticks = _measure.group_ticks(after, [CpuTarget("postgres", 10)])
    assert after_ticks["postgres"] - before_ticks["postgres"] == 5 + 2
    assert _measure.tree_ticks(after, 99) is None


def test_group_ticks_own_time_only_and_missing_targets() -> None:
    snapshot = snap(stat_line(1, 0, 10, 5, cutime=100), stat_line(2, 1, 1000))
    ticks = _measure.group_ticks(
        snapshot,
        [CpuTarget("loadgen", 1, tree=False), CpuTarget("tree", 1), CpuTarget("gone", 77)],
    )
    assert ticks == {"loadgen": 15, "tree": 15 + 100 + 1000}


def test_group_ticks_sums_targets_sharing_a_name() -> None:
    snapshot = snap(stat_line(1, 0, 10), stat_line(2, 0, 20))
    ticks = _measure.group_ticks(snapshot, [CpuTarget("adapter", 1), CpuTarget("adapter", 2)])
    assert ticks == {"adapter": 30}


def test_cpu_ms_and_per_task() -> None:
    ms = _measure.cpu_ms({"a": 100, "b": 50, "c": 1}, {"a": 300, "b": 50}, clk_tck=100)
    assert ms == {"a": 2000.0, "b": 0.0}  # c vanished: left out
    total, by = _measure.per_task({"a": 2000.0, "b": 500.0, "fake": 1000.0}, 100, exclude=["fake"])
    assert total == 25.0
    assert by == {"a": 20.0, "b": 5.0, "fake": 10.0}
    total, by = _measure.per_task({"a": 1.0}, 0)
    assert math.isnan(total)
    assert math.isnan(by["a"])


def test_read_snapshot_from_a_proc_like_directory(tmp_path: Path) -> None:
    for pid, line in ((5, stat_line(5, 1, 3)), (6, stat_line(6, 5, 4))):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "stat").write_text(line)
    (tmp_path / "7").mkdir()  # vanished between listing and reading
    (tmp_path / "8").mkdir()
    (tmp_path / "8" / "stat").write_text("garbage")
    (tmp_path / "self").mkdir()
    snapshot = _measure.read_snapshot(tmp_path)
    assert sorted(snapshot) == [5, 6]
    probe = _measure.CpuProbe([CpuTarget("tree", 5)], proc_root=tmp_path)
    assert probe.sample() == {"tree": 7}


# --- ledger analysis ----------------------------------------------------------------------


def ev(kind: str, t: float, **fields: Any) -> dict[str, Any]:
    return {"kind": kind, "t": t, **fields}


def test_refill_pairs_each_finish_with_the_next_free_create() -> None:
    # Limit 2: two creates fill the slots; each finish frees one, refilled by the next create.
    events = [
        ev("create", 0.00),
        ev("create", 0.01),
        ev("finish", 0.50),
        ev("finish", 0.51),
        ev("create", 0.56),  # 60 ms after the first finish
        ev("create", 0.61),  # 100 ms after the second
        ev("finish", 1.06),
        ev("create", 1.08),  # 20 ms
        ev("finish", 1.11),  # the backlog is empty: no create follows
        ev("finish", 1.58),
        ev("webhook", 0.52),
    ]
    gaps = _measure.refill_gaps(list(reversed(events)))  # order of the input does not matter
    assert [round(g * 1000) for g in gaps] == [60, 100, 20]


def test_refill_without_finishes_or_creates() -> None:
    assert _measure.refill_gaps([ev("create", 1.0), ev("create", 2.0)]) == []
    assert _measure.refill_gaps([ev("finish", 1.0)]) == []


def test_run_times_use_the_last_attempt_per_task() -> None:
    events = [
        ev("create", 1.0, prediction_id="p1", task="t1"),
        ev("finish", 1.2, prediction_id="p1"),
        ev("create", 5.0, prediction_id="p2", task="t1"),  # a retry of t1
        ev("finish", 5.05, prediction_id="p2"),
        ev("create", 2.0, prediction_id="p3", task="t2"),  # still running
        ev("create", 2.0, prediction_id="p4"),  # no task id: not ours
        ev("finish", 2.1, prediction_id="p4"),
    ]
    runs = _measure.run_times(events)
    assert runs.keys() == {"t1"}
    assert runs["t1"] == pytest.approx(0.05)
    assert _measure.first_creates(events) == {"t1": 1.0, "t2": 2.0}


def test_added_latency_subtracts_the_run_time_and_skips_unknowns() -> None:
    submitted = {"a": 10.0, "b": 20.0, "c": 30.0, "d": 40.0}
    terminal = {"a": 10.5, "b": 21.0, "d": 40.3}
    runs = {"a": 0.2, "b": 0.5, "c": 0.1}
    added = _measure.added_latencies_ms(submitted, terminal, runs)
    assert [round(x) for x in added] == [300, 500]


# --- the BullMQ peer's availability -------------------------------------------------------


def test_bullmq_peer_skips_without_a_harness(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BULLMQ_HARNESS", str(tmp_path / "missing"))
    reason = _peers.unavailable()
    assert reason is not None
    assert "no BullMQ harness" in reason
    result = _peers.run_work_through(
        warmup_s=0, window_s=0, outstanding=1, concurrency=1, on_window=lambda *_: None
    )
    assert result == {"skipped": reason}


# --- work counted per task ------------------------------------------------------------------

METRICS_TEXT = """# HELP conveyor_grpc_server_handled_total RPCs completed, by method and status code.
# TYPE conveyor_grpc_server_handled_total counter
conveyor_grpc_server_handled_total{grpc_code="OK",grpc_method="/conveyor.scheduler.v1.ProviderCoordinationService/BeginSubmitBatch",service="scheduler"} 40.0
conveyor_grpc_server_handled_total{grpc_code="UNAVAILABLE",grpc_method="/conveyor.scheduler.v1.ProviderCoordinationService/BeginSubmitBatch",service="scheduler"} 2.0
conveyor_grpc_server_handled_total{grpc_code="OK",grpc_method="/conveyor.scheduler.v1.SchedulerService/SubmitTask",service="scheduler"} 7.0
conveyor_grpc_server_handling_seconds_count{grpc_method="/conveyor.scheduler.v1.SchedulerService/SubmitTask",service="scheduler"} 7.0
"""


def test_rpc_counts_sum_every_status_code_per_method() -> None:
    assert _counts.rpc_counts(METRICS_TEXT) == {
        "scheduler/BeginSubmitBatch": 42.0,
        "scheduler/SubmitTask": 7.0,
    }


def test_work_per_task_divides_the_window_by_the_tasks_completed() -> None:
    before = _counts.Counts(
        pg_transactions=1000,
        kafka_records={"events": 400, "commands": 100},
        rpcs={"scheduler/SubmitTask": 10.0, "scheduler/CompleteSubmitBatch": 5.0},
    )
    after = _counts.Counts(
        pg_transactions=1450,
        kafka_records={"events": 800, "commands": 200},
        rpcs={
            "scheduler/SubmitTask": 110.0,
            "scheduler/CompleteSubmitBatch": 5.0,  # no call in the window: left out
            "gateway/SubmitTask": 100.0,  # first seen in the window
        },
    )
    assert _counts.per_task(before, after, 100) == {
        "pg_transactions": 4.5,
        "kafka_records": 5.0,
        "kafka_records_by_topic": {"commands": 1.0, "events": 4.0},
        "grpc_calls": 2.0,
        "grpc_calls_by_method": {"gateway/SubmitTask": 1.0, "scheduler/SubmitTask": 1.0},
    }
    assert _counts.per_task(before, after, 0) == {}


def test_stage_medians_take_each_stage_over_the_tasks_that_have_both_ends() -> None:
    def path(t0: float, gaps_ms: list[float]) -> dict[str, float | None]:
        points: dict[str, float | None] = {}
        t = t0
        for name, gap in zip(_stages.POINTS, [0.0, *gaps_ms], strict=True):
            t += gap / 1000.0
            points[name] = t
        return points

    a = path(100.0, [5, 8, 4, 5, 1, 9, 3, 4, 3])  # 42 ms in all
    b = path(200.0, [7, 8, 6, 5, 1, 7, 3, 4, 3])  # 44 ms
    c = path(300.0, [6, 8, 5, 5, 1, 8, 3, 4, 3])  # 43 ms
    c["command_record"] = None  # a record not found: both of its stages skip this task
    out = _stages.stage_medians([a, b, c])
    assert out["n"] == 3
    assert out["created_to_dispatched_ms"] == pytest.approx(6.0)  # median of 5, 7, 6
    assert out["dispatched_to_command_record_ms"] == pytest.approx(8.0)  # a and b only
    assert out["command_record_to_begin_submit_ms"] == pytest.approx(5.0)  # median of 4 and 6
    assert out["finish_to_result_record_ms"] == pytest.approx(8.0)
    assert out["total_ms"] == pytest.approx(43.0)  # the whole path needs only its two ends
    assert list(out)[1:-1] == [f"{x}_to_{y}_ms" for x, y in itertools.pairwise(_stages.POINTS)]


def test_stage_medians_of_no_tasks() -> None:
    assert _stages.stage_medians([]) == {"n": 0}
