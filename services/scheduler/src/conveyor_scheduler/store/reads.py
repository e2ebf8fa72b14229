"""Reads of tasks and their events: one task, a locked set, a tenant's list with cursors, the event
history after a sequence, the queue position and the recent run time.

Functions take an ``AsyncConnection`` inside a transaction opened by the caller and never commit.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from conveyor_common.errors import (
    FieldViolation,
    InvalidArgument,
    NotFound,
    RpcError,
)
from conveyor_scheduler.store import models as m
from conveyor_scheduler.store.bulk import raw_dict_cursor, raw_mappings
from conveyor_scheduler.store.convert import (
    TaskRow,
    TrackedRow,
)

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


_LOCK_TASKS_SQL = text("SELECT * FROM tasks WHERE id = ANY(:ids) ORDER BY id FOR UPDATE")


async def lock_tasks(
    conn: AsyncConnection, ids: Iterable[uuid.UUID], *, raw: bool = False
) -> dict[uuid.UUID, TaskRow]:
    """Lock tasks in id order (deadlock-free) and return them by id (``raw``: through psycopg
    directly, for a caller holding the connection in pipeline mode)."""
    wanted = sorted(set(ids))
    if not wanted:
        return {}
    if raw:
        return {
            r["id"]: TrackedRow(r)
            for r in await raw_mappings(conn, _LOCK_TASKS_SQL, {"ids": wanted})
        }
    rows = await conn.execute(_LOCK_TASKS_SQL, {"ids": wanted})
    return {r["id"]: TrackedRow(r) for r in rows.mappings()}


async def queue_lock_tasks(
    conn: AsyncConnection, ids: Iterable[uuid.UUID]
) -> Callable[[], Awaitable[dict[uuid.UUID, TaskRow]]]:
    """:func:`lock_tasks` on a connection in pipeline mode, sent without waiting for its rows: the
    returned call reads them, in the round trip of every statement queued before it."""
    wanted = sorted(set(ids))
    cursor = await raw_dict_cursor(conn, _LOCK_TASKS_SQL, {"ids": wanted}) if wanted else None

    async def rows() -> dict[uuid.UUID, TaskRow]:
        if cursor is None:
            return {}
        return {r["id"]: TrackedRow(r) for r in await cursor.fetchall()}

    return rows


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


SubmitOutcome = tuple[TaskRow, bool] | RpcError
"""(task, deduplicated), or the error that request alone gets (nothing of it written)."""


# --------------------------------------------------------------------------------------------
# Tenants and models (admin)


# --------------------------------------------------------------------------------------------
# Selectors of bulk operations
