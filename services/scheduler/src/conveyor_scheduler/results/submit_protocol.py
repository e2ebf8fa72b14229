"""The submit protocol around each prediction create (BeginSubmit, CompleteSubmit, MarkSubmitUnknown,
ListInFlight): the scheduler fences every call by attempt, so a stale or duplicate dispatch is told to
stop and each attempt gets at most one prediction (reliability.md 2.5).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from conveyor_common.vocabulary import (
    ALREADY_SUBMITTED,
    DISPATCHED,
    EV_CANCELED,
    EV_STARTED,
    PROCEED,
    RECONCILE,
    RUNNING,
    SS_DISPATCHED,
    SS_SUBMITTED,
    SS_SUBMITTING,
    SS_UNKNOWN,
    STOP,
)
from conveyor_scheduler.dispatch.wakeups import CHANNEL
from conveyor_scheduler.lifecycle import finish
from conveyor_scheduler.store import models as m
from conveyor_scheduler.store.bulk import pipelined, raw_cursor, raw_execute
from conveyor_scheduler.store.changes import Changes
from conveyor_scheduler.store.convert import TaskRow
from conveyor_scheduler.store.reads import decode_cursor, encode_cursor, load_task, lock_tasks


class BeginOutcome(NamedTuple):
    """BeginSubmit's answer for one attempt, as decided (a later item of a batch may change the
    row): the decision, and the row's ``prediction_id`` and ``submit_started_at`` then (None when
    the task does not exist)."""

    decision: int
    row: dict[str, Any] | None


def _outcome(decision: int, row: TaskRow | None) -> BeginOutcome:
    if row is None:
        return BeginOutcome(decision, None)
    return BeginOutcome(
        decision,
        {"prediction_id": row["prediction_id"], "submit_started_at": row["submit_started_at"]},
    )


def _parse(task_id: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(task_id)
    except ValueError:
        return None


def _begin(row: TaskRow | None, attempt: int, changes: Changes) -> BeginOutcome:
    """Record the intent to create the prediction of (task, attempt) on its locked row."""
    if row is None or row["attempt"] != attempt or row["status"] not in m.ACTIVE_STATUSES:
        return _outcome(STOP, row)
    state = row["submit_state"]
    if state == SS_DISPATCHED:
        if row["cancel_requested"]:
            finish(row, m.CANCELED, changes.now)
            changes.free_slot(row)
            changes.event(row, EV_CANCELED, m.DISPATCHED)
            return _outcome(STOP, row)
        row.update(submit_state=SS_SUBMITTING, submit_started_at=changes.now)
        changes.touch(row)
        return _outcome(PROCEED, row)
    if state in (SS_SUBMITTING, SS_UNKNOWN):
        return _outcome(RECONCILE, row)
    return _outcome(ALREADY_SUBMITTED, row)


async def begin_submits(
    conn: AsyncConnection,
    items: Sequence[tuple[str, int]],
    now: datetime,
    leave_pipeline: Callable[[], Awaitable[None]] | None = None,
) -> tuple[list[BeginOutcome], Changes]:
    """BeginSubmit of several (task, attempt) in one transaction, decided in order (the rows are
    locked in id order first). ``leave_pipeline``: ``conn`` is in pipeline mode
    (``store.bulk.pipelined``), the lock is the round trip and the writes go with the commit."""
    changes = Changes(now=now)
    piped = leave_pipeline is not None
    rows = await lock_tasks(
        conn, [t for t in (_parse(i) for i, _ in items) if t is not None], raw=piped
    )
    out = []
    for task_id, attempt in items:
        tid = _parse(task_id)
        out.append(_begin(rows.get(tid) if tid is not None else None, attempt, changes))
    if changes.dirty:
        await changes.flush(conn, leave_pipeline=leave_pipeline)
    return out, changes


_BEGIN_AT_ONCE_SQL = text(
    "WITH v AS (SELECT * FROM unnest(CAST(:ids AS uuid[]), CAST(:attempts AS int[]))"
    " AS v(id, attempt)),"
    " l AS (SELECT t.id FROM tasks t JOIN v ON t.id = v.id AND t.attempt = v.attempt"
    f" WHERE t.status IN ({DISPATCHED}, {RUNNING}) AND t.submit_state = {SS_DISPATCHED}"
    " AND NOT t.cancel_requested ORDER BY t.id FOR UPDATE OF t)"
    f" UPDATE tasks t SET submit_state = {SS_SUBMITTING}, submit_started_at = :now,"
    " updated_at = :now FROM l WHERE t.id = l.id"
    " RETURNING t.id, t.attempt, t.prediction_id, t.submit_started_at"
)
"""The common BeginSubmit (``_begin``'s PROCEED: the attempt current, active, dispatched and not
being canceled) as one statement; the rows are locked in id order, as ``lock_tasks`` does."""
_NOTIFY_IF_BEGUN_SQL = text(
    "SELECT pg_notify(:channel, :payload) WHERE EXISTS (SELECT 1 FROM tasks"
    f" WHERE id = ANY(CAST(:ids AS uuid[])) AND submit_state = {SS_SUBMITTING}"
    " AND submit_started_at = :now)"
)


async def begin_at_once(
    conn: AsyncConnection,
    items: Sequence[tuple[str, int]],
    now: datetime,
    notify: str | None = None,
) -> list[BeginOutcome | None]:
    """BeginSubmit in one round trip (the update, the commit; ADR 0003): PROCEED for the first
    item of each (task, attempt) whose attempt could begin, None for every other item, which
    :func:`begin_submits` decides in order in a transaction of its own (a repeated attempt is then
    answered as if it came second, as in one transaction). ``notify``: the NOTIFY payload the
    transaction carries if anything began (a follower's window wake-up)."""
    parsed = [(_parse(task_id), attempt) for task_id, attempt in items]
    params = {
        "ids": [t for t, _ in parsed if t is not None],
        "attempts": [a for t, a in parsed if t is not None],
        "now": now,
    }
    async with pipelined(conn):
        cursor = await raw_cursor(conn, _BEGIN_AT_ONCE_SQL, params)
        if notify is not None:
            await raw_execute(
                conn,
                _NOTIFY_IF_BEGUN_SQL,
                {"channel": CHANNEL, "payload": notify, "ids": params["ids"], "now": now},
                fetch=False,
            )
    begun = {(r[0], r[1]): r for r in await cursor.fetchall()}
    out: list[BeginOutcome | None] = []
    for key in parsed:
        row = begun.pop(key, None)
        out.append(
            None
            if row is None
            else BeginOutcome(PROCEED, {"prediction_id": row[2], "submit_started_at": row[3]})
        )
    return out


def _complete(row: TaskRow | None, attempt: int, prediction_id: str, changes: Changes) -> bool:
    """Record the prediction id of (task, attempt) on its locked row; the task runs from now."""
    if row is None or row["attempt"] != attempt or row["status"] not in m.ACTIVE_STATUSES:
        return False
    if row["prediction_id"] and row["prediction_id"] != prediction_id:
        return False
    row.update(prediction_id=prediction_id, submit_state=SS_SUBMITTED)
    row["last_provider_update_at"] = changes.now
    changes.touch(row)
    if row["status"] == m.DISPATCHED:
        row.update(status=m.RUNNING, started_at=changes.now)
        changes.event(row, EV_STARTED, m.DISPATCHED)
    return True


async def complete_submits(
    conn: AsyncConnection,
    items: Sequence[tuple[str, int, str]],
    now: datetime,
    leave_pipeline: Callable[[], Awaitable[None]] | None = None,
) -> tuple[list[bool], Changes]:
    """CompleteSubmit of several (task, attempt, prediction id) in one transaction, in order
    (``leave_pipeline`` as in :func:`begin_submits`)."""
    changes = Changes(now=now)
    piped = leave_pipeline is not None
    rows = await lock_tasks(
        conn, [t for t in (_parse(i) for i, _, _ in items) if t is not None], raw=piped
    )
    out = []
    for task_id, attempt, prediction_id in items:
        tid = _parse(task_id)
        out.append(
            _complete(rows.get(tid) if tid is not None else None, attempt, prediction_id, changes)
        )
    if changes.dirty:
        await changes.flush(conn, leave_pipeline=leave_pipeline)
    return out, changes


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
