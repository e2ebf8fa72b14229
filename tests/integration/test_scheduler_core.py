"""Scheduler core on real PostgreSQL: submit/get/list/cancel, idempotency, admission, events history,
dispatch within limits, provider results, retries/dead-letter/redrive, the submit protocol, expiry,
rescue, aging and fair share, and migrations == models.

Dispatch cycles are driven by hand through the same Dispatcher the leader loop runs, so each test
controls exactly when dispatch happens.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text

from conveyor.tasks.v1 import task_pb2
from conveyor_common.errors import FailedPrecondition, NotFound, ResourceExhausted
from conveyor_scheduler import testing as kit
from conveyor_scheduler.core import SchedulerCore
from conveyor_scheduler.dispatch.cycle import Dispatcher
from conveyor_scheduler.dispatch.leadership import Leader
from conveyor_scheduler.dispatch.wakeups import Wakeups
from conveyor_scheduler.store import db, models

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


@pytest.fixture(scope="module")
async def sched_url(database_url: str) -> str:
    await kit.migrate(database_url)
    return database_url


@dataclass
class Env:
    core: SchedulerCore
    dispatcher: Dispatcher
    leader: Leader

    async def dispatch(self) -> int:
        return await self.dispatcher.cycle()

    async def scalar(self, sql: str, **params: Any) -> Any:
        async with self.core.engine.connect() as conn:
            return await conn.scalar(text(sql), params)

    async def rows(self, sql: str, **params: Any) -> list[Any]:
        async with self.core.engine.connect() as conn:
            return list((await conn.execute(text(sql), params)).all())

    async def task(self, task_id: Any) -> dict[str, Any]:
        async with self.core.engine.connect() as conn:
            row = (
                (await conn.execute(text("SELECT * FROM tasks WHERE id = :id"), {"id": task_id}))
                .mappings()
                .one()
            )
            return dict(row)

    async def check(self) -> dict[str, int]:
        return await kit.check_invariants(self.core.engine, self.core.policy)


@pytest.fixture
async def make_env(sched_url: str) -> AsyncIterator[Callable[..., Awaitable[Env]]]:
    envs: list[Env] = []

    async def make(**overrides: Any) -> Env:
        settings = kit.make_settings(sched_url, **overrides)
        engine = db.create_engine(sched_url, pool_size=5)
        if not envs:
            await kit.reset(engine)
        core = SchedulerCore(engine, settings, wakeups=Wakeups())
        leader = Leader(settings, sched_url, f"test-{len(envs)}")
        env = Env(core, Dispatcher(settings, core.policy, leader, core.wakeups), leader)
        envs.append(env)
        return env

    yield make
    for env in envs:
        await env.leader.dispose()
        await env.core.engine.dispose()


async def _leader_env(make_env: Callable[..., Awaitable[Env]], **overrides: Any) -> Env:
    env = await make_env(**overrides)
    assert await env.leader.try_acquire()
    return env


# ------------------------------------------------------------------------------------------------
# Submit, read, cancel


async def test_submit_get_list_cancel_and_history(make_env: Callable[..., Awaitable[Env]]) -> None:
    env = await make_env()
    [(row, dedup)] = await env.core.submit("t1", task_pb2.TIER_FREE, [kit.item("r1")])
    assert not dedup
    assert row["status"] == models.QUEUED
    task = await env.core.get_task("t1", str(row["id"]))
    assert task.status == task_pb2.TASK_STATUS_QUEUED
    assert task.queue_position == 1
    assert task.spec.model == "acme/img"
    assert task.last_sequence == 1
    # Another tenant's task answers exactly like a missing one.
    with pytest.raises(NotFound) as other:
        await env.core.get_task("t2", str(row["id"]))
    with pytest.raises(NotFound) as missing:
        await env.core.get_task("t2", str(uuid.uuid4()))
    assert other.value.code == missing.value.code

    second = [await env.core.submit("t1", 1, [kit.item()]) for _ in range(3)]
    listed, token = await env.core.list_tasks("t1", page_size=2)
    assert [r["id"] for r in listed] == [second[2][0][0]["id"], second[1][0][0]["id"]]
    rest, token2 = await env.core.list_tasks("t1", page_size=2, page_token=token)
    assert [r["id"] for r in rest] == [second[0][0][0]["id"], row["id"]]
    assert token2 == ""
    assert (await env.core.list_tasks("t2"))[0] == []

    canceled = await env.core.cancel("t1", str(row["id"]), "changed my mind")
    assert canceled["status"] == models.CANCELED
    events, terminal, last = await env.core.task_events("t1", str(row["id"]), 0, 100)
    assert terminal
    assert last == 2
    assert [e.type for e in events] == [
        task_pb2.TASK_EVENT_TYPE_SUBMITTED,
        task_pb2.TASK_EVENT_TYPE_CANCELED,
    ]
    assert [e.sequence for e in events] == [1, 2]
    assert events[1].task.status == task_pb2.TASK_STATUS_CANCELED
    resumed, _, _ = await env.core.task_events("t1", str(row["id"]), 1, 100)
    assert [e.sequence for e in resumed] == [2]
    # Cancel again: idempotent, nothing new.
    again = await env.core.cancel("t1", str(row["id"]), "")
    assert again["last_sequence"] == 2
    # Every event went to the outbox keyed by the task id, in sequence order.
    keys = await env.rows(
        "SELECT key, topic FROM outbox WHERE key = :k ORDER BY id", k=str(row["id"])
    )
    assert [k.topic for k in keys] == ["conveyor.tasks.v1.events"] * 2
    await env.check()


async def test_idempotent_submit(make_env: Callable[..., Awaitable[Env]]) -> None:
    env = await make_env()
    it = kit.item("same")
    [(first, d1)] = await env.core.submit("t1", 1, [it])
    [(again, d2)] = await env.core.submit("t1", 1, [it])
    assert (d1, d2) == (False, True)
    assert again["id"] == first["id"]
    with pytest.raises(FailedPrecondition):
        await env.core.submit("t1", 1, [kit.item("same", prompt="a dog")])
    # The same request id of another tenant is another task.
    [(other, d3)] = await env.core.submit("t2", 1, [it])
    assert not d3
    assert other["id"] != first["id"]

    # Concurrent identical submits (separate transactions, same key): exactly one task.
    race = kit.item("race")
    results = await asyncio.gather(*(env.core.submit("t1", 1, [race]) for _ in range(8)))
    ids = {r[0][0]["id"] for r in results}
    assert len(ids) == 1
    assert sum(1 for r in results if not r[0][1]) == 1
    assert await env.scalar("SELECT count(*) FROM tasks WHERE request_id = 'race'") == 1
    await env.check()


async def test_admission_rejections_write_nothing(make_env: Callable[..., Awaitable[Env]]) -> None:
    env = await make_env(
        queue_capacity=5, tenant_max_waiting=3, tenant_submit_burst=4, tenant_submit_rate=0.001
    )
    first = kit.item("a-first")
    await env.core.submit("a", 1, [first])
    for _ in range(2):
        await env.core.submit("a", 1, [kit.item()])
    before = await env.rows(
        "SELECT (SELECT count(*) FROM tasks), (SELECT count(*) FROM outbox),"
        " (SELECT count(*) FROM task_events), (SELECT count(*) FROM idempotency_keys),"
        " (SELECT sum(waiting) FROM queue_counters), (SELECT waiting FROM tenants WHERE tenant_id='a')"
    )
    with pytest.raises(ResourceExhausted) as cap:
        await env.core.submit("a", 1, [kit.item("over-cap")])
    assert "waiting" in cap.value.violations[0].subject
    assert cap.value.retry_after_seconds > 0
    await env.core.submit("b", 1, [kit.item(), kit.item()])
    # The queue is full (5 of 5): c's weighted share is 5 // 3 = 1, so a batch of two is refused
    # (a single task would be admitted: a tenant below its share keeps room).
    with pytest.raises(ResourceExhausted) as full:
        await env.core.submit("c", 1, [kit.item("over-global"), kit.item("over-global-2")])
    assert full.value.violations[0].subject == "queue"
    after = await env.rows(
        "SELECT (SELECT count(*) FROM tasks), (SELECT count(*) FROM outbox),"
        " (SELECT count(*) FROM task_events), (SELECT count(*) FROM idempotency_keys),"
        " (SELECT sum(waiting) FROM queue_counters), (SELECT waiting FROM tenants WHERE tenant_id='a')"
    )
    assert after[0][0] == before[0][0] + 2  # only b's two tasks
    assert after[0][5] == before[0][5] == 3
    assert (
        await env.scalar("SELECT count(*) FROM idempotency_keys WHERE request_id LIKE 'over-%'")
        == 0
    )
    # A duplicate of an admitted task is answered even when the queue is full.
    [(dup_row, dup)] = await env.core.submit("a", 1, [first])
    assert dup
    assert dup_row["request_id"] == "a-first"
    await env.check()


async def test_submit_rate_limit(make_env: Callable[..., Awaitable[Env]]) -> None:
    env = await make_env(tenant_submit_burst=3, tenant_submit_rate=0.01)
    await env.core.submit("r", 1, [kit.item() for _ in range(3)])
    with pytest.raises(ResourceExhausted) as exc:
        await env.core.submit("r", 1, [kit.item("too-fast")])
    assert exc.value.violations[0].subject.endswith("submit_rate")
    assert exc.value.retry_after_seconds > 10
    assert await env.scalar("SELECT count(*) FROM tasks WHERE tenant_id = 'r'") == 3


async def test_a_tenant_created_by_an_admin_starts_with_a_full_submit_bucket(
    make_env: Callable[..., Awaitable[Env]],
) -> None:
    env = await make_env(tenant_submit_burst=5, tenant_submit_rate=0.01)
    await env.core.upsert_tenant("fresh", 0, task_pb2.TenantLimits())
    await env.core.submit("fresh", 1, [kit.item() for _ in range(5)])
    with pytest.raises(ResourceExhausted):  # the burst still caps it
        await env.core.submit("fresh", 1, [kit.item("sixth")])
    assert await env.scalar("SELECT count(*) FROM tasks WHERE tenant_id = 'fresh'") == 5


# ------------------------------------------------------------------------------------------------
# Dispatch within limits, results


async def test_dispatch_respects_limits_and_results_free_slots(
    make_env: Callable[..., Awaitable[Env]],
) -> None:
    env = await _leader_env(make_env, global_concurrency=5)
    for tenant in ("a", "b"):
        await env.core.submit(tenant, 1, [kit.item() for _ in range(5)])
    await env.core.submit("v", 1, [kit.item(kind=task_pb2.TASK_KIND_VIDEO) for _ in range(3)])
    n = await env.dispatch()
    assert 1 <= n <= 5
    maxima = await env.check()
    assert maxima["global"] <= 5
    assert maxima["tenant"] <= 3
    assert await env.dispatch() == 0  # saturated
    active = await env.rows("SELECT id, attempt FROM tasks WHERE status = 2 ORDER BY id")
    # One DispatchTask and one DISPATCHED event per dispatched task, keyed by task id.
    cmds = await env.scalar(
        "SELECT count(*) FROM outbox WHERE topic = 'conveyor.provider.v1.commands'"
        " AND ce_type = 'conveyor.events.v1.DispatchTask'"
    )
    assert cmds == len(active)
    first = active[0]
    await env.core.apply_results([kit.result(first.id, first.attempt, "started")])
    dup = kit.result(first.id, first.attempt, "progress", percent=40)
    await env.core.apply_results([dup])
    await env.core.apply_results([dup])  # redelivery: the inbox absorbs it
    stale = kit.result(first.id, first.attempt + 1, "succeeded")
    await env.core.apply_results([stale])  # another attempt's: ignored
    row = await env.task(first.id)
    assert row["status"] == models.RUNNING
    assert row["progress"] == 40
    assert row["last_sequence"] == 4  # submitted, dispatched, started, progress
    await env.core.apply_results([kit.result(first.id, first.attempt, "succeeded")])
    row = await env.task(first.id)
    assert row["status"] == models.SUCCEEDED
    assert row["progress"] == 100
    assert await env.scalar("SELECT count(*) FROM active_slots WHERE task_id = :t", t=first.id) == 0
    assert await env.dispatch() >= 1  # the freed slot is used again
    await env.check()
    # Drain everything: all end succeeded, limits held throughout.
    for _ in range(100):
        rows = await env.rows("SELECT id, attempt FROM tasks WHERE status IN (2, 3)")
        if not rows and await env.scalar("SELECT count(*) FROM tasks WHERE status = 1") == 0:
            break
        await env.core.apply_results([kit.result(r.id, r.attempt, "succeeded") for r in rows])
        await env.dispatch()
        await env.check()
    assert await env.scalar("SELECT count(*) FROM tasks WHERE status <> 4") == 0


async def test_model_pause_kind_limit_and_throttle(make_env: Callable[..., Awaitable[Env]]) -> None:
    env = await _leader_env(make_env, global_concurrency=10, kind_limits={"video": 2})
    await env.core.submit(
        "a", 3, [kit.item(kind=task_pb2.TASK_KIND_VIDEO, model="acme/vid") for _ in range(3)]
    )
    await env.core.submit("b", 3, [kit.item(model="acme/paused") for _ in range(2)])
    await env.core.set_model_paused("acme/paused", True, "maintenance")
    assert await env.dispatch() == 1  # one video (cost 2) fills the video limit of 2
    assert (
        await env.scalar("SELECT count(*) FROM tasks WHERE model = 'acme/paused' AND status = 1")
        == 2
    )
    await env.core.set_model_paused("acme/paused", False, None)
    # Throttle: the provider is paused until retry_at; dispatch resumes afterwards.
    vid = (await env.rows("SELECT id, attempt FROM tasks WHERE status = 2"))[0]
    until = datetime.now(UTC) + timedelta(seconds=1.0)
    await env.core.apply_results([kit.result(vid.id, vid.attempt, "throttled", retry_at=until)])
    assert await env.dispatch() == 0
    assert env.dispatcher.next_wake is not None
    await asyncio.sleep(1.1)
    assert await env.dispatch() == 2  # the two unpaused image tasks
    await env.check()


async def test_retry_backoff_dead_letter_and_redrive(
    make_env: Callable[..., Awaitable[Env]],
) -> None:
    env = await _leader_env(
        make_env, retry_base_seconds=0.5, retry_max_seconds=0.5, retry_jitter=0.0
    )
    [(row, _)] = await env.core.submit("a", 1, [kit.item(max_attempts=2)])
    tid = row["id"]
    assert await env.dispatch() == 1
    await env.core.apply_results([kit.result(tid, 1, "failed", retryable=True)])
    t = await env.task(tid)
    assert t["status"] == models.QUEUED
    assert t["not_before"] is not None
    assert t["enqueued_at"] == row["enqueued_at"]  # keeps its place in line
    assert await env.dispatch() == 0  # backoff not over
    await asyncio.sleep(0.6)
    assert await env.dispatch() == 1
    await env.core.apply_results([kit.result(tid, 2, "failed", retryable=True)])
    t = await env.task(tid)
    assert t["status"] == models.DEAD_LETTERED
    dlq = await env.scalar(
        "SELECT count(*) FROM outbox WHERE topic = 'conveyor.tasks.v1.dead-letter' AND key = :k",
        k=str(tid),
    )
    assert dlq == 1
    await env.check()
    ids = await env.core.bulk(
        "redrive",
        task_ids=[str(tid)],
        tenant_id="",
        model="",
        statuses=[models.DEAD_LETTERED],
        created_before=None,
        limit=10,
    )
    assert ids == [tid]
    t = await env.task(tid)
    assert (t["status"], t["generation"], t["attempt"], t["attempt_base"]) == (
        models.QUEUED,
        1,
        2,
        2,
    )
    assert await env.dispatch() == 1
    await env.core.apply_results([kit.result(tid, 3, "succeeded")])
    t = await env.task(tid)
    assert t["status"] == models.SUCCEEDED
    events, _, _ = await env.core.task_events("a", str(tid), 0, 100)
    assert [e.type for e in events] == [1, 2, 7, 2, 10, 12, 2, 5]
    # A non-retryable failure fails at once.
    [(row2, _)] = await env.core.submit("a", 1, [kit.item()])
    assert await env.dispatch() == 1
    await env.core.apply_results([kit.result(row2["id"], 1, "failed", retryable=False)])
    assert (await env.task(row2["id"]))["status"] == models.FAILED
    await env.check()


async def test_cancel_paths(make_env: Callable[..., Awaitable[Env]]) -> None:
    env = await _leader_env(
        make_env, global_concurrency=10, tier_concurrency={"free": 10, "premium": 10, "pro": 10}
    )
    rows = [r for r, _ in await env.core.submit("a", 1, [kit.item() for _ in range(3)])]
    assert await env.dispatch() == 3
    before_begin, submitting, running = (r["id"] for r in rows)
    # Dispatched, no BeginSubmit yet: canceled at once, slot freed, BeginSubmit then says STOP.
    c = await env.core.cancel("a", str(before_begin), "x")
    assert c["status"] == models.CANCELED
    assert (await env.core.begin_submit(str(before_begin), 1))[0] == 2  # STOP
    # Submitting: cancel requested + CancelTask; slot kept until the provider reports.
    assert (await env.core.begin_submit(str(submitting), 1))[0] == 1  # PROCEED
    c = await env.core.cancel("a", str(submitting), "y")
    assert c["status"] == models.DISPATCHED
    assert c["cancel_requested"]
    assert (
        await env.scalar(
            "SELECT count(*) FROM outbox WHERE ce_type = 'conveyor.events.v1.CancelTask' AND key = :k",
            k=str(submitting),
        )
        == 1
    )
    assert (
        await env.scalar("SELECT count(*) FROM active_slots WHERE task_id = :t", t=submitting) == 1
    )
    await env.core.apply_results([kit.result(submitting, 1, "canceled")])
    assert (await env.task(submitting))["status"] == models.CANCELED
    # Running, and a success races the cancel: the provider's answer wins.
    await env.core.apply_results([kit.result(running, 1, "started")])
    await env.core.cancel("a", str(running), "z")
    await env.core.apply_results([kit.result(running, 1, "succeeded")])
    assert (await env.task(running))["status"] == models.SUCCEEDED
    await env.check()
    # Concurrent cancels of one queued task: exactly one CANCELED event.
    [(q, _)] = await env.core.submit("a", 1, [kit.item()])
    await asyncio.gather(*(env.core.cancel("a", str(q["id"]), "") for _ in range(5)))
    assert (
        await env.scalar(
            "SELECT count(*) FROM task_events WHERE task_id = :t AND type = 9", t=q["id"]
        )
        == 1
    )
    await env.check()


async def test_submit_protocol(make_env: Callable[..., Awaitable[Env]]) -> None:
    env = await _leader_env(make_env)
    [(row, _)] = await env.core.submit("a", 1, [kit.item()])
    tid = str(row["id"])
    assert await env.dispatch() == 1
    assert (await env.core.begin_submit(tid, 2))[0] == 2  # stale attempt: STOP
    assert (await env.core.begin_submit(tid, 1))[0] == 1  # PROCEED
    decision, r = await env.core.begin_submit(tid, 1)  # duplicate dispatch: RECONCILE
    assert decision == 4
    assert r is not None
    assert r["submit_started_at"] is not None
    assert await env.core.mark_submit_unknown(tid, 1)
    assert (await env.core.begin_submit(tid, 1))[0] == 4
    in_flight, _ = await env.core.list_in_flight(None, 10, "")
    assert [(str(x["id"]), x["submit_state"]) for x in in_flight] == [(tid, 3)]
    assert await env.core.complete_submit(tid, 1, "pred-1")
    assert not await env.core.complete_submit(tid, 1, "pred-2")
    t = await env.task(row["id"])
    assert (t["status"], t["prediction_id"], t["submit_state"]) == (models.RUNNING, "pred-1", 4)
    decision, r = await env.core.begin_submit(tid, 1)
    assert decision == 3
    assert r is not None
    assert r["prediction_id"] == "pred-1"
    await env.check()


async def test_expiry_and_rescue(make_env: Callable[..., Awaitable[Env]]) -> None:
    from conveyor_scheduler.sweeps import expiry as transitions

    env = await _leader_env(make_env, global_concurrency=1)
    now = datetime.now(UTC)
    [(keep, _)] = await env.core.submit("a", 1, [kit.item()])
    [(exp, _)] = await env.core.submit(
        "a", 1, [kit.item(queue_deadline=now + timedelta(milliseconds=200))]
    )
    assert await env.dispatch() == 1
    await asyncio.sleep(0.3)
    async with env.core.engine.begin() as conn:
        changes = await transitions.expire_due(conn, datetime.now(UTC))
    assert len(changes.events) == 1
    t = await env.task(exp["id"])
    assert t["status"] == models.EXPIRED
    # Rescue: the dispatched task never got BeginSubmit: its DispatchTask is re-emitted, same
    # attempt, and the slot stays held.
    async with env.core.engine.begin() as conn:
        rescued = await transitions.rescue_dispatches(
            conn, datetime.now(UTC) + timedelta(seconds=60), 30, "replicate", env.core.policy
        )
    assert len(rescued.outbox) == 1
    assert (
        await env.scalar(
            "SELECT count(*) FROM outbox WHERE ce_type = 'conveyor.events.v1.DispatchTask' AND key = :k",
            k=str(keep["id"]),
        )
        == 2
    )
    assert await env.scalar("SELECT count(*) FROM active_slots") == 1
    await env.check()


# ------------------------------------------------------------------------------------------------
# Priority: aging and fair share


async def test_aging_lets_an_old_low_task_go_first(make_env: Callable[..., Awaitable[Env]]) -> None:
    # 60 class steps per minute = one class per second: a low task that waited 2.5 s outranks a
    # normal task submitted now.
    env = await _leader_env(make_env, global_concurrency=1, aging_rate_per_minute=60.0)
    [(low, _)] = await env.core.submit("a", 1, [kit.item(priority=task_pb2.PRIORITY_LOW)])
    [(high, _)] = await env.core.submit("b", 1, [kit.item(priority=task_pb2.PRIORITY_HIGH)])
    await asyncio.sleep(0.05)
    assert await env.dispatch() == 1
    assert (await env.task(high["id"]))["status"] == models.DISPATCHED  # fresh: class decides
    await env.core.apply_results([kit.result(high["id"], 1, "succeeded")])
    await asyncio.sleep(1.6)
    [(normal, _)] = await env.core.submit("c", 1, [kit.item(priority=task_pb2.PRIORITY_NORMAL)])
    assert await env.dispatch() == 1
    assert (await env.task(low["id"]))["status"] == models.DISPATCHED
    assert (await env.task(normal["id"]))["status"] == models.QUEUED


async def test_fair_share_light_tenant_not_stuck_behind_flood(
    make_env: Callable[..., Awaitable[Env]],
) -> None:
    env = await _leader_env(
        make_env,
        global_concurrency=2,
        tier_concurrency={"free": 2, "premium": 2, "pro": 2},
        aging_rate_per_minute=0.0,
    )
    await env.core.submit("flood", 1, [kit.item() for _ in range(100)])
    await env.core.submit("light", 1, [kit.item() for _ in range(5)])
    order: list[str] = []
    for _ in range(60):
        await env.dispatch()
        rows = await env.rows("SELECT id, attempt, tenant_id FROM tasks WHERE status = 2")
        order += [r.tenant_id for r in rows]
        await env.core.apply_results([kit.result(r.id, r.attempt, "succeeded") for r in rows])
        if order.count("light") == 5:
            break
    # Equal weights: the light tenant's 5 tasks go out within the first ~10 dispatches, not after
    # the flood's 100.
    last_light = max(i for i, t in enumerate(order) if t == "light")
    assert last_light < 12, order[:20]
    await env.check()


# ------------------------------------------------------------------------------------------------
# Schema


async def test_migrations_equal_models(sched_url: str) -> None:
    engine = db.create_engine(sched_url, pool_size=1)

    def diff(conn: Any) -> list[Any]:
        ctx = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": True}
        )
        return list(compare_metadata(ctx, db.target_metadata()))

    try:
        async with engine.connect() as conn:
            changes = await conn.run_sync(diff)
        assert changes == []
        await db.check_schema(engine)
    finally:
        await engine.dispose()


# ------------------------------------------------------------------------------------------------
# Maintenance, stats, ETA


async def test_reconcile_gauges_retention_stats_and_eta(
    make_env: Callable[..., Awaitable[Env]],
) -> None:
    from prometheus_client import CollectorRegistry

    from conveyor_scheduler.metrics import SchedulerMetrics
    from conveyor_scheduler.sweeps import maintenance

    env = await _leader_env(make_env, global_concurrency=1, outbox_retention_seconds=0)
    await env.core.submit("a", 1, [kit.item() for _ in range(4)])
    assert await env.dispatch() == 1
    # A recent success gives the ETA basis.
    [done] = await env.rows("SELECT id, attempt FROM tasks WHERE status = 2")
    await env.core.apply_results([kit.result(done.id, done.attempt, "started")])
    await asyncio.sleep(0.05)
    await env.core.apply_results([kit.result(done.id, done.attempt, "succeeded")])
    assert await env.dispatch() == 1
    queued = await env.rows(
        "SELECT id FROM tasks WHERE status = 1 ORDER BY rank DESC, enqueued_at, id"
    )
    last = await env.core.get_task("a", str(queued[-1].id))
    assert last.queue_position == 2
    assert last.HasField("estimated_start_at")
    first = await env.core.get_task("a", str(queued[0].id))
    assert first.estimated_start_at.ToDatetime() <= last.estimated_start_at.ToDatetime()

    stats = await env.core.queue_stats(0, "", None)
    total = next(s for s in stats if s["model"] == "" and s["kind"] == task_pb2.TASK_KIND_IMAGE)
    assert (total["waiting"], total["active"], total["succeeded"]) == (2, 1, 1)
    assert total["oldest_waiting_age"] > 0
    assert total["recent_run_time_p50"] > 0

    # Counters drift (a bug, a manual edit): the reconcile repairs them.
    async with env.core.engine.begin() as conn:
        await conn.execute(text("UPDATE tenants SET waiting = waiting + 5 WHERE tenant_id = 'a'"))
        await conn.execute(text("UPDATE queue_counters SET waiting = waiting + 7 WHERE shard = 3"))
    assert await maintenance.reconcile_counters(env.core.engine) == 2
    await env.check()
    assert await maintenance.reconcile_counters(env.core.engine) == 0

    registry = CollectorRegistry()
    metrics = SchedulerMetrics(registry)
    await maintenance.refresh_gauges(env.core.engine, env.core.policy, metrics)
    assert (
        registry.get_sample_value(
            "conveyor_scheduler_queue_depth", {"kind": "image", "priority": "normal"}
        )
        == 2
    )
    assert registry.get_sample_value("conveyor_scheduler_active_slots", {"scope": "global"}) == 1
    async with env.core.engine.begin() as conn:
        await conn.execute(text("UPDATE outbox SET published_at = now() - interval '1 minute'"))
    await maintenance.retention(env.core.engine, env.core.settings)
    assert await env.scalar("SELECT count(*) FROM outbox") == 0


async def test_rerank_matches_the_policy(make_env: Callable[..., Awaitable[Env]]) -> None:
    from conveyor_scheduler.__main__ import rerank
    from conveyor_scheduler.dispatch.policy import Policy

    env = await make_env(aging_rate_per_minute=0.2)
    rows = [
        r
        for r, _ in await env.core.submit(
            "a", task_pb2.TIER_PRO, [kit.item(priority=p) for p in (1, 2, 3, 4)]
        )
    ]
    faster = kit.make_settings(
        env.core.settings.database_url.get_secret_value(), aging_rate_per_minute=3.0
    )
    assert await rerank(faster) == 4
    policy = Policy.from_settings(faster)
    for row in rows:
        stored = (await env.task(row["id"]))["rank"]
        assert stored == pytest.approx(
            policy.rank(row["priority"], row["tier"], row["enqueued_at"])
        )


async def test_saturated_model_at_the_head_does_not_block_a_tenant(
    make_env: Callable[..., Awaitable[Env]],
) -> None:
    env = await _leader_env(make_env, global_concurrency=10, model_limits={"m/x": 1})
    await env.core.submit(
        "a", 1, [kit.item(model="m/x", priority=task_pb2.PRIORITY_HIGH) for _ in range(3)]
    )
    await env.core.submit("a", 1, [kit.item(model="m/y") for _ in range(3)])
    assert await env.dispatch() == 1  # one m/x: the model limit
    assert await env.dispatch() == 2  # the tenant's m/y tasks behind it go next (tenant limit 3)
    assert await env.dispatch() == 0
    rows = await env.rows("SELECT model, count(*) AS n FROM tasks WHERE status = 2 GROUP BY model")
    assert {r.model: r.n for r in rows} == {"m/x": 1, "m/y": 2}
    # The m/x slot frees: the next m/x task goes out (the cache is re-read for it).
    [x] = await env.rows("SELECT id, attempt FROM tasks WHERE status = 2 AND model = 'm/x'")
    await env.core.apply_results([kit.result(x.id, x.attempt, "succeeded")])
    assert await env.dispatch() == 1
    assert await env.scalar("SELECT count(*) FROM tasks WHERE status = 2 AND model = 'm/x'") == 1
    await env.check()


async def _drain(env: Env, rounds: int = 50) -> list[Any]:
    """Dispatch and complete until nothing is left, checking every limit after each step.

    Returns the dispatched (task id, slot cost) in dispatch order.
    """
    order: list[Any] = []
    for _ in range(rounds):
        await env.dispatch()
        await env.check()
        rows = await env.rows(
            "SELECT s.task_id, s.attempt, s.cost FROM active_slots s ORDER BY s.acquired_at"
        )
        order += [(r.task_id, r.cost) for r in rows if (r.task_id, r.cost) not in order]
        if not rows:
            if await env.scalar("SELECT count(*) FROM tasks WHERE status = 1") == 0:
                break
            continue
        await env.core.apply_results([kit.result(r.task_id, r.attempt, "succeeded") for r in rows])
    return order


async def test_task_costlier_than_its_tenant_limit_runs_alone_and_blocks_nothing(
    make_env: Callable[..., Awaitable[Env]],
) -> None:
    env = await _leader_env(make_env, global_concurrency=5)
    await env.core.upsert_tenant("a", 0, task_pb2.TenantLimits(max_concurrency=1))
    [(video, _)] = await env.core.submit("a", 1, [kit.item(kind=task_pb2.TASK_KIND_VIDEO)])
    images = await env.core.submit("a", 1, [kit.item() for _ in range(3)])
    assert video["slot_cost"] == 2  # the nominal cost stays; the clamp happens at dispatch
    assert await env.dispatch() == 1
    [slot] = await env.rows("SELECT task_id, cost FROM active_slots")
    assert (slot.task_id, slot.cost) == (video["id"], 1)  # clamped to the tenant's limit of 1
    assert await env.dispatch() == 0  # the tenant's limit holds
    order = await _drain(env)
    assert [t for t, _ in order] == [video["id"]] + [r["id"] for r, _ in images]
    assert await env.scalar("SELECT count(*) FROM tasks WHERE status <> 4") == 0


async def test_tenant_limit_lowered_below_a_queued_cost_later(
    make_env: Callable[..., Awaitable[Env]],
) -> None:
    env = await _leader_env(make_env, global_concurrency=5)
    [(video, _)] = await env.core.submit("b", 1, [kit.item(kind=task_pb2.TASK_KIND_VIDEO)])
    images = await env.core.submit("b", 1, [kit.item() for _ in range(2)])
    # Lowered after submit (the free tier's 3 down to 1): the queued video still goes, alone.
    await env.core.upsert_tenant("b", 0, task_pb2.TenantLimits(max_concurrency=1))
    order = await _drain(env)
    assert order == [(video["id"], 1)] + [(r["id"], 1) for r, _ in images]
    assert await env.scalar("SELECT count(*) FROM tasks WHERE status <> 4") == 0


async def test_kind_limit_below_the_kind_cost_still_dispatches(
    make_env: Callable[..., Awaitable[Env]],
) -> None:
    # A video costs 2 but the video kind's limit is 1: videos run one at a time, images alongside.
    env = await _leader_env(make_env, global_concurrency=5, kind_limits={"video": 1})
    await env.core.submit("k", 1, [kit.item(kind=task_pb2.TASK_KIND_VIDEO) for _ in range(2)])
    await env.core.submit("k", 1, [kit.item() for _ in range(2)])
    assert await env.dispatch() == 2  # one video (cost 1 now) and an image (read: 3 by rank)
    assert await env.dispatch() == 1  # the other image, past the second video (kind full)
    assert await env.scalar("SELECT sum(cost) FROM active_slots WHERE kind = 1") == 1
    order = await _drain(env)
    assert len(order) == 4
    assert await env.scalar("SELECT count(*) FROM tasks WHERE status <> 4") == 0
