"""The stall watch on real PostgreSQL: a replica frozen in the middle of a pipelined transaction
(its statements sent, the Sync not yet: no server timeout is armed) holds its row locks until
another replica ends its session. Every replica's watch ends it soon after another session waits
on it, later when nobody does, and never a live or idle session."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from sqlalchemy import text

from conveyor_scheduler.app import SchedulerApp
from conveyor_scheduler.dispatch.stalls import StallWatch
from conveyor_testkit import scheduler as kit

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


async def _connect(database_url: str, name: str) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(
        database_url.replace("+psycopg", ""), application_name=name
    )


async def _freeze_holding_tenant(database_url: str, tenant: str) -> tuple[Any, Any, int]:
    """A scheduler session that locked ``tenant``'s row inside a pipeline and then froze."""
    conn = await _connect(database_url, "conveyor-scheduler:frozen")
    pid = conn.info.backend_pid
    pipeline = conn.pipeline()
    await pipeline.__aenter__()
    await conn.execute("SELECT 1 FROM tenants WHERE tenant_id = %s FOR UPDATE", (tenant,))
    await conn.execute("SELECT 1")  # sent; the Sync never is (the process froze)
    return conn, pipeline, pid


async def _dispatched(app: SchedulerApp) -> bool:
    async with app.engine.connect() as conn:
        q = "SELECT count(*) FROM tasks WHERE dispatch_emitted_at IS NULL"
        return bool(await conn.scalar(text(q)) == 0)


@pytest.fixture
async def replica(database_url: str) -> AsyncIterator[SchedulerApp]:
    await kit.migrate(database_url)
    app = SchedulerApp(
        kit.make_settings(
            database_url,
            instance_id="stall-watch",
            lock_stall_seconds=0.5,
            stall_check_seconds=0.1,
            idle_transaction_seconds=30.0,
            leader_lease_seconds=30.0,
        ),
        kafka=False,
        grpc=False,
    )
    await kit.reset(app.engine)
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


async def test_a_frozen_lock_holder_is_ended_soon_after_a_submit_waits_on_it(
    database_url: str, replica: SchedulerApp
) -> None:
    await replica.core.submit("t", 1, [kit.item()])  # the tenant's row exists
    deadline = time.monotonic() + 5.0
    while not await _dispatched(replica):  # else the dispatch is what waits on the frozen lock
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    # Frozen, nobody waiting: kept past lock_stall_seconds; the first submit that waits on it
    # has it ended at the watch's next check.
    conn, pipeline, pid = await _freeze_holding_tenant(database_url, "t")
    try:
        await asyncio.sleep(1.0)
        assert await kit.session_state(database_url, pid) != "gone"
        waited = await _timed_submit(replica, "t")
        assert waited <= 0.6, waited
        assert await kit.session_state(database_url, pid) == "gone"
        with pytest.raises(psycopg.OperationalError):  # resumed, the zombie finds no session
            await pipeline.__aexit__(None, None, None)
    finally:
        await conn.close()
    # Frozen just now: a submit waits on it about lock_stall_seconds (0.5 s), within a check.
    conn, pipeline, pid = await _freeze_holding_tenant(database_url, "t")
    try:
        waited = await _timed_submit(replica, "t")
        print(f"\nsubmit behind a just-frozen lock holder: {waited:.3f} s")
        assert 0.4 <= waited <= 1.2, waited
        assert await kit.session_state(database_url, pid) == "gone"
    finally:
        await conn.close()


async def _timed_submit(app: SchedulerApp, tenant: str) -> float:
    started = time.monotonic()
    [(task, _)] = await asyncio.wait_for(app.core.submit(tenant, 1, [kit.item()]), 5.0)
    assert task["tenant_id"] == tenant
    return time.monotonic() - started


async def test_a_frozen_transaction_nobody_waits_on_is_ended_after_the_idle_bound(
    database_url: str,
) -> None:
    await kit.migrate(database_url)
    settings = kit.make_settings(
        database_url, lock_stall_seconds=0.1, idle_transaction_seconds=1.0, leader_lease_seconds=30
    )
    watch = StallWatch(database_url, settings, "test")
    frozen, pipeline, pid = await _freeze_holding_tenant(database_url, "nobody")
    live = await _connect(database_url, "conveyor-scheduler:live")
    idle = await _connect(database_url, "conveyor-scheduler:idle")
    try:
        await idle.commit()
        await live.execute("SELECT 1")  # a live transaction: its next statement comes in time
        await asyncio.sleep(0.6)
        await live.execute("SELECT 1")
        assert await watch.check() == []  # the frozen one: 0.6 s, under 1 s
        await asyncio.sleep(0.6)
        await live.execute("SELECT 1")
        assert await watch.check() == [pid]  # 1.2 s; the live one is kept
        await live.execute("SELECT 1")
        assert (
            await kit.session_state(database_url, idle.info.backend_pid) == "idle"
        )  # in the pool: kept
        with pytest.raises(psycopg.OperationalError):
            await pipeline.__aexit__(None, None, None)
        # The watch's own session ended (a database restart): that check fails, the next one
        # reconnects.
        assert watch._conn is not None
        await idle.execute("SELECT pg_terminate_backend(%s)", (watch._conn.info.backend_pid,))
        await idle.commit()
        with pytest.raises(psycopg.OperationalError):
            await watch.check()
        assert await watch.check() == []
    finally:
        for c in (frozen, live, idle):
            await c.close()
        await watch.close()
