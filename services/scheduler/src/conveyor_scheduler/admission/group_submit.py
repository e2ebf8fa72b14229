"""One pipelined transaction for a group of submits (a gateway's coalesced SubmitTaskGroup or a batch).

A common group takes three statements: the idempotency keys with the queue total, then the tenant
locks with admission, then tasks, events, outbox rows and the counter in one ``unnest`` INSERT, where
a value shared by every row is sent once. Each item is decided alone and answered with the exact
status a lone SubmitTask would get.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from conveyor_common.errors import (
    FailedPrecondition,
    QuotaViolation,
    ResourceExhausted,
)
from conveyor_common.ids import uuid7
from conveyor_common.vocabulary import EV_SUBMITTED
from conveyor_scheduler.admission.quota import (
    _ADMIT_SQL,
    _GROUP_ADMIT_SQL,
    _GROUP_LOCK_ADMIT_SQL,
    _reject_tenant,
    fair_share_room,
)
from conveyor_scheduler.admission.submit import SubmitRequest, new_task_row
from conveyor_scheduler.dispatch.policy import Policy
from conveyor_scheduler.settings import SchedulerSettings
from conveyor_scheduler.store import models as m
from conveyor_scheduler.store.bulk import insert_new_tasks, raw_execute
from conveyor_scheduler.store.changes import Changes
from conveyor_scheduler.store.convert import (
    SNAPSHOT,
    TaskRow,
)
from conveyor_scheduler.store.reads import SubmitOutcome


async def submit_group(
    conn: AsyncConnection,
    requests: Sequence[SubmitRequest],
    *,
    policy: Policy,
    settings: SchedulerSettings,
    now: datetime,
    leave_pipeline: Callable[[], Awaitable[None]] | None = None,
) -> list[SubmitOutcome]:
    """Single-item submits of many callers in ONE transaction (group commit); an outcome each.

    Each request gets what :func:`submit` of it alone, in list order, would give: a duplicate key
    (same fingerprint) answers the existing task and takes no quota; another fingerprint is
    FAILED_PRECONDITION; admission (the tenant's waiting cap and submit tokens, the global
    capacity) is decided per request, so a rejected request writes nothing (its fresh key is
    deleted again) and never fails the others. The statements are per group, not per request:
    keys in one INSERT, duplicates in two reads, tenant rows locked in sorted order, admission in one
    conditional UPDATE per group (a tenant whose whole share does not fit falls back to one
    request at a time, in order), tasks, events and outbox in one go, then one queue-counter shard
    last (the lock order of every writer: tenant rows sorted, then one shard). The global capacity
    is read once without locking, like :func:`_admit` (overshoot bounded by submits in flight).

    ``(tenant_id, request_id)`` must be distinct within ``requests`` (the caller defers repeats to
    the next group). Request ``i`` is enqueued at ``now + i`` microseconds (FIFO kept).

    The common path runs three statements through :func:`raw_execute`, so the caller may hold the
    connection in psycopg's pipeline mode; ``leave_pipeline`` is awaited before any other
    statement (duplicates, a new tenant, a share that does not fit), which SQLAlchemy runs.
    """

    async def slow_path() -> None:
        if leave_pipeline is not None:
            await leave_pipeline()

    n = len(requests)
    outcomes: list[SubmitOutcome | None] = [None] * n
    expires = now + timedelta(seconds=settings.idempotency_ttl_seconds)
    new_ids = [uuid7() for _ in requests]
    fresh: set[tuple[str, str]] = set()
    base = 0  # waiting tasks in the whole queue (read in the same statement, without locking)
    for r in await raw_execute(
        conn,
        _GROUP_KEYS_SQL,
        {
            "ts": [q.tenant_id for q in requests],
            "rids": [q.item.request_id for q in requests],
            "fps": [q.item.fingerprint for q in requests],
            "tids": new_ids,
            "now": now,
            "exp": expires,
        },
    ):
        base = int(r[2])
        if r[0] is not None:
            fresh.add((r[0], r[1]))
    is_fresh = [(q.tenant_id, q.item.request_id) in fresh for q in requests]
    dups = [i for i in range(n) if not is_fresh[i]]
    if dups:
        await slow_path()
        keys = await conn.execute(
            text(
                "SELECT k.tenant_id, k.request_id, k.fingerprint, k.task_id FROM idempotency_keys k"
                " JOIN unnest(CAST(:ts AS text[]), CAST(:rids AS text[])) AS u(t, r)"
                " ON k.tenant_id = u.t AND k.request_id = u.r"
            ),
            {
                "ts": [requests[i].tenant_id for i in dups],
                "rids": [requests[i].item.request_id for i in dups],
            },
        )
        by_key = {(r.tenant_id, r.request_id): (bytes(r.fingerprint), r.task_id) for r in keys}
        rows = await conn.execute(
            text("SELECT * FROM tasks WHERE id = ANY(:ids)"),
            {"ids": [tid for _, tid in by_key.values()]},
        )
        by_id = {r["id"]: dict(r) for r in rows.mappings()}
        for i in dups:
            q = requests[i]
            fp, tid = by_key[(q.tenant_id, q.item.request_id)]
            if fp != q.item.fingerprint:
                outcomes[i] = FailedPrecondition(
                    f"request_id {q.item.request_id!r} was already used with a different request",
                    reason="IDEMPOTENCY_KEY_REUSED",
                )
            elif tid not in by_id:
                outcomes[i] = FailedPrecondition(
                    f"task of request_id {q.item.request_id!r} was purged"
                )
            else:
                outcomes[i] = (by_id[tid], True)
    # Global capacity, per request in tenant order (read without locking, like _admit).
    groups: dict[str, list[int]] = defaultdict(list)
    for i in range(n):
        if is_fresh[i]:
            groups[requests[i].tenant_id].append(i)
    tenants = sorted(groups)
    if tenants:
        room = settings.queue_capacity - base
        fair: dict[str, int] | None = None  # read only once the queue is full
        taken: dict[str, int] = defaultdict(int)  # places kept in this group, per tenant
        for t in tenants:
            kept = []
            for i in groups[t]:
                if room < 1 and fair is None:
                    await slow_path()
                    fair = await fair_share_room(conn, tenants, policy, settings)
                    for other, count in taken.items():
                        fair[other] -= count
                if room >= 1 or (fair is not None and fair.get(t, 0) >= 1):
                    # Within the capacity, or else below its weighted share: a tenant is never
                    # refused for capacity that others' backlog took.
                    room -= 1
                    taken[t] += 1
                    if fair is not None:
                        fair[t] -= 1
                    kept.append(i)
                else:
                    outcomes[i] = ResourceExhausted(
                        [
                            QuotaViolation(
                                "queue",
                                f"the queue holds {base} of {settings.queue_capacity} waiting tasks",
                            )
                        ],
                        retry_after_seconds=5.0,
                    )
            groups[t] = kept
        tenants = [t for t in tenants if groups[t]]
    admitted: dict[int, int] = {}  # request index -> the task's tier
    if tenants:
        ns = [len(groups[t]) for t in tenants]
        tiers = [requests[groups[t][-1]].claimed_tier for t in tenants]
        admit_params: dict[str, Any] = {
            "ts": tenants,
            "ns": ns,
            "tiers": tiers,
            "now": now,
            "burst": settings.tenant_submit_burst,
            "rate": settings.tenant_submit_rate,
            "max_waiting": settings.tenant_max_waiting,
        }
        # Common case in one round trip: lock the tenant rows (sorted) and admit each tenant's
        # whole share; missing tenants are created and admitted below.
        have: set[str] = set()
        granted: dict[str, int | None] = {}
        for r in await raw_execute(conn, _GROUP_LOCK_ADMIT_SQL, admit_params):
            have.add(r[0])
            if r[1]:
                granted[r[0]] = r[2]
        missing = [t for t in tenants if t not in have]
        if missing:
            await slow_path()
            lock_sql = text(
                "SELECT tenant_id FROM tenants WHERE tenant_id = ANY(:ts)"
                " ORDER BY tenant_id FOR UPDATE"
            )
            await conn.execute(
                pg_insert(m.Tenant)
                .values(
                    [
                        {
                            "tenant_id": t,
                            "claimed_tier": requests[groups[t][0]].claimed_tier,
                            "tokens": float(settings.tenant_submit_burst),
                            "tokens_at": now,
                        }
                        for t in missing
                    ]
                )
                .on_conflict_do_nothing()
            )
            await conn.execute(lock_sql, {"ts": missing})
            idx = [tenants.index(t) for t in missing]
            for r in await conn.execute(
                _GROUP_ADMIT_SQL,
                admit_params
                | {
                    "ts": missing,
                    "ns": [ns[i] for i in idx],
                    "tiers": [tiers[i] for i in idx],
                },
            ):
                granted[r.tenant_id] = r.tier
        for t in tenants:
            if t in granted:
                for i in groups[t]:
                    tier = granted[t]
                    admitted[i] = int(tier) if tier is not None else requests[i].claimed_tier
                continue
            await slow_path()
            for i in groups[t]:  # the whole share does not fit: one request at a time, in order
                q = requests[i]
                params = {
                    "t": t,
                    "n": 1,
                    "now": now,
                    "tier": q.claimed_tier,
                    "burst": settings.tenant_submit_burst,
                    "rate": settings.tenant_submit_rate,
                    "max_waiting": settings.tenant_max_waiting,
                }
                row = (await conn.execute(_ADMIT_SQL, params)).first()
                if row is not None:
                    admitted[i] = int(row[0]) if row[0] is not None else q.claimed_tier
                    continue
                try:
                    if await _reject_tenant(conn, t, 1, settings, now):
                        # The tenant's row is locked by this transaction: a race cannot happen.
                        outcomes[i] = ResourceExhausted(
                            [QuotaViolation(f"tenant:{t}", "admission contended; retry")], 0.1
                        )
                except ResourceExhausted as exc:
                    outcomes[i] = exc
    rejected = [i for i in range(n) if is_fresh[i] and i not in admitted]
    if rejected:
        await slow_path()
        await conn.execute(
            text(
                "DELETE FROM idempotency_keys k USING unnest(CAST(:ts AS text[]),"
                " CAST(:rids AS text[]), CAST(:tids AS uuid[])) AS u(t, r, id)"
                " WHERE k.tenant_id = u.t AND k.request_id = u.r AND k.task_id = u.id"
            ),
            {
                "ts": [requests[i].tenant_id for i in rejected],
                "rids": [requests[i].item.request_id for i in rejected],
                "tids": [new_ids[i] for i in rejected],
            },
        )
    if admitted:
        changes = Changes(now=now)
        created: list[TaskRow] = []
        for i in sorted(admitted):
            q = requests[i]
            task = new_task_row(
                new_ids[i],
                q.tenant_id,
                q.item,
                admitted[i],
                policy,
                settings,
                now + timedelta(microseconds=i),
            )
            task["last_sequence"] = 0
            task[SNAPSHOT] = changes.event(task, EV_SUBMITTED, 0).task
            created.append(task)
            outcomes[i] = (task, False)
        await insert_new_tasks(conn, created, changes, queue_shard_delta=len(created))
    out: list[SubmitOutcome] = []
    for o in outcomes:
        assert o is not None
        out.append(o)
    return out


_GROUP_KEYS_SQL = text(
    """
    INSERT INTO idempotency_keys (tenant_id, request_id, fingerprint, task_id, created_at, expires_at)
    SELECT u.tn, u.r, u.f, u.t, :now, :exp
    FROM unnest(CAST(:ts AS text[]), CAST(:rids AS text[]), CAST(:fps AS bytea[]),
                CAST(:tids AS uuid[])) AS u(tn, r, f, t)
    ORDER BY u.tn, u.r
    ON CONFLICT (tenant_id, request_id) DO UPDATE SET
        fingerprint = excluded.fingerprint, task_id = excluded.task_id,
        created_at = excluded.created_at, expires_at = excluded.expires_at
    WHERE idempotency_keys.expires_at < :now
    RETURNING tenant_id, request_id
    """
)
""":data:`_KEYS_SQL` over several tenants (in key order: concurrent groups cannot deadlock on keys)."""


_GROUP_KEYS_SQL = text(
    f"""
    WITH cap AS (SELECT COALESCE(sum(waiting), 0) AS waiting FROM queue_counters),
    k AS ({_GROUP_KEYS_SQL.text})
    SELECT k.tenant_id, k.request_id, cap.waiting FROM cap LEFT JOIN k ON true
    """
)
"""The fresh keys of a group (a duplicate is not returned) with the queue's waiting total, read
without locking like :func:`_admit` (one row with NULL keys when none is fresh)."""
