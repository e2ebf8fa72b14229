"""Task groups: create (the group and its children in one transaction) and read (get, list, events).

The aggregate hook is in :mod:`.aggregate`, the cancel pass in :mod:`.cancel`, the fan-in follow-up
in :mod:`.follow_up`, event encoding in :mod:`.events`.

Lock order (the same as every other writer, so nothing can deadlock): task rows (id order), tenant
rows (sorted), one queue-counter shard, then group rows (id order). The aggregate hook runs at the end
of :meth:`Changes.flush`, after the task rows were written, so it sees the children as committed by
this transaction and locks the group rows last.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from conveyor.tasks.v1 import group_pb2
from conveyor_common.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from conveyor_common.ids import uuid7
from conveyor_common.vocabulary import (
    G_RUNNING,
    G_SUCCEEDED,
    G_TERMINAL,
    GROUP_EV_CHILD,
    GROUP_EV_CREATED,
)
from conveyor_scheduler.admission.submit import NewTask, fingerprint, submit
from conveyor_scheduler.client_webhooks.group_deliveries import create_group_endpoint
from conveyor_scheduler.dispatch.policy import Policy
from conveyor_scheduler.groups.delays import CHILDREN, ChildContext
from conveyor_scheduler.groups.events import (
    GroupRow,
    group_event,
    group_proto,
    insert_events,
    length_delimited,
)
from conveyor_scheduler.settings import SchedulerSettings
from conveyor_scheduler.store.convert import set_ts

logger = logging.getLogger(__name__)

FAIL_FAST_PREFIX = "fail-fast: "


work_available = asyncio.Event()
"""Set when a group has children to cancel or a follow-up to submit (wakes the group worker)."""


def group_fingerprint(spec: group_pb2.GroupSpec) -> bytes:
    """Hash of a CreateGroup body (deterministic serialization)."""
    return hashlib.sha256(spec.SerializeToString(deterministic=True)).digest()


def child_request_id(request_id: str, index: int) -> str:
    """The idempotency key of a group's child (in the tenant's key space)."""
    return f"{request_id}/group-child/{index}"


# --------------------------------------------------------------------------------------------
# Create and read


async def create_group(
    conn: AsyncConnection,
    *,
    tenant_id: str,
    claimed_tier: int,
    request_id: str,
    spec: group_pb2.GroupSpec,
    policy: Policy,
    settings: SchedulerSettings,
    now: datetime,
) -> tuple[GroupRow, list[uuid.UUID], bool]:
    """Admit a group and its children atomically: (group, child ids, deduplicated).

    The children go through :func:`repository.submit` (idempotency keys, the tenant's waiting cap and
    submit tokens, the global capacity: a group counts as its N children) in the same transaction as
    the group row, so a refused group writes nothing.
    """
    fp = group_fingerprint(spec)
    gid = uuid7()
    follow_up = spec.follow_up.SerializeToString() if spec.HasField("follow_up") else None
    inserted = await conn.scalar(
        text(
            "INSERT INTO task_groups (id, tenant_id, request_id, fingerprint, status, policy,"
            " total, queued, follow_up, labels, created_at, updated_at)"
            " VALUES (:id, :t, :r, :fp, 1, :policy, :n, :n, :fu, CAST(:labels AS jsonb), :now, :now)"
            " ON CONFLICT (tenant_id, request_id) DO NOTHING RETURNING id"
        ),
        {
            "id": gid,
            "t": tenant_id,
            "r": request_id,
            "fp": fp,
            "policy": int(spec.policy) or 1,
            "n": len(spec.children),
            "fu": follow_up,
            "labels": json.dumps(dict(spec.labels)),
            "now": now,
        },
    )
    if inserted is None:
        row = await group_by_request(conn, tenant_id, request_id)
        if bytes(row["fingerprint"]) != fp:
            raise FailedPrecondition(
                f"request_id {request_id!r} was already used with a different group",
                reason="IDEMPOTENCY_KEY_REUSED",
            )
        return row, await child_ids(conn, row["id"]), True
    ctx = ChildContext(gid)
    items = []
    for i, child in enumerate(spec.children):
        rid = child_request_id(request_id, i)
        ctx.index[rid] = i
        items.append(NewTask(rid, child, fingerprint(child)))
    token = CHILDREN.set(ctx)
    try:
        out = await submit(
            conn,
            tenant_id=tenant_id,
            claimed_tier=claimed_tier,
            items=items,
            policy=policy,
            settings=settings,
            now=now,
        )
    finally:
        CHILDREN.reset(token)
    if any(dedup for _, dedup in out):
        raise FailedPrecondition(
            "a child's idempotency key is already taken by another task"
            f" (keys {child_request_id(request_id, 0)!r}...): use a new request_id",
            reason="IDEMPOTENCY_KEY_REUSED",
        )
    row = await lock_group(conn, gid)
    ids = [r["id"] for r, _ in out]
    if spec.HasField("webhook"):
        await create_group_endpoint(conn, tenant_id=tenant_id, group_id=gid, webhook=spec.webhook)
    await insert_events(conn, [group_event(row, GROUP_EV_CREATED, now, child_ids=ids)])
    await conn.execute(
        text("UPDATE task_groups SET last_sequence = :s WHERE id = :id"),
        {"s": row["last_sequence"], "id": gid},
    )
    return row, ids, False


async def group_by_request(conn: AsyncConnection, tenant_id: str, request_id: str) -> GroupRow:
    row = (
        (
            await conn.execute(
                text("SELECT * FROM task_groups WHERE tenant_id = :t AND request_id = :r"),
                {"t": tenant_id, "r": request_id},
            )
        )
        .mappings()
        .first()
    )
    if row is None:  # pragma: no cover - the conflicting row exists
        raise FailedPrecondition("the group of this request_id is being created; retry")
    return dict(row)


async def lock_group(conn: AsyncConnection, gid: uuid.UUID) -> GroupRow:
    row = (
        (
            await conn.execute(
                text("SELECT * FROM task_groups WHERE id = :id FOR UPDATE"), {"id": gid}
            )
        )
        .mappings()
        .one()
    )
    return dict(row)


def parse_group_id(group_id: str) -> uuid.UUID:
    """A group id, or NotFound (as for a missing group)."""
    try:
        return uuid.UUID(group_id)
    except ValueError:
        raise NotFound("group", group_id) from None


async def load_group(
    conn: AsyncConnection, group_id: str, tenant_id: str | None, *, lock: bool = False
) -> GroupRow:
    """One group of a tenant, or NotFound (also for another tenant's group)."""
    gid = parse_group_id(group_id)
    sql = "SELECT * FROM task_groups WHERE id = :id"
    params: dict[str, Any] = {"id": gid}
    if tenant_id is not None:
        sql += " AND tenant_id = :t"
        params["t"] = tenant_id
    if lock:
        sql += " FOR UPDATE"
    row = (await conn.execute(text(sql), params)).mappings().first()
    if row is None:
        raise NotFound("group", group_id)
    return dict(row)


async def child_ids(conn: AsyncConnection, gid: uuid.UUID) -> list[uuid.UUID]:
    """Child task ids in child order."""
    rows = await conn.execute(
        text("SELECT id FROM tasks WHERE group_id = :g ORDER BY group_index"), {"g": gid}
    )
    return [r[0] for r in rows]


async def list_groups(
    conn: AsyncConnection,
    tenant_id: str,
    *,
    statuses: Sequence[int],
    created_after: datetime | None,
    page_size: int,
    page_token: str,
) -> tuple[list[GroupRow], str]:
    """Groups newest first, keyset cursor on (created_at, id)."""
    where = ["tenant_id = :t"]
    params: dict[str, Any] = {"t": tenant_id, "limit": page_size + 1}
    if statuses:
        where.append("status = ANY(:st)")
        params["st"] = list(statuses)
    if created_after is not None:
        where.append("created_at >= :after")
        params["after"] = created_after
    if page_token:
        try:
            at, gid = json.loads(base64.urlsafe_b64decode(page_token.encode()))
            params.update(c_at=datetime.fromisoformat(at), c_id=uuid.UUID(gid))
        except (ValueError, TypeError) as exc:
            raise InvalidArgument([FieldViolation("page_token", "not a valid cursor")]) from exc
        where.append("(created_at, id) < (:c_at, :c_id)")
    rows = await conn.execute(
        text(
            f"SELECT * FROM task_groups WHERE {' AND '.join(where)}"
            " ORDER BY created_at DESC, id DESC LIMIT :limit"
        ),
        params,
    )
    out = [dict(r) for r in rows.mappings()]
    token = ""
    if len(out) > page_size:
        out = out[:page_size]
        last = out[-1]
        token = base64.urlsafe_b64encode(
            json.dumps([last["created_at"].astimezone(UTC).isoformat(), str(last["id"])]).encode()
        ).decode()
    return out, token


async def events_after(
    conn: AsyncConnection, group: GroupRow, after: int, limit: int
) -> list[bytes]:
    """Serialized GroupEvents of ``group`` (its row) with sequence > ``after``, in order.

    A CHILD event's row references the child's event in ``task_events`` (written once, not copied),
    appended as the GroupEvent's ``child_event`` field without parsing it. Its own part is stored
    as columns (the group's status and counters after the child's event; older rows hold it
    serialized) and built here from them and the group's fixed fields."""
    rows = await conn.execute(
        text(
            "SELECT g.payload, t.payload AS child, g.sequence, g.event_id, g.occurred_at,"
            " g.snap_status, g.snap_done, g.snap_succeeded, g.snap_failed, g.snap_canceled,"
            " g.snap_running, g.snap_queued, g.snap_progress_sum, g.snap_cancel_requested,"
            " tg.cancel_reason, tg.finished_at"
            " FROM group_events g JOIN task_groups tg ON tg.id = g.group_id"
            " LEFT JOIN task_events t"
            " ON t.task_id = g.child_task_id AND t.sequence = g.child_sequence"
            " WHERE g.group_id = :g AND g.sequence > :a ORDER BY g.sequence LIMIT :l"
        ),
        {"g": group["id"], "a": after, "l": limit},
    )
    out = []
    for r in rows:
        own = r.payload if r.payload is not None else _child_event_bytes(group, r)
        out.append(own if r.child is None else own + length_delimited(8, r.child))
    return out


def _child_event_bytes(group: GroupRow, r: Any) -> bytes:
    """A CHILD event stored as columns, serialized (deterministic: a resumed read is identical)."""
    snapshot = dict(
        group,
        status=r.snap_status,
        done=r.snap_done,
        succeeded=r.snap_succeeded,
        failed=r.snap_failed,
        canceled=r.snap_canceled,
        running=r.snap_running,
        queued=r.snap_queued,
        progress_sum=r.snap_progress_sum,
        cancel_requested=r.snap_cancel_requested,
        # Set once, when the cancel was requested; the finish, once, when the group settled (read
        # with the events, in their snapshot: never older than them).
        cancel_reason=r.cancel_reason if r.snap_cancel_requested else None,
        finished_at=r.finished_at if r.snap_status != G_RUNNING else None,
        follow_up_task_id=None,  # submitted after the last child event
        last_sequence=r.sequence,
        updated_at=r.occurred_at,
    )
    ev = group_pb2.GroupEvent(
        event_id=str(r.event_id),
        group_id=str(group["id"]),
        tenant_id=group["tenant_id"],
        sequence=r.sequence,
        type=GROUP_EV_CHILD,
        group=group_proto(snapshot),
    )
    set_ts(ev.occurred_at, r.occurred_at)
    return ev.SerializeToString()


def stream_finished(row: GroupRow) -> bool:
    """Whether no event will follow the group's last one."""
    if row["status"] not in G_TERMINAL:
        return False
    owes_follow_up = (
        row["status"] == G_SUCCEEDED
        and row["follow_up"] is not None
        and row["follow_up_task_id"] is None
    )
    return not owes_follow_up


# --------------------------------------------------------------------------------------------
# The aggregate hook (called by Changes.flush)


# --------------------------------------------------------------------------------------------
# Cancel


# --------------------------------------------------------------------------------------------
# Follow-up (fan-in)
