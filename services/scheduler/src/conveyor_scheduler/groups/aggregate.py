"""A group's aggregate, kept in the transaction of its children's changes.

:func:`on_flush` runs inside :meth:`~conveyor_scheduler.store.changes.Changes.flush` for every change
that touches a child: it recomputes the counters and progress of each affected group from its
children, appends the CHILD events, settles the group when its last child ends (and under fail-fast
on a child's definitive failure) and records the COMPLETED event with every child's outcome.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from conveyor.tasks.v1 import group_pb2
from conveyor_common.ids import uuid7
from conveyor_common.vocabulary import (
    G_CANCELED,
    G_FAILED,
    G_PARTIALLY_FAILED,
    G_RUNNING,
    G_SUCCEEDED,
    GROUP_EV_CANCEL_REQUESTED,
    GROUP_EV_CHILD,
    GROUP_EV_COMPLETED,
    POLICY_FAIL_FAST,
)
from conveyor_scheduler.client_webhooks.group_deliveries import deliver_group_events
from conveyor_scheduler.groups.events import (
    INSERT_EVENTS_SQL,
    GroupRow,
    group_event,
    group_proto,
    length_delimited,
    varint,
)
from conveyor_scheduler.groups.follow_up import children_outputs
from conveyor_scheduler.groups.store import FAIL_FAST_PREFIX, work_available
from conveyor_scheduler.store.changes import Changes
from conveyor_scheduler.store.convert import set_ts

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


SAVE_SQL = text(
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


_SAVE_AND_APPEND_SQL = text("WITH saved AS (" + _SAVE_MANY_SQL.text + ") " + INSERT_EVENTS_SQL.text)
"""Save the groups and append their events in one round trip."""


def _child_events(
    g: GroupRow, refs: list[tuple[uuid.UUID, int]], now: datetime
) -> list[dict[str, Any]]:
    """CHILD events of one group: each references its child's event (task id, sequence) and
    carries the group's snapshot, serialized once for the group."""
    snapshot = length_delimited(7, group_proto(g).SerializeToString())
    head = group_pb2.GroupEvent(
        group_id=str(g["id"]),
        tenant_id=g["tenant_id"],
        type=GROUP_EV_CHILD,
    )
    set_ts(head.occurred_at, now)
    common = head.SerializeToString() + snapshot
    out = []
    first = g["last_sequence"] + 1
    for i, (task_id, sequence) in enumerate(refs):
        event_id = uuid7()
        # event_id (field 1) and sequence (field 4, varint), encoded by hand: the hot path.
        own = length_delimited(1, str(event_id).encode()) + b"\x20" + varint(first + i)
        out.append(
            {
                "group_id": g["id"],
                "sequence": first + i,
                "event_id": event_id,
                "type": GROUP_EV_CHILD,
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
            events.append(group_event(g, GROUP_EV_CANCEL_REQUESTED, now))
            work_available.set()
        if settles:
            settled.append(g)
            if g["status"] == G_SUCCEEDED and g["follow_up"] is not None:
                work_available.set()
        saved.append(g)
    if settled:  # every settled group's outputs in one query
        outputs = await children_outputs(conn, [g["id"] for g in settled])
        events.extend(
            group_event(g, GROUP_EV_COMPLETED, now, outputs=outputs.get(g["id"], []))
            for g in settled
        )
    if saved:  # the groups and their new events in one round trip
        keys = save_keys()
        params = {k: [g[k] for g in saved] for k in keys} | _event_params(events)
        await conn.execute(_SAVE_AND_APPEND_SQL, params)
        await deliver_group_events(conn, events)


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


def save_keys() -> tuple[str, ...]:
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
