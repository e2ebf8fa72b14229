"""Scheduler benchmark: dispatch throughput and refill latency at 10k and 1M waiting tasks and under
skew, against the naive per-row-counter dispatch of performance.md §2.4 measured in the same run.

The scheduler runs alone on the devstack's PostgreSQL (server defaults: fsync on; never the test
mode) with 1,000 tenants (free tier: 3 slots each) and completions simulated at once: every
dispatched task is completed in-process through the results consumer's code path
(``SchedulerCore.apply_results``), so each dispatched task costs a dispatch transaction share and a
completion transaction share, both with their events and outbox rows.

* ``dispatch_throughput_tps``: tasks dispatched per second by the leader loop (global limit 1,000
  slots, 3 per tenant) while an in-process completer completes each dispatched batch as soon as it
  commits, the way the service runs its leader loop and results consumer side by side. Also
  ``sequential_tps`` (each cycle then its completions, no overlap) and ``dispatch_only_tps`` (the
  dispatch cycles' own rate in that sequential run).
* ``refill_latency_p50_ms`` / ``_p99_ms``: with the global limit saturated, one task completes (its
  transaction commits) and the leader loop, woken in process, dispatches the next one (its commit):
  the time between the two commits.
* ``_skew``: one tenant holds 90% of a 100k backlog (the saturated tenant's backlog is never
  scanned); compared against the uniform 10k figures.

Usage: ``python bench/scheduler_bench.py [--quick] [--database-url URL] [--out PATH]``.
``--quick`` (CI smoke, < 60 s) uses a 100k backlog instead of 1M and shorter windows.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import text

from conveyor_scheduler.core import SchedulerCore
from conveyor_scheduler.dispatch.cycle import Dispatcher
from conveyor_scheduler.dispatch.leadership import Leader
from conveyor_scheduler.dispatch.loops import LeaderLoops
from conveyor_scheduler.dispatch.policy import Policy
from conveyor_scheduler.dispatch.wakeups import Wakeups
from conveyor_scheduler.settings import SchedulerSettings
from conveyor_scheduler.store.db import create_engine
from conveyor_testkit import scheduler as kit

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # bench/ helpers are imported by their package path
    sys.path.insert(0, str(_ROOT))

from bench._scheduler_baseline import baseline  # noqa: E402

TENANTS = 1000
RESULTS = Path(__file__).resolve().parent / "results" / "scheduler.json"


def _settings(url: str, **overrides: Any) -> SchedulerSettings:
    base: dict[str, Any] = {
        "global_concurrency": 1000,
        "queue_capacity": 10_000_000,
        "tenant_max_waiting": 10_000_000,
        "dispatch_batch_max": 500,
        "tenant_candidates_max": 3,
        "aging_rate_per_minute": 0.2,
        "maintenance_seconds": 3600.0,
        "dispatch_poll_seconds": 1.0,
        "dispatch_window": 0,  # the dispatcher alone: no adapter takes the commands up
    }
    base.update(overrides)
    return kit.make_settings(url, **base)


# ------------------------------------------------------------------------------------------------
# Database setup


async def fresh_database(server_url: str, name: str) -> str:
    """Create database ``name`` on the server of ``server_url`` and migrate it."""
    async with await psycopg.AsyncConnection.connect(server_url, autocommit=True) as conn:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = server_url.rpartition("/")
    url = f"{base}/{name}"
    await kit.migrate(url)
    return url


async def load_backlog(url: str, total: int, skew: bool, policy: Policy) -> float:
    """COPY ``total`` queued tasks over 1,000 tenants (90% to one tenant when ``skew``)."""
    started = time.perf_counter()
    now = datetime.now(UTC)
    rng = random.Random(7)
    counts = [0] * TENANTS
    cols = (
        "id, tenant_id, request_id, kind, model, is_deployment, input, priority, tier, status,"
        " progress, attempt, attempt_base, max_attempts, generation, cancel_requested,"
        " run_timeout_s, created_at, updated_at, enqueued_at, last_sequence, labels, slot_cost, rank"
    )
    async with await psycopg.AsyncConnection.connect(url) as conn:
        await conn.execute(
            "INSERT INTO tenants (tenant_id, claimed_tier, tokens) SELECT 'tenant-' || g, 1, 1e9"
            " FROM generate_series(0, %s) g",
            (TENANTS - 1,),
        )
        async with conn.cursor() as cur, cur.copy(f"COPY tasks ({cols}) FROM STDIN") as copy:
            for i in range(total):
                t = 0 if skew and rng.random() < 0.9 else rng.randrange(TENANTS)
                counts[t] += 1
                enq = now - timedelta(seconds=(total - i) * 0.001)
                await copy.write_row(
                    (
                        uuid.uuid4(),
                        f"tenant-{t}",
                        f"r{i}",
                        2,
                        "acme/img",
                        False,
                        '{"prompt": "x"}',
                        3,
                        1,
                        1,
                        0,
                        0,
                        0,
                        3,
                        0,
                        False,
                        600,
                        enq,
                        enq,
                        enq,
                        0,
                        "{}",
                        1,
                        policy.rank(3, 1, enq),
                    )
                )
        async with conn.cursor() as cur:
            await cur.executemany(
                "UPDATE tenants SET waiting = %s WHERE tenant_id = %s",
                [(c, f"tenant-{t}") for t, c in enumerate(counts) if c],
            )
        await conn.execute(
            "UPDATE queue_counters SET waiting = CASE WHEN shard = 0 THEN %s ELSE 0 END", (total,)
        )
        await conn.commit()
        await conn.set_autocommit(True)
        await conn.execute("VACUUM ANALYZE tasks")
        await conn.execute("VACUUM ANALYZE tenants")
    return time.perf_counter() - started


# ------------------------------------------------------------------------------------------------
# Measurements


async def measure_throughput(url: str, dispatches: int) -> dict[str, float]:
    """The leader loop dispatches while a completer (the results consumer's path, in process)
    completes every dispatched task as soon as its dispatch commits, as the service runs them:
    tasks dispatched per second until ``dispatches`` went out."""
    settings = _settings(url)
    engine = create_engine(url, pool_size=4)
    wakeups = Wakeups()
    core = SchedulerCore(engine, settings, wakeups=wakeups)
    leader = Leader(settings, url, "bench-loop")
    loops = LeaderLoops(settings, core.policy, engine, leader, wakeups)
    queue: asyncio.Queue[list[tuple[uuid.UUID, int]]] = asyncio.Queue()
    dispatched = 0
    reached = asyncio.Event()
    reached_at = 0.0

    def on_commit(n: int) -> None:
        nonlocal dispatched, reached_at
        dispatched += n
        queue.put_nowait(list(loops.dispatcher.last_dispatched))
        if dispatched >= dispatches and not reached.is_set():
            reached_at = time.perf_counter()
            reached.set()

    async def completer() -> None:
        while True:
            batch = await queue.get()
            while not queue.empty() and len(batch) < 1000:
                batch += queue.get_nowait()
            await core.apply_results([kit.result(t, a, "succeeded") for t, a in batch])

    loops.dispatcher.on_commit.append(on_commit)
    started = time.perf_counter()
    loops.start()
    worker = asyncio.create_task(completer())
    try:
        await asyncio.wait_for(reached.wait(), timeout=600)
    finally:
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker
        await loops.stop()
        # Complete what is still in flight so the next measurement starts with free slots.
        async with engine.connect() as conn:
            left = (
                await conn.execute(text("SELECT id, attempt FROM tasks WHERE status = 2"))
            ).all()
        if left:
            await core.apply_results([kit.result(r.id, r.attempt, "succeeded") for r in left])
        await leader.dispose()
        await engine.dispose()
    return {"tps": dispatched / (reached_at - started), "dispatched": dispatched}


async def measure_sequential(url: str, dispatches: int) -> dict[str, float]:
    """Dispatch cycles, each followed by the completion of its tasks (no overlap): tasks per
    second, and the rate of the dispatch cycles alone."""
    settings = _settings(url)
    engine = create_engine(url, pool_size=4)
    core = SchedulerCore(engine, settings, wakeups=Wakeups())
    leader = Leader(settings, url, "bench")
    assert await leader.try_acquire()
    disp = Dispatcher(settings, core.policy, leader, core.wakeups)
    done = 0
    cycles = 0
    dispatch_s = 0.0
    started = time.perf_counter()
    try:
        while done < dispatches:
            t0 = time.perf_counter()
            n = await disp.cycle()
            dispatch_s += time.perf_counter() - t0
            cycles += 1
            if n == 0:
                break
            await core.apply_results(
                [kit.result(tid, attempt, "succeeded") for tid, attempt in disp.last_dispatched]
            )
            done += n
        elapsed = time.perf_counter() - started
    finally:
        await leader.dispose()
        await engine.dispose()
    return {
        "tps": done / elapsed,
        "dispatched": done,
        "cycles": cycles,
        "dispatch_only_tps": done / dispatch_s if dispatch_s else 0.0,
    }


async def measure_refill(url: str, samples: int) -> dict[str, float]:
    """p50/p99 from a completion's commit to the next dispatch's commit (leader loop, saturated)."""
    settings = _settings(url, global_concurrency=200)
    engine = create_engine(url, pool_size=4)
    wakeups = Wakeups()
    core = SchedulerCore(engine, settings, wakeups=wakeups)
    leader = Leader(settings, url, "bench-refill")
    loops = LeaderLoops(settings, core.policy, engine, leader, wakeups)
    dispatched = asyncio.Event()
    stamp: list[float] = []

    def on_commit(n: int) -> None:
        stamp.append(time.perf_counter())
        dispatched.set()

    loops.dispatcher.on_commit.append(on_commit)
    loops.start()
    latencies: list[float] = []
    try:
        # Fill the global limit first.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            async with engine.connect() as conn:
                active = await conn.scalar(text("SELECT count(*) FROM active_slots"))
            if active >= 200:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        for _ in range(samples):
            async with engine.connect() as conn:
                row = (
                    await conn.execute(
                        text(
                            "SELECT id, attempt FROM tasks WHERE status = 2 ORDER BY random() LIMIT 1"
                        )
                    )
                ).first()
            assert row is not None
            dispatched.clear()
            stamp.clear()
            await core.apply_results([kit.result(row.id, row.attempt, "succeeded")])
            t0 = time.perf_counter()
            await asyncio.wait_for(dispatched.wait(), timeout=5)
            latencies.append((stamp[0] - t0) * 1000)
            await asyncio.sleep(0.005)
    finally:
        await loops.stop()
        await leader.dispose()
        await engine.dispose()
    latencies.sort()
    return {
        "p50_ms": statistics.median(latencies),
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "samples": len(latencies),
    }


async def measure_submits(url: str, seconds: float, clients: int = 8) -> float:
    """Single-task submits per second through SubmitTask's path (``SchedulerCore.submit_one``:
    admission, idempotency key, task, event, outbox; concurrent calls share a group commit) from
    ``clients`` concurrent callers over 1,000 tenants."""
    settings = _settings(url)
    engine = create_engine(url, pool_size=clients)
    core = SchedulerCore(engine, settings, wakeups=Wakeups())
    done = 0
    stop_at = time.monotonic() + seconds

    async def client(seed: int) -> None:
        nonlocal done
        rng = random.Random(seed)
        while time.monotonic() < stop_at:
            await core.submit_one(f"tenant-{rng.randrange(TENANTS)}", 1, kit.item())
            done += 1

    started = time.perf_counter()
    try:
        await asyncio.gather(*(client(i) for i in range(clients)))
    finally:
        await engine.dispose()
    return done / (time.perf_counter() - started)


# ------------------------------------------------------------------------------------------------
# Baseline: performance.md §2.4 (per-row counters, one job per transaction, 8 clients)


# ------------------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    server_url: str = args.database_url
    server = None
    if not server_url:
        from conveyor_devstack.stack import start_postgres_async

        # Server defaults (fsync on) except a cache that holds the 1M-task working set, as any
        # production server would; the baseline runs on the same server.
        server = await start_postgres_async(fast=False, settings={"shared_buffers": "1GB"})
        server_url = server.url
    big = 100_000 if args.quick else 1_000_000
    window = 3000 if args.quick else 20_000
    samples = 60 if args.quick else 400
    policy = Policy.from_settings(_settings(server_url))
    out: dict[str, Any] = {
        "machine": "2 vCPU (shared by client and server)",
        "tenants": TENANTS,
        "tenant_limit": 3,
        "quick": args.quick,
        "big_backlog": big,
        "started_at": datetime.now(UTC).isoformat(),
    }
    try:
        for label, total, skew in (
            ("10k", 10_000, False),
            ("1m", big, False),
            ("skew", 100_000, True),
        ):
            url = await fresh_database(server_url, f"sched_bench_{label}")
            load_s = await load_backlog(url, total, skew, policy)
            print(f"[{label}] loaded {total} tasks in {load_s:.1f}s", file=sys.stderr)
            # Under skew the light tenants hold 10% of the backlog: measure while they still have
            # work (the heavy tenant alone can only ever hold its 3 slots).
            count = min(window, total // 20 if skew else total // 2)
            seq = await measure_sequential(url, count // 2)
            tp = await measure_throughput(url, count // 2)
            refill = await measure_refill(url, samples)
            out[f"dispatch_throughput_tps_{label}"] = round(tp["tps"], 1)
            out[f"sequential_tps_{label}"] = round(seq["tps"], 1)
            out[f"dispatch_only_tps_{label}"] = round(seq["dispatch_only_tps"], 1)
            out[f"refill_latency_p50_ms_{label}"] = round(refill["p50_ms"], 2)
            out[f"refill_latency_p99_ms_{label}"] = round(refill["p99_ms"], 2)
            out[f"backlog_{label}"] = total
            out[f"load_seconds_{label}"] = round(load_s, 1)
            print(f"[{label}] {tp} {seq} {refill}", file=sys.stderr)
        url = await fresh_database(server_url, "sched_bench_submit")
        await load_backlog(url, 0, False, policy)
        out["submit_throughput_tps"] = round(
            await measure_submits(url, 2.0 if args.quick else 8.0), 1
        )
        url = await fresh_database(server_url, "sched_bench_baseline")
        secs = 2.5 if args.quick else 10.0
        out["baseline_naive_tps_uniform"] = round(await baseline(url, 100_000, False, secs), 1)
        out["baseline_naive_tps_skew"] = round(await baseline(url, 100_000, True, secs), 1)
        out["baseline"] = (
            "performance.md §2.4 naive dispatch on the same server in the same run: claim 1 job per"
            " transaction (SKIP LOCKED over jobs joined to per-user counter rows, limit 3 per user,"
            " 1,000 users) plus one global counter row, then complete it; 8 clients"
        )
        t10, t1m, tsk = (out[f"dispatch_throughput_tps_{k}"] for k in ("10k", "1m", "skew"))
        out["ratio_throughput_vs_baseline_uniform"] = round(
            t10 / out["baseline_naive_tps_uniform"], 2
        )
        out["ratio_throughput_vs_baseline_skew"] = round(tsk / out["baseline_naive_tps_skew"], 2)
        out["ratio_throughput_1m_vs_10k"] = round(t10 / t1m, 2)
        out["ratio_throughput_skew_vs_uniform"] = round(t10 / tsk, 2)
        out["ratio_refill_p99_1m_vs_10k"] = round(
            out["refill_latency_p99_ms_1m"] / out["refill_latency_p99_ms_10k"], 2
        )
        out["ratio_refill_p99_skew_vs_uniform"] = round(
            out["refill_latency_p99_ms_skew"] / out["refill_latency_p99_ms_10k"], 2
        )
        out["dispatch_throughput_tps"] = t10
        out["refill_latency_p50_ms"] = out["refill_latency_p50_ms_10k"]
        out["refill_latency_p99_ms"] = out["refill_latency_p99_ms_10k"]
        out["targets"] = {
            "dispatch_throughput_tps": ">= 3000",
            "refill_latency_p99_ms": "<= 20",
            "1m_vs_10k": "<= 1.5x",
            "skew_vs_uniform": "<= 1.5x",
        }
        async with await psycopg.AsyncConnection.connect(server_url, autocommit=True) as conn:
            for label in ("10k", "1m", "skew", "submit", "baseline"):
                await conn.execute(f'DROP DATABASE IF EXISTS "sched_bench_{label}" WITH (FORCE)')
    finally:
        if server is not None:
            await asyncio.to_thread(server.close)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="CI smoke: 100k instead of 1M, short windows"
    )
    parser.add_argument(
        "--database-url", default="", help="an existing server (else the devstack's)"
    )
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    result = asyncio.run(run(args))
    result["bench_seconds"] = round(time.perf_counter() - started, 1)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
