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
* ``added_latency_p50_ms_at_5tps`` / ``added_latency_p99_ms_at_100tps``: open-loop paced submits
  (~20 s each), from the scheduled submit time to the terminal event on the watch stream, minus the
  prediction's own run time at the fake (create -> finish in its ledger);
* ``refill_p99_ms``: global limit 5, 0.5 s predictions, a few hundred tasks: from a finish at the fake
  to the next create (the fake's ledger timestamps, paired in time order);
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
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import grpc
import httpx

from conveyor.tasks.v1 import task_pb2
from conveyor.tasks.v1 import task_service_pb2 as svc_pb2
from conveyor.tasks.v1 import task_service_pb2_grpc as svc_grpc
from conveyor_common.channels import client_options
from conveyor_devstack.stack import Devstack
from conveyor_devstack.system import ConveyorSystem, SystemConfig
from conveyor_devstack.topics import conveyor_topics

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # bench/ helpers are imported by their package path
    sys.path.insert(0, str(ROOT))

from bench import _measure, _peers  # noqa: E402

log = logging.getLogger("pipeline_bench")

TARGETS = {
    "work_through_tps": 250.0,
    "cpu_ms_per_task": 8.0,
    "added_latency_p50_ms_at_5tps": 40.0,
    "added_latency_p99_ms_at_100tps": 150.0,
    "refill_p99_ms": 50.0,
    "priority_under_backlog_s": 1.0,
}
"""The bounds issue #13 asks for (throughput: at least; the others: at most)."""

TERMINAL_TYPES = (
    task_pb2.TASK_EVENT_TYPE_SUCCEEDED,
    task_pb2.TASK_EVENT_TYPE_FAILED,
    task_pb2.TASK_EVENT_TYPE_CANCELED,
    task_pb2.TASK_EVENT_TYPE_DEAD_LETTERED,
    task_pb2.TASK_EVENT_TYPE_EXPIRED,
)
TERMINAL_STATUSES = {
    task_pb2.TASK_STATUS_SUCCEEDED: task_pb2.TASK_EVENT_TYPE_SUCCEEDED,
    task_pb2.TASK_STATUS_FAILED: task_pb2.TASK_EVENT_TYPE_FAILED,
    task_pb2.TASK_STATUS_CANCELED: task_pb2.TASK_EVENT_TYPE_CANCELED,
    task_pb2.TASK_STATUS_DEAD_LETTERED: task_pb2.TASK_EVENT_TYPE_DEAD_LETTERED,
    task_pb2.TASK_STATUS_EXPIRED: task_pb2.TASK_EVENT_TYPE_EXPIRED,
}
BIG = 1_000_000_000
LIFTED_SCHEDULER = {
    "SCHEDULER_GLOBAL_CONCURRENCY": str(BIG),
    "SCHEDULER_TIER_CONCURRENCY": json.dumps({"free": BIG, "premium": BIG, "pro": BIG}),
    "SCHEDULER_DEFAULT_MODEL_LIMIT": "0",
    "SCHEDULER_PROVIDER_RATE_PER_SECOND": str(BIG),
    "SCHEDULER_PROVIDER_BURST": str(BIG),
    "SCHEDULER_QUEUE_CAPACITY": str(BIG),
    "SCHEDULER_TENANT_MAX_WAITING": str(BIG),
    "SCHEDULER_TENANT_SUBMIT_RATE": str(BIG),
    "SCHEDULER_TENANT_SUBMIT_BURST": str(BIG),
}
LIFTED_ADAPTER = {
    "ADAPTER_CREATE_RATE_PER_MIN": str(BIG),
    "ADAPTER_CREATE_BURST": str(BIG),
    "ADAPTER_WEBHOOK_QUEUE_SIZE": "100000",
}
LIFTED_GATEWAY = {
    "GATEWAY_RATE_LIMIT_PER_SECOND": str(BIG),
    "GATEWAY_RATE_LIMIT_BURST": str(BIG),
}
LIFTED_FAKE: dict[str, Any] = {
    "create_rate_per_min": float(BIG),
    "create_burst": BIG,
    "other_rate_per_min": float(BIG),
    "other_burst": BIG,
}
INSTANT: dict[str, Any] = {"min_duration_s": 0.0, "max_duration_s": 0.0}
SERVICE_GROUPS = {
    "scheduler-1": "scheduler-1",
    "scheduler-2": "scheduler-2",
    "adapter-1": "adapter",
    "notifier-1": "notifier",
    "gateway-1": "gateway",
}
"""System process name -> CPU group name in the results."""
SYSTEM_GROUPS = (
    "scheduler-1",
    "scheduler-2",
    "adapter",
    "notifier",
    "gateway",
    "postgres",
    "kafka",
)
"""The groups counted in cpu_ms_per_task (everything but the fake and the load generator)."""


@dataclass(frozen=True)
class Plan:
    """Sizes of every scenario (full or quick)."""

    tenants: int = 4
    outstanding: int = 1000
    warmup_s: float = 15.0
    window_s: float = 60.0
    drain_timeout_s: float = 240.0
    slow_rate: float = 5.0
    fast_rate: float = 100.0
    paced_s: float = 20.0
    refill_tasks: int = 300
    refill_limit: int = 5
    refill_duration_s: float = 0.5
    backlog_tasks: int = 2000
    priority_timeout_s: float = 300.0
    bullmq_warmup_s: float = 5.0
    bullmq_window_s: float = 60.0

    @classmethod
    def quick(cls) -> Plan:
        """Tiny loads: the same code paths in about a minute (the smoke test runs it)."""
        return cls(
            tenants=2,
            outstanding=50,
            warmup_s=1.0,
            window_s=2.0,
            drain_timeout_s=60.0,
            paced_s=0.6,
            refill_tasks=15,
            backlog_tasks=50,
            priority_timeout_s=60.0,
            bullmq_warmup_s=0.5,
            bullmq_window_s=1.5,
        )


# ---------------------------------------------------------------------------------------------
# Processes to account


def kafka_pid(devstack: Devstack) -> int | None:
    """The broker's JVM (local-process devstack only): the process whose command line names the
    broker's instance directory."""
    if devstack.kafka is None or not devstack.kafka.can_restart:
        return None
    root = devstack.kafka.local.root
    return None if root is None else pid_by_cmdline(str(root))


def postmaster_pid(devstack: Devstack) -> int | None:
    """PostgreSQL's postmaster (local-process devstack only), from ``postmaster.pid``."""
    if devstack.postgres is None or not devstack.postgres.can_restart:
        return None
    try:
        text = (devstack.postgres.local.data_dir / "postmaster.pid").read_text()
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return None


def pid_by_cmdline(fragment: str, proc_root: Path = Path("/proc")) -> int | None:
    """The lowest pid whose command line contains ``fragment`` (not ours)."""
    found: list[int] = []
    for entry in proc_root.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if fragment in cmdline:
            found.append(int(entry.name))
    return min(found, default=None)


def cpu_targets(system: ConveyorSystem) -> list[_measure.CpuTarget]:
    """Every group to account: the services, PostgreSQL, Kafka, the fake and this process."""
    targets = []
    for name, group in SERVICE_GROUPS.items():
        pid = system.process(name).pid
        if pid is not None:
            targets.append(_measure.CpuTarget(group, pid))
    fake = system.process("fake").pid
    if fake is not None:
        targets.append(_measure.CpuTarget("fake", fake))
    pg = postmaster_pid(system.devstack)
    if pg is not None:
        targets.append(_measure.CpuTarget("postgres", pg))
    kafka = kafka_pid(system.devstack)
    if kafka is not None:
        targets.append(_measure.CpuTarget("kafka", kafka))
    # This process is the parent of every service: its own time only, not its tree.
    targets.append(_measure.CpuTarget("loadgen", os.getpid(), tree=False))
    return targets


# ---------------------------------------------------------------------------------------------
# The system


def system_config(run_dir: Path, log_level: str, *, refill: Plan | None = None) -> SystemConfig:
    """The ``make up`` shape with every limit lifted; ``refill`` sets its global limit and durations."""
    scheduler = dict(LIFTED_SCHEDULER)
    fake: dict[str, Any] = {**LIFTED_FAKE, **INSTANT}
    if refill is not None:
        scheduler["SCHEDULER_GLOBAL_CONCURRENCY"] = str(refill.refill_limit)
        fake["min_duration_s"] = fake["max_duration_s"] = refill.refill_duration_s
    return SystemConfig(
        schedulers=2,
        adapters=1,
        notifiers=1,
        gateways=1,
        scheduler_env=scheduler,
        adapter_env=dict(LIFTED_ADAPTER),
        gateway_env=dict(LIFTED_GATEWAY),
        fake=fake,
        run_dir=run_dir,
        log_level=log_level,
        start_timeout=180.0,
    )


@contextlib.asynccontextmanager
async def running(
    devstack: Devstack, logs: Path, name: str, log_level: str, *, refill: Plan | None = None
) -> AsyncIterator[ConveyorSystem]:
    """A fresh system on the shared devstack, stopped at the end."""
    config = system_config(logs / name, log_level, refill=refill)
    async with ConveyorSystem.run(config, devstack=devstack) as system:
        yield system


async def fetch_ledger(system: ConveyorSystem, kind: str, task: str | None = None) -> list[Any]:
    """Events of one kind from the fake's ledger (of one task when given)."""
    params = {"kind": kind, **({"task": task} if task else {})}
    async with httpx.AsyncClient(timeout=60.0) as client:
        resp = await client.get(system.endpoints.ledger_url, params=params)
        resp.raise_for_status()
        events: list[Any] = resp.json()["events"]
        return events


# ---------------------------------------------------------------------------------------------
# The client side


Priority: TypeAlias = task_pb2.Priority.ValueType


def make_spec(priority: Priority = task_pb2.PRIORITY_NORMAL) -> task_pb2.TaskSpec:
    spec = task_pb2.TaskSpec(kind=task_pb2.TASK_KIND_IMAGE, model="bench/sdxl", priority=priority)
    spec.input.update({"prompt": "pipeline benchmark", "steps": 30})
    return spec


_SPECS = {p: make_spec(p) for p in (task_pb2.PRIORITY_NORMAL, task_pb2.PRIORITY_URGENT)}


class Client:
    """Raw ``conveyor.tasks.v1`` stubs on a few channels to the gateway, one token per tenant."""

    def __init__(self, system: ConveyorSystem, tenants: list[str], channels: int = 4) -> None:
        self.tokens = {t: system.mint_token(t, tier="pro") for t in tenants}
        self.channels = [
            grpc.aio.insecure_channel(
                system.gateway_address, options=client_options(("grpc.channel_id", i))
            )
            for i in range(channels)
        ]
        self.stubs: list[Any] = [svc_grpc.TaskServiceStub(ch) for ch in self.channels]
        self.errors: Counter[str] = Counter()
        self._next = 0

    def stub(self) -> Any:
        self._next += 1
        return self.stubs[self._next % len(self.stubs)]

    def md(self, tenant: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", "Bearer " + self.tokens[tenant]),)

    async def close(self) -> None:
        for ch in self.channels:
            await ch.close()

    async def submit(
        self, tenant: str, priority: Priority = task_pb2.PRIORITY_NORMAL
    ) -> str | None:
        """One SubmitTask; the task id, or None (the error is counted)."""
        req = svc_pb2.SubmitTaskRequest(request_id=str(uuid.uuid4()), spec=_SPECS[priority])
        try:
            resp = await self.stub().SubmitTask(req, metadata=self.md(tenant), timeout=60)
        except grpc.aio.AioRpcError as exc:
            self.errors["submit:" + exc.code().name] += 1
            return None
        return str(resp.task.task_id)

    async def batch(self, tenant: str, n: int) -> list[str]:
        """BatchSubmitTasks of ``n`` (<= 100) normal tasks; their ids."""
        req = svc_pb2.BatchSubmitTasksRequest(request_id=str(uuid.uuid4()))
        for _ in range(n):
            req.items.add(request_id=str(uuid.uuid4()), spec=_SPECS[task_pb2.PRIORITY_NORMAL])
        try:
            resp = await self.stub().BatchSubmitTasks(req, metadata=self.md(tenant), timeout=60)
        except grpc.aio.AioRpcError as exc:
            self.errors["batch:" + exc.code().name] += 1
            return []
        return [str(t.task_id) for t in resp.tasks]

    async def terminal_status(self, tenant: str, task_id: str) -> int | None:
        """The terminal event type matching the task's status now, or None if not terminal."""
        try:
            resp = await self.stub().GetTask(
                svc_pb2.GetTaskRequest(task_id=task_id), metadata=self.md(tenant), timeout=30
            )
        except grpc.aio.AioRpcError as exc:
            self.errors["get:" + exc.code().name] += 1
            return None
        return TERMINAL_STATUSES.get(resp.task.status)

    async def queued(self, tenant: str) -> int:
        """Whether the tenant still has queued tasks (0 or 1: one page of one)."""
        req = svc_pb2.ListTasksRequest(
            filter=svc_pb2.TaskFilter(statuses=[task_pb2.TASK_STATUS_QUEUED]), page_size=1
        )
        resp = await self.stub().ListTasks(req, metadata=self.md(tenant), timeout=30)
        return len(resp.tasks)


@dataclass
class Terminals:
    """Terminal events seen on the watch streams (first sighting per task, wall time).

    When a stream is cut ("live stream fell behind") it is opened again; the tasks of that tenant
    still pending are then looked up once (GetTask) after a short pause, and those already terminal
    are marked ``reconciled`` (their time is the lookup's, so latency figures leave them out).
    """

    client: Client
    seen: dict[str, float] = field(default_factory=dict)
    types: Counter[str] = field(default_factory=Counter)
    pending: dict[str, str] = field(default_factory=dict)
    """Task id -> tenant, submitted and not yet seen terminal."""
    reconciled: set[str] = field(default_factory=set)
    duplicates: int = 0
    cuts: Counter[str] = field(default_factory=Counter)
    listeners: list[Callable[[str, str], None]] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _stopping: bool = False

    def expect(self, task_id: str, tenant: str) -> None:
        """A submitted task (its terminal event may already have been seen)."""
        if task_id in self.seen:
            self._fire(task_id, tenant)
        else:
            self.pending[task_id] = tenant

    def add(self, task_id: str, event_type: int, t: float) -> None:
        if task_id in self.seen:
            self.duplicates += 1
            return
        self.seen[task_id] = t
        self.types[task_pb2.TaskEventType.Name(event_type)] += 1  # type: ignore[arg-type]
        self._changed.set()
        tenant = self.pending.pop(task_id, None)
        if tenant is not None:
            self._fire(task_id, tenant)

    def _fire(self, task_id: str, tenant: str) -> None:
        for listener in self.listeners:
            listener(task_id, tenant)

    def stopping(self) -> bool:
        return self._stopping

    async def until(self, condition: Callable[[], bool], within_s: float) -> bool:
        """Wait (woken by each new terminal event) until ``condition()`` holds; False after
        ``within_s`` seconds without it."""
        deadline = time.monotonic() + within_s
        while not condition():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 1.0))
        return True

    async def all_seen(self, ids: Collection[str], within_s: float) -> bool:
        """Wait until every task of ``ids`` was seen terminal (False after ``within_s``)."""
        return await self.until(lambda: all(t in self.seen for t in ids), within_s)

    def watch(self, tenant: str) -> None:
        """Start the tenant's terminal-events stream."""
        self._tasks.append(asyncio.create_task(self._watch(tenant)))

    async def _watch(self, tenant: str) -> None:
        req = svc_pb2.WatchTasksRequest(types=TERMINAL_TYPES)
        while not self.stopping():
            call = self.client.stub().WatchTasks(req, metadata=self.client.md(tenant))
            try:
                async for resp in call:
                    self.add(resp.event.task_id, resp.event.type, time.time())
            except grpc.aio.AioRpcError as exc:
                if self.stopping() or exc.code() == grpc.StatusCode.CANCELLED:
                    return
                self.cuts[f"{exc.code().name}: {exc.details()}"] += 1
                self._tasks.append(asyncio.create_task(self._reconcile(tenant)))
                await asyncio.sleep(0.1)

    async def _reconcile(self, tenant: str) -> None:
        await asyncio.sleep(1.0)  # the new stream is live by then; what ended before is looked up
        ids = [tid for tid, ten in list(self.pending.items()) if ten == tenant]
        sem = asyncio.Semaphore(16)

        async def one(tid: str) -> None:
            async with sem:
                event_type = await self.client.terminal_status(tenant, tid)
            if event_type is not None and tid not in self.seen:
                self.reconciled.add(tid)
                self.add(tid, event_type, time.time())

        await asyncio.gather(*(one(tid) for tid in ids))

    async def ready(self, tenants: list[str], within_s: float = 120.0) -> None:
        """Every stream delivers: a probe task per tenant seen terminal on its stream (a probe that
        ended before its stream was subscribed is followed by another)."""
        for tenant in tenants:
            self.watch(tenant)
        deadline = time.monotonic() + within_s

        async def probe(tenant: str) -> None:
            while time.monotonic() < deadline:
                tid = await self.client.submit(tenant)
                if tid is None:
                    await asyncio.sleep(0.5)
                    continue
                self.expect(tid, tenant)
                if await self.all_seen([tid], min(5.0, max(0.1, deadline - time.monotonic()))):
                    return
                self.pending.pop(tid, None)  # its end went by before the stream was live
            raise RuntimeError(
                f"the watch of {tenant} delivered no probe within {within_s:.0f} s "
                f"(client errors: {dict(self.client.errors)})"
            )

        await asyncio.gather(*(probe(t) for t in tenants))

    async def close(self) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def stats(self) -> dict[str, Any]:
        return {
            "terminal_types": dict(self.types),
            "watch_cuts": dict(self.cuts),
            "reconciled_after_cut": len(self.reconciled),
            "duplicate_terminal_events": self.duplicates,
        }


def tenant_names(scenario: str, n: int) -> list[str]:
    suffix = uuid.uuid4().hex[:6]
    return [f"{scenario}-{suffix}-{i}" for i in range(n)]


# ---------------------------------------------------------------------------------------------
# Scenarios


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
        cpu_before = probe.sample()
        window_start = time.monotonic()
        await asyncio.sleep(plan.window_s)
        cpu_after = probe.sample()
        window_end = time.monotonic()
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


async def paced(
    system: ConveyorSystem, client: Client, terminals: Terminals, tenants: list[str], rate: float,
    seconds: float, within_s: float,
) -> dict[str, Any]:  # fmt: skip
    """Open loop at ``rate``/s for ``seconds``: added latency of each task (see the module doc)."""
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
    """Added latency at a light and at a heavy paced load."""
    tenants = tenant_names("lat", plan.tenants)
    client = Client(system, tenants)
    terminals = Terminals(client)
    try:
        await terminals.ready(tenants)
        within_s = 60.0 + plan.fast_rate * plan.paced_s / 10.0
        slow = await paced(
            system, client, terminals, tenants, plan.slow_rate, plan.paced_s, within_s
        )
        fast = await paced(
            system, client, terminals, tenants, plan.fast_rate, plan.paced_s, within_s
        )
        return {
            "added_latency_p50_ms_at_5tps": slow["p50_ms"],
            "added_latency_p99_ms_at_100tps": fast["p99_ms"],
            "details": {
                f"at_{plan.slow_rate:g}_per_s": slow,
                f"at_{plan.fast_rate:g}_per_s": fast,
                "client_errors": dict(client.errors),
                **terminals.stats(),
            },
        }
    finally:
        await terminals.close()
        await client.close()


async def refill(system: ConveyorSystem, plan: Plan) -> dict[str, Any]:
    """Global limit ``refill_limit``, ``refill_duration_s`` predictions: finish -> next create."""
    tenants = tenant_names("refill", 1)
    client = Client(system, tenants)
    terminals = Terminals(client)
    try:
        await terminals.ready(tenants)
        ids: list[str] = []
        while len(ids) < plan.refill_tasks:
            got = await client.batch(tenants[0], min(100, plan.refill_tasks - len(ids)))
            if not got:
                raise RuntimeError(f"batch submit failed: {dict(client.errors)}")
            ids += got
            for tid in got:
                terminals.expect(tid, tenants[0])
        expected_s = plan.refill_tasks * plan.refill_duration_s / plan.refill_limit
        await terminals.all_seen(ids, 3 * expected_s + 120.0)
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
                "completed": sum(1 for t in ids if t in terminals.seen),
                "creates": len(creates),
                "pairs": summary,
                "ideal_s": round(expected_s, 1),
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
        # Refill first: the lifted-limit scenarios leave no work behind except the last (priority),
        # whose dispatched backlog would otherwise reach the next system's adapter through Kafka.
        print("== refill", flush=True)
        timings["devstack"] = round(time.monotonic() - started, 1)
        async with running(devstack, logs, "refill", log_level, refill=plan) as system:
            scenarios["refill"] = await refill(system, plan)
        timings["refill"] = round(time.monotonic() - started, 1)
        steps: list[tuple[str, Callable[[ConveyorSystem, Plan], Any]]] = [
            ("work_through", work_through),
            ("latency", latency),
            ("priority", priority),
        ]
        if quick:  # one system for the three: the same code paths, fewer starts
            async with running(devstack, logs, "lifted", log_level) as system:
                for name, step in steps:
                    print(f"== {name}", flush=True)
                    scenarios[name] = await step(system, plan)
                    timings[name] = round(time.monotonic() - started, 1)
        else:
            for name, step in steps:
                print(f"== {name}", flush=True)
                async with running(devstack, logs, name, log_level) as system:
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
