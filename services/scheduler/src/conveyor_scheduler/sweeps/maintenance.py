"""The leader's slow sweeps: gauges, retention, and the waiting-counter reconcile."""

from __future__ import annotations

import logging
import time
from datetime import timedelta

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor_common.vocabulary import KIND_NAME, PRIORITY_NAME
from conveyor_scheduler.clock import utcnow
from conveyor_scheduler.dispatch.policy import Policy
from conveyor_scheduler.metrics import SchedulerMetrics
from conveyor_scheduler.settings import SchedulerSettings

logger = logging.getLogger(__name__)


_last_reconcile = 0.0


async def refresh_gauges(
    engine: AsyncEngine, policy: Policy, metrics: SchedulerMetrics | None
) -> None:
    """Queue depth by kind/priority and active slots against limits."""
    if metrics is None:
        return
    async with engine.connect() as conn:
        depth = await conn.execute(
            text("SELECT kind, priority, count(*) FROM tasks WHERE status = 1 GROUP BY 1, 2")
        )
        seen = set()
        for kind, priority, n in depth:
            labels = (KIND_NAME.get(kind, str(kind)), PRIORITY_NAME.get(priority, str(priority)))
            seen.add(labels)
            metrics.queue_depth.labels(*labels).set(n)
        for kind_name in KIND_NAME.values():
            for prio_name in PRIORITY_NAME.values():
                if (kind_name, prio_name) not in seen:
                    metrics.queue_depth.labels(kind_name, prio_name).set(0)
        usage = await conn.execute(
            text(
                "SELECT model, kind, sum(cost)::int FROM active_slots"
                " GROUP BY GROUPING SETS ((model), (kind), ())"
            )
        )
        for model, kind, used in usage:
            if model is not None:
                metrics.active_slots.labels(f"model:{model}").set(used)
                if policy.model_limit(model):
                    metrics.slot_limit.labels(f"model:{model}").set(policy.model_limit(model))
            elif kind is not None:
                metrics.active_slots.labels(f"kind:{KIND_NAME.get(kind, kind)}").set(used)
            else:
                metrics.active_slots.labels("global").set(used or 0)
        metrics.slot_limit.labels("global").set(policy.global_concurrency)
        for kind, limit in policy.kind_limits.items():
            metrics.slot_limit.labels(f"kind:{KIND_NAME.get(kind, kind)}").set(limit)


async def retention(engine: AsyncEngine, settings: SchedulerSettings) -> None:
    """Delete published outbox rows, old inbox ids and expired idempotency keys (bounded batches)."""
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE published_at < :cut"
                " LIMIT 10000)"
            ),
            {"cut": _ago(settings.outbox_retention_seconds)},
        )
        await conn.execute(
            text(
                "DELETE FROM inbox WHERE (consumer, event_id) IN (SELECT consumer, event_id"
                " FROM inbox WHERE received_at < :cut LIMIT 10000)"
            ),
            {"cut": _ago(settings.inbox_retention_seconds)},
        )
        await conn.execute(
            text(
                "DELETE FROM idempotency_keys WHERE (tenant_id, request_id) IN (SELECT tenant_id,"
                " request_id FROM idempotency_keys WHERE expires_at < now() LIMIT 10000)"
            )
        )


def _ago(seconds: float) -> object:
    return utcnow() - timedelta(seconds=seconds)


async def maybe_reconcile(engine: AsyncEngine, settings: SchedulerSettings) -> None:
    """Run :func:`reconcile_counters` every ``reconcile_seconds``."""
    global _last_reconcile
    if time.monotonic() - _last_reconcile < settings.reconcile_seconds:
        return
    _last_reconcile = time.monotonic()
    await reconcile_counters(engine)


async def reconcile_counters(engine: AsyncEngine) -> int:
    """Repair waiting counters that drifted from the tasks table; returns how many were fixed.

    A cheap comparison finds suspects first; each suspect tenant is then fixed under its row lock
    (``FOR UPDATE`` waits for in-flight submits/dispatches of that tenant, and the following count
    runs on a fresh READ COMMITTED snapshot that includes them). The global shards are then set so
    that their sum equals the sum of the tenants' counters.
    """
    fixed = 0
    async with engine.connect() as conn:
        suspects = await conn.execute(
            text(
                "SELECT t.tenant_id FROM tenants t LEFT JOIN (SELECT tenant_id, count(*) AS n"
                " FROM tasks WHERE status = 1 GROUP BY tenant_id) q USING (tenant_id)"
                " WHERE t.waiting <> COALESCE(q.n, 0)"
            )
        )
        tenant_ids = [r[0] for r in suspects]
    for tenant_id in tenant_ids:
        async with engine.begin() as conn:
            await conn.execute(
                text("SELECT 1 FROM tenants WHERE tenant_id = :t FOR UPDATE"), {"t": tenant_id}
            )
            n = await conn.scalar(
                text("SELECT count(*) FROM tasks WHERE status = 1 AND tenant_id = :t"),
                {"t": tenant_id},
            )
            result = await conn.execute(
                text("UPDATE tenants SET waiting = :n WHERE tenant_id = :t AND waiting <> :n"),
                {"t": tenant_id, "n": n},
            )
            if result.rowcount:
                fixed += 1
                logger.warning(
                    "waiting counter repaired",
                    extra={"action": "counter_repaired", "tenant_id": tenant_id, "waiting": n},
                )
    async with engine.begin() as conn:
        # Lock every shard, then tenants are read: submits lock tenant then shard, so take the
        # shards in a fixed order and keep this short.
        await conn.execute(text("SELECT 1 FROM queue_counters ORDER BY shard FOR UPDATE"))
        total = await conn.scalar(text("SELECT COALESCE(sum(waiting), 0) FROM tenants"))
        shards = await conn.scalar(text("SELECT COALESCE(sum(waiting), 0) FROM queue_counters"))
        if total != shards:
            await conn.execute(
                text("UPDATE queue_counters SET waiting = CASE WHEN shard = 0 THEN :t ELSE 0 END"),
                {"t": total},
            )
            fixed += 1
            logger.warning(
                "global waiting counter repaired",
                extra={"action": "counter_repaired", "waiting": total, "was": shards},
            )
    return fixed
