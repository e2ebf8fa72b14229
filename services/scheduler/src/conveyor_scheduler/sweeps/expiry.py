"""Fast sweeps: queue deadlines that passed (EXPIRED) and dispatches no adapter picked up in time
(re-published, same attempt, so the adapter's submit protocol keeps it to one prediction).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from conveyor_common.vocabulary import EV_EXPIRED
from conveyor_scheduler.dispatch.command import dispatch_command
from conveyor_scheduler.dispatch.policy import Policy
from conveyor_scheduler.lifecycle import finish
from conveyor_scheduler.store import models as m
from conveyor_scheduler.store.changes import Changes
from conveyor_scheduler.store.convert import TrackedRow


async def expire_due(conn: AsyncConnection, now: datetime, limit: int = 500) -> Changes:
    """Queued tasks past their queue deadline -> expired."""
    rows = await conn.execute(
        text(
            "SELECT * FROM tasks WHERE status = 1 AND queue_deadline <= :now"
            " ORDER BY id LIMIT :limit FOR UPDATE SKIP LOCKED"
        ),
        {"now": now, "limit": limit},
    )
    changes = Changes(now=now)
    for r in rows.mappings():
        row = TrackedRow(r)
        finish(row, m.EXPIRED, now)
        row.update(
            error_code="queue_deadline_exceeded",
            error_message="the queue-wait deadline passed before a slot was free",
            error_retryable=False,
        )
        changes.waiting[row["tenant_id"]] -= 1
        changes.event(row, EV_EXPIRED, m.QUEUED)
    await changes.flush(conn)
    return changes


async def rescue_dispatches(
    conn: AsyncConnection,
    now: datetime,
    lease_seconds: float,
    provider: str,
    policy: Policy,
    limit: int = 500,
) -> Changes:
    """Re-emit DispatchTask for dispatches no adapter confirmed (no BeginSubmit) within the lease.

    Same attempt: the adapter dedups through BeginSubmit. The slot stays held.
    """
    rows = await conn.execute(
        text(
            "SELECT * FROM tasks WHERE status = 2 AND submit_state = 1"
            " AND dispatch_emitted_at <= :cutoff ORDER BY id LIMIT :limit FOR UPDATE SKIP LOCKED"
        ),
        {"cutoff": now - timedelta(seconds=lease_seconds), "limit": limit},
    )
    changes = Changes(now=now)
    for r in rows.mappings():
        row = TrackedRow(r)
        row["dispatch_emitted_at"] = now
        changes.touch(row)
        changes.command(row, dispatch_command(row, provider, policy, now))
    await changes.flush(conn)
    return changes
