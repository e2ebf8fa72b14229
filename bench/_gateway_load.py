"""The gateway benchmark's load: specs, a gRPC load generator, and its closed-loop and open-loop runs."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import grpc

from conveyor.scheduler.v1 import scheduler_service_pb2 as sched_pb2
from conveyor.scheduler.v1 import scheduler_service_pb2_grpc as sched_grpc
from conveyor.tasks.v1 import task_pb2
from conveyor.tasks.v1 import task_service_pb2 as svc_pb2
from conveyor.tasks.v1 import task_service_pb2_grpc as svc_grpc
from conveyor_common.channels import client_options


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def _make_spec(i: int) -> task_pb2.TaskSpec:
    s = task_pb2.TaskSpec(kind=task_pb2.TASK_KIND_IMAGE, model="bench/sdxl")
    s.input.update({"prompt": f"benchmark prompt {i}", "steps": 30})
    return s


_SPECS = [_make_spec(i) for i in range(1024)]


def spec(i: int) -> task_pb2.TaskSpec:
    """One of 1,024 prebuilt bodies (each request still gets its own request_id): building a
    Struct per request would load the shared cores with load-generator work."""
    return _SPECS[i % len(_SPECS)]


@dataclass
class Load:
    address: str
    tokens: list[str]
    channels: list[grpc.aio.Channel] = field(default_factory=list)
    stubs: list[Any] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    direct: bool = False

    def open(self, n: int) -> None:
        for i in range(n):
            ch = grpc.aio.insecure_channel(
                self.address, options=client_options(("grpc.channel_id", i))
            )
            self.channels.append(ch)
            self.stubs.append(
                sched_grpc.SchedulerServiceStub(ch) if self.direct else svc_grpc.TaskServiceStub(ch)
            )

    async def close(self) -> None:
        for ch in self.channels:
            await ch.close()

    def md(self, i: int) -> tuple[tuple[str, str], ...]:
        return (("authorization", "Bearer " + self.tokens[i % len(self.tokens)]),)

    def error(self, exc: grpc.aio.AioRpcError) -> None:
        name = exc.code().name
        self.errors[name] = self.errors.get(name, 0) + 1

    async def submit(self, worker: int, i: int) -> bool:
        stub = self.stubs[worker % len(self.stubs)]
        req = svc_pb2.SubmitTaskRequest(request_id=str(uuid.uuid4()), spec=spec(i))
        try:
            if self.direct:
                wrapped = sched_pb2.SchedulerServiceSubmitTaskRequest(
                    principal=sched_pb2.Principal(
                        tenant_id=f"bench-{worker % len(self.tokens)}",
                        tier=task_pb2.TIER_PRO,
                        role=sched_pb2.ROLE_TENANT,
                        subject="bench",
                    ),
                    request=req,
                )
                await stub.SubmitTask(wrapped, timeout=10)
                return True
            await stub.SubmitTask(req, metadata=self.md(worker), timeout=10)
            return True
        except grpc.aio.AioRpcError as exc:
            self.error(exc)
            return False

    async def batch(self, worker: int, size: int) -> int:
        stub = self.stubs[worker % len(self.stubs)]
        req = svc_pb2.BatchSubmitTasksRequest(request_id=str(uuid.uuid4()))
        for i in range(size):
            req.items.add(request_id=str(uuid.uuid4()), spec=spec(i))
        try:
            await stub.BatchSubmitTasks(req, metadata=self.md(worker), timeout=30)
            return size
        except grpc.aio.AioRpcError as exc:
            self.error(exc)
            return 0


async def closed_loop(load: Load, workers: int, seconds: float, batch: int = 0) -> float:
    """Tasks per second with ``workers`` clients each sending as fast as answers come back."""
    done = 0
    stop_at = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        nonlocal done
        i = 0
        while time.perf_counter() < stop_at:
            if batch:
                n = await load.batch(w, batch)
            else:
                n = 1 if await load.submit(w, i) else 0
            done += n  # after the await: `done += await ...` would lose concurrent updates
            i += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(workers)))
    return done / (time.perf_counter() - start)


async def open_loop(load: Load, rate: float, seconds: float) -> dict[str, Any]:
    """Submits at ``rate``/s on a fixed schedule; latency from each scheduled send time."""
    total = int(rate * seconds)
    latencies: list[float] = []
    failures = 0
    max_lag = 0.0
    start = time.perf_counter() + 0.05
    tasks: list[asyncio.Task[None]] = []

    async def one(i: int, scheduled: float) -> None:
        nonlocal failures
        ok = await load.submit(i, i)
        if ok:
            latencies.append((time.perf_counter() - scheduled) * 1000)
        else:
            failures += 1

    for i in range(total):
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        max_lag = max(max_lag, time.perf_counter() - scheduled)
        tasks.append(asyncio.create_task(one(i, scheduled)))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    return {
        "offered_per_s": rate,
        "requests": total,
        "ok": len(latencies),
        "failed": failures,
        "achieved_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(pct(latencies, 50), 2),
        "p90_ms": round(pct(latencies, 90), 2),
        "p99_ms": round(pct(latencies, 99), 2),
        "max_ms": round(max(latencies, default=float("nan")), 2),
        "generator_max_lag_ms": round(max_lag * 1000, 2),
    }
