"""Fair admission through the gateway and the real scheduler: a tenant flooding at its full submit
rate fills the queue, yet a calm tenant below its weighted share is never refused (#15)."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from conveyor.tasks.v1 import task_pb2
from conveyor.tasks.v1 import task_service_pb2 as svc_pb2
from conveyor.tasks.v1 import task_service_pb2_grpc as svc_grpc
from conveyor_testkit.stack import Stack, start_stack
from conveyor_testkit.tokens import metadata

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

FLOOD_SECONDS = float(os.environ.get("CONVEYOR_FLOOD_SECONDS", "60"))
CAPACITY = 300
RATE = 100.0


@pytest.fixture(scope="module")
async def stack(database_url: str) -> AsyncIterator[Stack]:
    s = await start_stack(
        database_url,
        scheduler={
            "queue_capacity": CAPACITY,
            "tenant_max_waiting": 100_000,
            "tenant_submit_rate": RATE,
            "tenant_submit_burst": int(RATE),
            "global_concurrency": 1,  # nothing drains the queue meanwhile: it stays full
        },
    )
    try:
        yield s
    finally:
        await s.stop()


async def test_a_flood_at_full_rate_never_refuses_a_calm_tenant_under_its_share(
    stack: Stack,
) -> None:
    async with grpc.aio.insecure_channel(stack.address) as channel:
        tasks: Any = svc_grpc.TaskServiceStub(channel)
        flood_md = metadata(stack.keys.token("flood"))
        calm_md = metadata(stack.keys.token("calm"))

        async def submit(md: Any) -> grpc.StatusCode:
            spec = task_pb2.TaskSpec(kind=task_pb2.TASK_KIND_TEXT, model="acme/llm")
            spec.input.update({"prompt": "p"})
            try:
                await tasks.SubmitTask(
                    svc_pb2.SubmitTaskRequest(request_id=str(uuid.uuid4()), spec=spec),
                    metadata=md,
                    timeout=10,
                )
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

        flood_codes: list[grpc.StatusCode] = []
        calm_codes: list[grpc.StatusCode] = []
        end = time.monotonic() + FLOOD_SECONDS

        async def flood() -> None:
            while time.monotonic() < end:  # its full rate: RATE per second, in steps of 10
                flood_codes.extend(await asyncio.gather(*(submit(flood_md) for _ in range(10))))
                await asyncio.sleep(10 / RATE)

        async def calm() -> None:
            while time.monotonic() < end:
                calm_codes.append(await submit(calm_md))
                await asyncio.sleep(0.5)

        await asyncio.gather(flood(), calm())
    ok = flood_codes.count(grpc.StatusCode.OK)
    assert ok >= CAPACITY // 2, "the flood filled its share of the queue"
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in flood_codes, "then it was held at its share"
    assert set(flood_codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    # The calm tenant's waiting tasks stay below its share (CAPACITY / 2): never refused.
    assert len(calm_codes) >= FLOOD_SECONDS  # two a second
    assert set(calm_codes) == {grpc.StatusCode.OK}, [c.name for c in calm_codes]
