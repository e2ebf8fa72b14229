"""A single submit: idempotency by request id, admission, the new task row, its SUBMITTED event.

Writers lock task rows first (``FOR UPDATE``, in id order), then tenant rows (sorted), then one
queue-counter shard, so they cannot deadlock with each other.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from conveyor.tasks.v1 import task_pb2
from conveyor_common.context import current_traceparent
from conveyor_common.errors import (
    FailedPrecondition,
)
from conveyor_common.ids import uuid7
from conveyor_common.vocabulary import EV_SUBMITTED
from conveyor_scheduler.admission.quota import _admit
from conveyor_scheduler.dispatch.policy import Policy
from conveyor_scheduler.groups.delays import apply_spec
from conveyor_scheduler.settings import SchedulerSettings
from conveyor_scheduler.store import models as m
from conveyor_scheduler.store.bulk import insert_new_tasks, raw_execute
from conveyor_scheduler.store.changes import Changes
from conveyor_scheduler.store.convert import (
    SNAPSHOT,
    TaskRow,
    from_ts,
    seed_spec,
    struct_to_dict,
)


@dataclass(frozen=True)
class NewTask:
    """One validated submit item."""

    request_id: str
    spec: task_pb2.TaskSpec
    fingerprint: bytes
    traceparent: str = ""
    """The submit's trace context (a coalesced submit brings its own); empty = the current one."""


def fingerprint(spec: task_pb2.TaskSpec) -> bytes:
    """Hash of the request body (deterministic serialization: map order does not matter)."""
    return hashlib.sha256(spec.SerializeToString(deterministic=True)).digest()


async def submit(
    conn: AsyncConnection,
    *,
    tenant_id: str,
    claimed_tier: int,
    items: Sequence[NewTask],
    policy: Policy,
    settings: SchedulerSettings,
    now: datetime,
    leave_pipeline: Callable[[], Awaitable[None]] | None = None,
) -> list[tuple[TaskRow, bool]]:
    """Admit ``items`` atomically (all or none). Returns (task, deduplicated) in item order.

    Idempotency keys go first: a duplicate takes no quota, and a concurrent duplicate waits on the
    primary key until the first commits, then reads its task. Admission (tenant waiting cap and
    submit rate in one conditional UPDATE of the tenant row; the global capacity from the sharded
    counter) raises ResourceExhausted, which rolls the transaction back: nothing is written.
    The common path runs on the raw connection (pipeline mode allowed, see :func:`submit_group`);
    ``leave_pipeline`` is awaited before any SQLAlchemy statement.
    """

    async def slow_path() -> None:
        if leave_pipeline is not None:
            await leave_pipeline()

    expires = now + timedelta(seconds=settings.idempotency_ttl_seconds)
    new_ids = {it.request_id: uuid7() for it in items}
    key_rows = [
        {
            "tenant_id": tenant_id,
            "request_id": it.request_id,
            "fingerprint": it.fingerprint,
            "task_id": new_ids[it.request_id],
            "created_at": now,
            "expires_at": expires,
        }
        for it in items
    ]
    fresh = {
        r[0]
        for r in await raw_execute(
            conn,
            _KEYS_SQL,
            {
                "tenant": tenant_id,
                "rids": [k["request_id"] for k in key_rows],
                "fps": [k["fingerprint"] for k in key_rows],
                "tids": [k["task_id"] for k in key_rows],
                "now": now,
                "exp": expires,
            },
        )
    }
    existing: dict[str, TaskRow] = {}
    dup_ids = [it.request_id for it in items if it.request_id not in fresh]
    if dup_ids:
        await slow_path()
        keys = await conn.execute(
            text(
                "SELECT request_id, fingerprint, task_id FROM idempotency_keys"
                " WHERE tenant_id = :t AND request_id = ANY(:r)"
            ),
            {"t": tenant_id, "r": dup_ids},
        )
        by_request = {r.request_id: (bytes(r.fingerprint), r.task_id) for r in keys}
        task_ids = {}
        for it in items:
            if it.request_id in fresh:
                continue
            fp, tid = by_request[it.request_id]
            if fp != it.fingerprint:
                raise FailedPrecondition(
                    f"request_id {it.request_id!r} was already used with a different request",
                    reason="IDEMPOTENCY_KEY_REUSED",
                )
            task_ids[it.request_id] = tid
        rows = await conn.execute(
            text("SELECT * FROM tasks WHERE id = ANY(:ids)"), {"ids": list(task_ids.values())}
        )
        by_id = {r["id"]: dict(r) for r in rows.mappings()}
        for rid, tid in task_ids.items():
            if tid not in by_id:
                raise FailedPrecondition(f"task of request_id {rid!r} was purged")
            existing[rid] = by_id[tid]
    new_items = [it for it in items if it.request_id in fresh]
    tier = claimed_tier
    if new_items:
        tier = await _admit(
            conn,
            tenant_id,
            claimed_tier,
            len(new_items),
            settings,
            now,
            policy,
            slow_path=slow_path,
        )
    changes = Changes(now=now)
    created: dict[str, TaskRow] = {}
    for it in new_items:
        row = new_task_row(new_ids[it.request_id], tenant_id, it, tier, policy, settings, now)
        created[it.request_id] = row
        row["last_sequence"] = 0
        row[SNAPSHOT] = changes.event(row, EV_SUBMITTED, 0).task
    if created:
        await insert_new_tasks(conn, list(created.values()), changes)
    out: list[tuple[TaskRow, bool]] = []
    for it in items:
        if it.request_id in created:
            out.append((created[it.request_id], False))
        else:
            out.append((existing[it.request_id], True))
    return out


_KEYS_SQL = text(
    """
    INSERT INTO idempotency_keys (tenant_id, request_id, fingerprint, task_id, created_at, expires_at)
    SELECT :tenant, u.r, u.f, u.t, :now, :exp
    FROM unnest(CAST(:rids AS text[]), CAST(:fps AS bytea[]), CAST(:tids AS uuid[])) AS u(r, f, t)
    ON CONFLICT (tenant_id, request_id) DO UPDATE SET
        fingerprint = excluded.fingerprint, task_id = excluded.task_id,
        created_at = excluded.created_at, expires_at = excluded.expires_at
    WHERE idempotency_keys.expires_at < :now
    RETURNING request_id
    """
)
"""Record the keys; a key seen before (and not expired) is not returned: a duplicate."""


@dataclass(frozen=True)
class SubmitRequest:
    """One caller's single-item submit (grouped by :func:`submit_group`)."""

    tenant_id: str
    claimed_tier: int
    item: NewTask


def new_task_row(
    task_id: uuid.UUID,
    tenant_id: str,
    item: NewTask,
    tier: int,
    policy: Policy,
    settings: SchedulerSettings,
    now: datetime,
) -> TaskRow:
    """The row of a newly admitted task."""
    spec = item.spec
    priority = spec.priority or task_pb2.PRIORITY_NORMAL
    target = spec.WhichOneof("target")
    run_timeout = (
        int(spec.run_timeout.ToTimedelta().total_seconds())
        if spec.HasField("run_timeout")
        else settings.default_run_timeout_seconds
    )
    row: TaskRow = {
        "id": task_id,
        "tenant_id": tenant_id,
        "request_id": item.request_id,
        "kind": int(spec.kind),
        "model": spec.deployment if target == "deployment" else spec.model,
        "is_deployment": target == "deployment",
        "input": struct_to_dict(spec.input),
        "priority": int(priority),
        "tier": tier,
        "status": m.QUEUED,
        "progress": 0,
        "attempt": 0,
        "attempt_base": 0,
        "max_attempts": spec.max_attempts or settings.default_max_attempts,
        "generation": 0,
        "prediction_id": None,
        "submit_state": None,
        "submit_started_at": None,
        "cancel_requested": False,
        "cancel_reason": None,
        "queue_deadline": from_ts(spec.queue_deadline) if spec.HasField("queue_deadline") else None,
        "run_timeout_s": max(1, run_timeout),
        "run_deadline": None,
        "not_before": None,
        "created_at": now,
        "updated_at": now,
        "enqueued_at": now,
        "dispatched_at": None,
        "dispatch_emitted_at": None,
        "started_at": None,
        "finished_at": None,
        "last_provider_update_at": None,
        "result": None,
        "error_code": None,
        "error_message": None,
        "error_retryable": None,
        "last_sequence": 0,
        "labels": dict(spec.labels),
        "webhook_url": spec.webhook.url or None if spec.HasField("webhook") else None,
        "traceparent": item.traceparent or current_traceparent(),
        "webhook_events": [int(e) for e in spec.webhook.events]
        if spec.HasField("webhook")
        else None,
        "slot_cost": policy.cost(int(spec.kind)),
        "rank": policy.rank(int(priority), tier, now),
    }
    apply_spec(row, spec, policy, now)
    seed_spec(row, spec.input)
    return row
