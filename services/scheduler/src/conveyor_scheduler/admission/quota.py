"""Admission control: queue capacity, per-tenant caps, submit rate and fair share.

A tenant row is locked (sorted, after task rows) and its counters checked and bumped in one
statement; a refusal names the violated quota (RESOURCE_EXHAUSTED with QuotaFailure and RetryInfo).
Fair share: when the queue is nearly full, a tenant below its share of the room is never refused
because another tenant flooded it. A same-tenant race is decided again inside the transaction.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from conveyor_common.errors import (
    QuotaViolation,
    ResourceExhausted,
)
from conveyor_common.randomness import rng
from conveyor_scheduler.dispatch.policy import Policy
from conveyor_scheduler.settings import SchedulerSettings
from conveyor_scheduler.store import models as m
from conveyor_scheduler.store.bulk import raw_execute

_GROUP_ADMIT_UPDATE = """
    UPDATE tenants t SET
        waiting = t.waiting + u.n,
        tokens = LEAST(COALESCE(t.submit_burst, :burst),
                       t.tokens + GREATEST(0, EXTRACT(EPOCH FROM (:now - t.tokens_at)))
                                  * COALESCE(t.submit_rate, :rate)) - u.n,
        tokens_at = GREATEST(t.tokens_at, :now),
        claimed_tier = u.tier,
        updated_at = :now
    FROM unnest(CAST(:ts AS text[]), CAST(:ns AS int[]), CAST(:tiers AS int[])) AS u(tid, n, tier)
    WHERE t.tenant_id = u.tid {locked}
      AND t.waiting + u.n <= COALESCE(t.max_waiting, :max_waiting)
      AND LEAST(COALESCE(t.submit_burst, :burst),
                t.tokens + GREATEST(0, EXTRACT(EPOCH FROM (:now - t.tokens_at)))
                           * COALESCE(t.submit_rate, :rate)) >= u.n
    RETURNING t.tenant_id, t.tier
"""


_GROUP_LOCK_ADMIT_SQL = text(
    f"""
    WITH locked AS MATERIALIZED (
        SELECT tenant_id FROM tenants WHERE tenant_id = ANY(CAST(:ts AS text[]))
        ORDER BY tenant_id FOR UPDATE
    ), granted AS ({_GROUP_ADMIT_UPDATE.format(locked="AND t.tenant_id IN (SELECT tenant_id FROM locked)")})
    SELECT l.tenant_id, g.tenant_id IS NOT NULL AS granted, g.tier
    FROM locked l LEFT JOIN granted g ON g.tenant_id = l.tenant_id
    """
)
"""Lock the existing tenant rows of a group (sorted: concurrent groups cannot deadlock) and take
each one's whole share in the same statement: (tenant_id, granted, stored tier) per existing tenant."""


_GROUP_ADMIT_SQL = text(_GROUP_ADMIT_UPDATE.format(locked=""))
""":data:`_ADMIT_SQL` for several tenants (rows locked beforehand, in sorted order)."""


_ADMIT_SQL = text(
    """
    UPDATE tenants SET
        waiting = waiting + :n,
        tokens = LEAST(COALESCE(submit_burst, :burst),
                       tokens + GREATEST(0, EXTRACT(EPOCH FROM (:now - tokens_at)))
                                * COALESCE(submit_rate, :rate)) - :n,
        tokens_at = GREATEST(tokens_at, :now),
        claimed_tier = :tier,
        updated_at = :now
    WHERE tenant_id = :t
      AND waiting + :n <= COALESCE(max_waiting, :max_waiting)
      AND LEAST(COALESCE(submit_burst, :burst),
                tokens + GREATEST(0, EXTRACT(EPOCH FROM (:now - tokens_at)))
                         * COALESCE(submit_rate, :rate)) >= :n
    RETURNING tier
    """
)


async def _admit(
    conn: AsyncConnection,
    tenant_id: str,
    claimed_tier: int,
    n: int,
    settings: SchedulerSettings,
    now: datetime,
    policy: Policy,
    *,
    slow_path: Callable[[], Awaitable[None]] | None = None,
) -> int:
    """Take ``n`` waiting places and submit tokens of the tenant and the global queue.

    Returns the tier the tasks get (admin-set tier, else the token's claim). The two common
    statements run on the raw connection; ``slow_path`` is awaited before any other.
    """
    params = {
        "t": tenant_id,
        "n": n,
        "now": now,
        "tier": claimed_tier,
        "burst": settings.tenant_submit_burst,
        "rate": settings.tenant_submit_rate,
        "max_waiting": settings.tenant_max_waiting,
    }
    rows = await raw_execute(conn, _ADMIT_SQL, params)
    row: Any = rows[0] if rows else None
    if row is None and slow_path is not None:
        await slow_path()
    for _ in range(ADMISSION_RACE_RETRIES):
        if row is not None:
            break
        inserted = await conn.execute(
            pg_insert(m.Tenant)
            .values(
                tenant_id=tenant_id,
                claimed_tier=claimed_tier,
                tokens=float(settings.tenant_submit_burst),
                tokens_at=now,
            )
            .on_conflict_do_nothing()
            .returning(m.Tenant.tenant_id)
        )
        if inserted.first() is not None:
            row = (await conn.execute(_ADMIT_SQL, params)).first()
        if row is None and await _reject_tenant(conn, tenant_id, n, settings, now):
            # No quota is exceeded: another submit of the tenant changed its row in between
            # (e.g. created it concurrently). Decide again here; the caller never sees the race.
            row = (await conn.execute(_ADMIT_SQL, params)).first()
    if row is None:
        raise ResourceExhausted(
            [QuotaViolation(f"tenant:{tenant_id}", "admission contended; retry")],
            retry_after_seconds=0.1,
        )
    taken = await raw_execute(
        conn,
        _GLOBAL_ADMIT_SQL,
        {"n": n, "s": rng.randrange(m.QUEUE_SHARDS), "cap": settings.queue_capacity},
    )
    if not taken:
        if slow_path is not None:
            await slow_path()
        # The tenant's own places were taken above (its waiting count includes them): a tenant
        # still within its weighted share is admitted past the capacity others filled.
        if (await fair_share_room(conn, [tenant_id], policy, settings))[tenant_id] >= 0:
            await conn.execute(
                text("UPDATE queue_counters SET waiting = waiting + :n WHERE shard = :s"),
                {"n": n, "s": rng.randrange(m.QUEUE_SHARDS)},
            )
            return int(row[0]) if row[0] is not None else claimed_tier
        total = await conn.scalar(text("SELECT COALESCE(sum(waiting), 0) FROM queue_counters"))
        raise ResourceExhausted(
            [
                QuotaViolation(
                    "queue", f"the queue holds {total} of {settings.queue_capacity} waiting tasks"
                )
            ],
            retry_after_seconds=5.0,
        )
    return int(row[0]) if row[0] is not None else claimed_tier


_FAIR_SHARE_SQL = text(
    "SELECT tenant_id, waiting, COALESCE(tier, claimed_tier, 1) AS tier, weight FROM tenants"
    " WHERE waiting > 0 OR tenant_id = ANY(CAST(:ts AS text[]))"
)


async def fair_share_room(
    conn: AsyncConnection,
    tenants: Sequence[str],
    policy: Policy,
    settings: SchedulerSettings,
) -> dict[str, int]:
    """Waiting places each of ``tenants`` may still take within its weighted share of the queue
    capacity: ``floor(capacity * weight / sum of the weights of the tenants with waiting tasks and
    the asking ones) - waiting`` (negative: over its share).

    Admission keeps room for every tenant this way: when the queue is full, a tenant below its
    share is still admitted (the global count may then exceed the capacity, by at most the sum of
    the shares), while a tenant above its share is refused until the others' shares are free.
    """
    rows = (await conn.execute(_FAIR_SHARE_SQL, {"ts": list(tenants)})).all()
    weights = {r.tenant_id: policy.tenant_weight(int(r.tier), r.weight) for r in rows}
    waiting = {r.tenant_id: int(r.waiting) for r in rows}
    for t in tenants:
        weights.setdefault(t, policy.tenant_weight(1, None))
    total = sum(weights.values())
    return {t: settings.queue_capacity * weights[t] // total - waiting.get(t, 0) for t in tenants}


_GLOBAL_ADMIT_SQL = text(
    "UPDATE queue_counters SET waiting = waiting + :n WHERE shard = :s"
    " AND (SELECT COALESCE(sum(waiting), 0) FROM queue_counters) + :n <= :cap RETURNING shard"
)
"""Check the global capacity and take the places in one round trip (the sum is read without
locking the other shards: concurrent submits may overshoot by the number in flight)."""


ADMISSION_RACE_RETRIES = 3
"""Times a submit re-runs its tenant admission when it lost a race but no quota is exceeded."""


async def _reject_tenant(
    conn: AsyncConnection, tenant_id: str, n: int, settings: SchedulerSettings, now: datetime
) -> bool:
    """Explain why the tenant's conditional update matched nothing: raises ResourceExhausted
    naming the exceeded quotas; returns True when none is exceeded (it raced with a change)."""
    row = (
        await conn.execute(
            text(
                "SELECT waiting, COALESCE(max_waiting, :mw) AS cap,"
                " LEAST(COALESCE(submit_burst, :burst), tokens"
                "  + GREATEST(0, EXTRACT(EPOCH FROM (:now - tokens_at))) * COALESCE(submit_rate, :rate))"
                "  AS tokens, COALESCE(submit_rate, :rate) AS rate,"
                " COALESCE(submit_burst, :burst) AS burst"
                " FROM tenants WHERE tenant_id = :t"
            ),
            {
                "t": tenant_id,
                "mw": settings.tenant_max_waiting,
                "burst": settings.tenant_submit_burst,
                "rate": settings.tenant_submit_rate,
                "now": now,
            },
        )
    ).first()
    violations: list[QuotaViolation] = []
    retry = 1.0
    if row is None:  # pragma: no cover - the row was just inserted
        raise ResourceExhausted([QuotaViolation(f"tenant:{tenant_id}", "unknown")], 1.0)
    if row.waiting + n > row.cap:
        violations.append(
            QuotaViolation(
                f"tenant:{tenant_id}/waiting",
                f"{row.waiting} tasks waiting, limit {row.cap} (asked for {n} more)",
            )
        )
        retry = 5.0
    if row.tokens < n:
        if n > row.burst:
            violations.append(
                QuotaViolation(
                    f"tenant:{tenant_id}/submit_rate",
                    f"a batch of {n} exceeds the submit burst {row.burst}",
                )
            )
        else:
            violations.append(
                QuotaViolation(
                    f"tenant:{tenant_id}/submit_rate",
                    f"submit rate {row.rate:g}/s exceeded",
                )
            )
            retry = max(retry if violations[:-1] else 0.0, (n - row.tokens) / row.rate)
    if not violations:  # raced with a change in between: the caller decides again
        return True
    raise ResourceExhausted(violations, retry_after_seconds=retry)
