"""The adapter's submit protocol (BeginSubmit, create, CompleteSubmit) against a real scheduler.

64 concurrent adapter workers drive BeginSubmit + CompleteSubmit for every dispatched task through
the adapter's ``Coordinator`` and the scheduler's gRPC ``ProviderCoordinationService`` on durable
PostgreSQL (fsync, synchronous commit), once with the batch calls (``BeginSubmitBatch`` /
``CompleteSubmitBatch``: concurrent calls coalesced, one transaction per batch) and once item by
item (the baseline, as before issue #13), alternating, best window each. Figures: tasks through
the protocol per second and the Python CPU (adapter client and scheduler, one process) per task.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import psycopg

from conveyor.scheduler.v1 import provider_coordination_service_pb2_grpc as provider_grpc
from conveyor.tasks.v1 import task_pb2
from conveyor_provider_adapter.coordination import Coordinator
from conveyor_scheduler.api.provider import ProviderCoordinationServicer
from conveyor_scheduler.core import SchedulerCore
from conveyor_scheduler.dispatch.cycle import Dispatcher
from conveyor_scheduler.dispatch.leadership import Leader
from conveyor_scheduler.dispatch.wakeups import Wakeups
from conveyor_scheduler.store import db
from conveyor_testkit import scheduler as kit

RESULTS = Path(__file__).resolve().parent / "results" / "submit_protocol.json"
WORKERS = 64


async def _window(server_url: str, tasks: int, batches: bool) -> dict[str, float]:
    name = f"submit_protocol_{int(batches)}"
    async with await psycopg.AsyncConnection.connect(server_url, autocommit=True) as conn:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    url = server_url.rpartition("/")[0] + "/" + name
    await kit.migrate(url)
    huge = 10**7
    settings = kit.make_settings(
        url,
        global_concurrency=huge,
        dispatch_batch_max=500,
        dispatch_window=0,
        tenant_max_waiting=huge,
        queue_capacity=huge,
        submit_rate_per_second=huge,
        submit_burst=huge,
    )
    engine = db.create_engine(url, pool_size=8)
    core = SchedulerCore(engine, settings, wakeups=Wakeups())
    await core.upsert_tenant("bench", 0, task_pb2.TenantLimits(max_concurrency=huge))
    for start in range(0, tasks, 500):
        end = min(tasks, start + 500)
        await core.submit("bench", 1, [kit.item(f"r{i}") for i in range(start, end)])
    leader = Leader(settings, url, "submit-protocol-bench")
    assert await leader.try_acquire()
    dispatcher = Dispatcher(settings, core.policy, leader, core.wakeups)
    attempts: list[tuple[str, int]] = []
    while len(attempts) < tasks and await dispatcher.cycle():
        attempts += [(str(t), a) for t, a in dispatcher.last_dispatched]
    server = grpc.aio.server()
    provider_grpc.add_ProviderCoordinationServiceServicer_to_server(
        ProviderCoordinationServicer(core), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    coordinator = Coordinator(f"127.0.0.1:{port}", adapter_id="bench")
    coordinator._batches = batches  # the baseline: item by item, as before the batch calls
    queue = list(attempts)

    async def worker() -> None:
        while queue:
            task_id, attempt = queue.pop()
            answer = await coordinator.begin_submit(task_id, attempt)
            assert answer.decision == 1, answer
            assert await coordinator.complete_submit(task_id, attempt, f"p-{task_id}")

    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(WORKERS)))
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    await coordinator.close()
    await server.stop(0)
    await leader.dispose()
    await engine.dispose()
    async with await psycopg.AsyncConnection.connect(server_url, autocommit=True) as conn:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return {"tps": len(attempts) / wall, "cpu_ms": 1000 * cpu / len(attempts)}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from conveyor_devstack.stack import start_postgres_async

    server = await start_postgres_async(fast=False)
    tasks = 1_000 if args.quick else 3_000
    best: dict[bool, dict[str, float]] = {}
    try:
        for _ in range(1 if args.quick else 2):
            for batches in (False, True):
                got = await _window(server.url, tasks, batches)
                print(
                    f"[batches={batches}] {got['tps']:.0f}/s {got['cpu_ms']:.2f} ms",
                    file=sys.stderr,
                )
                if batches not in best or got["tps"] > best[batches]["tps"]:
                    best[batches] = got
    finally:
        await asyncio.to_thread(server.close)
    return {
        "machine": "2 vCPU (shared by client and server)",
        "tasks": tasks,
        "workers": WORKERS,
        "quick": args.quick,
        "started_at": datetime.now(UTC).isoformat(),
        "submit_protocol_tps_batched": round(best[True]["tps"], 1),
        "submit_protocol_tps_item_by_item": round(best[False]["tps"], 1),
        "python_cpu_ms_per_task_batched": round(best[True]["cpu_ms"], 3),
        "python_cpu_ms_per_task_item_by_item": round(best[False]["cpu_ms"], 3),
        "ratio_batched_vs_item_by_item": round(best[True]["tps"] / best[False]["tps"], 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 tasks, one window each")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    started = time.monotonic()
    out = asyncio.run(run(args))
    out["bench_seconds"] = round(time.monotonic() - started, 1)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
