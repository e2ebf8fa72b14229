"""conveyor_scheduler.lifecycle on real PostgreSQL: retries with backoff, dead-lettering and redrive."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from conveyor_scheduler.store import models
from conveyor_testkit import scheduler as kit
from tests.integration.scheduler_env import Env


async def test_retry_backoff_dead_letter_and_redrive(
    make_env: Callable[..., Awaitable[Env]],
) -> None:
    env = await make_env(lead=True, retry_base_seconds=0.5, retry_max_seconds=0.5, retry_jitter=0.0)
    [(row, _)] = await env.core.submit("a", 1, [kit.item(max_attempts=2)])
    tid = row["id"]
    assert await env.dispatch() == 1
    await env.core.apply_results([kit.result(tid, 1, "failed", retryable=True)])
    t = await env.task(tid)
    assert t["status"] == models.QUEUED
    assert t["not_before"] is not None
    assert t["enqueued_at"] == row["enqueued_at"]  # keeps its place in line
    assert await env.dispatch() == 0  # backoff not over
    await asyncio.sleep(0.6)
    assert await env.dispatch() == 1
    await env.core.apply_results([kit.result(tid, 2, "failed", retryable=True)])
    t = await env.task(tid)
    assert t["status"] == models.DEAD_LETTERED
    dlq = await env.scalar(
        "SELECT count(*) FROM outbox WHERE topic = 'conveyor.tasks.v1.dead-letter' AND key = :k",
        k=str(tid),
    )
    assert dlq == 1
    await env.check()
    ids = await env.core.bulk(
        "redrive",
        task_ids=[str(tid)],
        tenant_id="",
        model="",
        statuses=[models.DEAD_LETTERED],
        created_before=None,
        limit=10,
    )
    assert ids == [tid]
    t = await env.task(tid)
    assert (t["status"], t["generation"], t["attempt"], t["attempt_base"]) == (
        models.QUEUED,
        1,
        2,
        2,
    )
    assert await env.dispatch() == 1
    await env.core.apply_results([kit.result(tid, 3, "succeeded")])
    t = await env.task(tid)
    assert t["status"] == models.SUCCEEDED
    events, _, _ = await env.core.task_events("a", str(tid), 0, 100)
    assert [e.type for e in events] == [1, 2, 7, 2, 10, 12, 2, 5]
    # A non-retryable failure fails at once.
    [(row2, _)] = await env.core.submit("a", 1, [kit.item()])
    assert await env.dispatch() == 1
    await env.core.apply_results([kit.result(row2["id"], 1, "failed", retryable=False)])
    assert (await env.task(row2["id"]))["status"] == models.FAILED
    await env.check()
