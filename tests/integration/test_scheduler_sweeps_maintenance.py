"""conveyor_scheduler.sweeps.maintenance on real PostgreSQL: counter reconcile, gauges, retention,
queue stats and ETAs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from sqlalchemy import text

from conveyor.tasks.v1 import task_pb2
from conveyor_testkit import scheduler as kit
from tests.integration.scheduler_env import Env


async def test_reconcile_gauges_retention_stats_and_eta(
    make_env: Callable[..., Awaitable[Env]],
) -> None:
    from prometheus_client import CollectorRegistry

    from conveyor_scheduler.metrics import SchedulerMetrics
    from conveyor_scheduler.sweeps import maintenance

    env = await make_env(lead=True, global_concurrency=1, outbox_retention_seconds=0)
    await env.core.submit("a", 1, [kit.item() for _ in range(4)])
    assert await env.dispatch() == 1
    # A recent success gives the ETA basis.
    [done] = await env.rows("SELECT id, attempt FROM tasks WHERE status = 2")
    await env.core.apply_results([kit.result(done.id, done.attempt, "started")])
    await asyncio.sleep(0.05)
    await env.core.apply_results([kit.result(done.id, done.attempt, "succeeded")])
    assert await env.dispatch() == 1
    queued = await env.rows(
        "SELECT id FROM tasks WHERE status = 1 ORDER BY rank DESC, enqueued_at, id"
    )
    last = await env.core.get_task("a", str(queued[-1].id))
    assert last.queue_position == 2
    assert last.HasField("estimated_start_at")
    first = await env.core.get_task("a", str(queued[0].id))
    assert first.estimated_start_at.ToDatetime() <= last.estimated_start_at.ToDatetime()

    stats = await env.core.queue_stats(0, "", None)
    total = next(s for s in stats if s["model"] == "" and s["kind"] == task_pb2.TASK_KIND_IMAGE)
    assert (total["waiting"], total["active"], total["succeeded"]) == (2, 1, 1)
    assert total["oldest_waiting_age"] > 0
    assert total["recent_run_time_p50"] > 0

    # Counters drift (a bug, a manual edit): the reconcile repairs them.
    async with env.core.engine.begin() as conn:
        await conn.execute(text("UPDATE tenants SET waiting = waiting + 5 WHERE tenant_id = 'a'"))
        await conn.execute(text("UPDATE queue_counters SET waiting = waiting + 7 WHERE shard = 3"))
    assert await maintenance.reconcile_counters(env.core.engine) == 2
    await env.check()
    assert await maintenance.reconcile_counters(env.core.engine) == 0

    registry = CollectorRegistry()
    metrics = SchedulerMetrics(registry)
    await maintenance.refresh_gauges(env.core.engine, env.core.policy, metrics)
    assert (
        registry.get_sample_value(
            "conveyor_scheduler_queue_depth", {"kind": "image", "priority": "normal"}
        )
        == 2
    )
    assert registry.get_sample_value("conveyor_scheduler_active_slots", {"scope": "global"}) == 1
    async with env.core.engine.begin() as conn:
        await conn.execute(text("UPDATE outbox SET published_at = now() - interval '1 minute'"))
    await maintenance.retention(env.core.engine, env.core.settings)
    assert await env.scalar("SELECT count(*) FROM outbox") == 0
