"""Autoscaling of the provider adapter, shown on the running stack.

What runs, all on 127.0.0.1: PostgreSQL and Kafka (devstack), the fake Replicate, the scheduler, the
notifier, the gateway and up to 6 provider adapters (``conveyor_devstack.system``), and a real
Prometheus (Debian's package) scraping every process's /metrics. A load generator submits image tasks
through the gateway at a rate that rises, then falls. Every sync period the controller here:

1. evaluates the EXACT PromQL of the provider-adapter KEDA trigger
   (``deploy/k8s/components/autoscaling-keda/scaledobjects.yaml``) through Prometheus's HTTP API,
   and, for comparison, the prometheus-adapter rule of the HPA flavour expanded the way the adapter does;
2. computes the desired replicas with the Kubernetes HPA algorithm: AverageValue target
   (``ceil(value / threshold)``, 10 % tolerance), min/max, and the ``behavior`` of the manifest
   (stabilization windows, rate policies with their periods, selectPolicy);
3. starts or stops adapter processes (SIGTERM: they leave the consumer group cleanly) to match.

Each adapter creates at most ``--per-replica`` predictions per second (``ADAPTER_CREATE_RATE_PER_MIN``),
which makes one replica's capacity explicit: throughput can only follow the load by adding replicas.
``--time-scale K`` divides every period of the behaviour and the sync/scrape intervals by K (default 4:
the 300 s scale-down window becomes 75 s) so the run takes minutes, not half an hour; the PromQL and
the algorithm are unchanged.

Outputs in ``bench/results/autoscaling/``: ``autoscaling.csv`` (every tick), ``autoscaling.md`` (a
table, one row per ~10 s, and the summary), ``autoscaling.png`` (load/throughput, backlog, replicas),
``summary.json``.

Usage: ``python bench/autoscaling_demo.py [--time-scale 4] [--per-replica 2] [--quick]``
(``--quick``: a shorter profile for a smoke run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # bench/ helpers are imported by their package path
    sys.path.insert(0, str(_ROOT))

from bench._autoscaling_rig import (  # noqa: E402
    AdapterPool,
    LoadStats,
    Prometheus,
    drive_load,
    load_profile,
    offered_rate,
)
from bench._hpa_model import NAMESPACE, ROOT, Behavior, HpaModel, Scaler, load_scaler  # noqa: E402

OUT = ROOT / "bench" / "results" / "autoscaling"

log = logging.getLogger("autoscaling_demo")


# --------------------------------------------------------------------------------------------------
# The HPA algorithm (kubernetes pkg/controller/podautoscaler, autoscaling/v2 with behavior)


# --------------------------------------------------------------------------------------------------
# The manifests: exact queries, targets, bounds and behaviour


# --------------------------------------------------------------------------------------------------
# Prometheus


# --------------------------------------------------------------------------------------------------
# Load


# --------------------------------------------------------------------------------------------------
# The adapter replicas


# --------------------------------------------------------------------------------------------------
# The run


@dataclass
class Row:
    t: float
    offered_tps: float
    submitted: int
    dispatch_backlog: float
    commands_lag: float
    rule_values_agree: bool
    proposal: int
    desired: int
    replicas_running: int
    creates_per_s: float
    completed_per_s: float


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from conveyor_devstack.system import ConveyorSystem, SystemConfig

    scaler = load_scaler()
    behavior = Behavior.from_manifest(scaler.behavior, args.time_scale)
    model = HpaModel(scaler.min_replicas, scaler.max_replicas, scaler.thresholds, behavior)
    sync = 15.0 / args.time_scale
    profile = load_profile(args.quick)
    workdir = Path(tempfile.mkdtemp(prefix="conveyor-autoscale-"))
    log.info(
        "queries: %s; thresholds %s; replicas %d-%d; sync %.2fs; workdir %s",
        scaler.queries,
        scaler.thresholds,
        scaler.min_replicas,
        scaler.max_replicas,
        sync,
        workdir,
    )
    per_min = str(int(args.per_replica * 60))
    config = SystemConfig(
        schedulers=1,
        adapters=1,
        notifiers=1,
        gateways=1,
        run_dir=workdir / "system",
        log_level="WARNING",
        scheduler_env={
            "SCHEDULER_GLOBAL_CONCURRENCY": "2000",
            "SCHEDULER_TIER_CONCURRENCY": '{"free": 2000, "premium": 2000, "pro": 2000}',
            "SCHEDULER_PROVIDER_RATE_PER_SECOND": "200",
            "SCHEDULER_PROVIDER_BURST": "200",
            "SCHEDULER_TENANT_SUBMIT_RATE": "200",
            "SCHEDULER_TENANT_SUBMIT_BURST": "400",
            "SCHEDULER_QUEUE_CAPACITY": "20000",
            "SCHEDULER_TENANT_MAX_WAITING": "20000",
            # Commands wait in Kafka while the adapters are scaled out: no re-emission meanwhile.
            "SCHEDULER_SUBMIT_LEASE_SECONDS": "3600",
        },
        adapter_env={
            "ADAPTER_CREATE_RATE_PER_MIN": per_min,
            "ADAPTER_CREATE_BURST": "1",
            "ADAPTER_THROTTLE_MAX_WAIT_S": "600",
            # The manifest's 15 s, scaled like every other period.
            "ADAPTER_RECONCILE_INTERVAL_S": str(round(15.0 / args.time_scale, 2)),
        },
        fake={
            "min_duration_s": 0.3,
            "max_duration_s": 0.6,
            "output_kind": "text",
            "output_bytes": 64,
        },
    )
    prom = Prometheus(workdir, scrape_interval=max(1.0, sync / 2))
    async with ConveyorSystem.run(config) as system:
        pool = AdapterPool(system, scaler.max_replicas)
        adapters = pool.names
        await asyncio.gather(*(pool.start(n) for n in adapters[1 : scaler.min_replicas]))
        await prom.start(pool.metrics_targets())
        try:
            rows, stats = await control(args, scaler, model, system, pool, prom, profile, adapters)
        finally:
            prom.stop()
    return write_results(rows, stats, scaler, args, profile)


async def control(
    args: argparse.Namespace,
    scaler: Scaler,
    model: HpaModel,
    system: Any,
    pool: AdapterPool,
    prom: Prometheus,
    profile: list[tuple[float, float]],
    adapters: list[str],
) -> tuple[list[Row], LoadStats]:
    """Drive the load and run the autoscaling loop until the replicas are back at the minimum."""
    sync = 15.0 / args.time_scale
    rows: list[Row] = []
    running = adapters[: scaler.min_replicas]
    current = len(running)
    changing: set[asyncio.Task[None]] = set()

    async def scale_to(n: int) -> None:
        nonlocal running
        if n > len(running):
            start = [a for a in adapters if a not in running][: n - len(running)]
            running = running + start
            for name in start:
                t = asyncio.create_task(pool.start(name))
                changing.add(t)
                t.add_done_callback(changing.discard)
        elif n < len(running):
            stop = running[n:]
            running = running[:n]
            for name in stop:
                t = asyncio.create_task(pool.stop(name))
                changing.add(t)
                t.add_done_callback(changing.discard)

    stats = LoadStats()
    throughput = f'sum(rate(conveyor_adapter_creates_total{{namespace="{NAMESPACE}",outcome="created"}}[{max(4, round(sync * 3))}s]))'
    completed = f'sum(rate(conveyor_scheduler_terminal_total{{namespace="{NAMESPACE}",status="succeeded"}}[{max(4, round(sync * 3))}s]))'
    await asyncio.sleep(sync)  # a few scrapes before the first decision
    t0 = time.monotonic()
    load = asyncio.create_task(
        drive_load(system.gateway_address, system.endpoints.tenant_token, profile, stats, t0)
    )
    total = sum(d for d, _ in profile)
    async with httpx.AsyncClient(timeout=5.0, trust_env=False) as client:
        while True:
            now = time.monotonic() - t0
            values = [(await prom.query(client, q)) or 0.0 for q in scaler.queries]
            rule_values = [
                (await prom.query(client, q)) or 0.0 for q in scaler.adapter_rule_queries
            ]
            proposal, desired = model.desired(now, current, values)
            if desired != current:
                model.record(now, desired - current)
                await scale_to(desired)
                current = desired
            live = sum(1 for n in running if system.process(n).running)
            rows.append(
                Row(
                    t=round(now, 2),
                    offered_tps=offered_rate(profile, now),
                    submitted=stats.submitted,
                    dispatch_backlog=values[0],
                    commands_lag=values[1],
                    rule_values_agree=values == rule_values,
                    proposal=proposal,
                    desired=desired,
                    replicas_running=live,
                    creates_per_s=round((await prom.query(client, throughput)) or 0.0, 3),
                    completed_per_s=round((await prom.query(client, completed)) or 0.0, 3),
                )
            )
            r = rows[-1]
            log.info(
                "t=%6.1fs load=%4.1f/s backlog=%5.0f lag=%5.0f proposal=%d desired=%d "
                "running=%d creates=%5.2f/s",
                r.t,
                r.offered_tps,
                r.dispatch_backlog,
                r.commands_lag,
                r.proposal,
                r.desired,
                r.replicas_running,
                r.creates_per_s,
            )
            if now > total and current == scaler.min_replicas and r.dispatch_backlog == 0:
                break
            if now > total + args.max_tail:
                log.warning("stopping: replicas did not return to the minimum in time")
                break
            await asyncio.sleep(max(0.0, sync - ((time.monotonic() - t0) - now)))
    load.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await load
    if changing:
        await asyncio.wait(changing, timeout=30)
    return rows, stats


def write_results(
    rows: list[Row],
    stats: LoadStats,
    scaler: Scaler,
    args: argparse.Namespace,
    profile: list[tuple[float, float]],
) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "autoscaling.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0]).keys()))
        writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))
    by_replicas: dict[int, list[float]] = {}
    for row in rows:
        if row.dispatch_backlog > scaler.thresholds[0]:  # backlog: throughput is capacity-bound
            by_replicas.setdefault(row.replicas_running, []).append(row.creates_per_s)
    capacity = {n: round(sum(v) / len(v), 2) for n, v in sorted(by_replicas.items()) if v}
    summary = {
        "queries": dict(zip(scaler.names, scaler.queries, strict=True)),
        "adapter_rule_queries": list(scaler.adapter_rule_queries),
        "threshold_per_replica": dict(zip(scaler.names, scaler.thresholds, strict=True)),
        "min_replicas": scaler.min_replicas,
        "max_replicas": scaler.max_replicas,
        "time_scale": args.time_scale,
        "sync_period_s": round(15.0 / args.time_scale, 2),
        "per_replica_creates_per_s": args.per_replica,
        "profile": [{"seconds": d, "tasks_per_s": r} for d, r in profile],
        "submitted": stats.submitted,
        "rejected": stats.rejected,
        "errors": stats.errors,
        "peak_dispatch_backlog": max(r.dispatch_backlog for r in rows),
        "peak_commands_lag": max(r.commands_lag for r in rows),
        "peak_replicas": max(r.replicas_running for r in rows),
        "final_replicas": rows[-1].replicas_running,
        "peak_creates_per_s": max(r.creates_per_s for r in rows),
        "creates_per_s_by_replicas_under_backlog": capacity,
        "keda_and_adapter_rule_agree_ticks": sum(r.rule_values_agree for r in rows),
        "ticks": len(rows),
        "duration_s": rows[-1].t,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    step = max(1, round(10.0 / (15.0 / args.time_scale)))
    lines = [
        "# Autoscaling demo: provider adapter on its dispatch backlog",
        "",
        "KEDA triggers of `deploy/k8s/components/autoscaling-keda` evaluated by Prometheus: "
        + "; ".join(
            f"{n} `{q}` (threshold {t:g} per replica)"
            for n, q, t in zip(scaler.names, scaler.queries, scaler.thresholds, strict=True)
        )
        + f"; {scaler.min_replicas}-{scaler.max_replicas} replicas; "
        f"behaviour from the manifest with every period divided by {args.time_scale:g} "
        f"(sync every {15.0 / args.time_scale:.2f} s). Each adapter creates at most "
        f"{args.per_replica:g} predictions/s.",
        "",
        "| t (s) | offered (tasks/s) | dispatch backlog | commands lag | proposal | desired "
        "| running | creates/s | completed/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines.extend(
        f"| {row.t:.0f} | {row.offered_tps:g} | {row.dispatch_backlog:.0f} | {row.commands_lag:.0f} "
        f"| {row.proposal} | {row.desired} "
        f"| {row.replicas_running} | {row.creates_per_s:.2f} | {row.completed_per_s:.2f} |"
        for row in rows[::step] + ([rows[-1]] if (len(rows) - 1) % step else [])
    )
    lines += ["", "Summary:", "", "```json", json.dumps(summary, indent=2), "```", ""]
    (out / "autoscaling.md").write_text("\n".join(lines))
    plot(rows, scaler, out / "autoscaling.png", args)
    return summary


def plot(rows: list[Row], scaler: Scaler, path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r.t for r in rows]
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    ax1.step(
        t, [r.offered_tps for r in rows], where="post", label="offered load (tasks/s)", color="grey"
    )
    ax1.plot(
        t,
        [r.creates_per_s for r in rows],
        label="throughput: predictions created/s",
        color="tab:blue",
    )
    ax1.plot(
        t,
        [r.completed_per_s for r in rows],
        label="tasks completed/s",
        color="tab:green",
        alpha=0.7,
    )
    ax1.set_ylabel("per second")
    ax1.legend(loc="upper right", fontsize=8)
    ax1.set_title(
        f"provider-adapter autoscaling on the dispatch backlog "
        f"(time scale 1/{args.time_scale:g}, {args.per_replica:g} creates/s per replica)"
    )
    ax2.plot(
        t, [r.dispatch_backlog for r in rows], label="dispatch backlog (trigger 1)", color="tab:red"
    )
    ax2.plot(t, [r.commands_lag for r in rows], label="commands lag (trigger 2)", color="tab:brown")
    ax2.plot(
        t,
        [scaler.thresholds[0] * r.replicas_running for r in rows],
        label="threshold x running replicas",
        color="tab:orange",
        linestyle="--",
    )
    ax2.set_ylabel("commands")
    ax2.legend(loc="upper right", fontsize=8)
    ax3.step(
        t,
        [r.proposal for r in rows],
        where="post",
        label="metric proposal",
        color="tab:purple",
        alpha=0.5,
    )
    ax3.step(
        t, [r.desired for r in rows], where="post", label="desired (HPA behaviour)", color="black"
    )
    ax3.step(
        t,
        [r.replicas_running for r in rows],
        where="post",
        label="running adapters",
        color="tab:blue",
        linestyle="--",
    )
    ax3.set_ylabel("replicas")
    ax3.set_xlabel("seconds")
    ax3.set_ylim(0, scaler.max_replicas + 1)
    ax3.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-scale", type=float, default=4.0, help="divide periods by this")
    parser.add_argument(
        "--per-replica", type=float, default=2.0, help="creates/s one adapter may do"
    )
    parser.add_argument("--quick", action="store_true", help="a short profile (smoke run)")
    parser.add_argument(
        "--max-tail", type=float, default=240.0, help="seconds allowed after the load"
    )
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if os.environ.get("PYTHONASYNCIODEBUG"):
        logging.getLogger("asyncio").setLevel(logging.DEBUG)
    summary = asyncio.run(run(args))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
