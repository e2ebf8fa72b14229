"""An idle leader's submit dispatches its own tasks in its transaction (dispatch/inline.py), on a
real replica: what fits every limit goes out with the SUBMITTED event, the rest stays queued for the
cycle, and nothing is dispatched that a cycle would not dispatch (limits exact, delayed tasks and
paused tenants wait)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text

from conveyor.tasks.v1 import task_pb2
from conveyor_common.vocabulary import EV_DISPATCHED, EV_SUBMITTED
from conveyor_scheduler.admission.submit import NewTask, fingerprint
from conveyor_scheduler.app import SchedulerApp
from conveyor_testkit import scheduler as kit
from tests.integration.dispatch_env import count_cycles, running_app, wait_status

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

QUEUED = task_pb2.TASK_STATUS_QUEUED
DISPATCHED = task_pb2.TASK_STATUS_DISPATCHED


@pytest.fixture
async def app(database_url: str) -> AsyncIterator[SchedulerApp]:
    async with running_app(database_url, global_concurrency=3, instance_id="inline-test") as app:
        # The first submit finds the cache of a new term stale: a cycle dispatches it and leaves
        # the leader drained, as a running leader with nothing queued is.
        row, _ = await app.core.submit_one("acme", 3, kit.item("first"))
        await wait_status(app, str(row["id"]), DISPATCHED, 5.0)
        for _ in range(100):
            if app.loops.dispatcher.nothing_queued():
                break
            await asyncio.sleep(0.01)
        assert app.loops.dispatcher.nothing_queued()
        yield app


async def status(app: SchedulerApp, row: dict[str, object]) -> int:
    return (await app.core.get_task("acme", str(row["id"]))).status


async def test_a_submit_on_an_idle_leader_dispatches_its_task_in_its_transaction(
    app: SchedulerApp,
) -> None:
    cycles = count_cycles(app)
    row, _ = await app.core.submit_one("acme", 3, kit.item("inline"))
    assert await status(app, row) == DISPATCHED  # when the submit answers, not after a cycle
    async with app.engine.connect() as conn:
        events = (
            await conn.execute(
                text("SELECT sequence, type FROM task_events WHERE task_id = :t ORDER BY sequence"),
                {"t": row["id"]},
            )
        ).all()
        outbox = (
            await conn.execute(
                text("SELECT topic, ce_type FROM outbox WHERE key = :k ORDER BY id"),
                {"k": str(row["id"])},
            )
        ).all()
        slots = await conn.scalar(text("SELECT count(*) FROM active_slots"))
    assert [(e.sequence, e.type) for e in events] == [(1, EV_SUBMITTED), (2, EV_DISPATCHED)]
    assert [o.topic for o in outbox].count("conveyor.provider.v1.commands") == 1
    assert len(outbox) == 3  # SUBMITTED, DISPATCHED and the DispatchTask, one relay pass
    assert slots == 2
    await asyncio.sleep(0.2)
    assert cycles[0] == 0  # nothing was left for a cycle
    assert app.loops.dispatcher.nothing_queued()
    assert (await kit.check_invariants(app.engine, app.core.policy))["global"] == 2


async def test_concurrent_submits_dispatch_within_the_global_limit_and_the_rest_waits(
    app: SchedulerApp,
) -> None:
    """Ten submits at once (one group transaction) with two free slots: two go out in the submit's
    transaction, the rest stay queued, and a freed slot dispatches the next by a cycle."""
    rows = await asyncio.gather(
        *(app.core.submit_one("acme", 3, kit.item(f"burst-{i}")) for i in range(10))
    )
    got = [await status(app, r) for r, _ in rows]
    assert got.count(DISPATCHED) == 2
    assert got.count(QUEUED) == 8
    await asyncio.sleep(0.3)
    got = [await status(app, r) for r, _ in rows]
    assert got.count(DISPATCHED) == 2  # the cycle it woke found the limit full
    done = next(r for (r, _), s in zip(rows, got, strict=True) if s == DISPATCHED)
    await app.core.begin_submits([(str(done["id"]), 1)])
    await app.core.apply_results([kit.result(done["id"], 1, "succeeded")])
    for _ in range(100):
        got = [await status(app, r) for r, _ in rows]
        if got.count(QUEUED) == 7:  # the freed slot went to a queued one, by a cycle
            break
        await asyncio.sleep(0.02)
    assert got.count(QUEUED) == 7
    assert got.count(DISPATCHED) == 2
    assert (await kit.check_invariants(app.engine, app.core.policy))["global"] == 3


async def test_a_delayed_task_or_a_paused_tenants_task_is_not_dispatched_by_its_submit(
    app: SchedulerApp,
) -> None:
    spec = kit.spec(prompt="later")
    spec.delay.FromMilliseconds(300)
    delayed, _ = await app.core.submit_one("acme", 3, NewTask("delayed", spec, fingerprint(spec)))
    assert await status(app, delayed) == QUEUED
    took = await wait_status(app, str(delayed["id"]), DISPATCHED, 5.0)
    assert took > 0.15  # at its time, by the cycle

    await app.core.set_tenant_paused("acme", True, "test")
    for _ in range(100):  # the resume after this must find the leader drained again
        if app.loops.dispatcher.nothing_queued():
            break
        await asyncio.sleep(0.01)
    row, _ = await app.core.submit_one("acme", 3, kit.item("paused"))
    await asyncio.sleep(0.2)
    assert await status(app, row) == QUEUED
    await app.core.set_tenant_paused("acme", False, None)
    await wait_status(app, str(row["id"]), DISPATCHED, 5.0)


async def test_a_submit_while_the_limit_is_full_waits_for_a_cycle(app: SchedulerApp) -> None:
    """The submit that fills the limit leaves the room saturated (no cycle reads it back); the next
    one stays queued until a slot frees."""
    cycles = count_cycles(app)
    rows = [(await app.core.submit_one("acme", 3, kit.item(f"fill-{i}")))[0] for i in range(2)]
    assert [await status(app, r) for r in rows] == [DISPATCHED, DISPATCHED]
    assert app.loops.dispatcher.room.saturated
    late, _ = await app.core.submit_one("acme", 3, kit.item("late"))
    assert await status(app, late) == QUEUED
    await asyncio.sleep(0.2)
    assert cycles[0] == 0  # the full limit is not read again for the late submit
    await app.core.begin_submits([(str(rows[0]["id"]), 1)])
    await app.core.apply_results([kit.result(rows[0]["id"], 1, "failed", retryable=False)])
    await wait_status(app, str(late["id"]), DISPATCHED, 5.0)


async def test_a_group_with_submits_waiting_behind_it_leaves_its_tasks_to_the_cycle(
    database_url: str,
) -> None:
    """Groups of one: the first has a second submit waiting for the flusher, so it does not spend
    the dispatch's round trips before that one's transaction (a cycle dispatches beside it)."""
    async with running_app(
        database_url, global_concurrency=3, submit_group_max=1, instance_id="inline-busy"
    ) as app:
        row, _ = await app.core.submit_one("acme", 3, kit.item("first"))
        await wait_status(app, str(row["id"]), DISPATCHED, 5.0)
        for _ in range(100):
            if app.loops.dispatcher.nothing_queued():
                break
            await asyncio.sleep(0.01)
        assert app.loops.dispatcher.nothing_queued()
        first = asyncio.ensure_future(app.core.submit_one("acme", 3, kit.item("busy-1")))
        second = asyncio.ensure_future(app.core.submit_one("acme", 3, kit.item("busy-2")))
        row, _ = await first
        assert await status(app, row) == QUEUED  # the flusher had the second waiting
        row2, _ = await second
        for r in (row, row2):
            await wait_status(app, str(r["id"]), DISPATCHED, 5.0)
