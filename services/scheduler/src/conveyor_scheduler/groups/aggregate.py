"""A group's aggregate, kept in the transaction of its children's changes.

:func:`on_flush` runs inside :meth:`~conveyor_scheduler.store.changes.Changes.flush` for every change
that touches a child: it applies each changed child's difference (its status bucket and progress,
before and after the transaction) to its group's counters, appends the CHILD events, settles the
group when its last child ends (and under fail-fast on a child's definitive failure; the decisive
moment recounts the group from its children) and records the COMPLETED event with every child's
outcome.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from conveyor_common.vocabulary import (
    G_CANCELED,
    G_FAILED,
    G_PARTIALLY_FAILED,
    G_SUCCEEDED,
    GROUP_EV_CANCEL_REQUESTED,
    GROUP_EV_COMPLETED,
    POLICY_FAIL_FAST,
)
from conveyor_scheduler.client_webhooks.group_deliveries import deliver_group_events
from conveyor_scheduler.groups.events import (
    INSERT_EVENTS_SQL,
    GroupRow,
    group_event,
)
from conveyor_scheduler.groups.follow_up import children_outputs
from conveyor_scheduler.groups.store import FAIL_FAST_PREFIX, work_available
from conveyor_scheduler.store.changes import Changes
from conveyor_scheduler.store.convert import TrackedRow

logger = logging.getLogger(__name__)

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


_APPLY_SQL = text(
    """
    WITH d AS (
        SELECT * FROM unnest(CAST(:id AS uuid[]), CAST(:q AS int[]), CAST(:r AS int[]),
            CAST(:dn AS int[]), CAST(:s AS int[]), CAST(:f AS int[]), CAST(:c AS int[]),
            CAST(:p AS bigint[]), CAST(:n AS bigint[]))
            AS d(id, q, r, dn, s, f, c, p, n)
    ), locked AS MATERIALIZED (
        SELECT g.id FROM task_groups g WHERE g.id = ANY(CAST(:id AS uuid[]))
        ORDER BY g.id FOR UPDATE
    ), upd AS (
        UPDATE task_groups g SET queued = g.queued + d.q, running = g.running + d.r,
            done = g.done + d.dn, succeeded = g.succeeded + d.s, failed = g.failed + d.f,
            canceled = g.canceled + d.c, progress_sum = g.progress_sum + d.p,
            last_sequence = g.last_sequence + d.n, updated_at = :now
        FROM locked JOIN d ON d.id = locked.id
        WHERE g.id = locked.id
        RETURNING g.id, g.status, g.policy, g.total, g.done, g.succeeded, g.failed, g.canceled,
            g.running, g.queued, g.progress_sum, g.cancel_requested, g.last_sequence, d.n
    ), appended AS (
        INSERT INTO group_events (group_id, sequence, event_id, type, occurred_at, child_task_id,
            child_sequence, snap_status, snap_done, snap_succeeded, snap_failed, snap_canceled,
            snap_running, snap_queued, snap_progress_sum, snap_cancel_requested)
        SELECT u.id, u.last_sequence - u.n + c.k, gen_random_uuid(), 2, :now, c.t, c.s,
            u.status, u.done, u.succeeded, u.failed, u.canceled, u.running, u.queued,
            u.progress_sum, u.cancel_requested
        FROM unnest(CAST(:cg AS uuid[]), CAST(:ct AS uuid[]), CAST(:cs AS bigint[]),
            CAST(:ck AS bigint[])) AS c(g, t, s, k)
        JOIN upd u ON u.id = c.g
    )
    SELECT u.id FROM upd u
    WHERE u.status = 1 AND (u.done >= u.total
        OR (u.policy = 2 AND u.failed > 0 AND NOT u.cancel_requested))
    ORDER BY u.id
    """
)
"""One statement per transaction: lock the groups in id order, apply their children's differences
(a concurrent writer's committed change is re-read under the lock: ``x = x + d`` never loses one),
append the CHILD events with the group's counters after them (the reader builds the GroupEvent), and
return the groups to decide (their last child ended, or fail-fast applies)."""


def _share(status: int, progress: int) -> tuple[int, int, int, int, int, int, int]:
    """A child's share of its group's counters: (queued, running, done, succeeded, failed,
    canceled, progress), status 0 = not a child yet."""
    if status == 1:
        return (1, 0, 0, 0, 0, 0, progress)
    if status in (2, 3):
        return (0, 1, 0, 0, 0, 0, progress)
    if status == 4:
        return (0, 0, 1, 1, 0, 0, 100)
    if status == 6:
        return (0, 0, 1, 0, 0, 1, 100)
    if status in (5, 7, 8):
        return (0, 0, 1, 0, 1, 0, 100)
    return (0, 0, 0, 0, 0, 0, 0)


_DELTA_KEYS = ("q", "r", "dn", "s", "f", "c", "p")


async def on_flush(conn: AsyncConnection, changes: Changes) -> None:
    """Apply the differences of the children this transaction changed to their groups' counters,
    append the children's events to the groups' histories, and settle groups whose children are
    done (or fail fast).

    Per transaction: one statement locks the groups and applies the differences, one appends the
    events; a group that settles or fails fast (once per group) is recounted from its children
    first, so the decisive moment reads the truth, and saved with its new status."""
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
    deltas = {gid: [0, 0, 0, 0, 0, 0, 0] for gid in gids}
    for tid, gid in members.items():
        origin = changes.origins.get(tid)
        if origin is None or gid not in deltas:
            continue
        row = changes.dirty[tid]
        now_state = (row["status"], row["progress"])
        if now_state != origin:
            acc = deltas[gid]
            for i, (new, old) in enumerate(zip(_share(*now_state), _share(*origin), strict=True)):
                acc[i] += new - old
            changes.origins[tid] = now_state  # a second flush of this unit counts from here
            if isinstance(row, TrackedRow):
                row.origin = now_state
    refs: dict[str, list[Any]] = {"cg": [], "ct": [], "cs": [], "ck": []}
    for gid in gids:
        for k, (task_id, sequence) in enumerate(payloads[gid], start=1):
            refs["cg"].append(gid)
            refs["ct"].append(task_id)
            refs["cs"].append(sequence)
            refs["ck"].append(k)
    params: dict[str, Any] = {"id": gids, "now": changes.now, "n": [len(payloads[g]) for g in gids]}
    for i, key in enumerate(_DELTA_KEYS):
        params[key] = [deltas[g][i] for g in gids]
    decisive = [r[0] for r in await conn.execute(_APPLY_SQL, params | refs)]
    if decisive:
        await _decide(conn, decisive, changes.now)


async def _decide(conn: AsyncConnection, gids: list[uuid.UUID], now: datetime) -> None:
    """Settle (or fail fast) groups whose counters say so, from a recount of their children (the
    decisive moment reads the truth, and mends a drift were there one); their lock is held."""
    rows = await conn.execute(
        text("SELECT * FROM task_groups WHERE id = ANY(:ids) ORDER BY id"), {"ids": gids}
    )
    groups = {r["id"]: dict(r) for r in rows.mappings()}
    first_failed: dict[uuid.UUID, Any] = {}
    drifted: set[uuid.UUID] = set()
    for agg in (await conn.execute(_AGGREGATE_SQL, {"ids": gids})).mappings():
        g = groups[agg["group_id"]]
        counted = {c: int(agg[c]) for c in _COUNTERS}
        if any(g[c] != v for c, v in counted.items()):
            drifted.add(g["id"])
            logger.warning(
                "group aggregate recounted",
                extra={"group_id": str(g["id"]), "kept": {c: g[c] for c in _COUNTERS}},
            )
        g.update(counted)
        first_failed[g["id"]] = agg["first_failed"]
    events: list[dict[str, Any]] = []
    saved: list[GroupRow] = []
    settled: list[GroupRow] = []
    for gid in gids:
        g = groups[gid]
        settles = g["done"] == g["total"]
        fails_fast = (
            g["policy"] == POLICY_FAIL_FAST and g["failed"] > 0 and not g["cancel_requested"]
        )
        if not (settles or fails_fast):
            if gid in drifted:
                saved.append(g)
            continue
        g["updated_at"] = now
        if fails_fast:
            g["cancel_requested"] = True
            g["cancel_pending"] = not settles
            g["cancel_reason"] = f"{FAIL_FAST_PREFIX}child {first_failed.get(gid)} did not succeed"
            events.append(group_event(g, GROUP_EV_CANCEL_REQUESTED, now))
            work_available.set()
        if settles:
            g["status"] = settled_status(g)
            g["finished_at"] = now
            g["cancel_pending"] = False
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
    if saved:  # the decided groups and their events in one round trip
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
