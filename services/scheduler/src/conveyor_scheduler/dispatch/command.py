"""The DispatchTask command of a task's attempt (the dispatch cycle and the rescue sweep)."""

from __future__ import annotations

from datetime import datetime

from conveyor.events.v1 import events_pb2
from conveyor_scheduler.dispatch.policy import Policy
from conveyor_scheduler.store.convert import TaskRow, set_ts, spec_of


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
