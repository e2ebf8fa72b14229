"""State transitions after dispatch: provider results, the submit protocol, cancel, redrive, expiry
and rescue. See ``docs/task-state-machine.md``.

Each function works on task rows locked by the caller's transaction and records its effects in a
:class:`~conveyor_scheduler.outbox.Changes`. Transitions are forward-only and fenced by ``attempt``:
a result or call about another attempt than the task's current one changes nothing. A slot is freed
only when the provider side of the attempt is terminal (succeeded, failed, canceled, aborted), or when
no create was ever attempted for it (cancel before BeginSubmit).
"""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from conveyor.events.v1 import events_pb2
from conveyor.tasks.v1 import task_pb2
from conveyor_scheduler import models as m
from conveyor_scheduler.convert import TaskRow, TrackedRow, from_ts, set_ts, spec_of
from conveyor_scheduler.groups.delays import retry_delay
from conveyor_scheduler.outbox import Changes
from conveyor_scheduler.policy import Policy
from conveyor_scheduler.repository import (
    EV_CANCEL_REQUESTED,
    EV_CANCELED,
    EV_DEAD_LETTERED,
    EV_EXPIRED,
    EV_FAILED,
    EV_PROGRESS,
    EV_REDRIVEN,
    EV_RETRY,
    EV_STARTED,
    EV_SUCCEEDED,
    SS_DISPATCHED,
    SS_SUBMITTED,
    SS_SUBMITTING,
    SS_UNKNOWN,
    decode_cursor,
    encode_cursor,
    load_task,
    lock_tasks,
    set_provider_throttle,
)
from conveyor_scheduler.settings import SchedulerSettings

logger = logging.getLogger(__name__)

RESULTS_CONSUMER = "scheduler-results"
"""Inbox consumer name of the provider results."""

_INBOX_SQL = text(
    "INSERT INTO inbox (consumer, event_id, received_at)"
    " SELECT :consumer, id, :now FROM unnest(CAST(:ids AS text[])) AS id"
    " ON CONFLICT DO NOTHING RETURNING event_id"
)


@dataclass(frozen=True)
class Backoff:
    """Exponential retry backoff with jitter and a cap."""

    base: float
    cap: float
    jitter: float

    @classmethod
    def from_settings(cls, s: SchedulerSettings) -> Backoff:
        """From settings."""
        return cls(s.retry_base_seconds, s.retry_max_seconds, s.retry_jitter)

    def delay(self, attempt_in_generation: int) -> float:
        """Seconds before retry number ``attempt_in_generation`` (1 = after the first failure)."""
        raw = min(self.cap, self.base * (2 ** max(0, attempt_in_generation - 1)))
        return float(max(0.0, raw * (1 + self.jitter * (2 * random.random() - 1))))


def _finish(row: TaskRow, status: int, now: datetime) -> None:
    row["status"] = status
    row["finished_at"] = now
    row["submit_state"] = None
    row["not_before"] = None


# --------------------------------------------------------------------------------------------
# Cancel


def apply_cancel(row: TaskRow, changes: Changes, reason: str) -> bool:
    """Cancel one locked task. Returns whether anything changed.

    queued -> canceled at once; dispatched with no create intent yet (submit_state dispatched) ->
    canceled at once and its slot freed (BeginSubmit will answer STOP, so no create can follow);
    otherwise cancel_requested and a CancelTask command: the slot frees when the adapter reports
    the provider side terminal.
    """
    status = row["status"]
    if status == m.QUEUED:
        _finish(row, m.CANCELED, changes.now)
        row["cancel_reason"] = reason or None
        changes.waiting[row["tenant_id"]] -= 1
        changes.event(row, EV_CANCELED, status)
        return True
    if status == m.DISPATCHED and row["submit_state"] == SS_DISPATCHED:
        _finish(row, m.CANCELED, changes.now)
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


# --------------------------------------------------------------------------------------------
# Redrive


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
) -> Changes:
    """Apply provider results in one transaction: inbox dedup, attempt fencing, forward-only."""
    changes = Changes(now=now)
    if not results:
        return changes
    ids = list(dict.fromkeys(r.result_id for r in results if r.result_id))
    fresh: set[str] = set()
    if ids:
        fresh = {
            r[0]
            for r in await conn.execute(_INBOX_SQL, {"consumer": consumer, "ids": ids, "now": now})
        }
    todo: list[events_pb2.ProviderResult] = []
    seen: set[str] = set()
    for r in results:
        if r.result_id in fresh and r.result_id not in seen:
            seen.add(r.result_id)
            todo.append(r)
    task_ids: list[uuid.UUID] = []
    for r in todo:
        if r.WhichOneof("outcome") == "throttled":
            until = from_ts(r.throttled.retry_at) if r.throttled.HasField("retry_at") else now
            await set_provider_throttle(conn, r.throttled.provider or provider, until)
            continue
        try:
            task_ids.append(uuid.UUID(r.task_id))
        except ValueError:
            logger.warning("result for a bad task id", extra={"action": "result_bad_task"})
    rows = await lock_tasks(conn, task_ids)
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
    await changes.flush(conn)
    return changes


def apply_result(
    row: TaskRow, result: events_pb2.ProviderResult, changes: Changes, backoff: Backoff
) -> None:
    """Apply one provider result to a locked task row (no effect when stale or backwards)."""
    now = changes.now
    if result.attempt != row["attempt"] or row["status"] not in m.ACTIVE_STATUSES:
        return  # another attempt's, or the task is terminal/queued again: a duplicate or stale
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
        _finish(row, m.SUCCEEDED, now)
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
            _cancelled(row, changes, previous)
        elif f.retryable:
            _retry_or_dead_letter(row, changes, previous, backoff)
        else:
            _finish(row, m.FAILED, now)
            changes.event(row, EV_FAILED, previous)
        return
    if outcome == "canceled":
        if result.canceled.deadline_exceeded and not row["cancel_requested"]:
            row.update(
                error_code="timeout",
                error_message="the run deadline passed; the provider canceled the prediction",
                error_retryable=False,
            )
            _finish(row, m.FAILED, now)
            changes.event(row, EV_FAILED, previous)
        else:
            _cancelled(row, changes, previous)
        return
    if outcome == "aborted":
        if row["cancel_requested"]:
            _cancelled(row, changes, previous)
        else:
            # Aborted before it started (provider-side capacity or deadline): nothing ran, so a
            # new attempt is as safe as after a retryable failure.
            row.update(
                error_code="aborted", error_message=result.aborted.message, error_retryable=True
            )
            _retry_or_dead_letter(row, changes, previous, backoff)
        return
    # Unknown outcome: the slot must not be freed for it.
    changes.free_slots.remove(row["id"])


def _cancelled(row: TaskRow, changes: Changes, previous: int) -> None:
    _finish(row, m.CANCELED, changes.now)
    changes.event(row, EV_CANCELED, previous)


def _retry_or_dead_letter(row: TaskRow, changes: Changes, previous: int, backoff: Backoff) -> None:
    used = row["attempt"] - row["attempt_base"]
    if used < row["max_attempts"]:
        row.update(
            status=m.QUEUED,
            submit_state=None,
            submit_started_at=None,
            prediction_id=None,
            progress=0,
            started_at=None,
            not_before=changes.now + timedelta(seconds=retry_delay(row, backoff, used)),
        )
        changes.waiting[row["tenant_id"]] += 1
        changes.event(row, EV_RETRY, previous)
    else:
        _finish(row, m.DEAD_LETTERED, changes.now)
        changes.event(row, EV_DEAD_LETTERED, previous)


# --------------------------------------------------------------------------------------------
# Submit protocol (reliability.md 2.5)

PROCEED, STOP, ALREADY_SUBMITTED, RECONCILE = 1, 2, 3, 4


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
            _finish(row, m.CANCELED, now)
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


# --------------------------------------------------------------------------------------------
# Leader sweeps


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
        _finish(row, m.EXPIRED, now)
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


def dispatch_command(
    row: TaskRow, provider: str, policy: Policy, now: datetime
) -> events_pb2.DispatchTask:
    """The DispatchTask of a task's current attempt."""
    cmd = events_pb2.DispatchTask(
        task_id=str(row["id"]),
        tenant_id=row["tenant_id"],
        attempt=row["attempt"],
        kind=row["kind"],
        provider=provider,
        effective_priority=policy.effective(row["rank"], now),
    )
    if row["is_deployment"]:
        cmd.deployment = row["model"]
    else:
        cmd.model = row["model"]
    cmd.input.CopyFrom(spec_of(row).input)
    if row["run_deadline"] is not None:
        set_ts(cmd.run_deadline, row["run_deadline"])
    if row["dispatched_at"] is not None:
        set_ts(cmd.dispatched_at, row["dispatched_at"])
    return cmd
