"""SQL of task groups: create, read, the aggregate hook, the cancel pass and the fan-in follow-up.

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

from google.protobuf import struct_pb2
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from conveyor.tasks.v1 import group_pb2, task_pb2
from conveyor_common.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from conveyor_common.ids import uuid7
from conveyor_common.vocabulary import EV_SUBMITTED
from conveyor_scheduler.admission.submit import NewTask, fingerprint, new_task_row, submit
from conveyor_scheduler.control.cancel import apply_cancel
from conveyor_scheduler.dispatch.policy import Policy
from conveyor_scheduler.groups.delays import CHILDREN, ChildContext
from conveyor_scheduler.groups.models import (
    G_CANCELED,
    G_FAILED,
    G_PARTIALLY_FAILED,
    G_RUNNING,
    G_SUCCEEDED,
    G_TERMINAL,
    POLICY_FAIL_FAST,
)
from conveyor_scheduler.settings import SchedulerSettings
from conveyor_scheduler.store.bulk import insert_new_tasks
from conveyor_scheduler.store.changes import Changes
from conveyor_scheduler.store.convert import SNAPSHOT, TaskRow, set_ts
from conveyor_scheduler.store.reads import lock_tasks

logger = logging.getLogger(__name__)

EV_CREATED, EV_CHILD, EV_CANCEL_REQUESTED, EV_COMPLETED, EV_FOLLOW_UP = 1, 2, 3, 4, 5
FAIL_FAST_PREFIX = "fail-fast: "

GroupRow = dict[str, Any]

work_available = asyncio.Event()
"""Set when a group has children to cancel or a follow-up to submit (wakes the group worker)."""


def group_fingerprint(spec: group_pb2.GroupSpec) -> bytes:
    """Hash of a CreateGroup body (deterministic serialization)."""
    return hashlib.sha256(spec.SerializeToString(deterministic=True)).digest()


def child_request_id(request_id: str, index: int) -> str:
    """The idempotency key of a group's child (in the tenant's key space)."""
    return f"{request_id}/group-child/{index}"


def group_proto(row: GroupRow, child_ids: Sequence[uuid.UUID] = ()) -> group_pb2.Group:
    """The public Group of a row."""
    total = row["total"]
    g = group_pb2.Group(
        group_id=str(row["id"]),
        tenant_id=row["tenant_id"],
        request_id=row["request_id"],
        status=row["status"],
        policy=row["policy"],
        follow_up_task_id=str(row["follow_up_task_id"]) if row["follow_up_task_id"] else "",
        cancel_requested=row["cancel_requested"],
        cancel_reason=row["cancel_reason"] or "",
        last_sequence=row["last_sequence"],
        labels=row["labels"] or {},
        has_follow_up=row["follow_up"] is not None,
        progress=group_pb2.GroupProgress(
            total=total,
            done=row["done"],
            succeeded=row["succeeded"],
            failed=row["failed"],
            canceled=row["canceled"],
            running=row["running"],
            queued=row["queued"],
            percent=round(row["progress_sum"] / total, 2) if total else 0.0,
        ),
    )
    g.child_task_ids.extend(str(c) for c in child_ids)
    for name in ("created_at", "updated_at", "finished_at"):
        if row[name] is not None:
            set_ts(getattr(g, name), row[name])
    return g


def _event(
    row: GroupRow,
    event_type: int,
    now: datetime,
    *,
    outputs: Sequence[group_pb2.GroupChildOutput] = (),
    child_ids: Sequence[uuid.UUID] = (),
) -> dict[str, Any]:
    """A group_events row (bumps the group's last_sequence)."""
    row["last_sequence"] += 1
    event_id = uuid7()
    ev = group_pb2.GroupEvent(
        event_id=str(event_id),
        group_id=str(row["id"]),
        tenant_id=row["tenant_id"],
        sequence=row["last_sequence"],
        type=event_type,  # type: ignore[arg-type]
        group=group_proto(row, child_ids),
        outputs=outputs,
    )
    set_ts(ev.occurred_at, now)
    payload = ev.SerializeToString()
    return {
        "group_id": row["id"],
        "sequence": row["last_sequence"],
        "event_id": event_id,
        "type": event_type,
        "occurred_at": now,
        "payload": payload,
        "child_task_id": None,
        "child_sequence": None,
    }


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length_delimited(field_number: int, data: bytes) -> bytes:
    out = bytearray()
    for value in ((field_number << 3) | 2, len(data)):
        while value >= 0x80:
            out.append((value & 0x7F) | 0x80)
            value >>= 7
        out.append(value)
    return bytes(out) + data


_INSERT_EVENTS_SQL = text(
    "INSERT INTO group_events (group_id, sequence, event_id, type, occurred_at, payload,"
    " child_task_id, child_sequence)"
    " SELECT * FROM unnest(CAST(:g AS uuid[]), CAST(:s AS bigint[]), CAST(:e AS uuid[]),"
    " CAST(:t AS smallint[]), CAST(:o AS timestamptz[]), CAST(:p AS bytea[]),"
    " CAST(:ct AS uuid[]), CAST(:cs AS bigint[]))"
)


async def _insert_events(conn: AsyncConnection, events: list[dict[str, Any]]) -> None:
    if not events:
        return
    await conn.execute(
        _INSERT_EVENTS_SQL,
        {
            "g": [e["group_id"] for e in events],
            "s": [e["sequence"] for e in events],
            "e": [e["event_id"] for e in events],
            "t": [e["type"] for e in events],
            "o": [e["occurred_at"] for e in events],
            "p": [e["payload"] for e in events],
            "ct": [e["child_task_id"] for e in events],
            "cs": [e["child_sequence"] for e in events],
        },
    )


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
        row = await _group_by_request(conn, tenant_id, request_id)
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
    row = await _lock_group(conn, gid)
    ids = [r["id"] for r, _ in out]
    await _insert_events(conn, [_event(row, EV_CREATED, now, child_ids=ids)])
    await conn.execute(
        text("UPDATE task_groups SET last_sequence = :s WHERE id = :id"),
        {"s": row["last_sequence"], "id": gid},
    )
    return row, ids, False


async def _group_by_request(conn: AsyncConnection, tenant_id: str, request_id: str) -> GroupRow:
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


async def _lock_group(conn: AsyncConnection, gid: uuid.UUID) -> GroupRow:
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
    conn: AsyncConnection, gid: uuid.UUID, after: int, limit: int
) -> list[bytes]:
    """Serialized GroupEvents with sequence > ``after``, in order. A CHILD event's row references
    the child's event in ``task_events`` (written once, not copied): it is appended here as the
    GroupEvent's ``child_event`` field, without parsing either."""
    rows = await conn.execute(
        text(
            "SELECT g.payload, t.payload FROM group_events g LEFT JOIN task_events t"
            " ON t.task_id = g.child_task_id AND t.sequence = g.child_sequence"
            " WHERE g.group_id = :g AND g.sequence > :a ORDER BY g.sequence LIMIT :l"
        ),
        {"g": gid, "a": after, "l": limit},
    )
    return [own if child is None else own + _length_delimited(8, child) for own, child in rows]


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

_AGGREGATE_SQL = text(
    """
    SELECT group_id,
        count(*) FILTER (WHERE status IN (4, 5, 6, 7, 8)) AS done,
        count(*) FILTER (WHERE status = 4) AS succeeded,
        count(*) FILTER (WHERE status IN (5, 7, 8)) AS failed,
        count(*) FILTER (WHERE status = 6) AS canceled,
        count(*) FILTER (WHERE status IN (2, 3)) AS running,
        count(*) FILTER (WHERE status = 1) AS queued,
        COALESCE(sum(CASE WHEN status IN (4, 5, 6, 7, 8) THEN 100 ELSE progress END), 0)
            AS progress_sum,
        (array_agg(group_index ORDER BY group_index) FILTER (WHERE status IN (5, 7, 8)))[1]
            AS first_failed
    FROM tasks WHERE group_id = ANY(:ids) GROUP BY group_id
    """
)

_SAVE_SQL = text(
    """
    UPDATE task_groups SET status = :status, done = :done, succeeded = :succeeded,
        failed = :failed, canceled = :canceled, running = :running, queued = :queued,
        progress_sum = :progress_sum, cancel_requested = :cancel_requested,
        cancel_pending = :cancel_pending, cancel_reason = :cancel_reason,
        last_sequence = :last_sequence, updated_at = :updated_at, finished_at = :finished_at
    WHERE id = :id
    """
)

_COUNTERS = ("done", "succeeded", "failed", "canceled", "running", "queued", "progress_sum")


_SAVE_MANY_SQL = text(
    """
    UPDATE task_groups AS g SET status = v.status, done = v.done, succeeded = v.succeeded,
        failed = v.failed, canceled = v.canceled, running = v.running, queued = v.queued,
        progress_sum = v.progress_sum, cancel_requested = v.cancel_requested,
        cancel_pending = v.cancel_pending, cancel_reason = v.cancel_reason,
        last_sequence = v.last_sequence, updated_at = v.updated_at, finished_at = v.finished_at
    FROM unnest(CAST(:id AS uuid[]), CAST(:status AS smallint[]), CAST(:done AS int[]),
        CAST(:succeeded AS int[]), CAST(:failed AS int[]), CAST(:canceled AS int[]),
        CAST(:running AS int[]), CAST(:queued AS int[]), CAST(:progress_sum AS bigint[]),
        CAST(:cancel_requested AS bool[]), CAST(:cancel_pending AS bool[]),
        CAST(:cancel_reason AS text[]), CAST(:last_sequence AS bigint[]),
        CAST(:updated_at AS timestamptz[]), CAST(:finished_at AS timestamptz[]))
        AS v(id, status, done, succeeded, failed, canceled, running, queued, progress_sum,
             cancel_requested, cancel_pending, cancel_reason, last_sequence, updated_at,
             finished_at)
    WHERE g.id = v.id
    """
)

_SAVE_AND_APPEND_SQL = text(
    "WITH saved AS (" + _SAVE_MANY_SQL.text + ") " + _INSERT_EVENTS_SQL.text
)
"""Save the groups and append their events in one round trip."""


def _child_events(
    g: GroupRow, refs: list[tuple[uuid.UUID, int]], now: datetime
) -> list[dict[str, Any]]:
    """CHILD events of one group: each references its child's event (task id, sequence) and
    carries the group's snapshot, serialized once for the group."""
    snapshot = _length_delimited(7, group_proto(g).SerializeToString())
    head = group_pb2.GroupEvent(
        group_id=str(g["id"]),
        tenant_id=g["tenant_id"],
        type=EV_CHILD,  # type: ignore[arg-type]
    )
    set_ts(head.occurred_at, now)
    common = head.SerializeToString() + snapshot
    out = []
    first = g["last_sequence"] + 1
    for i, (task_id, sequence) in enumerate(refs):
        event_id = uuid7()
        # event_id (field 1) and sequence (field 4, varint), encoded by hand: the hot path.
        own = _length_delimited(1, str(event_id).encode()) + b"\x20" + _varint(first + i)
        out.append(
            {
                "group_id": g["id"],
                "sequence": first + i,
                "event_id": event_id,
                "type": EV_CHILD,
                "occurred_at": now,
                "payload": own + common,
                "child_task_id": task_id,
                "child_sequence": sequence,
            }
        )
    return out


async def on_flush(conn: AsyncConnection, changes: Changes) -> None:
    """Recompute the aggregate of every group a child of which this transaction changed, append
    the children's events to the groups' histories, and settle groups whose children are done.

    Per transaction: one statement locks the groups, one recomputes their aggregates, one saves
    them, one appends the events, whatever the number of groups and children involved."""
    members = {
        r["id"]: r["group_id"] for r in changes.dirty.values() if r.get("group_id") is not None
    }
    if not members:
        return
    payloads: dict[uuid.UUID, list[tuple[uuid.UUID, int]]] = {}
    for e in changes.events:
        gid = members.get(e["task_id"])
        if gid is not None:
            payloads.setdefault(gid, []).append((e["task_id"], e["sequence"]))
    # Every status change comes with an event: a transaction that only touched children (a
    # BeginSubmit, a rescue) changes no aggregate and takes no group lock.
    gids = sorted(payloads)
    if not gids:
        return
    rows = await conn.execute(
        text("SELECT * FROM task_groups WHERE id = ANY(:ids) ORDER BY id FOR UPDATE"),
        {"ids": gids},
    )
    groups = {r["id"]: dict(r) for r in rows.mappings()}
    aggregates = {
        r["group_id"]: dict(r)
        for r in (await conn.execute(_AGGREGATE_SQL, {"ids": gids})).mappings()
    }
    now = changes.now
    events: list[dict[str, Any]] = []
    saved: list[GroupRow] = []
    settled: list[GroupRow] = []
    for gid in gids:
        g = groups.get(gid)
        agg = aggregates.get(gid)
        if g is None or agg is None:
            continue
        for c in _COUNTERS:
            g[c] = int(agg[c])
        g["updated_at"] = now
        running = g["status"] == G_RUNNING
        settles = running and g["done"] == g["total"]
        fails_fast = (
            running
            and g["policy"] == POLICY_FAIL_FAST
            and g["failed"] > 0
            and not g["cancel_requested"]
        )
        if fails_fast:
            g["cancel_requested"] = True
            g["cancel_pending"] = not settles
            g["cancel_reason"] = f"{FAIL_FAST_PREFIX}child {agg['first_failed']} did not succeed"
        if settles:
            g["status"] = settled_status(g)
            g["finished_at"] = now
            g["cancel_pending"] = False
        # The child events carry the snapshot after this transaction (status included).
        child = _child_events(g, payloads.get(gid, []), now)
        g["last_sequence"] += len(child)
        events.extend(child)
        if fails_fast:
            events.append(_event(g, EV_CANCEL_REQUESTED, now))
            work_available.set()
        if settles:
            settled.append(g)
            if g["status"] == G_SUCCEEDED and g["follow_up"] is not None:
                work_available.set()
        saved.append(g)
    if settled:  # every settled group's outputs in one query
        outputs = await children_outputs(conn, [g["id"] for g in settled])
        events.extend(
            _event(g, EV_COMPLETED, now, outputs=outputs.get(g["id"], [])) for g in settled
        )
    if saved:  # the groups and their new events in one round trip
        keys = _save_keys()
        params = {k: [g[k] for g in saved] for k in keys} | _event_params(events)
        await conn.execute(_SAVE_AND_APPEND_SQL, params)


def _event_params(events: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "g": [e["group_id"] for e in events],
        "s": [e["sequence"] for e in events],
        "e": [e["event_id"] for e in events],
        "t": [e["type"] for e in events],
        "o": [e["occurred_at"] for e in events],
        "p": [e["payload"] for e in events],
        "ct": [e["child_task_id"] for e in events],
        "cs": [e["child_sequence"] for e in events],
    }


def _save_keys() -> tuple[str, ...]:
    return (
        "id",
        "status",
        *_COUNTERS,
        "cancel_requested",
        "cancel_pending",
        "cancel_reason",
        "last_sequence",
        "updated_at",
        "finished_at",
    )


def settled_status(g: GroupRow) -> int:
    """The terminal status of a group whose children are all terminal."""
    if g["succeeded"] == g["total"]:
        return G_SUCCEEDED
    if g["cancel_requested"] and not (g["cancel_reason"] or "").startswith(FAIL_FAST_PREFIX):
        return G_CANCELED
    if g["policy"] == POLICY_FAIL_FAST or g["succeeded"] == 0:
        return G_FAILED
    return G_PARTIALLY_FAILED


async def child_outputs(conn: AsyncConnection, gid: uuid.UUID) -> list[group_pb2.GroupChildOutput]:
    """Every child's outcome, in child order."""
    return (await children_outputs(conn, [gid])).get(gid, [])


async def children_outputs(
    conn: AsyncConnection, gids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, list[group_pb2.GroupChildOutput]]:
    """Every child's outcome of each group, in child order (one query)."""
    rows = await conn.execute(
        text(
            "SELECT group_id, id, group_index, status, result, error_code, error_message,"
            " error_retryable FROM tasks WHERE group_id = ANY(:g) ORDER BY group_id, group_index"
        ),
        {"g": list(gids)},
    )
    out: dict[uuid.UUID, list[group_pb2.GroupChildOutput]] = {}
    for r in rows:
        o = group_pb2.GroupChildOutput(index=r.group_index, task_id=str(r.id), status=r.status)
        if r.result is not None:
            o.result.ParseFromString(r.result)
        if r.error_code is not None:
            o.error.code = r.error_code
            o.error.message = r.error_message or ""
            o.error.retryable = bool(r.error_retryable)
        out.setdefault(r.group_id, []).append(o)
    return out


# --------------------------------------------------------------------------------------------
# Cancel


async def request_cancel(
    conn: AsyncConnection, group_id: str, tenant_id: str, reason: str, now: datetime
) -> GroupRow:
    """Mark a group's cancel (the children are canceled by :func:`cancel_children` next)."""
    g = await load_group(conn, group_id, tenant_id, lock=True)
    if g["status"] != G_RUNNING or g["cancel_requested"]:
        return g
    g.update(cancel_requested=True, cancel_pending=True, cancel_reason=reason or "canceled")
    g["updated_at"] = now
    await _insert_events(conn, [_event(g, EV_CANCEL_REQUESTED, now)])
    await conn.execute(_SAVE_SQL, {k: g[k] for k in _save_keys()})
    return g


async def cancel_children(conn: AsyncConnection, gid: uuid.UUID, now: datetime) -> Changes:
    """Cancel every non-terminal child of a group whose cancel is pending, through the tasks'
    own cancel (a running child's cancel reaches the provider), then clear ``cancel_pending``.

    Lock order: the children first (id order), then the group (by the flush's hook)."""

    ids = [
        r[0]
        for r in await conn.execute(
            text("SELECT id FROM tasks WHERE group_id = :g AND status IN (1, 2, 3)"), {"g": gid}
        )
    ]
    rows = await lock_tasks(conn, ids)
    g = (
        (
            await conn.execute(
                text("SELECT cancel_reason FROM task_groups WHERE id = :g"), {"g": gid}
            )
        )
        .mappings()
        .one()
    )
    changes = Changes(now=now)
    reason = g["cancel_reason"] or "group canceled"
    for row in rows.values():
        apply_cancel(row, changes, reason)
    await changes.flush(conn)  # the hook recomputes (and may settle) the group
    await conn.execute(
        text("UPDATE task_groups SET cancel_pending = false WHERE id = :g"), {"g": gid}
    )
    return changes


# --------------------------------------------------------------------------------------------
# Follow-up (fan-in)


def output_value(result: task_pb2.TaskResult) -> struct_pb2.Value:
    """What a child contributes to the follow-up's input: its file URL(s), else its raw output."""
    v = struct_pb2.Value()
    urls = [f.url or f.source_url for f in result.files]
    if len(urls) == 1:
        v.string_value = urls[0]
    elif urls:
        v.list_value.values.extend(struct_pb2.Value(string_value=u) for u in urls)
    elif result.HasField("output"):
        v.CopyFrom(result.output)
    else:
        v.null_value = struct_pb2.NULL_VALUE
    return v


async def submit_follow_up(
    conn: AsyncConnection,
    gid: uuid.UUID,
    *,
    policy: Policy,
    settings: SchedulerSettings,
    now: datetime,
) -> TaskRow | None:
    """Submit the fan-in task of a succeeded group (once: under the group row's lock).

    The follow-up is admitted without the waiting cap and submit rate: its group was admitted as
    a whole and a refusal here could only leave the group's promise unkept. It is counted as
    waiting like every queued task.
    """
    g = (
        (
            await conn.execute(
                text(
                    "SELECT * FROM task_groups WHERE id = :g AND status = 2"
                    " AND follow_up IS NOT NULL AND follow_up_task_id IS NULL"
                    " FOR UPDATE SKIP LOCKED"
                ),
                {"g": gid},
            )
        )
        .mappings()
        .first()
    )
    if g is None:
        return None
    group = dict(g)
    follow_up = group_pb2.GroupFollowUp()
    follow_up.ParseFromString(group["follow_up"])
    spec = task_pb2.TaskSpec()
    spec.CopyFrom(follow_up.spec)
    outputs = await child_outputs(conn, gid)
    values = struct_pb2.ListValue()
    values.values.extend(output_value(o.result) for o in outputs)
    spec.input.fields[follow_up.outputs_field or "inputs"].list_value.CopyFrom(values)
    tier_row = await conn.scalar(
        text("SELECT COALESCE(tier, claimed_tier, 1) FROM tenants WHERE tenant_id = :t"),
        {"t": group["tenant_id"]},
    )
    item = NewTask(f"{group['request_id']}/group-follow-up", spec, fingerprint(spec))
    task_id = uuid7()
    row = new_task_row(task_id, group["tenant_id"], item, int(tier_row or 1), policy, settings, now)
    changes = Changes(now=now)
    row["last_sequence"] = 0
    row[SNAPSHOT] = changes.event(row, EV_SUBMITTED, 0).task
    await insert_new_tasks(conn, [row], changes, queue_shard_delta=1)
    await conn.execute(
        text("UPDATE tenants SET waiting = waiting + 1 WHERE tenant_id = :t"),
        {"t": group["tenant_id"]},
    )
    group["follow_up_task_id"] = task_id
    group["updated_at"] = now
    await _insert_events(conn, [_event(group, EV_FOLLOW_UP, now)])
    await conn.execute(
        text(
            "UPDATE task_groups SET follow_up_task_id = :f, last_sequence = :s, updated_at = :now"
            " WHERE id = :g"
        ),
        {"f": task_id, "s": group["last_sequence"], "now": now, "g": gid},
    )
    return row


async def pending_work(conn: AsyncConnection, limit: int = 100) -> list[tuple[uuid.UUID, str]]:
    """Groups with children to cancel ("cancel") or a follow-up to submit ("follow_up")."""
    rows = await conn.execute(
        text(
            "SELECT id, CASE WHEN status = 1 THEN 'cancel' ELSE 'follow_up' END FROM task_groups"
            " WHERE (cancel_pending AND status = 1)"
            " OR (status = 2 AND follow_up IS NOT NULL AND follow_up_task_id IS NULL)"
            " ORDER BY id LIMIT :l"
        ),
        {"l": limit},
    )
    return [(r[0], r[1]) for r in rows]
