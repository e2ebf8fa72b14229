"""conveyor_scheduler.sweeps.expiry on real PostgreSQL: queue deadlines expire tasks and lost
dispatches are rescued.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

from conveyor_scheduler.store import models
from conveyor_testkit import scheduler as kit
from tests.integration.scheduler_env import Env


async def test_expiry_and_rescue(make_env: Callable[..., Awaitable[Env]]) -> None:
    from conveyor_scheduler.sweeps import expiry as transitions

    env = await make_env(lead=True, global_concurrency=1)
    now = datetime.now(UTC)
    [(keep, _)] = await env.core.submit("a", 1, [kit.item()])
    [(exp, _)] = await env.core.submit(
        "a", 1, [kit.item(queue_deadline=now + timedelta(milliseconds=200))]
    )
    assert await env.dispatch() == 1
    await asyncio.sleep(0.3)
    async with env.core.engine.begin() as conn:
        changes = await transitions.expire_due(conn, datetime.now(UTC))
    assert len(changes.events) == 1
    t = await env.task(exp["id"])
    assert t["status"] == models.EXPIRED
    # Rescue: the dispatched task never got BeginSubmit: its DispatchTask is re-emitted, same
    # attempt, and the slot stays held.
    async with env.core.engine.begin() as conn:
        rescued = await transitions.rescue_dispatches(
            conn, datetime.now(UTC) + timedelta(seconds=60), 30, "replicate", env.core.policy
        )
    assert len(rescued.outbox) == 1
    assert (
        await env.scalar(
            "SELECT count(*) FROM outbox WHERE ce_type = 'conveyor.events.v1.DispatchTask' AND key = :k",
            k=str(keep["id"]),
        )
        == 2
    )
    assert await env.scalar("SELECT count(*) FROM active_slots") == 1
    await env.check()
