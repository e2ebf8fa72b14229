"""The SDK client against the gateway (in-memory scheduler): wait follows the watch, retries of
UNAVAILABLE with the same request id, giving up, a watch resumed across a gateway restart.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from prometheus_client import CollectorRegistry

from conveyor_client import AsyncConveyorClient, ConveyorError
from conveyor_gateway.app import Gateway, build_gateway
from tests.unit.gateway_env import (
    FAST_WATCH,
    E,
    Env,
    drive,
    env_fixture,  # noqa: F401 (the env fixture)
    settings,
    start_env,
    stop_env,
)


async def test_sdk_wait_follows_the_watch_to_the_end(env: Env) -> None:
    token = env.keys.token()
    async with AsyncConveyorClient(f"127.0.0.1:{env.gateway.port}", token) as client:
        resp = await client.submit("image", model="acme/sdxl", input={"prompt": "p"})
        driver = asyncio.create_task(drive(env, resp.task.task_id))
        final = await client.wait(resp.task.task_id)
        await driver
        assert final.status == E.TASK_STATUS_SUCCEEDED


async def test_sdk_retries_unavailable_with_the_same_request_id() -> None:
    env = await start_env(scheduler_retry_attempts=1)  # the gateway passes UNAVAILABLE through
    try:
        env.scheduler.fail_unavailable = 2
        async with AsyncConveyorClient(
            f"127.0.0.1:{env.gateway.port}", env.keys.token(), backoff_base=0.01
        ) as client:
            resp = await client.submit("image", model="acme/sdxl", input={"prompt": "p"})
        calls = [c for c in env.scheduler.calls if c[0] == "SubmitTask"]
        assert len(calls) == 3
        assert {c[1].request.request_id for c in calls} == {resp.task.request_id}
        assert len(env.scheduler.tasks) == 1
    finally:
        await stop_env(env)


async def test_sdk_gives_up_after_its_retries() -> None:
    env = await start_env(scheduler_retry_attempts=1)
    try:
        env.scheduler.fail_unavailable = 100
        async with AsyncConveyorClient(
            f"127.0.0.1:{env.gateway.port}", env.keys.token(), retries=2, backoff_base=0.01
        ) as client:
            with pytest.raises(ConveyorError) as exc:
                await client.stats()
        assert exc.value.code == grpc.StatusCode.UNAVAILABLE
        assert exc.value.retry_after_seconds is not None
        assert len(env.scheduler.calls) == 3
    finally:
        await stop_env(env)


async def test_sdk_watch_resumes_across_a_gateway_restart() -> None:
    env = await start_env()
    port = env.gateway.port
    replacement: Gateway | None = None
    try:
        async with AsyncConveyorClient(
            f"127.0.0.1:{port}", env.keys.token(), backoff_base=0.05
        ) as client:
            task = (await client.submit("image", model="acme/sdxl", input={"p": 1})).task
            seen: list[int] = []

            async def follow() -> None:
                async for event in client.watch(task.task_id):
                    seen.append(event.sequence)  # noqa: PERF401 (read while it grows)

            follower = asyncio.create_task(follow())
            env.scheduler.append_event(task.task_id, E.TASK_EVENT_TYPE_DISPATCHED)
            for _ in range(100):
                if len(seen) >= 2:
                    break
                await asyncio.sleep(0.02)
            assert seen == [1, 2]
            await env.gateway.stop(0)  # the stream breaks mid-watch
            env.scheduler.append_event(task.task_id, E.TASK_EVENT_TYPE_STARTED)
            replacement = build_gateway(
                settings(env.fakes.port, env.fakes.port, grpc_port=port),
                CollectorRegistry(),
                watch_config=FAST_WATCH,
            )
            await replacement.start()
            env.scheduler.append_event(
                task.task_id, E.TASK_EVENT_TYPE_SUCCEEDED, status=E.TASK_STATUS_SUCCEEDED
            )
            await asyncio.wait_for(follower, 15)
        assert seen == [1, 2, 3, 4]  # no gap, no duplicate across the reconnect
    finally:
        if replacement is not None:
            await replacement.stop(0)
        await env.channel.close()
        await env.fakes.stop(0.5)
