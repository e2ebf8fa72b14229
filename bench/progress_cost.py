"""What one task's provider updates cost (issue #13, item 2: progress is cheap).

Starts the ``make up`` shape (2 schedulers, 1 adapter, 1 notifier, 1 gateway) on a fresh devstack with
the fake Replicate throttling ``logs``/``output`` webhooks like Replicate (once per 0.5 s) and every
limit lifted, then runs two scenarios one after the other:

* ``instant``: predictions that finish at once (the pipeline benchmark's shape);
* ``progress``: predictions of a few seconds printing a tqdm line per step (a real model's shape).

For each it submits ``--tasks`` tasks, waits until every one is terminal and the system is quiet, and
reports per task: the webhook deliveries the fake sent (by event), the ``ProviderResult`` records on
``conveyor.provider.v1.results``, the results the schedulers consumed (by outcome; every record,
duplicates included), the task events written (by type), the records on ``conveyor.tasks.v1.events``
and PostgreSQL's committed transactions in the system's database (minus the idle rate measured just
before). Counts, not timings: the figures
do not depend on the machine's load (the idle-rate correction aside).

Usage: ``python bench/progress_cost.py [--tasks N] [--duration S] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import httpx
import psycopg

from conveyor.tasks.v1 import task_pb2
from conveyor.tasks.v1 import task_service_pb2 as svc_pb2
from conveyor.tasks.v1 import task_service_pb2_grpc as svc_grpc
from conveyor_common import topics
from conveyor_devstack.processes import metric_samples
from conveyor_devstack.stack import Devstack
from conveyor_devstack.system import ConveyorSystem, SystemConfig
from conveyor_devstack.topics import conveyor_topics

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._counts import end_offsets, xact_commit  # noqa: E402
from bench._pipeline_system import (  # noqa: E402
    LIFTED_ADAPTER,
    LIFTED_FAKE,
    LIFTED_GATEWAY,
    LIFTED_SCHEDULER,
    TERMINAL_STATUSES,
)

log = logging.getLogger("progress_cost")
TENANT = "progress-cost"
QUIET_S = 3.0
"""After the last terminal: how long nothing may change before the counters are read."""
SETTLE_S = 11.0
"""PostgreSQL's idle backends flush their statistics every 10 s: wait this long before reading them."""


def task_events(url: str, task_ids: list[str]) -> Counter[str]:
    """Task events written for these tasks, by type name."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT type, count(*) FROM task_events WHERE task_id = ANY(%s::uuid[]) GROUP BY type",
            (task_ids,),
        ).fetchall()
    return Counter(
        {
            task_pb2.TaskEventType.Name(task_pb2.TaskEventType.ValueType(int(t)))
            .removeprefix("TASK_EVENT_TYPE_")
            .lower(): int(n)
            for t, n in rows
        }
    )


async def scheduler_results(system: ConveyorSystem) -> Counter[str]:
    """``conveyor_scheduler_results_total`` of every scheduler, by outcome."""
    total: Counter[str] = Counter()
    for p in system.by_role("scheduler"):
        text = await system.metrics(p.name)
        for labels, value in metric_samples(text, "conveyor_scheduler_results_total"):
            total[labels.get("outcome", "")] += int(value)
    return total


async def webhooks_sent(system: ConveyorSystem, task_ids: set[str]) -> Counter[str]:
    """Webhook deliveries the fake attempted for these tasks, by event."""
    async with httpx.AsyncClient(timeout=60.0) as client:
        creates = (await client.get(system.endpoints.ledger_url, params={"kind": "create"})).json()[
            "events"
        ]
        hooks = (await client.get(system.endpoints.ledger_url, params={"kind": "webhook"})).json()[
            "events"
        ]
    ours = {c["prediction_id"] for c in creates if c.get("task") in task_ids}
    return Counter(h["event"] for h in hooks if h.get("prediction_id") in ours)


async def snapshot(system: ConveyorSystem) -> dict[str, Any]:
    bootstrap = system.devstack.kafka_bootstrap
    assert system.devstack.postgres is not None
    return {
        "at": time.monotonic(),
        "results_records": await end_offsets(bootstrap, topics.PROVIDER_RESULTS),
        "task_event_records": await end_offsets(bootstrap, topics.TASK_EVENTS),
        "xact_commit": await asyncio.to_thread(
            xact_commit, system.devstack.postgres.url, system.database
        ),
        "applied": await scheduler_results(system),
    }


async def run_scenario(
    system: ConveyorSystem, name: str, tasks: int, duration_s: float, idle_rate: float
) -> dict[str, Any]:
    token = system.mint_token(TENANT, tier="pro")
    md = (("authorization", "Bearer " + token),)
    before = await snapshot(system)
    async with grpc.aio.insecure_channel(system.gateway_address) as channel:
        stub: Any = svc_grpc.TaskServiceStub(channel)
        ids: list[str] = []
        for i in range(tasks):
            spec = task_pb2.TaskSpec(kind=task_pb2.TASK_KIND_IMAGE, model="bench/sdxl")
            spec.input.update({"prompt": f"{name} {i}", "__fake_duration_s": duration_s})
            resp = await stub.SubmitTask(
                svc_pb2.SubmitTaskRequest(request_id=str(uuid.uuid4()), spec=spec),
                metadata=md,
                timeout=30,
            )
            ids.append(str(resp.task.task_id))
        pending = set(ids)
        deadline = time.monotonic() + 120 + duration_s * 4
        while pending and time.monotonic() < deadline:
            for tid in list(pending):
                resp = await stub.GetTask(
                    svc_pb2.GetTaskRequest(task_id=tid), metadata=md, timeout=30
                )
                if resp.task.status in TERMINAL_STATUSES:
                    pending.discard(tid)
            if pending:
                await asyncio.sleep(0.5)
        if pending:
            raise RuntimeError(f"{name}: {len(pending)} tasks not terminal in time")
    # Quiet: wait until the results topic stops growing (late non-terminal updates, redeliveries).
    last = -1
    while True:
        await asyncio.sleep(QUIET_S)
        now = await end_offsets(system.devstack.kafka_bootstrap, topics.PROVIDER_RESULTS)
        if now == last:
            break
        last = now
    await asyncio.sleep(SETTLE_S)
    after = await snapshot(system)
    assert system.devstack.postgres is not None
    events = await asyncio.to_thread(task_events, system.database_url, ids)
    hooks = await webhooks_sent(system, set(ids))
    elapsed = after["at"] - before["at"]
    applied = after["applied"] - before["applied"]
    xacts = after["xact_commit"] - before["xact_commit"]

    def per(n: float) -> float:
        return round(n / tasks, 2)

    return {
        "tasks": tasks,
        "prediction_duration_s": duration_s,
        "webhooks_per_task": {k: per(v) for k, v in sorted(hooks.items())},
        "results_records_per_task": per(after["results_records"] - before["results_records"]),
        "results_consumed_per_task": {k: per(v) for k, v in sorted(applied.items())},
        "task_events_per_task": {k: per(v) for k, v in sorted(events.items())},
        "task_event_records_per_task": per(
            after["task_event_records"] - before["task_event_records"]
        ),
        "xact_commit_per_task": per(xacts),
        "xact_commit_per_task_minus_idle": per(max(0.0, xacts - idle_rate * elapsed)),
        "elapsed_s": round(elapsed, 1),
    }


async def main(tasks: int, duration_s: float, log_level: str) -> dict[str, Any]:
    config = SystemConfig(
        schedulers=2,
        adapters=1,
        notifiers=1,
        gateways=1,
        scheduler_env=dict(LIFTED_SCHEDULER),
        adapter_env=dict(LIFTED_ADAPTER),
        gateway_env=dict(LIFTED_GATEWAY),
        fake={
            **LIFTED_FAKE,
            "min_duration_s": 0.0,
            "max_duration_s": 0.0,
            "progress_steps": 40,
            "webhook_throttle_s": 0.5,  # Replicate's: output/logs at most once every 500 ms
        },
        log_level=log_level,
        start_timeout=180.0,
    )
    devstack = await Devstack.start(fast=True, topics=conveyor_topics()).start_async()
    try:
        async with ConveyorSystem.run(config, devstack=devstack) as system:
            assert devstack.postgres is not None
            idle_s = 2 * SETTLE_S
            await asyncio.sleep(SETTLE_S)
            x0 = await asyncio.to_thread(xact_commit, devstack.postgres.url, system.database)
            await asyncio.sleep(idle_s)
            x1 = await asyncio.to_thread(xact_commit, devstack.postgres.url, system.database)
            idle_rate = (x1 - x0) / idle_s
            out: dict[str, Any] = {"idle_xact_commit_per_s": round(idle_rate, 2)}
            for name, seconds in (("instant", 0.0), ("progress", duration_s)):
                print(f"== {name}", flush=True)
                out[name] = await run_scenario(system, name, tasks, seconds, idle_rate)
                print(json.dumps(out[name], indent=1), flush=True)
            return out
    finally:
        await asyncio.to_thread(devstack.close)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=40)
    parser.add_argument("--duration", type=float, default=4.0, help="seconds of a progress run")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = asyncio.run(main(args.tasks, args.duration, args.log_level))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
