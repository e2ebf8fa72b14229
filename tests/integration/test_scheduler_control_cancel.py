"""conveyor_scheduler.control.cancel on real PostgreSQL: every cancel path (queued, dispatched before
and after BeginSubmit, running, terminal).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from conveyor_scheduler.store import models
from conveyor_testkit import scheduler as kit
from tests.integration.scheduler_env import Env


async def test_cancel_paths(make_env: Callable[..., Awaitable[Env]]) -> None:
    env = await make_env(
        lead=True, global_concurrency=10, tier_concurrency={"free": 10, "premium": 10, "pro": 10}
    )
    rows = [r for r, _ in await env.core.submit("a", 1, [kit.item() for _ in range(3)])]
    assert await env.dispatch() == 3
    before_begin, submitting, running = (r["id"] for r in rows)
    # Dispatched, no BeginSubmit yet: canceled at once, slot freed, BeginSubmit then says STOP.
    c = await env.core.cancel("a", str(before_begin), "x")
    assert c["status"] == models.CANCELED
    assert (await env.core.begin_submit(str(before_begin), 1))[0] == 2  # STOP
    # Submitting: cancel requested + CancelTask; slot kept until the provider reports.
    assert (await env.core.begin_submit(str(submitting), 1))[0] == 1  # PROCEED
    c = await env.core.cancel("a", str(submitting), "y")
    assert c["status"] == models.DISPATCHED
    assert c["cancel_requested"]
    assert (
        await env.scalar(
            "SELECT count(*) FROM outbox WHERE ce_type = 'conveyor.events.v1.CancelTask' AND key = :k",
            k=str(submitting),
        )
        == 1
    )
    assert (
        await env.scalar("SELECT count(*) FROM active_slots WHERE task_id = :t", t=submitting) == 1
    )
    await env.core.apply_results([kit.result(submitting, 1, "canceled")])
    assert (await env.task(submitting))["status"] == models.CANCELED
    # Running, and a success races the cancel: the provider's answer wins.
    await env.core.apply_results([kit.result(running, 1, "started")])
    await env.core.cancel("a", str(running), "z")
    await env.core.apply_results([kit.result(running, 1, "succeeded")])
    assert (await env.task(running))["status"] == models.SUCCEEDED
    await env.check()
    # Concurrent cancels of one queued task: exactly one CANCELED event.
    [(q, _)] = await env.core.submit("a", 1, [kit.item()])
    await asyncio.gather(*(env.core.cancel("a", str(q["id"]), "") for _ in range(5)))
    assert (
        await env.scalar(
            "SELECT count(*) FROM task_events WHERE task_id = :t AND type = 9", t=q["id"]
        )
        == 1
    )
    await env.check()
