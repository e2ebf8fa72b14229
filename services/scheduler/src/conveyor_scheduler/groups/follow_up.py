"""The fan-in follow-up: every child's output collected, and the follow-up task submitted when the
group succeeds (its input receives the children's outputs), exactly once.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

from google.protobuf import struct_pb2
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from conveyor.tasks.v1 import group_pb2, task_pb2
from conveyor_common.ids import uuid7
from conveyor_common.vocabulary import (
    EV_SUBMITTED,
    GROUP_EV_FOLLOW_UP,
)
from conveyor_scheduler.admission.submit import NewTask, fingerprint, new_task_row
from conveyor_scheduler.dispatch.policy import Policy
from conveyor_scheduler.groups.events import group_event, insert_events
from conveyor_scheduler.settings import SchedulerSettings
from conveyor_scheduler.store.bulk import insert_new_tasks
from conveyor_scheduler.store.changes import Changes
from conveyor_scheduler.store.convert import SNAPSHOT, TaskRow


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
    await insert_events(conn, [group_event(group, GROUP_EV_FOLLOW_UP, now)])
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
