"""conveyor_scheduler.admission (submit, quota) on real PostgreSQL: idempotent submits, admission
refusals that write nothing, the submit rate and a new tenant's burst.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from conveyor.tasks.v1 import task_pb2
from conveyor_common.errors import FailedPrecondition, ResourceExhausted
from conveyor_testkit import scheduler as kit
from tests.integration.scheduler_env import Env


async def test_idempotent_submit(make_env: Callable[..., Awaitable[Env]]) -> None:
    env = await make_env()
    it = kit.item("same")
    [(first, d1)] = await env.core.submit("t1", 1, [it])
    [(again, d2)] = await env.core.submit("t1", 1, [it])
    assert (d1, d2) == (False, True)
    assert again["id"] == first["id"]
    with pytest.raises(FailedPrecondition):
        await env.core.submit("t1", 1, [kit.item("same", prompt="a dog")])
    # The same request id of another tenant is another task.
    [(other, d3)] = await env.core.submit("t2", 1, [it])
    assert not d3
    assert other["id"] != first["id"]

    # Concurrent identical submits (separate transactions, same key): exactly one task.
    race = kit.item("race")
    results = await asyncio.gather(*(env.core.submit("t1", 1, [race]) for _ in range(8)))
    ids = {r[0][0]["id"] for r in results}
    assert len(ids) == 1
    assert sum(1 for r in results if not r[0][1]) == 1
    assert await env.scalar("SELECT count(*) FROM tasks WHERE request_id = 'race'") == 1
    await env.check()


async def test_admission_rejections_write_nothing(make_env: Callable[..., Awaitable[Env]]) -> None:
    env = await make_env(
        queue_capacity=5, tenant_max_waiting=3, tenant_submit_burst=4, tenant_submit_rate=0.001
    )
    first = kit.item("a-first")
    await env.core.submit("a", 1, [first])
    for _ in range(2):
        await env.core.submit("a", 1, [kit.item()])
    before = await env.rows(
        "SELECT (SELECT count(*) FROM tasks), (SELECT count(*) FROM outbox),"
        " (SELECT count(*) FROM task_events), (SELECT count(*) FROM idempotency_keys),"
        " (SELECT sum(waiting) FROM queue_counters), (SELECT waiting FROM tenants WHERE tenant_id='a')"
    )
    with pytest.raises(ResourceExhausted) as cap:
        await env.core.submit("a", 1, [kit.item("over-cap")])
    assert "waiting" in cap.value.violations[0].subject
    assert cap.value.retry_after_seconds > 0
    await env.core.submit("b", 1, [kit.item(), kit.item()])
    # The queue is full (5 of 5): c's weighted share is 5 // 3 = 1, so a batch of two is refused
    # (a single task would be admitted: a tenant below its share keeps room).
    with pytest.raises(ResourceExhausted) as full:
        await env.core.submit("c", 1, [kit.item("over-global"), kit.item("over-global-2")])
    assert full.value.violations[0].subject == "queue"
    after = await env.rows(
        "SELECT (SELECT count(*) FROM tasks), (SELECT count(*) FROM outbox),"
        " (SELECT count(*) FROM task_events), (SELECT count(*) FROM idempotency_keys),"
        " (SELECT sum(waiting) FROM queue_counters), (SELECT waiting FROM tenants WHERE tenant_id='a')"
    )
    assert after[0][0] == before[0][0] + 2  # only b's two tasks
    assert after[0][5] == before[0][5] == 3
    assert (
        await env.scalar("SELECT count(*) FROM idempotency_keys WHERE request_id LIKE 'over-%'")
        == 0
    )
    # A duplicate of an admitted task is answered even when the queue is full.
    [(dup_row, dup)] = await env.core.submit("a", 1, [first])
    assert dup
    assert dup_row["request_id"] == "a-first"
    await env.check()


async def test_submit_rate_limit(make_env: Callable[..., Awaitable[Env]]) -> None:
    env = await make_env(tenant_submit_burst=3, tenant_submit_rate=0.01)
    await env.core.submit("r", 1, [kit.item() for _ in range(3)])
    with pytest.raises(ResourceExhausted) as exc:
        await env.core.submit("r", 1, [kit.item("too-fast")])
    assert exc.value.violations[0].subject.endswith("submit_rate")
    assert exc.value.retry_after_seconds > 10
    assert await env.scalar("SELECT count(*) FROM tasks WHERE tenant_id = 'r'") == 3


async def test_a_tenant_created_by_an_admin_starts_with_a_full_submit_bucket(
    make_env: Callable[..., Awaitable[Env]],
) -> None:
    env = await make_env(tenant_submit_burst=5, tenant_submit_rate=0.01)
    await env.core.upsert_tenant("fresh", 0, task_pb2.TenantLimits())
    await env.core.submit("fresh", 1, [kit.item() for _ in range(5)])
    with pytest.raises(ResourceExhausted):  # the burst still caps it
        await env.core.submit("fresh", 1, [kit.item("sixth")])
    assert await env.scalar("SELECT count(*) FROM tasks WHERE tenant_id = 'fresh'") == 5
