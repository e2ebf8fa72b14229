"""conveyor_gateway.coalesce: concurrent submits share SubmitTaskGroup calls and each gets its own
outcome; deadlines, turning it off, a stopped coalescer fails its callers.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from conveyor_client import ConveyorError
from conveyor_common.errors import QuotaViolation, ResourceExhausted
from tests.unit.gateway_env import (
    Env,
    env_fixture,  # noqa: F401 (the env fixture)
    start_env,
    stop_env,
    submit,
    submit_request,
)


async def test_concurrent_submits_share_group_calls_and_get_their_own_outcome(env: Env) -> None:
    """Coalescing: 60 concurrent submits travel in fewer SubmitTaskGroup calls, each caller gets
    its own task, and one refused item fails alone with its rich status."""
    assert env.gateway.submits is not None
    env.scheduler.delay = 0.02  # calls in flight while the others arrive
    env.scheduler.fail_request["refused"] = ResourceExhausted(
        [QuotaViolation("tenant:tenant-b/waiting", "too many waiting tasks")],
        retry_after_seconds=3,
    )
    ids = [f"c-{i}" for i in range(60)]
    results = await asyncio.gather(
        *(submit(env, "tenant-b" if i % 2 else "tenant-a", rid) for i, rid in enumerate(ids)),
        env.tasks.SubmitTask(submit_request("refused"), metadata=env.md("tenant-b"), timeout=5),
        return_exceptions=True,
    )
    *tasks, refused = results
    assert [t.request_id for t in tasks] == ids  # type: ignore[union-attr]
    assert [t.tenant_id for t in tasks] == [  # type: ignore[union-attr]
        "tenant-b" if i % 2 else "tenant-a" for i in range(60)
    ]
    assert len({t.task_id for t in tasks}) == 60  # type: ignore[union-attr]
    assert isinstance(refused, grpc.aio.AioRpcError)
    err = ConveyorError.from_rpc_error(refused)
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.quota_violations[0].field == "tenant:tenant-b/waiting"
    assert err.retry_after_seconds == pytest.approx(3)
    assert 2 <= env.gateway.submits.calls < 30
    sizes = env.registry.get_sample_value("conveyor_gateway_submit_group_size_sum")
    assert sizes == 61


async def test_a_submit_past_its_deadline_fails_alone(env: Env) -> None:
    env.scheduler.delay = 0.5
    slow = [asyncio.create_task(submit(env, request_id=f"patient-{i}")) for i in range(3)]
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await env.tasks.SubmitTask(submit_request("hasty"), metadata=env.md(), timeout=0.2)
    assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    done = await asyncio.gather(*slow)
    assert sorted(t.request_id for t in done) == ["patient-0", "patient-1", "patient-2"]


async def test_coalescing_can_be_turned_off() -> None:
    env = await start_env(submit_coalesce=False)
    try:
        assert env.gateway.submits is None
        task = await submit(env, "acme")
        assert task.tenant_id == "acme"
        assert [c[0] for c in env.scheduler.calls] == ["SubmitTask"]
    finally:
        await stop_env(env)


async def test_a_stopped_coalescer_fails_its_callers_instead_of_leaving_them_waiting() -> None:
    from conveyor.scheduler.v1 import scheduler_service_pb2 as sched_pb2
    from conveyor_gateway.coalesce import SubmitCoalescer

    class SlowScheduler:
        default_timeout = 5.0

        async def call(self, *args: Any, **kwargs: Any) -> Any:
            await asyncio.sleep(30)

    coalescer = SubmitCoalescer(SlowScheduler())  # type: ignore[arg-type]
    waiters = [
        asyncio.create_task(coalescer.submit(sched_pb2.SchedulerServiceSubmitTaskRequest(), None))
        for _ in range(3)
    ]
    await asyncio.sleep(0.05)
    assert coalescer.calls == 1  # all three in flight in one call
    for flusher in list(coalescer._flushers):
        flusher.cancel()
    results = await asyncio.wait_for(asyncio.gather(*waiters, return_exceptions=True), 2)
    assert all(isinstance(r, BaseException) for r in results)
