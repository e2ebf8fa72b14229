"""The kill test: 300 tasks across 4 tenants while a nemesis kill -9s the scheduler leader, an adapter and
the notifier at seeded random moments and restarts them; then a Jepsen-style check (``checker.py``).

Generator: an open loop of submits (random kind, priority and 0.2-0.6 s provider run), a watcher per
accepted task through the SDK (automatic resume), cancels of ~5% of the tasks at random moments and of
~3% as soon as they run.
Every client operation goes to a Jepsen-style history (``invoke``/``ok``/``fail``/``info``), written
next to the system's logs. Drain: wait until every watcher saw its terminal event. Then the checker
gates on: no lost, duplicated or unexpected task; one terminal state per task; one prediction per task
at the fake; no limit exceeded (global, per tenant: slot-weighted, from the ledger's create->finish
intervals); every watcher saw sequence numbers 1..N, each once, ending at the terminal event.

``CONVEYOR_E2E_SEED`` replays a run (the default seed is fixed).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time

import grpc
import pytest

from conveyor.tasks.v1 import admin_service_pb2 as admin_pb2
from conveyor.tasks.v1 import task_pb2
from conveyor_client import AsyncConveyorClient, ConveyorError, build_spec, new_request_id
from tests.e2e.checker import History, Limits, TaskMeta, check
from tests.e2e.harness import E2E, GLOBAL_LIMIT, KIND_COST, aclose

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.slow]

SEED = int(os.environ.get("CONVEYOR_E2E_SEED", "20261123"))
TASKS = 300
TENANT_LIMITS = {"kill-a": 1, "kill-b": 2, "kill-c": 2, "kill-d": 3}
SUBMIT_RATE = 20.0
"""Submits per second (open loop)."""
CANCEL_SHARE = 0.05
CANCEL_RUNNING_SHARE = 0.03
DRAIN_SECONDS = 180.0
KINDS = [
    ("image", "kill/sdxl"),
    ("text", "kill/llm"),
    ("image", "kill/flux"),
    ("video", "kill/vid"),
]
KIND_WEIGHTS = [45, 35, 12, 8]
PRIORITIES = ["urgent", "high", "normal", "low"]


class Run:
    """Generator, watchers and nemesis of one kill test run."""

    def __init__(self, e2e: E2E, clients: dict[str, AsyncConveyorClient], rng: random.Random):
        self.e2e = e2e
        self.clients = clients
        self.rng = rng
        self.history = History()
        self.meta: dict[str, TaskMeta] = {}
        self.watches: dict[str, list[task_pb2.TaskEvent]] = {}
        self.watch_errors: dict[str, str] = {}
        self.submitters: list[asyncio.Task[None]] = []
        self.watchers: list[asyncio.Task[None]] = []
        self.cancellers: list[asyncio.Task[None]] = []
        self.nemesis_log: list[str] = []
        self.deadline_resumes = 0
        self.failover_s: float | None = None
        self.t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.t0

    # -- generator -------------------------------------------------------------------------------

    async def submit_all(self) -> None:
        tenants = list(self.clients)
        weights = [TENANT_LIMITS[t.rsplit("-", 1)[0]] for t in tenants]
        plan = self.rng.choices(tenants, weights=weights, k=TASKS)
        for i, tenant in enumerate(plan):
            kind, model = self.rng.choices(KINDS, weights=KIND_WEIGHTS)[0]
            if kind == "video" and TENANT_LIMITS[tenant.rsplit("-", 1)[0]] < KIND_COST["video"]:
                # A task costing more slots than its tenant may hold is never dispatched and
                # blocks the tenant's queue (a scheduler limitation, reported); none of those here.
                kind, model = KINDS[0]
            # ~5% are cancelled at a random moment (mostly while queued), ~3% once they run.
            roll = self.rng.random()
            cancel_after: float | None = self.rng.uniform(0.2, 6.0) if roll < CANCEL_SHARE else None
            on_start = CANCEL_SHARE <= roll < CANCEL_SHARE + CANCEL_RUNNING_SHARE
            seconds = 2.0 if on_start else round(self.rng.uniform(0.2, 0.6), 3)
            spec = build_spec(
                kind,
                model=model,
                input={"i": i, "__fake_duration_s": seconds},
                priority=self.rng.choice(PRIORITIES),
            )
            if on_start:
                cancel_after = -1.0
            self.submitters.append(
                asyncio.create_task(self.submit_one(tenant, kind, model, spec, cancel_after))
            )
            await asyncio.sleep(self.rng.expovariate(SUBMIT_RATE))

    async def submit_one(
        self,
        tenant: str,
        kind: str,
        model: str,
        spec: task_pb2.TaskSpec,
        cancel_after: float | None,
    ) -> None:
        client = self.clients[tenant]
        rid = new_request_id()
        self.history.record("invoke", "submit", tenant, tenant=tenant, request_id=rid)
        try:
            resp = await client.submit(spec=spec, request_id=rid, rpc_timeout=15)
        except ConveyorError as exc:
            definite = exc.code not in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            )
            self.history.record(
                "fail" if definite else "info",
                "submit",
                tenant,
                tenant=tenant,
                request_id=rid,
                error=str(exc),
            )
            return
        task_id = resp.task.task_id
        self.meta[task_id] = TaskMeta(tenant, kind, model, rid)
        self.history.record("ok", "submit", tenant, tenant=tenant, request_id=rid, task_id=task_id)
        on_start = cancel_after is not None and cancel_after < 0
        self.watchers.append(
            asyncio.create_task(self.watch(client, task_id, tenant if on_start else None))
        )
        if cancel_after is not None and not on_start:
            self.cancellers.append(
                asyncio.create_task(self.cancel(tenant, client, task_id, cancel_after))
            )

    async def watch(
        self, client: AsyncConveyorClient, task_id: str, cancel_when_started: str | None = None
    ) -> None:
        """The SDK's watch (it resumes by itself on UNAVAILABLE). A DEADLINE_EXCEEDED of a watch
        without a deadline of ours is the gateway giving up on a slow downstream call: resume from
        the last sequence seen, as an application would, and count it. ``cancel_when_started``
        (the tenant) cancels the task as soon as it runs."""
        events = self.watches.setdefault(task_id, [])
        while True:
            stream = client.watch(task_id, after_sequence=events[-1].sequence if events else 0)
            try:
                async for event in stream:
                    events.append(event)
                    if cancel_when_started and event.type == task_pb2.TASK_EVENT_TYPE_STARTED:
                        self.cancellers.append(
                            asyncio.create_task(
                                self.cancel(cancel_when_started, client, task_id, 0.0)
                            )
                        )
                        cancel_when_started = None
                return
            except ConveyorError as exc:
                if exc.code != grpc.StatusCode.DEADLINE_EXCEEDED:
                    self.watch_errors[task_id] = str(exc)
                    return
                self.deadline_resumes += 1
            finally:
                await aclose(stream)

    async def cancel(
        self, tenant: str, client: AsyncConveyorClient, task_id: str, delay: float
    ) -> None:
        await asyncio.sleep(delay)
        rid = new_request_id()
        self.history.record("invoke", "cancel", tenant, request_id=rid, task_id=task_id)
        try:
            task = await client.cancel(task_id, request_id=rid, reason="kill test")
        except ConveyorError as exc:
            self.history.record("fail", "cancel", tenant, request_id=rid, error=str(exc))
            return
        self.history.record(
            "ok", "cancel", tenant, request_id=rid, status=task_pb2.TaskStatus.Name(task.status)
        )

    # -- nemesis ---------------------------------------------------------------------------------

    async def nemesis(self) -> None:
        system = self.e2e.system
        plan = [
            (self.rng.uniform(2.0, 6.0), "leader"),
            (self.rng.uniform(8.0, 13.0), self.rng.choice(["adapter-1", "adapter-2"])),
            (self.rng.uniform(15.0, 20.0), "notifier-1"),
        ]
        for at, target in plan:
            await asyncio.sleep(max(0.0, at - self.now()))
            name = target
            if target == "leader":
                found = await system.leader(wait=5.0)
                assert found is not None, "no scheduler reports being the leader"
                name = found
            pid = system.process(name).pid
            await system.kill(name, signal.SIGKILL)
            killed_at = time.monotonic()
            self.nemesis_log.append(f"{self.now():6.2f}s kill -9 {name} (pid {pid})")
            if target == "leader":
                successor = await system.leader(wait=20.0)
                self.failover_s = time.monotonic() - killed_at
                self.nemesis_log.append(
                    f"{self.now():6.2f}s {successor} took the lead in {self.failover_s:.1f}s"
                )
                assert successor is not None, "no scheduler took the lead after the kill"
            await asyncio.sleep(self.rng.uniform(0.5, 2.0))
            started = time.monotonic()
            await system.restart(name)
            self.nemesis_log.append(
                f"{self.now():6.2f}s restarted {name} (pid {system.process(name).pid}, "
                f"healthy in {time.monotonic() - started:.1f}s)"
            )


async def test_kill_leader_adapter_and_notifier_while_300_tasks_run(e2e: E2E) -> None:
    rng = random.Random(SEED)
    tenants: dict[str, AsyncConveyorClient] = {}
    for prefix, limit in TENANT_LIMITS.items():
        tenant, client = await e2e.tenant(
            prefix, max_concurrency=limit, retries=8, watch_reconnects=60
        )
        tenants[tenant] = client
    seq = await e2e.ledger_seq()
    run = Run(e2e, tenants, rng)
    try:
        await _run_and_check(e2e, run, tenants, seq)
    finally:  # whatever happened, leave nothing running for the next test
        for task in [*run.submitters, *run.watchers, *run.cancellers]:
            task.cancel()
        for tenant in tenants:
            with contextlib.suppress(ConveyorError):
                await e2e.admin.bulk_cancel(admin_pb2.BulkSelector(tenant_id=tenant, limit=1000))


async def _run_and_check(
    e2e: E2E, run: Run, tenants: dict[str, AsyncConveyorClient], seq: int
) -> None:

    nemesis = asyncio.create_task(run.nemesis())
    await run.submit_all()
    await asyncio.gather(*run.submitters)
    submitted_in = run.now()
    await nemesis
    while len(run.watchers) < len(run.meta) or any(not w.done() for w in run.watchers):
        pending = [w for w in run.watchers if not w.done()]
        if run.now() > submitted_in + DRAIN_SECONDS:
            break
        await asyncio.wait(pending or [asyncio.create_task(asyncio.sleep(0.1))], timeout=1.0)
    drained_in = run.now()
    for w in [*run.watchers, *run.cancellers]:
        if not w.done():
            w.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await w

    # Final states, every tenant's list, and the provider's ledger.
    final: dict[str, task_pb2.Task] = {}
    listed: dict[str, list[task_pb2.Task]] = {}
    for tenant, client in tenants.items():
        listed[tenant] = [t async for page in client.list(page_size=200) for t in page]
        for task in listed[tenant]:
            final[task.task_id] = task
    ledger = await e2e.ledger(seq)
    limits = Limits(
        global_limit=GLOBAL_LIMIT,
        tenant={t: TENANT_LIMITS[t.rsplit("-", 1)[0]] for t in tenants},
        kind_cost=KIND_COST,
    )
    report = check(
        history=run.history,
        meta=run.meta,
        final=final,
        listed=listed,
        watches=run.watches,
        watch_errors=run.watch_errors,
        ledger=ledger,
        limits=limits,
    )
    report.figures["seed"] = SEED
    report.figures["submitted_in_s"] = round(submitted_in, 1)
    report.figures["drained_in_s"] = round(drained_in, 1)
    report.figures["nemesis"] = run.nemesis_log
    report.figures["watch_resumes_after_deadline_exceeded"] = run.deadline_resumes
    report.figures["leader_failover_s"] = run.failover_s and round(run.failover_s, 2)
    history_path = e2e.system.run_dir / f"kill-history-{SEED}.jsonl"
    run.history.dump(history_path)
    print(f"\nkill test: {len(run.meta)} tasks accepted; history in {history_path}")
    print(report.format())

    assert len(run.nemesis_log) == 7, run.nemesis_log
    assert not e2e.system.exited(), f"processes down after the run: {e2e.system.exited()}"
    assert report.figures["submits"].get("ok", 0) >= TASKS * 0.95, report.figures["submits"]
    assert report.ok, report.format()
