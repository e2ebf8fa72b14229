"""The submit protocol around each prediction create (BeginSubmit, CompleteSubmit, MarkSubmitUnknown,
ListInFlight): the scheduler fences every call by attempt, so a stale or duplicate dispatch is told to
stop and each attempt gets at most one prediction (reliability.md 2.5).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from conveyor_common.vocabulary import (
    ALREADY_SUBMITTED,
    EV_CANCELED,
    EV_STARTED,
    PROCEED,
    RECONCILE,
    SS_DISPATCHED,
    SS_SUBMITTED,
    SS_SUBMITTING,
    SS_UNKNOWN,
    STOP,
)
from conveyor_scheduler.lifecycle import finish
from conveyor_scheduler.store import models as m
from conveyor_scheduler.store.changes import Changes
from conveyor_scheduler.store.convert import TaskRow
from conveyor_scheduler.store.reads import decode_cursor, encode_cursor, load_task


async def begin_submit(
    conn: AsyncConnection, task_id: str, attempt: int, now: datetime
) -> tuple[int, TaskRow | None, Changes]:
    """Record the intent to create the prediction of (task, attempt); returns the decision."""
    changes = Changes(now=now)
    try:
        row = await load_task(conn, task_id, None, lock=True)
    except Exception:
        return STOP, None, changes
    if row["attempt"] != attempt or row["status"] not in m.ACTIVE_STATUSES:
        return STOP, row, changes
    state = row["submit_state"]
    if state == SS_DISPATCHED:
        if row["cancel_requested"]:
            finish(row, m.CANCELED, now)
            changes.free_slot(row)
            changes.event(row, EV_CANCELED, m.DISPATCHED)
            await changes.flush(conn)
            return STOP, row, changes
        row.update(submit_state=SS_SUBMITTING, submit_started_at=now)
        changes.touch(row)
        await changes.flush(conn)
        return PROCEED, row, changes
    if state in (SS_SUBMITTING, SS_UNKNOWN):
        return RECONCILE, row, changes
    return ALREADY_SUBMITTED, row, changes


async def complete_submit(
    conn: AsyncConnection, task_id: str, attempt: int, prediction_id: str, now: datetime
) -> tuple[bool, Changes]:
    """Record the prediction id of (task, attempt); the task is running from now."""
    changes = Changes(now=now)
    try:
        row = await load_task(conn, task_id, None, lock=True)
    except Exception:
        return False, changes
    if row["attempt"] != attempt or row["status"] not in m.ACTIVE_STATUSES:
        return False, changes
    if row["prediction_id"] and row["prediction_id"] != prediction_id:
        return False, changes
    row.update(prediction_id=prediction_id, submit_state=SS_SUBMITTED)
    row["last_provider_update_at"] = now
    changes.touch(row)
    if row["status"] == m.DISPATCHED:
        row.update(status=m.RUNNING, started_at=now)
        changes.event(row, EV_STARTED, m.DISPATCHED)
    await changes.flush(conn)
    return True, changes


async def mark_submit_unknown(
    conn: AsyncConnection, task_id: str, attempt: int, now: datetime
) -> bool:
    """The create outcome of (task, attempt) is unknown: never resubmit it blindly."""
    changes = Changes(now=now)
    try:
        row = await load_task(conn, task_id, None, lock=True)
    except Exception:
        return False
    if row["attempt"] != attempt or row["status"] not in m.ACTIVE_STATUSES:
        return False
    if row["submit_state"] in (SS_DISPATCHED, SS_SUBMITTING):
        row["submit_state"] = SS_UNKNOWN
        if row["submit_started_at"] is None:
            row["submit_started_at"] = now
        changes.touch(row)
        await changes.flush(conn)
    return True


async def list_in_flight(
    conn: AsyncConnection, quiet_since: datetime | None, page_size: int, page_token: str
) -> tuple[list[TaskRow], str]:
    """Active attempts, oldest dispatch first, optionally only those quiet since a time."""
    where = ["status IN (2, 3)"]
    params: dict[str, Any] = {"limit": page_size + 1}
    if quiet_since is not None:
        where.append("COALESCE(last_provider_update_at, submit_started_at, dispatched_at) < :quiet")
        params["quiet"] = quiet_since
    if page_token:
        at, tid = decode_cursor(page_token)
        where.append("(dispatched_at, id) > (:c_at, :c_id)")
        params.update(c_at=at, c_id=tid)
    rows = await conn.execute(
        text(
            f"SELECT * FROM tasks WHERE {' AND '.join(where)}"
            " ORDER BY dispatched_at, id LIMIT :limit"
        ),
        params,
    )
    out = [dict(r) for r in rows.mappings()]
    token = ""
    if len(out) > page_size:
        out = out[:page_size]
        token = encode_cursor(out[-1]["dispatched_at"], out[-1]["id"])
    return out, token
