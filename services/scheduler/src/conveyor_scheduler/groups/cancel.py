"""Cancelling a group: the request is recorded (CANCEL_REQUESTED), then every child is canceled in
batches (reaching the provider for running ones), the group settling when the last one ends.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from conveyor_common.vocabulary import (
    G_RUNNING,
    GROUP_EV_CANCEL_REQUESTED,
)
from conveyor_scheduler.control.cancel import apply_cancel
from conveyor_scheduler.groups.aggregate import SAVE_SQL, save_keys
from conveyor_scheduler.groups.events import GroupRow, group_event, insert_events
from conveyor_scheduler.groups.store import load_group
from conveyor_scheduler.store.changes import Changes
from conveyor_scheduler.store.reads import lock_tasks


async def request_cancel(
    conn: AsyncConnection, group_id: str, tenant_id: str, reason: str, now: datetime
) -> GroupRow:
    """Mark a group's cancel (the children are canceled by :func:`cancel_children` next)."""
    g = await load_group(conn, group_id, tenant_id, lock=True)
    if g["status"] != G_RUNNING or g["cancel_requested"]:
        return g
    g.update(cancel_requested=True, cancel_pending=True, cancel_reason=reason or "canceled")
    g["updated_at"] = now
    await insert_events(conn, [group_event(g, GROUP_EV_CANCEL_REQUESTED, now)])
    await conn.execute(SAVE_SQL, {k: g[k] for k in save_keys()})
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
