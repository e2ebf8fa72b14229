"""Whole-pipeline benchmark (issue #13): a task's whole path, end to end, as a user sees it.

gateway -> scheduler (PostgreSQL, outbox) -> Kafka -> provider adapter -> (fake) Replicate -> webhook ->
adapter -> Kafka -> scheduler -> Kafka -> notifier -> watch stream, measured in the deployed shape of
``make up`` (``conveyor_devstack.system.ConveyorSystem``: 2 schedulers, 1 adapter, 1 notifier, 1 gateway)
on one devstack with durable PostgreSQL (fsync and synchronous_commit on), the fake Replicate with
instant predictions, and every limit lifted (global, tier, model concurrency; tenant submit rate, burst
and max waiting; queue capacity; provider and adapter create rates; the gateway's rate limit; the fake's
rate limits). Each scenario runs on a freshly started system (``--quick`` shares one system between
the lifted-limit scenarios). Writes ``bench/results/pipeline.json``:

* ``work_through_tps``: tasks completed end to end per second over a 60 s window with 1,000 tasks
  outstanding (a closed loop over several tenants: each terminal event seen on the tenant's
  ``WatchTasks`` stream, filtered to terminal types, triggers the next single ``SubmitTask``);
* ``cpu_ms_per_task``: CPU (utime+stime from ``/proc/<pid>/stat``, with the reaped children's
  cutime+cstime: PostgreSQL's backends) of the services, PostgreSQL (postmaster and backends) and Kafka
  over that window per completed task; ``cpu_ms_per_task_by_process`` per group; the fake's and the
  load generator's CPU reported apart (``fake_cpu_ms_per_task``, ``loadgen_cpu_ms_per_task``);
* ``work_per_task``: over the same window, per completed task, PostgreSQL transactions, Kafka records
  (by topic) and gRPC calls the services handled (by method): counts, which unlike the timings do
  not move with the machine's speed that day (``bench/_counts.py``);
* ``added_latency_p50_ms_at_5tps`` / ``added_latency_p99_ms_at_100tps``: open-loop paced submits
  (~20 s each), from the scheduled submit time to the terminal event on the watch stream, minus the
  prediction's own run time at the fake (create -> finish in its ledger); after an unmeasured warm-up
  run (10 s at 50/s: the fresh system's first seconds), whose figures are kept in the details, and
  with the 5/s run's stage medians (``at_5_per_s_stages_ms``: where the time goes, ``bench/_stages.py``);
* ``refill_p99_ms``: global limit 5, 0.5 s predictions, a few hundred tasks: from a finish at the fake
  to the next create (the fake's ledger timestamps, paired in time order); 100 unmeasured tasks go
  first. It runs after the lifted-limit scenarios, on a broker they warmed up;
* ``work_through_tps_with_hung_creates``: the work-through loop over a shorter window while 1% of
  creates hang 3 s at the fake and then drop (the adapter recovers them): a hung command holds its
  own slot only, not the adapter's other commands;
* ``priority_under_backlog_s``: tenant A submits 2,000 tasks and they are all dispatched; then tenant B
  submits one urgent task: seconds from B's submit to its create at the fake;
* BullMQ end to end in the same invocation (Redis AOF fsync always; a Worker from the shared harness
  completing no-op jobs, 1,000 outstanding, completions seen through QueueEvents), its jobs/s and CPU
  per job (Redis + worker), and the ratios ``ratio_*_vs_bullmq`` (conveyor / bullmq).

The machine has 2 cores shared by every process, the load generator (this process) included.

Usage: ``python bench/pipeline_bench.py [--quick] [--out PATH] [--note TEXT]``; ``--quick`` runs every
scenario on a tiny load (about a minute) and is what the smoke test runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conveyor_devstack.stack import Devstack
from conveyor_devstack.system import ConveyorSystem
from conveyor_devstack.topics import conveyor_topics

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # bench/ helpers are imported by their package path
    sys.path.insert(0, str(ROOT))

from bench._pipeline_scenarios import (  # noqa: E402
    bullmq,
    hung_creates,
    latency,
    priority,
    refill,
    work_through,
)
from bench._pipeline_system import (  # noqa: E402
    LIFTED_ADAPTER,
    LIFTED_FAKE,
    LIFTED_GATEWAY,
    LIFTED_SCHEDULER,
    TARGETS,
    Plan,
    running,
)
from bench._pipeline_system import hung_creates as hung_create_faults  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Processes to account


# ---------------------------------------------------------------------------------------------
# The system


# ---------------------------------------------------------------------------------------------
# The client side


# ---------------------------------------------------------------------------------------------
# Scenarios


# ---------------------------------------------------------------------------------------------


def _ratio(a: Any, b: Any) -> float | None:
    if isinstance(a, int | float) and isinstance(b, int | float) and b:
        return round(float(a) / float(b), 4)
    return None


async def bench(plan: Plan, quick: bool, log_level: str, note: str | None) -> dict[str, Any]:
    logs = Path(tempfile.mkdtemp(prefix="pipeline-bench-"))
    print(f"pipeline bench: logs in {logs}", flush=True)
    load_before = os.getloadavg()
    result: dict[str, Any] = {}
    scenarios: dict[str, Any] = {}
    timings: dict[str, float] = {}
    started = time.monotonic()
    devstack = await Devstack.start(fast=False, topics=conveyor_topics()).start_async()
    try:
        timings["devstack"] = round(time.monotonic() - started, 1)
        # Refill after the lifted-limit runs, on a broker they warmed up (its JIT: a fresh
        # broker's hops cost several times a running one's); before the hung-creates run, whose
        # database's autovacuum would otherwise run beside the timed ones. Priority stays last: its
        # dispatched backlog stays in Kafka, where the next system's adapter would find it.
        faults = hung_create_faults(plan)
        steps: list[tuple[str, Callable[[ConveyorSystem, Plan], Any], dict[str, Any]]] = [
            ("work_through", work_through, {}),
            ("latency", latency, {}),
            ("refill", refill, {"refill": plan}),
            ("hung_creates", hung_creates, {"faults": faults}),
            ("priority", priority, {}),
        ]
        if quick:  # one system for the lifted-limit steps: the same code paths, fewer starts
            async with running(devstack, logs, "lifted", log_level) as system:
                for name, step, _ in steps[:2]:
                    print(f"== {name}", flush=True)
                    scenarios[name] = await step(system, plan)
                    timings[name] = round(time.monotonic() - started, 1)
            steps = steps[2:]
        for name, step, config in steps:
            print(f"== {name}", flush=True)
            async with running(devstack, logs, name, log_level, **config) as system:
                scenarios[name] = await step(system, plan)
            timings[name] = round(time.monotonic() - started, 1)
        devstack_info = devstack.describe()
    finally:
        await asyncio.to_thread(devstack.close)
    print("== bullmq", flush=True)
    peer = await asyncio.to_thread(bullmq, plan)
    timings["bullmq"] = round(time.monotonic() - started, 1)

    for scenario in scenarios.values():
        result.update({k: v for k, v in scenario.items() if k != "details"})
    result["bullmq_work_through_jobs_s"] = peer.get("jobs_per_s")
    result["bullmq_cpu_ms_per_job"] = peer.get("cpu_ms_per_job")
    result["ratio_work_through_vs_bullmq"] = _ratio(
        result.get("work_through_tps"), peer.get("jobs_per_s")
    )
    result["ratio_cpu_per_task_vs_bullmq"] = _ratio(
        result.get("cpu_ms_per_task"), peer.get("cpu_ms_per_job")
    )
    result["targets"] = TARGETS
    result["meets_targets"] = {
        key: (
            result.get(key) is not None
            and (result[key] >= bound if key == "work_through_tps" else result[key] <= bound)
        )
        for key, bound in TARGETS.items()
    }
    result["scenarios"] = {name: s.get("details", {}) for name, s in scenarios.items()}
    result["bullmq"] = peer
    result["setup"] = {
        "quick": quick,
        "plan": plan.__dict__,
        "shape": "2 schedulers, 1 adapter, 1 notifier, 1 gateway (ConveyorSystem, make up)",
        "postgres": "durable: fsync on, synchronous_commit on (devstack fast=False)",
        "fake": "instant predictions (min/max duration 0 s) except the refill scenario",
        "limits": {
            "scheduler": LIFTED_SCHEDULER,
            "adapter": LIFTED_ADAPTER,
            "gateway": LIFTED_GATEWAY,
            "fake": LIFTED_FAKE,
        },
        "log_level": log_level,
        "devstack": devstack_info,
        "cpus": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "elapsed_s": round(time.monotonic() - started, 1),
        "finished_at_s": timings,
        "logs": str(logs),
    }
    if note:
        result["note"] = note
    return result


def print_summary(result: dict[str, Any]) -> None:
    keys = [*TARGETS, "fake_cpu_ms_per_task", "loadgen_cpu_ms_per_task", "refill_p50_ms"]
    keys += ["work_through_tps_with_hung_creates"]
    keys += ["bullmq_work_through_jobs_s", "bullmq_cpu_ms_per_job"]
    keys += ["ratio_work_through_vs_bullmq", "ratio_cpu_per_task_vs_bullmq"]
    for key in keys:
        bound = TARGETS.get(key)
        extra = (
            f"  (target {'>=' if key == 'work_through_tps' else '<='} {bound:g})" if bound else ""
        )
        print(f"   {key:40} {result.get(key)}{extra}")
    for name, ms in (result.get("cpu_ms_per_task_by_process") or {}).items():
        print(f"   cpu_ms_per_task[{name}]{'':{max(1, 23 - len(name))}} {ms}")
    work = result.get("work_per_task") or {}
    for key in ("pg_transactions", "kafka_records", "grpc_calls"):
        print(f"   work_per_task[{key}]{'':{max(1, 25 - len(key))}} {work.get(key)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny loads (about a minute)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "pipeline.json")
    parser.add_argument("--note", help="free text stored in the result (e.g. machine load)")
    parser.add_argument(
        "--log-level", default="INFO", help="log level of every service (default INFO, as deployed)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    plan = Plan.quick() if args.quick else Plan()
    result = asyncio.run(bench(plan, args.quick, args.log_level, args.note))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_summary(result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
