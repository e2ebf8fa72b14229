"""Every query of the scheduler except the dispatcher's and the relay's (see those modules).

Functions take an ``AsyncConnection`` inside a transaction opened by the caller (the unit of work is
opened at the servicer, consumer or loop boundary) and never commit themselves. Writers lock task rows
first (``FOR UPDATE``, in id order), then tenant rows (sorted), then one queue-counter shard, so they
cannot deadlock with each other.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from conveyor.events.v1 import events_pb2
from conveyor.tasks.v1 import task_pb2
from conveyor_common.context import current_traceparent
from conveyor_common.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    QuotaViolation,
    ResourceExhausted,
    RpcError,
)
from conveyor_common.ids import uuid7
from conveyor_scheduler import models as m
from conveyor_scheduler.convert import (
    SNAPSHOT,
    TaskRow,
    TrackedRow,
    from_ts,
    seed_spec,
    struct_to_dict,
)
from conveyor_scheduler.groups.delays import apply_spec
from conveyor_scheduler.outbox import Changes, insert_new_tasks, raw_execute
from conveyor_scheduler.policy import Policy
from conveyor_scheduler.settings import SchedulerSettings

# TaskEventType numbers.
EV_SUBMITTED, EV_DISPATCHED, EV_STARTED, EV_PROGRESS, EV_SUCCEEDED, EV_FAILED = 1, 2, 3, 4, 5, 6
EV_RETRY, EV_CANCEL_REQUESTED, EV_CANCELED, EV_DEAD_LETTERED, EV_EXPIRED, EV_REDRIVEN = (
    7,
    8,
    9,
    10,
    11,
    12,
)
# SubmitState numbers.
SS_DISPATCHED, SS_SUBMITTING, SS_UNKNOWN, SS_SUBMITTED = 1, 2, 3, 4


@dataclass(frozen=True)
class NewTask:
    """One validated submit item."""

    request_id: str
    spec: task_pb2.TaskSpec
    fingerprint: bytes
    traceparent: str = ""
    """The submit's trace context (a coalesced submit brings its own); empty = the current one."""


def fingerprint(spec: task_pb2.TaskSpec) -> bytes:
    """Hash of the request body (deterministic serialization: map order does not matter)."""
    return hashlib.sha256(spec.SerializeToString(deterministic=True)).digest()


# --------------------------------------------------------------------------------------------
# Reads


async def load_task(
    conn: AsyncConnection, task_id: str, tenant_id: str | None, *, lock: bool = False
) -> TaskRow:
    """One task, or NotFound (also for another tenant's task, exactly like a missing one)."""
    try:
        tid = uuid.UUID(task_id)
    except ValueError:
        raise NotFound("task", task_id) from None
    sql = "SELECT * FROM tasks WHERE id = :id"
    params: dict[str, Any] = {"id": tid}
    if tenant_id is not None:
        sql += " AND tenant_id = :tenant"
        params["tenant"] = tenant_id
    if lock:
        sql += " FOR UPDATE"
    row = (await conn.execute(text(sql), params)).mappings().first()
    if row is None:
        raise NotFound("task", task_id)
    return TrackedRow(row)


async def lock_tasks(conn: AsyncConnection, ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, TaskRow]:
    """Lock tasks in id order (deadlock-free) and return them by id."""
    wanted = sorted(set(ids))
    if not wanted:
        return {}
    rows = await conn.execute(
        text("SELECT * FROM tasks WHERE id = ANY(:ids) ORDER BY id FOR UPDATE"), {"ids": wanted}
    )
    return {r["id"]: TrackedRow(r) for r in rows.mappings()}


async def queue_position(conn: AsyncConnection, row: TaskRow) -> int:
    """1 + queued tasks of the same kind ahead of ``row`` by rank (0 when not queued)."""
    if row["status"] != m.QUEUED:
        return 0
    ahead = await conn.scalar(
        text(
            "SELECT count(*) FROM tasks WHERE status = 1 AND kind = :kind"
            " AND (rank > :rank OR (rank = :rank AND (enqueued_at, id) < (:enq, :id)))"
        ),
        {"kind": row["kind"], "rank": row["rank"], "enq": row["enqueued_at"], "id": row["id"]},
    )
    return int(ahead or 0) + 1


async def recent_run_time_p50(
    conn: AsyncConnection, kind: int, model: str | None = None, *, tenant_id: str | None = None
) -> float:
    """Median run time (seconds) of the last 200 successes of a kind (and model, and tenant);
    0 if none."""
    sql = (
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY secs) FROM ("
        " SELECT EXTRACT(EPOCH FROM (finished_at - COALESCE(started_at, dispatched_at))) AS secs"
        " FROM tasks WHERE status = 4 AND kind = :kind{model}"
        + (" AND tenant_id = :tenant" if tenant_id is not None else "")
        + " ORDER BY finished_at DESC LIMIT 200) s"
    )
    params: dict[str, Any] = {"kind": kind}
    if tenant_id is not None:
        params["tenant"] = tenant_id
    if model:
        sql = sql.format(model=" AND model = :model")
        params["model"] = model
    else:
        sql = sql.format(model="")
    value = await conn.scalar(text(sql), params)
    return float(value or 0.0)


async def list_tasks(
    conn: AsyncConnection,
    tenant_id: str | None,
    *,
    statuses: Sequence[int] = (),
    kinds: Sequence[int] = (),
    model: str = "",
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    page_size: int = 50,
    page_token: str = "",
) -> tuple[list[TaskRow], str]:
    """Tasks newest first with a keyset cursor on (created_at, id)."""
    where = ["TRUE"]
    params: dict[str, Any] = {"limit": page_size + 1}
    if tenant_id is not None:
        where.append("tenant_id = :tenant")
        params["tenant"] = tenant_id
    if statuses:
        where.append("status = ANY(:statuses)")
        params["statuses"] = list(statuses)
    if kinds:
        where.append("kind = ANY(:kinds)")
        params["kinds"] = list(kinds)
    if model:
        where.append("model = :model")
        params["model"] = model
    if created_after is not None:
        where.append("created_at >= :after")
        params["after"] = created_after
    if created_before is not None:
        where.append("created_at < :before")
        params["before"] = created_before
    if page_token:
        c_at, c_id = decode_cursor(page_token)
        where.append("(created_at, id) < (:c_at, :c_id)")
        params.update(c_at=c_at, c_id=c_id)
    rows = (
        await conn.execute(
            text(
                f"SELECT * FROM tasks WHERE {' AND '.join(where)}"
                " ORDER BY created_at DESC, id DESC LIMIT :limit"
            ),
            params,
        )
    ).mappings()
    out = [dict(r) for r in rows]
    token = ""
    if len(out) > page_size:
        out = out[:page_size]
        token = encode_cursor(out[-1]["created_at"], out[-1]["id"])
    return out, token


def encode_cursor(at: datetime, task_id: uuid.UUID) -> str:
    """Opaque cursor."""
    raw = json.dumps([at.astimezone(UTC).isoformat(), str(task_id)]).encode()
    return base64.urlsafe_b64encode(raw).decode()


def decode_cursor(token: str) -> tuple[datetime, uuid.UUID]:
    """Inverse of encode_cursor; INVALID_ARGUMENT for garbage."""
    try:
        at, tid = json.loads(base64.urlsafe_b64decode(token.encode()))
        return datetime.fromisoformat(at), uuid.UUID(tid)
    except (ValueError, TypeError) as exc:
        raise InvalidArgument([FieldViolation("page_token", "not a valid cursor")]) from exc


async def events_after(
    conn: AsyncConnection, task_id: uuid.UUID, after: int, limit: int
) -> list[bytes]:
    """Serialized TaskEvents of a task with sequence > ``after``, in order."""
    rows = await conn.execute(
        text(
            "SELECT payload FROM task_events WHERE task_id = :id AND sequence > :after"
            " ORDER BY sequence LIMIT :limit"
        ),
        {"id": task_id, "after": after, "limit": limit},
    )
    return [r[0] for r in rows]


# --------------------------------------------------------------------------------------------
# Submit


async def submit(
    conn: AsyncConnection,
    *,
    tenant_id: str,
    claimed_tier: int,
    items: Sequence[NewTask],
    policy: Policy,
    settings: SchedulerSettings,
    now: datetime,
    leave_pipeline: Callable[[], Awaitable[None]] | None = None,
) -> list[tuple[TaskRow, bool]]:
    """Admit ``items`` atomically (all or none). Returns (task, deduplicated) in item order.

    Idempotency keys go first: a duplicate takes no quota, and a concurrent duplicate waits on the
    primary key until the first commits, then reads its task. Admission (tenant waiting cap and
    submit rate in one conditional UPDATE of the tenant row; the global capacity from the sharded
    counter) raises ResourceExhausted, which rolls the transaction back: nothing is written.
    The common path runs on the raw connection (pipeline mode allowed, see :func:`submit_group`);
    ``leave_pipeline`` is awaited before any SQLAlchemy statement.
    """

    async def slow_path() -> None:
        if leave_pipeline is not None:
            await leave_pipeline()

    expires = now + timedelta(seconds=settings.idempotency_ttl_seconds)
    new_ids = {it.request_id: uuid7() for it in items}
    key_rows = [
        {
            "tenant_id": tenant_id,
            "request_id": it.request_id,
            "fingerprint": it.fingerprint,
            "task_id": new_ids[it.request_id],
            "created_at": now,
            "expires_at": expires,
        }
        for it in items
    ]
    fresh = {
        r[0]
        for r in await raw_execute(
            conn,
            _KEYS_SQL,
            {
                "tenant": tenant_id,
                "rids": [k["request_id"] for k in key_rows],
                "fps": [k["fingerprint"] for k in key_rows],
                "tids": [k["task_id"] for k in key_rows],
                "now": now,
                "exp": expires,
            },
        )
    }
    existing: dict[str, TaskRow] = {}
    dup_ids = [it.request_id for it in items if it.request_id not in fresh]
    if dup_ids:
        await slow_path()
        keys = await conn.execute(
            text(
                "SELECT request_id, fingerprint, task_id FROM idempotency_keys"
                " WHERE tenant_id = :t AND request_id = ANY(:r)"
            ),
            {"t": tenant_id, "r": dup_ids},
        )
        by_request = {r.request_id: (bytes(r.fingerprint), r.task_id) for r in keys}
        task_ids = {}
        for it in items:
            if it.request_id in fresh:
                continue
            fp, tid = by_request[it.request_id]
            if fp != it.fingerprint:
                raise FailedPrecondition(
                    f"request_id {it.request_id!r} was already used with a different request",
                    reason="IDEMPOTENCY_KEY_REUSED",
                )
            task_ids[it.request_id] = tid
        rows = await conn.execute(
            text("SELECT * FROM tasks WHERE id = ANY(:ids)"), {"ids": list(task_ids.values())}
        )
        by_id = {r["id"]: dict(r) for r in rows.mappings()}
        for rid, tid in task_ids.items():
            if tid not in by_id:
                raise FailedPrecondition(f"task of request_id {rid!r} was purged")
            existing[rid] = by_id[tid]
    new_items = [it for it in items if it.request_id in fresh]
    tier = claimed_tier
    if new_items:
        tier = await _admit(
            conn,
            tenant_id,
            claimed_tier,
            len(new_items),
            settings,
            now,
            policy,
            slow_path=slow_path,
        )
    changes = Changes(now=now)
    created: dict[str, TaskRow] = {}
    for it in new_items:
        row = new_task_row(new_ids[it.request_id], tenant_id, it, tier, policy, settings, now)
        created[it.request_id] = row
        row["last_sequence"] = 0
        row[SNAPSHOT] = changes.event(row, EV_SUBMITTED, 0).task
    if created:
        await insert_new_tasks(conn, list(created.values()), changes)
    out: list[tuple[TaskRow, bool]] = []
    for it in items:
        if it.request_id in created:
            out.append((created[it.request_id], False))
        else:
            out.append((existing[it.request_id], True))
    return out


_KEYS_SQL = text(
    """
    INSERT INTO idempotency_keys (tenant_id, request_id, fingerprint, task_id, created_at, expires_at)
    SELECT :tenant, u.r, u.f, u.t, :now, :exp
    FROM unnest(CAST(:rids AS text[]), CAST(:fps AS bytea[]), CAST(:tids AS uuid[])) AS u(r, f, t)
    ON CONFLICT (tenant_id, request_id) DO UPDATE SET
        fingerprint = excluded.fingerprint, task_id = excluded.task_id,
        created_at = excluded.created_at, expires_at = excluded.expires_at
    WHERE idempotency_keys.expires_at < :now
    RETURNING request_id
    """
)
"""Record the keys; a key seen before (and not expired) is not returned: a duplicate."""


@dataclass(frozen=True)
class SubmitRequest:
    """One caller's single-item submit (grouped by :func:`submit_group`)."""

    tenant_id: str
    claimed_tier: int
    item: NewTask


SubmitOutcome = tuple[TaskRow, bool] | RpcError
"""(task, deduplicated), or the error that request alone gets (nothing of it written)."""


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


def new_task_row(
    task_id: uuid.UUID,
    tenant_id: str,
    item: NewTask,
    tier: int,
    policy: Policy,
    settings: SchedulerSettings,
    now: datetime,
) -> TaskRow:
    """The row of a newly admitted task."""
    spec = item.spec
    priority = spec.priority or task_pb2.PRIORITY_NORMAL
    target = spec.WhichOneof("target")
    run_timeout = (
        int(spec.run_timeout.ToTimedelta().total_seconds())
        if spec.HasField("run_timeout")
        else settings.default_run_timeout_seconds
    )
    row: TaskRow = {
        "id": task_id,
        "tenant_id": tenant_id,
        "request_id": item.request_id,
        "kind": int(spec.kind),
        "model": spec.deployment if target == "deployment" else spec.model,
        "is_deployment": target == "deployment",
        "input": struct_to_dict(spec.input),
        "priority": int(priority),
        "tier": tier,
        "status": m.QUEUED,
        "progress": 0,
        "attempt": 0,
        "attempt_base": 0,
        "max_attempts": spec.max_attempts or settings.default_max_attempts,
        "generation": 0,
        "prediction_id": None,
        "submit_state": None,
        "submit_started_at": None,
        "cancel_requested": False,
        "cancel_reason": None,
        "queue_deadline": from_ts(spec.queue_deadline) if spec.HasField("queue_deadline") else None,
        "run_timeout_s": max(1, run_timeout),
        "run_deadline": None,
        "not_before": None,
        "created_at": now,
        "updated_at": now,
        "enqueued_at": now,
        "dispatched_at": None,
        "dispatch_emitted_at": None,
        "started_at": None,
        "finished_at": None,
        "last_provider_update_at": None,
        "result": None,
        "error_code": None,
        "error_message": None,
        "error_retryable": None,
        "last_sequence": 0,
        "labels": dict(spec.labels),
        "webhook_url": spec.webhook.url or None if spec.HasField("webhook") else None,
        "traceparent": item.traceparent or current_traceparent(),
        "webhook_events": [int(e) for e in spec.webhook.events]
        if spec.HasField("webhook")
        else None,
        "slot_cost": policy.cost(int(spec.kind)),
        "rank": policy.rank(int(priority), tier, now),
    }
    apply_spec(row, spec, policy, now)
    seed_spec(row, spec.input)
    return row


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
        {"n": n, "s": random.randrange(m.QUEUE_SHARDS), "cap": settings.queue_capacity},
    )
    if not taken:
        if slow_path is not None:
            await slow_path()
        # The tenant's own places were taken above (its waiting count includes them): a tenant
        # still within its weighted share is admitted past the capacity others filled.
        if (await fair_share_room(conn, [tenant_id], policy, settings))[tenant_id] >= 0:
            await conn.execute(
                text("UPDATE queue_counters SET waiting = waiting + :n WHERE shard = :s"),
                {"n": n, "s": random.randrange(m.QUEUE_SHARDS)},
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


# --------------------------------------------------------------------------------------------
# Tenants and models (admin)


async def get_tenant(conn: AsyncConnection, tenant_id: str) -> dict[str, Any] | None:
    """A tenant row or None."""
    row = (
        (await conn.execute(text("SELECT * FROM tenants WHERE tenant_id = :t"), {"t": tenant_id}))
        .mappings()
        .first()
    )
    return dict(row) if row else None


async def upsert_tenant(
    conn: AsyncConnection, tenant_id: str, tier: int | None, limits: task_pb2.TenantLimits
) -> dict[str, Any]:
    """Create or update a tenant's tier and explicit limits (zeros = defaults)."""
    values = {
        "tier": tier or None,
        "max_concurrency": limits.max_concurrency or None,
        "max_waiting": limits.max_waiting or None,
        "submit_rate": limits.submit_rate_per_second or None,
        "submit_burst": limits.submit_burst or None,
        "weight": limits.weight or None,
    }
    # A new tenant starts with a full submit bucket (the admission SQL caps tokens at the burst);
    # the column default of 0 made a tenant's first submits after its creation by an admin fail.
    stmt = pg_insert(m.Tenant).values(tenant_id=tenant_id, tokens=1e9, **values)
    upsert = stmt.on_conflict_do_update(
        index_elements=[m.Tenant.tenant_id],
        set_={**values, "updated_at": text("now()")},
    ).returning(*m.Tenant.__table__.columns)
    row = (await conn.execute(upsert)).mappings().one()
    return dict(row)


async def set_model_paused(
    conn: AsyncConnection, model: str, paused: bool, reason: str | None
) -> bool:
    """Pause or resume a model; returns whether it is paused now."""
    stmt = pg_insert(m.ModelControl).values(model=model, paused=paused, reason=reason)
    stmt = stmt.on_conflict_do_update(
        index_elements=[m.ModelControl.model],
        set_={"paused": paused, "reason": reason, "updated_at": text("now()")},
    )
    await conn.execute(stmt)
    return paused


async def set_provider_throttle(conn: AsyncConnection, provider: str, until: datetime) -> None:
    """Pause dispatch to a provider until ``until`` (keeps the later of two throttles)."""
    stmt = pg_insert(m.ProviderControl).values(provider=provider, throttled_until=until)
    stmt = stmt.on_conflict_do_update(
        index_elements=[m.ProviderControl.provider],
        set_={
            "throttled_until": text(
                "GREATEST(provider_controls.throttled_until, excluded.throttled_until)"
            ),
            "updated_at": text("now()"),
        },
    )
    await conn.execute(stmt)


# --------------------------------------------------------------------------------------------
# Selectors of bulk operations


async def select_for_bulk(
    conn: AsyncConnection,
    *,
    task_ids: Sequence[str],
    tenant_id: str,
    model: str,
    statuses: Sequence[int],
    created_before: datetime | None,
    limit: int,
) -> list[TaskRow]:
    """Lock the tasks a BulkSelector matches (id order, at most ``limit``)."""
    where = ["status = ANY(:statuses)"]
    params: dict[str, Any] = {"statuses": list(statuses), "limit": limit}
    if task_ids:
        ids = []
        for t in task_ids:
            try:
                ids.append(uuid.UUID(t))
            except ValueError:
                raise InvalidArgument(
                    [FieldViolation("selector.task_ids", f"{t!r} is not a task id")]
                ) from None
        where.append("id = ANY(:ids)")
        params["ids"] = ids
    if tenant_id:
        where.append("tenant_id = :tenant")
        params["tenant"] = tenant_id
    if model:
        where.append("model = :model")
        params["model"] = model
    if created_before is not None:
        where.append("created_at < :before")
        params["before"] = created_before
    rows = await conn.execute(
        text(
            f"SELECT * FROM tasks WHERE {' AND '.join(where)} ORDER BY id LIMIT :limit FOR UPDATE"
        ),
        params,
    )
    return [TrackedRow(r) for r in rows.mappings()]


def provider_result_id(result: events_pb2.ProviderResult) -> str:
    """The inbox key of a provider result."""
    return result.result_id
