"""Cancellation and redrive: a single cancel, bulk cancel and redrive over a selector.

A queued task is canceled at once and its slot freed; a dispatched or running one is marked
cancel-requested and the cancel reaches the provider (the adapter cancels the prediction; BeginSubmit
answers STOP if no create happened yet).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from conveyor.events.v1 import events_pb2
from conveyor_common.errors import (
    FieldViolation,
    InvalidArgument,
)
from conveyor_common.vocabulary import EV_CANCEL_REQUESTED, EV_CANCELED, EV_REDRIVEN, SS_DISPATCHED
from conveyor_scheduler.dispatch.policy import Policy
from conveyor_scheduler.lifecycle import finish
from conveyor_scheduler.store import models as m
from conveyor_scheduler.store.changes import Changes
from conveyor_scheduler.store.convert import (
    TaskRow,
    TrackedRow,
)
from conveyor_scheduler.store.reads import load_task


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


def apply_cancel(row: TaskRow, changes: Changes, reason: str) -> bool:
    """Cancel one locked task. Returns whether anything changed.

    queued -> canceled at once; dispatched with no create intent yet (submit_state dispatched) ->
    canceled at once and its slot freed (BeginSubmit will answer STOP, so no create can follow);
    otherwise cancel_requested and a CancelTask command: the slot frees when the adapter reports
    the provider side terminal.
    """
    status = row["status"]
    if status == m.QUEUED:
        finish(row, m.CANCELED, changes.now)
        row["cancel_reason"] = reason or None
        changes.waiting[row["tenant_id"]] -= 1
        changes.event(row, EV_CANCELED, status)
        return True
    if status == m.DISPATCHED and row["submit_state"] == SS_DISPATCHED:
        finish(row, m.CANCELED, changes.now)
        row["cancel_requested"] = True
        row["cancel_reason"] = reason or None
        changes.free_slot(row)
        changes.event(row, EV_CANCELED, status)
        return True
    if status in m.ACTIVE_STATUSES and not row["cancel_requested"]:
        row["cancel_requested"] = True
        row["cancel_reason"] = reason or None
        changes.event(row, EV_CANCEL_REQUESTED, status)
        changes.command(
            row,
            events_pb2.CancelTask(
                task_id=str(row["id"]),
                tenant_id=row["tenant_id"],
                attempt=row["attempt"],
                prediction_id=row["prediction_id"] or "",
                reason=reason,
            ),
        )
        return True
    return False


async def cancel_task(
    conn: AsyncConnection, tenant_id: str | None, task_id: str, reason: str, now: datetime
) -> tuple[TaskRow, Changes]:
    """Cancel one task of a tenant (NotFound for others')."""
    row = await load_task(conn, task_id, tenant_id, lock=True)
    changes = Changes(now=now)
    apply_cancel(row, changes, reason)
    await changes.flush(conn)
    return row, changes


async def bulk_cancel(
    conn: AsyncConnection, rows: Sequence[TaskRow], reason: str, now: datetime
) -> tuple[list[uuid.UUID], Changes]:
    """Cancel locked tasks; returns the ids canceled or with a cancel requested."""
    changes = Changes(now=now)
    done = [row["id"] for row in rows if apply_cancel(row, changes, reason)]
    await changes.flush(conn)
    return done, changes


async def redrive(
    conn: AsyncConnection, rows: Sequence[TaskRow], policy: Policy, now: datetime
) -> tuple[list[uuid.UUID], Changes]:
    """Queue dead-lettered (or failed) tasks again with fresh attempts, in a new generation.

    The attempt counter keeps increasing (it is the fencing token); ``attempt_base`` records the
    attempts used so far, so the task gets ``max_attempts`` new ones. A redriven task is ranked as if
    submitted now: a mass redrive of old tasks must not jump every queue at once through aging.
    """
    changes = Changes(now=now)
    done: list[uuid.UUID] = []
    for row in rows:
        if row["status"] not in (m.DEAD_LETTERED, m.FAILED):
            continue
        previous = row["status"]
        row.update(
            status=m.QUEUED,
            attempt_base=row["attempt"],
            generation=row["generation"] + 1,
            finished_at=None,
            not_before=None,
            submit_state=None,
            submit_started_at=None,
            prediction_id=None,
            progress=0,
            started_at=None,
            result=None,
            error_code=None,
            error_message=None,
            error_retryable=None,
            cancel_requested=False,
            cancel_reason=None,
            enqueued_at=now,
            rank=policy.rank(row["priority"], row["tier"], now),
        )
        changes.waiting[row["tenant_id"]] += 1
        changes.event(row, EV_REDRIVEN, previous)
        done.append(row["id"])
    await changes.flush(conn)
    return done, changes
