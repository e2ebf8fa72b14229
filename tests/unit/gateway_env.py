"""Helpers of the gateway's unit tests: a gateway in front of in-memory scheduler and notifier doubles
(``start_env``), the ``env`` fixture (import ``env_fixture``), submits and watch drivers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from conveyor.tasks.v1 import task_pb2
from conveyor.tasks.v1 import task_service_pb2 as svc_pb2
from conveyor.tasks.v1 import task_service_pb2_grpc as svc_grpc
from conveyor_common.grpc_server import GrpcService
from conveyor_gateway.app import Gateway, build_gateway
from conveyor_gateway.settings import GatewaySettings
from conveyor_gateway.watch import WatchConfig
from conveyor_testkit.gateway import (
    FakeNotifier,
    FakeScheduler,
    notifier_binding,
    scheduler_binding,
    serve,
)
from conveyor_testkit.tokens import AUDIENCE, ISSUER, Keys, metadata

E = task_pb2


@dataclass
class Env:
    keys: Keys
    scheduler: FakeScheduler
    notifier: FakeNotifier
    fakes: GrpcService
    gateway: Gateway
    channel: grpc.aio.Channel
    tasks: Any
    registry: CollectorRegistry

    def md(self, tenant: str = "tenant-a", **kw: object) -> tuple[tuple[str, str], ...]:
        return metadata(self.keys.token(tenant, **kw))  # type: ignore[arg-type]


def settings(scheduler_port: int, notifier_port: int | None, **kw: object) -> GatewaySettings:
    values: dict[str, object] = {
        "grpc_host": "127.0.0.1",
        "grpc_port": 0,
        "scheduler_address": f"127.0.0.1:{scheduler_port}",
        "notifier_address": f"127.0.0.1:{notifier_port}" if notifier_port else None,
        "jwt_hs256_secret": Keys.generate.__defaults__[0].decode(),  # type: ignore[index]
        "jwt_issuer": ISSUER,
        "jwt_audience": AUDIENCE,
        "scheduler_retry_base_seconds": 0.01,
    }
    values.update(kw)
    return GatewaySettings(**values)  # type: ignore[arg-type]


FAST_WATCH = WatchConfig(poll_interval=0.05, safety_poll_interval=0.5, resubscribe_interval=0.2)


async def start_env(**kw: object) -> Env:
    notifier = FakeNotifier()
    scheduler = FakeScheduler(notifier)
    fakes = await serve(scheduler_binding(scheduler), notifier_binding(notifier))
    registry = CollectorRegistry()
    gateway = build_gateway(
        settings(fakes.port, fakes.port, **kw), registry, watch_config=FAST_WATCH
    )
    await gateway.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}")
    return Env(
        Keys.generate(), scheduler, notifier, fakes, gateway, channel,
        svc_grpc.TaskServiceStub(channel), registry,
    )  # fmt: skip


async def stop_env(env: Env) -> None:
    await env.channel.close()
    await env.gateway.stop(0.5)
    await env.fakes.stop(0.5)


@pytest.fixture(name="env")
async def env_fixture() -> AsyncIterator[Env]:
    e = await start_env()
    try:
        yield e
    finally:
        await stop_env(e)


def submit_request(request_id: str = "r-1") -> svc_pb2.SubmitTaskRequest:
    spec = task_pb2.TaskSpec(kind=E.TASK_KIND_IMAGE, model="acme/sdxl")
    spec.input.update({"prompt": "a cat"})
    return svc_pb2.SubmitTaskRequest(request_id=request_id, spec=spec)


async def submit(env: Env, tenant: str = "tenant-a", request_id: str = "r-1") -> task_pb2.Task:
    resp: svc_pb2.SubmitTaskResponse = await env.tasks.SubmitTask(
        submit_request(request_id), metadata=env.md(tenant), timeout=5
    )
    return resp.task


async def collect(
    env: Env, task_id: str, after: int = 0, tenant: str = "tenant-a"
) -> list[task_pb2.TaskEvent]:
    call = env.tasks.WatchTask(
        svc_pb2.WatchTaskRequest(task_id=task_id, after_sequence=after),
        metadata=env.md(tenant),
        timeout=10,
    )
    return [resp.event async for resp in call]


async def drive(env: Env, task_id: str, delay: float = 0.05) -> None:
    """Progress events then success, published live."""
    await asyncio.sleep(delay * 4)
    for p in (10, 50, 90):
        env.scheduler.append_event(
            task_id, E.TASK_EVENT_TYPE_PROGRESS, progress=p, status=E.TASK_STATUS_RUNNING
        )
        await asyncio.sleep(delay)
    env.scheduler.append_event(
        task_id, E.TASK_EVENT_TYPE_SUCCEEDED, progress=100, status=E.TASK_STATUS_SUCCEEDED
    )


def sequences(events: list[task_pb2.TaskEvent]) -> list[int]:
    return [e.sequence for e in events]


class FrozenScheduler(FakeScheduler):
    """A replica that accepts calls and never answers (a SIGSTOPped or stalled process)."""

    async def GetQueueStats(self, request: Any, context: Any) -> Any:
        self._record("GetQueueStats", request, context)
        await asyncio.Event().wait()
