"""Provider results applied to tasks: started, progress, succeeded, failed, canceled, throttled.

Each function works on task rows locked by the caller's transaction and records its effects in a
:class:`~conveyor_scheduler.store.changes.Changes`. Transitions are forward-only and fenced by
``attempt``: a result about another attempt than the task's current one changes nothing. Each record
is applied once (the inbox table). A slot is freed only when the provider side of the attempt is
terminal (succeeded, failed, canceled, aborted). See ``docs/task-state-machine.md``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from conveyor.events.v1 import events_pb2
from conveyor.tasks.v1 import task_pb2
from conveyor_common.vocabulary import (
    EV_FAILED,
    EV_PROGRESS,
    EV_STARTED,
    EV_SUCCEEDED,
    SS_SUBMITTED,
    STALE_CREATE,
)
from conveyor_scheduler.control.tenants import set_provider_throttle
from conveyor_scheduler.lifecycle import Backoff, finish, mark_canceled, retry_or_dead_letter
from conveyor_scheduler.store import models as m
from conveyor_scheduler.store.bulk import raw_cursor, raw_execute
from conveyor_scheduler.store.changes import Changes
from conveyor_scheduler.store.convert import TaskRow, from_ts
from conveyor_scheduler.store.reads import lock_tasks, queue_lock_tasks

logger = logging.getLogger(__name__)

RESULTS_CONSUMER = "scheduler-results"
"""Inbox consumer name of the provider results."""

_INBOX_SQL = text(
    "INSERT INTO inbox (consumer, event_id, received_at)"
    " SELECT :consumer, id, :now FROM unnest(CAST(:ids AS text[])) AS id"
    " ON CONFLICT DO NOTHING RETURNING event_id"
)


# --------------------------------------------------------------------------------------------
# Cancel


# --------------------------------------------------------------------------------------------
# Redrive


# --------------------------------------------------------------------------------------------
# Provider results


async def apply_results(
    conn: AsyncConnection,
    results: Sequence[events_pb2.ProviderResult],
    *,
    backoff: Backoff,
    provider: str,
    now: datetime,
    consumer: str = RESULTS_CONSUMER,
    leave_pipeline: Callable[[], Awaitable[None]] | None = None,
) -> Changes:
    """Apply provider results in one transaction: inbox dedup, attempt fencing, forward-only.

    With ``leave_pipeline`` the caller holds ``conn`` in psycopg's pipeline mode
    (``store.bulk.pipelined``): the inbox insert and the row locks go out together (one round trip
    where waiting for the inbox first cost two), every write goes with the commit; a batch with a
    throttle (written with SQLAlchemy, after leaving the pipeline) reads the inbox first.
    """
    changes = Changes(now=now)
    if not results:
        return changes
    piped = leave_pipeline is not None
    ids = list(dict.fromkeys(r.result_id for r in results if r.result_id))
    fresh: set[str] = set()
    locked: Callable[[], Awaitable[dict[uuid.UUID, TaskRow]]] | None = None
    if ids:
        params = {"consumer": consumer, "ids": ids, "now": now}
        if piped and not any(r.WhichOneof("outcome") == "throttled" for r in results):
            # The inbox and the row locks in one round trip: every result's task is locked, a
            # duplicate's to no effect (the lock order stays inbox, then tasks by id).
            inbox = await raw_cursor(conn, _INBOX_SQL, params)
            locked = await queue_lock_tasks(conn, _task_ids(results))
            fresh = {r[0] for r in await inbox.fetchall()}
        elif piped:
            fresh = {r[0] for r in await raw_execute(conn, _INBOX_SQL, params)}
        else:
            fresh = {r[0] for r in await conn.execute(_INBOX_SQL, params)}
    todo: list[events_pb2.ProviderResult] = []
    seen: set[str] = set()
    for r in results:
        if r.result_id in fresh and r.result_id not in seen:
            seen.add(r.result_id)
            todo.append(r)
    task_ids: list[uuid.UUID] = []
    for r in todo:
        if r.WhichOneof("outcome") == "throttled":
            if leave_pipeline is not None and piped:
                await leave_pipeline()
                piped = False
            until = from_ts(r.throttled.retry_at) if r.throttled.HasField("retry_at") else now
            await set_provider_throttle(conn, r.throttled.provider or provider, until)
            continue
        try:
            task_ids.append(uuid.UUID(r.task_id))
        except ValueError:
            logger.warning("result for a bad task id", extra={"action": "result_bad_task"})
    rows = await locked() if locked is not None else await lock_tasks(conn, task_ids, raw=piped)
    for r in todo:
        if r.WhichOneof("outcome") == "throttled":
            continue
        try:
            row = rows.get(uuid.UUID(r.task_id))
        except ValueError:
            continue
        if row is None:
            logger.warning("result for an unknown task", extra={"action": "result_unknown_task"})
            continue
        apply_result(row, r, changes, backoff)
    await changes.flush(conn, leave_pipeline=leave_pipeline if piped else None)
    return changes


def _task_ids(results: Sequence[events_pb2.ProviderResult]) -> list[uuid.UUID]:
    """The task ids of ``results`` (a malformed one is left out: it is reported when applied)."""
    out: list[uuid.UUID] = []
    for r in results:
        try:
            out.append(uuid.UUID(r.task_id))
        except ValueError:
            continue
    return out


def apply_result(
    row: TaskRow, result: events_pb2.ProviderResult, changes: Changes, backoff: Backoff
) -> None:
    """Apply one provider result to a locked task row (no effect when stale or backwards)."""
    now = changes.now
    if (
        result.attempt != row["attempt"]
        or row["status"] not in m.ACTIVE_STATUSES
        or (result.prediction_id and row["prediction_id"] not in (None, "", result.prediction_id))
    ):
        # Another attempt's, the task is terminal or queued again, or another prediction than the
        # one the attempt recorded: a duplicate or stale result, which changes nothing.
        _refuse(row, result, changes)
        return
    outcome = result.WhichOneof("outcome")
    row["last_provider_update_at"] = now
    if result.prediction_id and not row["prediction_id"]:
        row["prediction_id"] = result.prediction_id
        row["submit_state"] = SS_SUBMITTED
    changes.touch(row)
    if outcome in ("started", "progress"):
        if row["status"] == m.DISPATCHED:
            row["status"] = m.RUNNING
            row["started_at"] = (
                from_ts(result.observed_at) if result.HasField("observed_at") else now
            )
            changes.event(row, EV_STARTED, m.DISPATCHED)
        if outcome == "progress":
            pct = max(0, min(99, result.progress.percent))
            if pct > row["progress"]:
                row["progress"] = pct
                changes.event(row, EV_PROGRESS, m.RUNNING)
        return
    previous = row["status"]
    changes.free_slot(row)
    if outcome == "succeeded":
        s = result.succeeded
        res = task_pb2.TaskResult(files=s.files)
        if s.HasField("output"):
            res.output.CopyFrom(s.output)
        if s.HasField("predict_time"):
            res.predict_time.CopyFrom(s.predict_time)
        finish(row, m.SUCCEEDED, now)
        row.update(progress=100, result=res.SerializeToString())
        if row["started_at"] is None:
            row["started_at"] = row["dispatched_at"]
        changes.event(row, EV_SUCCEEDED, previous)
        return
    if outcome == "failed":
        f = result.failed
        row.update(
            error_code=f.code or "provider_error",
            error_message=f.message,
            error_retryable=f.retryable,
        )
        if row["cancel_requested"]:
            mark_canceled(row, changes, previous)
        elif f.retryable:
            retry_or_dead_letter(row, changes, previous, backoff)
        else:
            finish(row, m.FAILED, now)
            changes.event(row, EV_FAILED, previous)
        return
    if outcome == "canceled":
        if result.canceled.deadline_exceeded and not row["cancel_requested"]:
            row.update(
                error_code="timeout",
                error_message="the run deadline passed; the provider canceled the prediction",
                error_retryable=False,
            )
            finish(row, m.FAILED, now)
            changes.event(row, EV_FAILED, previous)
        else:
            mark_canceled(row, changes, previous)
        return
    if outcome == "aborted":
        if row["cancel_requested"]:
            mark_canceled(row, changes, previous)
        else:
            # Aborted before it started (provider-side capacity or deadline): nothing ran, so a
            # new attempt is as safe as after a retryable failure.
            row.update(
                error_code="aborted", error_message=result.aborted.message, error_retryable=True
            )
            retry_or_dead_letter(row, changes, previous, backoff)
        return
    # Unknown outcome: the slot must not be freed for it.
    changes.free_slots.remove(row["id"])


# --------------------------------------------------------------------------------------------
# Submit protocol (reliability.md 2.5)


# --------------------------------------------------------------------------------------------
# Leader sweeps


def _refuse(row: TaskRow, result: events_pb2.ProviderResult, changes: Changes) -> None:
    """A refused result of an adapter's own create (``started``, or a progress before it) names a
    prediction no attempt will record: the adapter is told to cancel it (ADR 0003), as a refused
    CompleteSubmit was."""
    if (
        result.source != events_pb2.RESULT_SOURCE_CREATE
        or result.WhichOneof("outcome") not in ("started", "progress")
        or not result.prediction_id
        or (result.attempt == row["attempt"] and result.prediction_id == row["prediction_id"])
    ):
        return
    logger.warning(
        "a create's prediction came for a stale attempt; canceling it",
        extra={
            "action": "stale_create_canceled",
            "task_id": str(row["id"]),
            "attempt": result.attempt,
            "prediction_id": result.prediction_id,
        },
    )
    changes.command(
        row,
        events_pb2.CancelTask(
            task_id=str(row["id"]),
            tenant_id=row["tenant_id"],
            attempt=result.attempt,
            prediction_id=result.prediction_id,
            reason=STALE_CREATE,
        ),
    )


def provider_result_id(result: events_pb2.ProviderResult) -> str:
    """The inbox key of a provider result."""
    return result.result_id
