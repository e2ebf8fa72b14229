"""conveyor_gateway.watch: history then live, gaps filled, a broken live stream survived, polling without
a notifier, resume after a sequence, tenant scoping, WatchTasks live and its UNAVAILABLE answer.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from prometheus_client import CollectorRegistry

from conveyor.tasks.v1 import task_service_pb2 as svc_pb2
from conveyor.tasks.v1 import task_service_pb2_grpc as svc_grpc
from conveyor_client import AsyncConveyorClient, ConveyorError
from conveyor_gateway.app import build_gateway
from conveyor_testkit.gateway import (
    FakeNotifier,
    FakeScheduler,
    scheduler_binding,
    serve,
)
from conveyor_testkit.tokens import Keys
from tests.unit.gateway_env import (
    FAST_WATCH,
    E,
    Env,
    collect,
    drive,
    env_fixture,  # noqa: F401 (the env fixture)
    sequences,
    settings,
    stop_env,
    submit,
)


async def test_watch_history_then_live(env: Env) -> None:
    task = await submit(env)
    events, _ = await asyncio.gather(collect(env, task.task_id), drive(env, task.task_id))
    assert sequences(events) == [1, 2, 3, 4, 5]
    assert events[-1].type == E.TASK_EVENT_TYPE_SUCCEEDED
    assert env.notifier.subscribe_count == 1


async def test_watch_fills_gaps_of_the_live_stream(env: Env) -> None:
    task = await submit(env)
    env.notifier.drop_sequences = {3}
    events, _ = await asyncio.gather(collect(env, task.task_id), drive(env, task.task_id))
    assert sequences(events) == [1, 2, 3, 4, 5]


async def test_watch_survives_a_broken_live_stream(env: Env) -> None:
    task = await submit(env)
    env.notifier.break_after = 1
    events, _ = await asyncio.gather(collect(env, task.task_id), drive(env, task.task_id))
    assert sequences(events) == [1, 2, 3, 4, 5]


async def test_watch_polls_without_a_notifier() -> None:
    notifier = FakeNotifier()
    scheduler = FakeScheduler(notifier)
    fakes = await serve(scheduler_binding(scheduler))  # no notifier served: Subscribe fails
    gateway = build_gateway(
        settings(fakes.port, fakes.port), CollectorRegistry(), watch_config=FAST_WATCH
    )
    await gateway.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}")
    env = Env(
        Keys.generate(),
        scheduler,
        notifier,
        fakes,
        gateway,
        channel,
        svc_grpc.TaskServiceStub(channel),
        CollectorRegistry(),
    )
    try:
        task = await submit(env)
        events, _ = await asyncio.gather(collect(env, task.task_id), drive(env, task.task_id))
        assert sequences(events) == [1, 2, 3, 4, 5]
    finally:
        await stop_env(env)


async def test_watch_resumes_after_a_sequence_and_ends_at_terminal(env: Env) -> None:
    task = await submit(env)
    await drive(env, task.task_id, delay=0)
    assert sequences(await collect(env, task.task_id, after=3)) == [4, 5]
    assert await collect(env, task.task_id, after=5) == []


async def test_watch_of_another_tenants_task_is_not_found(env: Env) -> None:
    task = await submit(env)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await collect(env, task.task_id, tenant="intruder")
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND


async def test_watch_tasks_is_live_and_tenant_scoped(env: Env) -> None:
    call = env.tasks.WatchTasks(svc_pb2.WatchTasksRequest(), metadata=env.md(), timeout=5)
    for _ in range(100):
        if env.notifier.subscribers:
            break
        await asyncio.sleep(0.02)
    mine = await submit(env, request_id="w1")
    await submit(env, "someone-else", request_id="w2")
    first = await call.read()
    assert isinstance(first, svc_pb2.WatchTasksResponse)
    assert first.event.task_id == mine.task_id
    call.cancel()


async def test_watch_tasks_without_a_reachable_notifier_is_unavailable_with_retry_info() -> None:
    scheduler = FakeScheduler()
    fakes = await serve(scheduler_binding(scheduler))  # no WatchFanoutService here
    gateway = build_gateway(settings(fakes.port, fakes.port), CollectorRegistry())
    await gateway.start()
    try:
        async with AsyncConveyorClient(f"127.0.0.1:{gateway.port}", Keys.generate().token()) as c:
            with pytest.raises(ConveyorError) as exc:
                async for _ in c.watch_all():
                    pass
        assert exc.value.code == grpc.StatusCode.UNAVAILABLE
        assert exc.value.retry_after_seconds == 1.0
    finally:
        await gateway.stop(0)
        await fakes.stop(0)
