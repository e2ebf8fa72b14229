"""The pipeline benchmark's scenarios: work-through with CPU per task, paced latency, slot refill,
priority under a dispatched backlog, and BullMQ's end-to-end run on the same machine.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

from bench import _counts, _measure, _peers, _stages
from bench._pipeline_client import Client, Terminals, tenant_names
from bench._pipeline_system import SYSTEM_GROUPS, Plan, cpu_targets, fetch_ledger
from conveyor.tasks.v1 import task_pb2
from conveyor_common import topics
from conveyor_devstack.system import ConveyorSystem

COUNTED_TOPICS = [topics.TASK_EVENTS, topics.PROVIDER_COMMANDS, topics.PROVIDER_RESULTS]
"""The topics a task's happy path writes to (``work_per_task``)."""


async def work_through(system: ConveyorSystem, plan: Plan) -> dict[str, Any]:
    """Closed loop with ``plan.outstanding`` tasks outstanding; completions and CPU over the window."""
    tenants = tenant_names("wt", plan.tenants)
    client = Client(system, tenants)
    terminals = Terminals(client)
    probe = _measure.CpuProbe(cpu_targets(system))
    completions: list[float] = []
    submitting = True
    inflight: set[asyncio.Task[None]] = set()

    async def submit_one(tenant: str) -> None:
        while submitting:
            tid = await client.submit(tenant)
            if tid is not None:
                terminals.expect(tid, tenant)
                return
            await asyncio.sleep(0.05)

    def spawn(tenant: str) -> None:
        task = asyncio.create_task(submit_one(tenant))
        inflight.add(task)
        task.add_done_callback(inflight.discard)

    def on_done(task_id: str, tenant: str) -> None:
        completions.append(time.monotonic())
        if submitting:
            spawn(tenant)

    try:
        await terminals.ready(tenants)
        terminals.listeners.append(on_done)
        started = time.monotonic()
        for i in range(plan.outstanding):
            spawn(tenants[i % len(tenants)])
        await asyncio.sleep(plan.warmup_s)
        counts_before = await _counts.read_counts(system, COUNTED_TOPICS)
        cpu_before = probe.sample()
        window_start = time.monotonic()
        await asyncio.sleep(plan.window_s)
        cpu_after = probe.sample()
        window_end = time.monotonic()
        counts_after = await _counts.read_counts(system, COUNTED_TOPICS)
        submitting = False
        done = sum(1 for t in completions if window_start <= t < window_end)
        elapsed = window_end - window_start
        # Drain, so the next system on this Kafka finds no leftover commands.
        drain_deadline = time.monotonic() + plan.drain_timeout_s
        await asyncio.gather(*inflight, return_exceptions=True)
        await terminals.until(lambda: not terminals.pending, drain_deadline - time.monotonic())
        cpu = probe.delta_ms(cpu_before, cpu_after)
        total, by = _measure.per_task({k: v for k, v in cpu.items() if k in SYSTEM_GROUPS}, done)
        apart = _measure.per_task({k: v for k, v in cpu.items() if k not in SYSTEM_GROUPS}, done)[1]
        return {
            "work_through_tps": round(done / elapsed, 1),
            "cpu_ms_per_task": total,
            "cpu_ms_per_task_by_process": by,
            "fake_cpu_ms_per_task": apart.get("fake"),
            "loadgen_cpu_ms_per_task": apart.get("loadgen"),
            # Counted, not timed: comparable across runs whatever the machine's speed that day.
            "work_per_task": _counts.per_task(counts_before, counts_after, done),
            "details": {
                "tenants": len(tenants),
                "outstanding": plan.outstanding,
                "warmup_s": plan.warmup_s,
                "window_s": round(elapsed, 2),
                "completed_in_window": done,
                "completed_total": len(completions),
                "cpu_ms_in_window": {k: round(v, 1) for k, v in cpu.items()},
                "cpu_cores_busy_in_window": round(sum(cpu.values()) / 1000 / elapsed, 2),
                "first_completion_after_s": round(min(completions) - started, 2)
                if completions
                else None,
                "drained": not terminals.pending,
                "left_pending": len(terminals.pending),
                "client_errors": dict(client.errors),
                **terminals.stats(),
            },
        }
    finally:
        submitting = False
        for task in inflight:
            task.cancel()
        await terminals.close()
        await client.close()


async def hung_creates(system: ConveyorSystem, plan: Plan) -> dict[str, Any]:
    """Work-through while a share of creates hang at the provider (``_pipeline_system.hung_creates``
    on the system's fake): one slow command must not hold up the adapter's others."""
    run = replace(plan, window_s=plan.hung_window_s)
    result = await work_through(system, run)
    return {
        "work_through_tps_with_hung_creates": result["work_through_tps"],
        "details": {
            "hung_create_rate": plan.hung_create_rate,
            "hung_create_s": plan.hung_create_s,
            "cpu_ms_per_task": result["cpu_ms_per_task"],
            **result["details"],
        },
    }


async def paced(
    system: ConveyorSystem, client: Client, terminals: Terminals, tenants: list[str], rate: float,
    seconds: float, within_s: float, ids: list[str] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Open loop at ``rate``/s for ``seconds``: added latency of each task (see the module doc);
    ``ids`` collects the submitted task ids."""
    total = max(1, round(rate * seconds))
    scheduled: dict[str, float] = {}
    failed = 0
    max_lag = 0.0
    start_wall = time.time() + 0.1
    start_mono = time.monotonic() + 0.1

    async def one(i: int, at_wall: float) -> None:
        nonlocal failed
        tenant = tenants[i % len(tenants)]
        tid = await client.submit(tenant)
        if tid is None:
            failed += 1
            return
        scheduled[tid] = at_wall
        if ids is not None:
            ids.append(tid)
        terminals.expect(tid, tenant)

    sends: list[asyncio.Task[None]] = []
    for i in range(total):
        delay = start_mono + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        max_lag = max(max_lag, time.monotonic() - (start_mono + i / rate))
        sends.append(asyncio.create_task(one(i, start_wall + i / rate)))
    await asyncio.gather(*sends)
    await terminals.all_seen(list(scheduled), within_s)
    creates = await fetch_ledger(system, "create")
    finishes = await fetch_ledger(system, "finish")
    runs = _measure.run_times(creates + finishes)
    seen = {t: v for t, v in terminals.seen.items() if t not in terminals.reconciled}
    added = _measure.added_latencies_ms(scheduled, seen, runs)
    missing = len(scheduled) - len(added)
    if missing:  # not seen in time (or reconciled): counted at the timeout, a lower bound
        added += [within_s * 1000.0] * missing
    summary: dict[str, Any] = {"offered_per_s": rate, "seconds": seconds, "submitted": total}
    summary.update(_measure.summarize_ms(added))
    summary.update(
        {
            "failed_submits": failed,
            "not_measured": missing,
            "lower_bound": bool(missing),
            "run_time_p50_ms": round(_measure.percentile([runs[t] * 1000 for t in scheduled if t in runs], 50), 2),
            "generator_max_lag_ms": round(max_lag * 1000, 1),
        }
    )  # fmt: skip
    return summary


async def latency(system: ConveyorSystem, plan: Plan) -> dict[str, Any]:
    """Added latency at a light and at a heavy paced load, after an unmeasured warm-up run (the
    system is fresh: its first seconds, and a broker's JIT, are not what a running service sees;
    the warm-up's own figures are in the details)."""
    tenants = tenant_names("lat", plan.tenants)
    client = Client(system, tenants)
    terminals = Terminals(client)
    try:
        await terminals.ready(tenants)
        within_s = 60.0 + plan.fast_rate * plan.paced_s / 10.0
        warmup = await paced(
            system,
            client,
            terminals,
            tenants,
            plan.latency_warmup_rate,
            plan.latency_warmup_s,
            within_s,
        )
        offsets = await _stages.end_offsets(system.devstack.kafka_bootstrap)
        slow_ids: list[str] = []
        slow = await paced(
            system, client, terminals, tenants, plan.slow_rate, plan.paced_s, within_s, slow_ids
        )
        stages = await _stages.breakdown(system, slow_ids, terminals.seen, offsets)
        fast = await paced(
            system, client, terminals, tenants, plan.fast_rate, plan.paced_s, within_s
        )
        return {
            "added_latency_p50_ms_at_5tps": slow["p50_ms"],
            "added_latency_p99_ms_at_100tps": fast["p99_ms"],
            "details": {
                f"at_{plan.slow_rate:g}_per_s": slow,
                f"at_{plan.slow_rate:g}_per_s_stages_ms": stages,
                f"at_{plan.fast_rate:g}_per_s": fast,
                "warmup": warmup,
                "client_errors": dict(client.errors),
                **terminals.stats(),
            },
        }
    finally:
        await terminals.close()
        await client.close()


async def refill(system: ConveyorSystem, plan: Plan) -> dict[str, Any]:
    """Global limit ``refill_limit``, ``refill_duration_s`` predictions: finish -> next create.

    ``refill_warmup_tasks`` go first and are not measured (the fresh system's first seconds); the
    measured tasks are submitted right behind them, so the slots never empty in between.
    """
    tenants = tenant_names("refill", 1)
    client = Client(system, tenants)
    terminals = Terminals(client)

    async def submit(count: int) -> list[str]:
        ids: list[str] = []
        while len(ids) < count:
            got = await client.batch(tenants[0], min(100, count - len(ids)))
            if not got:
                raise RuntimeError(f"batch submit failed: {dict(client.errors)}")
            ids += got
            for tid in got:
                terminals.expect(tid, tenants[0])
        return ids

    try:
        await terminals.ready(tenants)
        warm = await submit(plan.refill_warmup_tasks)
        ids = await submit(plan.refill_tasks)
        total = plan.refill_warmup_tasks + plan.refill_tasks
        expected_s = total * plan.refill_duration_s / plan.refill_limit
        await terminals.all_seen(warm + ids, 3 * expected_s + 120.0)
        mine = set(ids)
        creates = [e for e in await fetch_ledger(system, "create") if e.get("task") in mine]
        predictions = {str(e["prediction_id"]) for e in creates}
        finishes = [
            e for e in await fetch_ledger(system, "finish") if e.get("prediction_id") in predictions
        ]
        gaps = [g * 1000.0 for g in _measure.refill_gaps(creates + finishes)]
        summary = _measure.summarize_ms(gaps)
        return {
            "refill_p50_ms": summary["p50_ms"],
            "refill_p99_ms": summary["p99_ms"],
            "details": {
                "global_limit": plan.refill_limit,
                "prediction_s": plan.refill_duration_s,
                "tasks": plan.refill_tasks,
                "warmup_tasks": len(warm),
                "warmup_completed": sum(1 for t in warm if t in terminals.seen),
                "completed": sum(1 for t in ids if t in terminals.seen),
                "creates": len(creates),
                "pairs": summary,
                "ideal_s": round(plan.refill_tasks * plan.refill_duration_s / plan.refill_limit, 1),
                "client_errors": dict(client.errors),
                **terminals.stats(),
            },
        }
    finally:
        await terminals.close()
        await client.close()


async def priority(system: ConveyorSystem, plan: Plan) -> dict[str, Any]:
    """Tenant A's backlog all dispatched, then tenant B's urgent task: seconds to its create."""
    a, b = tenant_names("prio", 2)
    client = Client(system, [a, b])
    try:
        backlog: set[str] = set()
        started = time.monotonic()
        while len(backlog) < plan.backlog_tasks:
            got = await client.batch(a, min(100, plan.backlog_tasks - len(backlog)))
            if not got:
                raise RuntimeError(f"batch submit failed: {dict(client.errors)}")
            backlog.update(got)
        submitted_s = time.monotonic() - started
        while await client.queued(a):
            if time.monotonic() - started > 300:
                raise RuntimeError("tenant A's backlog was not dispatched within 300 s")
            await asyncio.sleep(0.2)
        dispatched_s = time.monotonic() - started

        def created_of_a(events: list[Any]) -> list[float]:
            return [float(e["t"]) for e in events if e.get("task") in backlog]

        a_created_before = len(created_of_a(await fetch_ledger(system, "create")))
        t0 = time.time()
        tid = await client.submit(b, task_pb2.PRIORITY_URGENT)
        if tid is None:
            raise RuntimeError(f"urgent submit failed: {dict(client.errors)}")
        deadline = time.monotonic() + plan.priority_timeout_s
        created: float | None = None
        while time.monotonic() < deadline:
            events = await fetch_ledger(system, "create", task=tid)
            if events:
                created = float(events[0]["t"])
                break
            await asyncio.sleep(0.1)
        a_created = created_of_a(await fetch_ledger(system, "create"))
        return {
            "priority_under_backlog_s": round(created - t0, 3)
            if created is not None
            else plan.priority_timeout_s,
            "details": {
                "backlog_tasks": plan.backlog_tasks,
                "backlog_submitted_in_s": round(submitted_s, 2),
                "backlog_all_dispatched_after_s": round(dispatched_s, 2),
                "backlog_created_at_fake_before_urgent_submit": a_created_before,
                "backlog_created_at_fake_before_urgent_create": None
                if created is None
                else sum(1 for t in a_created if t < created),
                "lower_bound": created is None,
                "client_errors": dict(client.errors),
            },
        }
    finally:
        await client.close()


def bullmq(plan: Plan) -> dict[str, Any]:
    """BullMQ's closed-loop run with the CPU of Redis and the worker over its window."""
    samples: dict[str, dict[str, int]] = {}
    probe: list[_measure.CpuProbe] = []

    def on_window(edge: str, pids: dict[str, int]) -> None:
        if not probe:
            probe.append(
                _measure.CpuProbe(
                    [
                        _measure.CpuTarget("redis", pids["redis"]),
                        _measure.CpuTarget("worker", pids["worker"]),
                        _measure.CpuTarget("producer", pids["producer"], tree=False),
                    ]
                )
            )
        samples[edge] = probe[0].sample()

    result = _peers.run_work_through(
        warmup_s=plan.bullmq_warmup_s,
        window_s=plan.bullmq_window_s,
        outstanding=plan.outstanding,
        concurrency=50,
        on_window=on_window,
    )
    if "skipped" in result or not probe or set(samples) != {"start", "end"}:
        return result
    cpu = probe[0].delta_ms(samples["start"], samples["end"])
    jobs = int(result.get("completed_in_window", 0))
    total, by = _measure.per_task({k: v for k, v in cpu.items() if k != "producer"}, jobs)
    result["cpu_ms_per_job"] = total
    result["cpu_ms_per_job_by_process"] = by
    result["producer_cpu_ms_per_job"] = _measure.per_task({"p": cpu.get("producer", 0.0)}, jobs)[1][
        "p"
    ]
    return result
