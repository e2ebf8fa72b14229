"""The pipeline benchmark's load generator: specs, a closed-loop submitting client, and the terminal
events read from each tenant's filtered WatchTasks stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import grpc

from bench._pipeline_system import TERMINAL_STATUSES, TERMINAL_TYPES
from conveyor.tasks.v1 import task_pb2
from conveyor.tasks.v1 import task_service_pb2 as svc_pb2
from conveyor.tasks.v1 import task_service_pb2_grpc as svc_grpc
from conveyor_common.channels import client_options
from conveyor_devstack.system import ConveyorSystem

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
