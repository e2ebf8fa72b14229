"""The pipeline benchmark's system: targets, lifted limits, the scenario plan, the processes whose CPU is
accounted, and the system's configuration (``bench/pipeline_bench.py`` runs it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench import _measure
from conveyor.tasks.v1 import task_pb2
from conveyor_devstack.stack import Devstack
from conveyor_devstack.system import ConveyorSystem, SystemConfig

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
    latency_warmup_rate: float = 50.0
    latency_warmup_s: float = 10.0
    refill_warmup_tasks: int = 100
    refill_tasks: int = 300
    refill_limit: int = 5
    refill_duration_s: float = 0.5
    backlog_tasks: int = 2000
    priority_timeout_s: float = 300.0
    bullmq_warmup_s: float = 5.0
    bullmq_window_s: float = 60.0
    hung_create_rate: float = 0.01
    hung_create_s: float = 3.0
    hung_window_s: float = 30.0

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
            latency_warmup_rate=5.0,
            latency_warmup_s=0.6,
            refill_warmup_tasks=5,
            refill_tasks=15,
            backlog_tasks=50,
            priority_timeout_s=60.0,
            bullmq_warmup_s=0.5,
            bullmq_window_s=1.5,
            hung_create_rate=0.05,
            hung_create_s=1.0,
            hung_window_s=2.0,
        )


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


def hung_creates(plan: Plan) -> dict[str, Any]:
    """The fake's faults of the hung-creates scenario: a share of creates take effect and then hang
    ``hung_create_s`` before the connection drops (no answer: the adapter recovers the prediction)."""
    return {"create_drop_rate": plan.hung_create_rate, "create_drop_delay_s": plan.hung_create_s}


def system_config(
    run_dir: Path,
    log_level: str,
    *,
    refill: Plan | None = None,
    faults: dict[str, Any] | None = None,
) -> SystemConfig:
    """The ``make up`` shape with every limit lifted; ``refill`` sets its global limit and durations,
    ``faults`` are the fake's fault knobs."""
    scheduler = dict(LIFTED_SCHEDULER)
    fake: dict[str, Any] = {**LIFTED_FAKE, **INSTANT, **(faults or {})}
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
    devstack: Devstack,
    logs: Path,
    name: str,
    log_level: str,
    *,
    refill: Plan | None = None,
    faults: dict[str, Any] | None = None,
) -> AsyncIterator[ConveyorSystem]:
    """A fresh system on the shared devstack, stopped at the end."""
    config = system_config(logs / name, log_level, refill=refill, faults=faults)
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
