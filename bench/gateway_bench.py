"""Gateway benchmark: submits through the gateway and the real scheduler on a durable PostgreSQL.

Writes ``bench/results/gateway.json`` with:

* ``submit_throughput_tps``: single SubmitTask calls per second, concurrent clients, each answered after
  the scheduler's durable commit (PostgreSQL with fsync and synchronous_commit on);
* ``batch_submit_throughput_tps``: tasks per second with BatchSubmitTasks of 100 items;
* ``submit_latency_p50_ms`` / ``submit_latency_p99_ms``: open-loop load at 500 submits/s offered,
  latency measured from each request's *scheduled* send time (no coordinated omission).

Layout (all on 127.0.0.1): PostgreSQL (devstack, durable), the scheduler in a subprocess (its gRPC
API and leader loops; no Kafka: the outbox fills but is not relayed, which does not change the submit
path), or ``--scheduler-replicas 2`` of them as deploy/k8s runs (one leading; the gateway spreads its
calls over them with round_robin, as over a headless Service), the gateway in a subprocess
(``python -m conveyor_gateway``), and the load generator in this process. Every
process shares the same 2 cores; every service process settles its GC once started, as
``serve_until_stopped`` does. If ``redis-server`` and Node with the BullMQ harness's
``node_modules`` are present, BullMQ's durable add (Redis AOF fsync always) runs in the same invocation
and the ratios are printed; otherwise the script says why it skipped it.

Usage: ``python bench/gateway_bench.py [--quick] [--scheduler-replicas N] [--out PATH]`` (``--quick``
finishes in about a minute).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conveyor_client.token import mint_token

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # bench/ helpers are imported by their package path
    sys.path.insert(0, str(ROOT))

from bench._gateway_load import Load, closed_loop, open_loop  # noqa: E402
from bench._peers import free_port, run_bullmq  # noqa: E402

SECRET = "bench-secret-" + "x" * 32
TARGETS = {
    "submit_throughput_tps": 2000.0,
    "batch_submit_throughput_tps": 10000.0,
    "submit_latency_p99_ms": 25.0,
}
BULLMQ_REFERENCE = {"add_sequential_jobs_s": 2200.0, "paced_p99_ms": 33.0}


# ---------------------------------------------------------------------------------------------
# Scheduler subprocess (no Kafka)


def serve_scheduler() -> None:
    """Run one scheduler replica without Kafka until SIGTERM (internal mode)."""
    from conveyor_common.logging import configure_logging
    from conveyor_common.service import settle_gc
    from conveyor_common.settings import load_settings
    from conveyor_scheduler.app import SchedulerApp
    from conveyor_scheduler.settings import SchedulerSettings

    settings = load_settings(SchedulerSettings)
    configure_logging("scheduler", settings.log_level)

    async def run() -> None:
        app = SchedulerApp(settings, kafka=False)
        await app.start()
        settle_gc()  # as serve_until_stopped does in python -m conveyor_scheduler
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await app.stop()

    asyncio.run(run())


def serve_fake_scheduler(port: int) -> None:
    """An in-memory SchedulerService (internal mode): measures the gateway's own capacity."""
    from prometheus_client import CollectorRegistry

    from conveyor_common.grpc_server import create_server
    from conveyor_common.metrics import RpcMetrics
    from conveyor_testkit.gateway import FakeScheduler, scheduler_binding

    async def run() -> None:
        server = create_server(
            [scheduler_binding(FakeScheduler())],
            host="127.0.0.1",
            port=port,
            metrics=RpcMetrics(CollectorRegistry(), "fake"),
        )
        await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop(1)

    asyncio.run(run())


@dataclass
class Procs:
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def spawn(self, args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        out = log.open("wb")
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def tail(log: Path) -> str:
    """The end of a subprocess log."""
    return log.read_text(errors="replace")[-3000:]


async def wait_serving(address: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    async with grpc.aio.insecure_channel(address) as ch:
        stub: Any = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{address} exited early:\n{tail(log)}")
            try:
                resp = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{address} did not become SERVING:\n{tail(log)}")


# ---------------------------------------------------------------------------------------------
# Load


async def gateway_capacity(
    procs: Procs, base: dict[str, str], logs: Path, tokens: list[str], seconds: float
) -> tuple[float, dict[str, Any]]:
    """Single submits/s of a second gateway in front of an in-memory scheduler stand-in."""
    fake_port, gw_port = free_port(), free_port()
    fake_log, gw_log = logs / "fake-scheduler.log", logs / "gateway-2.log"
    fake = procs.spawn(
        [sys.executable, __file__, "--serve-fake-scheduler", str(fake_port)], base, fake_log
    )
    env = {
        **base,
        "GATEWAY_SCHEDULER_ADDRESS": f"127.0.0.1:{fake_port}",
        "GATEWAY_GRPC_HOST": "127.0.0.1",
        "GATEWAY_GRPC_PORT": str(gw_port),
        "GATEWAY_METRICS_PORT": "0",
        "GATEWAY_LOG_LEVEL": "WARNING",
        "GATEWAY_JWT_HS256_SECRET": SECRET,
        "GATEWAY_RATE_LIMIT_PER_SECOND": "1000000",
        "GATEWAY_RATE_LIMIT_BURST": "1000000",
    }
    gw = procs.spawn([sys.executable, "-m", "conveyor_gateway"], env, gw_log)
    await wait_serving(f"127.0.0.1:{fake_port}", fake, fake_log)
    await wait_serving(f"127.0.0.1:{gw_port}", gw, gw_log)
    load = Load(f"127.0.0.1:{gw_port}", tokens)
    load.open(4)
    await closed_loop(load, 16, 0.5)
    overhead = await open_loop(load, 500.0, min(seconds, 5.0))
    tps = await closed_loop(load, 64, seconds)
    await load.close()
    for proc in (gw, fake):
        proc.send_signal(signal.SIGTERM)
    return tps, overhead


# ---------------------------------------------------------------------------------------------


async def bench(quick: bool, replicas: int) -> dict[str, Any]:
    from conveyor_common.service import settle_gc
    from conveyor_devstack.stack import start_postgres
    from conveyor_scheduler.store.db import migrate

    load_before = os.getloadavg()[0]
    phase = 4.0 if quick else 15.0
    paced = 5.0 if quick else 20.0
    logs = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    pg = await asyncio.to_thread(start_postgres, fast=False)  # durable: fsync + synchronous_commit
    procs = Procs()
    try:
        url = pg.create_database(f"gwbench_{uuid.uuid4().hex[:8]}")
        await asyncio.to_thread(migrate, url)
        sched_ports, gw_port = [free_port() for _ in range(replicas)], free_port()
        sched_target = "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in sched_ports)
        base = {k: v for k, v in os.environ.items() if not k.startswith(("SCHEDULER_", "GATEWAY_"))}
        sched_env = {
            **base,
            "SCHEDULER_DATABASE_URL": url,
            "SCHEDULER_GRPC_HOST": "127.0.0.1",
            "SCHEDULER_METRICS_PORT": "0",
            "SCHEDULER_LOG_LEVEL": "WARNING",
            "SCHEDULER_TENANT_SUBMIT_RATE": "1000000",
            "SCHEDULER_TENANT_SUBMIT_BURST": "1000000",
            "SCHEDULER_TENANT_MAX_WAITING": "100000000",
            "SCHEDULER_QUEUE_CAPACITY": "100000000",
        }
        scheds = [
            (
                port,
                logs / f"scheduler-{i}.log",
                procs.spawn(
                    [sys.executable, __file__, "--serve-scheduler"],
                    {
                        **sched_env,
                        "SCHEDULER_GRPC_PORT": str(port),
                        "SCHEDULER_INSTANCE_ID": f"bench-{i}",
                    },
                    logs / f"scheduler-{i}.log",
                ),
            )
            for i, port in enumerate(sched_ports)
        ]
        gw_env = {
            **base,
            "GATEWAY_SCHEDULER_ADDRESS": sched_target,
            "GATEWAY_GRPC_HOST": "127.0.0.1",
            "GATEWAY_GRPC_PORT": str(gw_port),
            "GATEWAY_METRICS_PORT": "0",
            "GATEWAY_LOG_LEVEL": "WARNING",
            "GATEWAY_JWT_HS256_SECRET": SECRET,
            "GATEWAY_RATE_LIMIT_PER_SECOND": "1000000",
            "GATEWAY_RATE_LIMIT_BURST": "1000000",
        }
        gw_log = logs / "gateway.log"
        gw = procs.spawn([sys.executable, "-m", "conveyor_gateway"], gw_env, gw_log)
        for port, log, proc in scheds:
            await wait_serving(f"127.0.0.1:{port}", proc, log)
        await wait_serving(f"127.0.0.1:{gw_port}", gw, gw_log)

        tokens = [mint_token(SECRET, f"bench-{i}", tier="pro", ttl_seconds=3600) for i in range(32)]
        load = Load(f"127.0.0.1:{gw_port}", tokens)
        load.open(4)
        await closed_loop(load, 16, 1.0)  # warm-up: connections, caches
        settle_gc()  # the load generator's own GC pauses must not count as latency
        # Latency first, on a small table: 100/s (diagnostic), then the 500/s figure.
        light = await open_loop(load, 100.0, paced / 2)
        print(f"open loop 100/s: p50 {light['p50_ms']} ms, p99 {light['p99_ms']} ms (diagnostic)")
        await asyncio.sleep(1.0)
        latency = await open_loop(load, 500.0, paced)
        print(
            f"open loop 500/s: p50 {latency['p50_ms']} ms, p99 {latency['p99_ms']} ms, "
            f"achieved {latency['achieved_per_s']}/s"
        )
        await asyncio.sleep(1.0)
        single = await closed_loop(load, 64, phase)
        print(f"single submits: {single:.0f}/s (64 concurrent clients, {phase:.0f} s)")
        batch = await closed_loop(load, 8, phase, batch=100)
        print(f"batch submits:  {batch:.0f} tasks/s (8 clients, 100 items per batch)")
        direct_load = Load(sched_target, tokens, direct=True)
        direct_load.open(4)
        direct = await closed_loop(direct_load, 64, phase)
        await direct_load.close()
        print(
            f"scheduler alone (no gateway, {replicas} replicas): {direct:.0f} submits/s "
            "(64 concurrent clients)"
        )
        await load.close()
        gateway_only, gw_latency = await gateway_capacity(procs, base, logs, tokens, phase)
        print(
            f"gateway alone (in-memory scheduler stand-in): {gateway_only:.0f} submits/s; "
            f"at 500/s p50 {gw_latency['p50_ms']} ms, p99 {gw_latency['p99_ms']} ms"
        )
        with pg.connect(url.rsplit("/", 1)[1]) as conn:
            row = conn.execute("SELECT count(*) FROM tasks").fetchone()
        rows = int(str(row[0])) if row else 0
    finally:
        procs.stop()
        with contextlib.suppress(Exception):
            pg.close()

    result: dict[str, Any] = {
        "submit_throughput_tps": round(single, 1),
        "batch_submit_throughput_tps": round(batch, 1),
        "submit_latency_p50_ms": latency["p50_ms"],
        "submit_latency_p99_ms": latency["p99_ms"],
        "open_loop": latency,
        "open_loop_100_per_s": light,
        "scheduler_direct_submit_tps": round(direct, 1),
        "gateway_only_submit_tps": round(gateway_only, 1),
        "gateway_only_open_loop_500_per_s": gw_latency,
        "errors": load.errors,
        "tasks_rows_written": rows,
        "mode": "quick" if quick else "full",
        "scheduler_replicas": replicas,
        "gateway_replicas": 1,
        "seconds_per_phase": phase,
        "cores": os.cpu_count(),
        "load_average_1m": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "durable": "PostgreSQL fsync=on synchronous_commit=on (devstack local, fast=False)",
        "targets": TARGETS,
    }
    result["meets_targets"] = {
        "submit_throughput_tps": single >= TARGETS["submit_throughput_tps"],
        "batch_submit_throughput_tps": batch >= TARGETS["batch_submit_throughput_tps"],
        "submit_latency_p99_ms": latency["p99_ms"] <= TARGETS["submit_latency_p99_ms"],
    }
    peer = await asyncio.to_thread(run_bullmq, quick)
    result["bullmq"] = peer
    if "skipped" in peer:
        print(f"BullMQ peer skipped: {peer['skipped']}")
        print(
            "  (reference from shared/reference: BullMQ durable add "
            f"{BULLMQ_REFERENCE['add_sequential_jobs_s']:.0f}/s one by one, "
            f"p99 {BULLMQ_REFERENCE['paced_p99_ms']} ms at 500/s)"
        )
        ref_tps = BULLMQ_REFERENCE["add_sequential_jobs_s"]
        ref_p99 = BULLMQ_REFERENCE["paced_p99_ms"]
        result["ratio_basis"] = "reference figures (peer not run)"
    else:
        ref_tps = float(peer["add_sequential_jobs_s"])
        ref_p99 = float(peer["paced"]["p99_ms"])
        result["ratio_basis"] = "BullMQ run in this invocation"
    result["ratio_submit_tps_vs_bullmq_add"] = round(single / ref_tps, 2)
    result["ratio_p99_vs_bullmq_paced"] = round(latency["p99_ms"] / ref_p99, 2)
    print(
        f"ratio vs BullMQ ({result['ratio_basis']}): submit throughput x"
        f"{result['ratio_submit_tps_vs_bullmq_add']}, p99 at 500/s x{result['ratio_p99_vs_bullmq_paced']}"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short phases (< 60 s)")
    parser.add_argument(
        "--scheduler-replicas",
        type=int,
        default=1,
        help="scheduler replicas behind the gateway (default 1; deploy/k8s runs 2)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gateway.json")
    parser.add_argument("--serve-scheduler", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-fake-scheduler", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_scheduler:
        serve_scheduler()
        return
    if args.serve_fake_scheduler:
        serve_fake_scheduler(args.serve_fake_scheduler)
        return
    result = asyncio.run(bench(args.quick, args.scheduler_replicas))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
