"""Delayed tasks and per-task retry delays; the task-row side of groups.

A delayed task is an ordinary queued task with ``not_before`` set: the dispatcher's candidate query
already skips queued tasks whose ``not_before`` is in the future, and the leader wakes at the
earliest ``not_before`` of all queued tasks, read from ONE partial index (``ix_tasks_backoff``, the
one retry backoffs use): there is no timer per task. A delayed task ages from its ``not_before``
(its ``enqueued_at``), so a task delayed for a day does not jump every queue when it becomes due.

These functions are the few hooks the core modules call (``new_task_row``, ``_build_spec``,
``task_proto``, the retry transition).
"""

from __future__ import annotations

import contextvars
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from conveyor.tasks.v1 import task_pb2

FIXED, EXPONENTIAL = 1, 2
DEFAULT_MAX_RETRY_DELAY_S = 24 * 3600.0


@dataclass
class ChildContext:
    """The group whose children ``new_task_row`` is building (set by CreateGroup)."""

    group_id: uuid.UUID
    index: dict[str, int] = field(default_factory=dict)
    """request_id -> position in the group."""


CHILDREN: contextvars.ContextVar[ChildContext | None] = contextvars.ContextVar(
    "conveyor_group_children", default=None
)


def apply_spec(row: dict[str, Any], spec: task_pb2.TaskSpec, policy: Any, now: datetime) -> None:
    """Complete a new task row from the spec's delay and retry policy (and its group, if any)."""
    not_before: datetime | None = None
    if spec.HasField("not_before"):
        not_before = spec.not_before.ToDatetime(tzinfo=UTC)
    elif spec.HasField("delay"):
        not_before = now + spec.delay.ToTimedelta()
    if not_before is not None and not_before > now:
        row["not_before"] = not_before
        row["enqueued_at"] = not_before  # ages from when it is due
        row["rank"] = policy.rank(row["priority"], row["tier"], not_before)
    if spec.HasField("retry_policy"):
        rp = spec.retry_policy
        row["retry_backoff"] = int(rp.backoff) or EXPONENTIAL
        row["retry_delay_s"] = max(0.0, rp.delay.ToTimedelta().total_seconds())
        row["retry_max_delay_s"] = (
            rp.max_delay.ToTimedelta().total_seconds()
            if rp.HasField("max_delay")
            else DEFAULT_MAX_RETRY_DELAY_S
        )
    ctx = CHILDREN.get()
    if ctx is not None and row["request_id"] in ctx.index:
        row["group_id"] = ctx.group_id
        row["group_index"] = ctx.index[row["request_id"]]


def spec_extras(spec: task_pb2.TaskSpec, row: Any) -> None:
    """The delay and retry policy of a stored task back into its TaskSpec."""
    if row.get("not_before") is not None and row.get("attempt", 0) == 0:
        spec.not_before.FromDatetime(row["not_before"])
    backoff = row.get("retry_backoff")
    if backoff:
        spec.retry_policy.backoff = backoff
        spec.retry_policy.delay.FromTimedelta(timedelta(seconds=row["retry_delay_s"] or 0.0))
        if backoff == EXPONENTIAL and row.get("retry_max_delay_s") is not None:
            spec.retry_policy.max_delay.FromTimedelta(timedelta(seconds=row["retry_max_delay_s"]))


def task_extras(task: task_pb2.Task, row: Any) -> None:
    """``Task.scheduled`` (queued, not due yet) and ``Task.group_id`` of a row."""
    group_id = row.get("group_id")
    if group_id is not None:
        task.group_id = str(group_id)
    not_before = row.get("not_before")
    if row["status"] == 1 and not_before is not None and not_before > datetime.now(UTC):
        task.scheduled = True
        task.estimated_start_at.FromDatetime(not_before)  # its ETA (GetTask may say later)


def retry_delay(row: Any, default: Any, used: int) -> float:
    """Seconds before retry number ``used`` (1 = after the first failure): the task's own retry
    policy when it has one, else the scheduler's default backoff (``default.delay``)."""
    backoff = row.get("retry_backoff")
    if not backoff:
        return float(default.delay(used))
    delay = float(row.get("retry_delay_s") or 0.0)
    if backoff == FIXED:
        return delay
    cap = float(row.get("retry_max_delay_s") or DEFAULT_MAX_RETRY_DELAY_S)
    return float(min(cap, delay * 2.0 ** max(0, used - 1)))
