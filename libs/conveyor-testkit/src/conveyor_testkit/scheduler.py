"""Helpers for tests and the benchmark: settings, schema reset, request and result builders, and the
invariant checker (limits never exceeded, one terminal state per task).
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import psycopg
from google.protobuf import struct_pb2
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.events.v1 import events_pb2
from conveyor.tasks.v1 import task_pb2
from conveyor_scheduler.admission.submit import NewTask, fingerprint
from conveyor_scheduler.dispatch.policy import Policy
from conveyor_scheduler.settings import SchedulerSettings
from conveyor_scheduler.store import db

TABLES = (
    "group_events",
    "task_groups",
    "active_slots",
    "task_events",
    "outbox",
    "inbox",
    "idempotency_keys",
    "tasks",
    "tenants",
    "model_controls",
    "provider_controls",
    "webhook_endpoints",
)


def make_settings(database_url: str, **overrides: Any) -> SchedulerSettings:
    """Settings for an in-process replica on ``database_url`` (no env needed)."""
    base: dict[str, Any] = {
        "database_url": database_url,
        "grpc_host": "127.0.0.1",
        "grpc_port": 0,
        "metrics_port": 0,
        "dispatch_poll_seconds": 0.2,
        "leader_retry_seconds": 0.2,
        "maintenance_seconds": 0.2,
        "notify_coalesce_seconds": 0.001,
        "notify_work_coalesce_seconds": 0.005,
        "provider_rate_per_second": 10_000.0,
        "provider_burst": 10_000,
        "tenant_submit_rate": 10_000.0,
        "tenant_submit_burst": 10_000,
    }
    base.update(overrides)
    return SchedulerSettings(**base)


async def migrate(database_url: str) -> None:
    """Build the schema by running the migrations (in a thread: alembic's env runs its own loop).

    ``run_in_executor``, not ``to_thread``: the thread must not inherit the test's context variables
    (a context left over by an earlier test on the session's loop made alembic's loop hang)."""
    await asyncio.get_running_loop().run_in_executor(None, db.migrate, database_url)


async def reset(engine: AsyncEngine) -> None:
    """Empty every table and zero the counters (between tests of one module)."""
    async with engine.begin() as conn:
        await conn.execute(text(f"TRUNCATE {', '.join(TABLES)} CASCADE"))
        await conn.execute(text("UPDATE queue_counters SET waiting = 0"))


def spec(
    *,
    kind: int = task_pb2.TASK_KIND_IMAGE,
    model: str = "acme/img",
    priority: int = task_pb2.PRIORITY_NORMAL,
    max_attempts: int = 0,
    prompt: str = "a cat",
    queue_deadline: datetime | None = None,
) -> task_pb2.TaskSpec:
    """A TaskSpec."""
    s = task_pb2.TaskSpec(kind=kind, model=model, priority=priority, max_attempts=max_attempts)  # type: ignore[arg-type]
    s.input.CopyFrom(struct_pb2.Struct())
    s.input.update({"prompt": prompt})
    if queue_deadline is not None:
        s.queue_deadline.FromDatetime(queue_deadline.astimezone(UTC))
    return s


def item(request_id: str | None = None, **kwargs: Any) -> NewTask:
    """A submit item."""
    s = spec(**kwargs)
    return NewTask(request_id or uuid.uuid4().hex, s, fingerprint(s))


def result(task_id: Any, attempt: int, outcome: str, **fields: Any) -> events_pb2.ProviderResult:
    """A ProviderResult with a fresh result id (pass ``result_id`` to repeat one)."""
    r = events_pb2.ProviderResult(
        result_id=fields.pop("result_id", uuid.uuid4().hex),
        task_id=str(task_id),
        attempt=attempt,
        prediction_id=fields.pop("prediction_id", f"p-{task_id}-{attempt}"),
    )
    r.observed_at.GetCurrentTime()
    if outcome == "started":
        r.started.SetInParent()
    elif outcome == "progress":
        r.progress.percent = fields.pop("percent", 50)
    elif outcome == "succeeded":
        r.succeeded.SetInParent()
    elif outcome == "failed":
        r.failed.code = fields.pop("code", "provider_error")
        r.failed.message = fields.pop("message", "boom")
        r.failed.retryable = fields.pop("retryable", True)
    elif outcome == "canceled":
        r.canceled.deadline_exceeded = fields.pop("deadline_exceeded", False)
    elif outcome == "aborted":
        r.aborted.message = "aborted"
    elif outcome == "throttled":
        r.throttled.provider = fields.pop("provider", "replicate")
        r.throttled.retry_at.FromDatetime(fields.pop("retry_at"))
    else:  # pragma: no cover
        raise ValueError(outcome)
    return r


async def check_invariants(engine: AsyncEngine, policy: Policy) -> dict[str, int]:
    """Assert every limit holds in ``active_slots`` and the bookkeeping is consistent.

    Returns the observed maxima (``global``, ``tenant``, ``model``, ``kind``).
    """
    async with engine.connect() as raw:
        # One REPEATABLE READ snapshot: concurrent writers never show a half-applied state.
        conn = await raw.execution_options(isolation_level="REPEATABLE READ")
        await conn.begin()
        usage = (
            await conn.execute(
                text(
                    "SELECT s.tenant_id, s.model, s.kind, sum(s.cost)::int AS used,"
                    " GROUPING(s.tenant_id, s.model, s.kind) AS g FROM active_slots s"
                    " GROUP BY GROUPING SETS ((s.tenant_id), (s.model), (s.kind), ())"
                )
            )
        ).all()
        tenants = {
            r.tenant_id: (r.tier, r.max_concurrency)
            for r in await conn.execute(
                text(
                    "SELECT tenant_id, COALESCE(tier, claimed_tier, 1) AS tier, max_concurrency"
                    " FROM tenants"
                )
            )
        }
        bad_slots = await conn.scalar(
            text(
                "SELECT count(*) FROM active_slots s JOIN tasks t ON t.id = s.task_id"
                " WHERE t.status NOT IN (2, 3) OR s.attempt <> t.attempt"
            )
        )
        missing_slots = await conn.scalar(
            text(
                "SELECT count(*) FROM tasks t WHERE t.status IN (2, 3)"
                " AND NOT EXISTS (SELECT 1 FROM active_slots s WHERE s.task_id = t.id)"
            )
        )
        terminal_events = await conn.scalar(
            text(
                "SELECT count(*) FROM tasks t WHERE t.status IN (4, 5, 6, 7, 8) AND"
                " (SELECT count(*) FROM task_events e WHERE e.task_id = t.id"
                "  AND e.generation = t.generation AND e.terminal) <> 1"
            )
        )
        gaps = await conn.scalar(
            text(
                "SELECT count(*) FROM tasks t WHERE t.last_sequence <>"
                " (SELECT count(*) FROM task_events e WHERE e.task_id = t.id)"
            )
        )
        waiting = (
            await conn.execute(
                text(
                    "SELECT t.tenant_id, t.waiting, (SELECT count(*) FROM tasks q"
                    " WHERE q.tenant_id = t.tenant_id AND q.status = 1) AS n FROM tenants t"
                )
            )
        ).all()
        inexact_groups = (
            await conn.execute(
                text(
                    "SELECT g.id, g.queued, g.running, g.done, g.succeeded, g.failed, g.canceled,"
                    " g.progress_sum, c.* FROM task_groups g CROSS JOIN LATERAL ("
                    " SELECT count(*) FILTER (WHERE status = 1) AS cq,"
                    " count(*) FILTER (WHERE status IN (2, 3)) AS cr,"
                    " count(*) FILTER (WHERE status IN (4, 5, 6, 7, 8)) AS cd,"
                    " count(*) FILTER (WHERE status = 4) AS cs,"
                    " count(*) FILTER (WHERE status IN (5, 7, 8)) AS cf,"
                    " count(*) FILTER (WHERE status = 6) AS cc,"
                    " COALESCE(sum(CASE WHEN status IN (4, 5, 6, 7, 8) THEN 100 ELSE progress"
                    " END), 0) AS cp FROM tasks t WHERE t.group_id = g.id) c"
                    " WHERE (g.queued, g.running, g.done, g.succeeded, g.failed, g.canceled,"
                    " g.progress_sum) IS DISTINCT FROM (c.cq, c.cr, c.cd, c.cs, c.cf, c.cc, c.cp)"
                )
            )
        ).all()
        shards = await conn.scalar(text("SELECT COALESCE(sum(waiting), 0) FROM queue_counters"))
        queued = await conn.scalar(text("SELECT count(*) FROM tasks WHERE status = 1"))
        slots = (
            await conn.execute(
                text(
                    "SELECT s.tenant_id, s.kind, s.cost, s.attempt, s.acquired_at, t.status"
                    " FROM active_slots s JOIN tasks t ON t.id = s.task_id ORDER BY s.acquired_at"
                )
            )
        ).all()
        await conn.rollback()
    maxima = {"global": 0, "tenant": 0, "model": 0, "kind": 0}
    for r in usage:
        if r.tenant_id is not None:
            tier, explicit = tenants[r.tenant_id]
            limit = policy.tenant_limit(tier, explicit)
            assert r.used <= limit, f"tenant {r.tenant_id} holds {r.used} > {limit}"
            maxima["tenant"] = max(maxima["tenant"], r.used)
        elif r.model is not None:
            limit = policy.model_limit(r.model)
            assert not limit or r.used <= limit, f"model {r.model} holds {r.used} > {limit}"
            maxima["model"] = max(maxima["model"], r.used)
        elif r.kind is not None:
            limit = policy.kind_limits.get(r.kind, 0)
            assert not limit or r.used <= limit, f"kind {r.kind} holds {r.used} > {limit}"
            maxima["kind"] = max(maxima["kind"], r.used)
        else:
            used = r.used or 0
            assert used <= policy.global_concurrency, f"global {used}: {slots}"
            maxima["global"] = max(maxima["global"], used)
    assert bad_slots == 0, f"{bad_slots} slots held by tasks not in flight (or stale attempt)"
    assert missing_slots == 0, f"{missing_slots} tasks in flight without a slot"
    assert terminal_events == 0, (
        f"{terminal_events} terminal tasks without exactly one terminal event"
    )
    assert gaps == 0, f"{gaps} tasks whose event sequence has gaps"
    for w in waiting:
        assert w.waiting == w.n, f"tenant {w.tenant_id} waiting counter {w.waiting} != {w.n}"
    assert shards == queued, f"global waiting {shards} != queued {queued}"
    assert not inexact_groups, f"group counters differ from their children: {inexact_groups}"
    return maxima


async def session_state(database_url: str, pid: int | None) -> str:
    """A backend's ``pg_stat_activity.state``, or ``gone`` when its session has ended."""
    conn = await psycopg.AsyncConnection.connect(
        database_url.replace("+psycopg", ""), autocommit=True
    )
    try:
        cursor = await conn.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", (pid,))
        row = await cursor.fetchone()
        return str(row[0]) if row else "gone"
    finally:
        await conn.close()
