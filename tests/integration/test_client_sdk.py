"""The typed SDK (conveyor_client.sdk) against a running gateway and real scheduler: typed results,
batch splitting, watching many tasks, RetryInfo honoured, token refresh, groups.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
import pytest

from conveyor_client import (
    AsyncClient,
    Client,
    ConveyorError,
    EventType,
    Paused,
    Priority,
    Task,
    TaskEvent,
    TaskStatus,
    TenantLimits,
    spec,
)
from conveyor_testkit.stack import Stack
from tests.integration.client_env import stack_fixture  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


async def test_typed_client_results_and_cancel_requested(stack: Stack) -> None:
    env = {"CONVEYOR_ADDRESS": stack.address, "CONVEYOR_TOKEN": stack.keys.token("typed")}
    async with AsyncClient.from_env(env, timeout=5) as c:
        sub = await c.submit("image", model="acme/sdxl", input={"prompt": "a fox"}, priority="high")
        assert isinstance(sub.task, Task)
        assert sub.task.status == TaskStatus.QUEUED
        assert str(sub.task.status) == "queued"
        assert sub.task.priority == Priority.HIGH
        assert sub.task.input == {"prompt": "a fox"}
        assert sub.to_dict()["task"]["status"] == "queued"
        got = await c.get(sub.task.task_id)
        assert got.task_id == sub.task.task_id
        live = ["queued", TaskStatus.DISPATCHED, "running"]  # it may be dispatched by now
        assert [t.task_id async for t in c.list(statuses=live)] == [got.task_id]
        assert [t async for t in c.list(statuses=["expired"])] == []
        canceled = await c.cancel(got.task_id)
        assert canceled.cancel_requested or canceled.status == TaskStatus.CANCELED
        final = await c.wait(got.task_id, timeout=15)
        assert final.status == TaskStatus.CANCELED
        assert final.terminal


async def test_batch_over_the_item_limit_is_split_and_deduplicated_on_retry(stack: Stack) -> None:
    async with AsyncClient(
        stack.address, stack.keys.token("big-batch", tier="pro"), timeout=20
    ) as c:
        specs = [spec("text", model="acme/llm", input={"prompt": f"p{i}"}) for i in range(150)]
        first = await c.submit_batch(specs, request_id="big-batch-1")
        assert len(first.tasks) == 150
        assert len({t.task_id for t in first.tasks}) == 150
        assert not any(item.deduplicated for item in first.items)
        # Same item request ids: answered from the first submit, nothing created twice.
        again = await c.raw.submit_batch(
            [(t.request_id, s) for t, s in zip(first.tasks, specs, strict=True)],
            request_id="big-batch-1",
        )
        assert list(again.deduplicated) == [True] * 150
        assert [t.task_id for t in again.tasks] == [t.task_id for t in first.tasks]


async def test_watch_many_follows_every_task_to_its_end(stack: Stack) -> None:
    async with AsyncClient(stack.address, stack.keys.token("many"), timeout=5) as c:
        batch = await c.submit_batch(
            [{"kind": "audio", "model": "acme/tts", "input": {"text": str(i)}} for i in range(3)]
        )
        ids = [t.task_id for t in batch.tasks]
        events: list[TaskEvent] = []

        async def follow() -> None:
            events.extend([e async for e in c.watch_many(ids)])

        follower = asyncio.create_task(follow())
        for task_id in ids:
            await c.cancel(task_id)
        await asyncio.wait_for(follower, 20)
        for task_id in ids:
            mine = [e for e in events if e.task_id == task_id]
            assert [e.sequence for e in mine] == list(range(1, len(mine) + 1))
            assert mine[-1].type == EventType.CANCELED


async def test_resource_exhausted_is_retried_after_retry_info(stack: Stack) -> None:
    async with AsyncClient(stack.address, stack.keys.token("ops", role="admin")) as admin:
        await admin.upsert_tenant(
            "bursty", limits=TenantLimits(submit_rate_per_second=0.5, submit_burst=1)
        )
    token = stack.keys.token("bursty")
    async with AsyncClient(
        stack.address, token, timeout=5, retry_resource_exhausted=False
    ) as strict:
        await strict.submit("text", model="acme/llm", input={"prompt": "the burst"})
        with pytest.raises(ConveyorError) as exc:
            await strict.submit("text", model="acme/llm", input={"prompt": "one more"})
        assert exc.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert exc.value.retry_after_seconds is not None
        # A deadline shorter than the asked delay (~2 s) fails at once instead of waiting in vain
        # (0.5 s: room for the first answer on a loaded machine, 50 ms was not).
    async with AsyncClient(stack.address, token, timeout=30) as patient:
        started = time.monotonic()
        with pytest.raises(ConveyorError) as exc:
            await patient.submit("text", model="acme/llm", input={"prompt": "x"}, timeout=0.5)
        assert exc.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert time.monotonic() - started < 0.5
        done = await patient.submit(
            "text", model="acme/llm", input={"prompt": "retried"}, request_id="retried-once"
        )
        assert done.task.request_id == "retried-once"
        assert not done.deduplicated


async def test_token_provider_is_asked_again_before_expiry(stack: Stack) -> None:
    minted: list[str] = []

    def provider() -> str:
        # Tokens that expire within the refresh margin: every call needs a fresh one.
        minted.append(stack.keys.token("provided", ttl=30))
        return minted[-1]

    def flow() -> None:
        with Client(stack.address, provider, timeout=5) as c:
            task = c.submit("image", model="acme/sdxl", input={"prompt": "sync"}).task
            assert c.get(task.task_id).tenant_id == "provided"

    await asyncio.to_thread(flow)
    assert len(minted) == 2


async def test_group_calls_of_the_typed_sdk(stack: Stack) -> None:
    from conveyor_client import Client

    token = stack.keys.token(f"typed-{uuid.uuid4().hex[:8]}")

    def run() -> list[int]:
        with Client(stack.address, token, timeout=5) as typed:
            group = typed.submit_group(
                [
                    {"kind": "image", "model": "acme/sdxl", "input": {"prompt": str(i)}}
                    for i in range(2)
                ],
                fail_fast=True,
            )
            assert typed.get_group(group.group_id).progress.total == 2
            typed.cancel_group(group.group_id, reason="typed")
            return [e.type for e in typed.watch_group(group.group_id)]

    types = await asyncio.to_thread(run)
    assert types[0] == 1  # CREATED
    assert types[-1] == 4  # COMPLETED


async def test_paused_models_and_tenants_are_typed(stack: Stack) -> None:
    admin = {
        "CONVEYOR_ADDRESS": stack.address,
        "CONVEYOR_TOKEN": stack.keys.token("ops", role="admin"),
    }
    async with AsyncClient.from_env(admin, timeout=5) as c:
        await c.upsert_tenant("typed-paused", tier="free")
        assert await c.pause_tenant("typed-paused", reason="audit")
        assert await c.pause_model("typed/model", reason="canary", allow_unknown=True)
        paused = {(p.kind, p.name): p for p in await c.paused()}
        assert isinstance(paused[("tenant", "typed-paused")], Paused)
        assert paused[("tenant", "typed-paused")].reason == "audit"
        assert paused[("model", "typed/model")].queued == 0
        assert paused[("model", "typed/model")].since is not None
        assert not await c.resume_tenant("typed-paused")
        assert not await c.resume_model("typed/model")
        assert await c.paused() == []
