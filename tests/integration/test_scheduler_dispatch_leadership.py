"""Leader failover on real PostgreSQL: kill the leader's session, or stop the leader replica; another
replica takes over within seconds, dispatch goes on, and the limits hold throughout.
"""

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


@pytest.fixture
async def pair(database_url: str) -> AsyncIterator[list[SchedulerApp]]:
    await kit.migrate(database_url)
    apps = [
        SchedulerApp(
            kit.make_settings(
                database_url,
                instance_id=f"fo-{i}",
                global_concurrency=3,
                leader_retry_seconds=0.5,
                dispatch_poll_seconds=0.2,
            ),
            kafka=False,
            grpc=False,
        )
        for i in range(2)
    ]
    await kit.reset(apps[0].engine)
    for app in apps:
        await app.start()
    try:
        yield apps
    finally:
        for app in apps:
            await app.stop()


async def _leaders(apps: list[SchedulerApp], within: float) -> list[SchedulerApp]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        leaders = [a for a in apps if a.leader.is_leader]
        if len(leaders) == 1:
            return leaders
        await asyncio.sleep(0.05)
    return [a for a in apps if a.leader.is_leader]


async def _in_flight(app: SchedulerApp) -> list[tuple[object, int]]:
    async with app.engine.connect() as conn:
        rows = await conn.execute(text("SELECT id, attempt FROM tasks WHERE status IN (2, 3)"))
        return [(r.id, r.attempt) for r in rows]


async def _wait_dispatched(app: SchedulerApp, n: int, within: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < within:
        if len(await _in_flight(app)) >= n:
            return time.monotonic() - started
        await asyncio.sleep(0.02)
    raise AssertionError(f"fewer than {n} tasks dispatched within {within}s")


async def _complete_all(app: SchedulerApp) -> None:
    await app.core.apply_results(
        [kit.result(tid, attempt, "succeeded") for tid, attempt in await _in_flight(app)]
    )


async def test_killed_leader_session_and_stopped_leader_fail_over(pair: list[SchedulerApp]) -> None:
    a = pair[0]
    await a.core.submit("t", 1, [kit.item() for _ in range(12)])
    [first] = await _leaders(pair, 5)
    await _wait_dispatched(a, 3, 5)
    await kit.check_invariants(a.engine, a.core.policy)

    # 1. Kill the leader's database session: its lock goes with it.
    async with a.engine.begin() as conn:
        killed = await conn.scalar(
            text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name = :n"
            ),
            {"n": f"conveyor-scheduler-leader:{first.instance}"},
        )
    assert killed == 1
    await _complete_all(a)  # free the slots: only a live leader can refill them
    took = await _wait_dispatched(a, 3, 5)
    [second] = await _leaders(pair, 5)
    assert took < 5
    await kit.check_invariants(a.engine, a.core.policy)

    # 2. Stop the leader replica altogether: the other one takes over within seconds.
    other = pair[1] if second is pair[0] else pair[0]
    await second.stop_loops()
    await second.leader.lose()
    await _complete_all(other)
    started = time.monotonic()
    took = await _wait_dispatched(other, 3, 5)
    assert other.leader.is_leader
    assert time.monotonic() - started < 5
    await kit.check_invariants(other.engine, other.core.policy)
    async with other.engine.connect() as conn:
        holders = await conn.scalar(
            text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
                " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            )
        )
    assert holders == 1
    print(f"\nfailover: kill -> refill in <5s; stop -> takeover+refill {took:.2f}s")


async def test_submit_on_a_follower_wakes_the_leader_through_notify(database_url: str) -> None:
    await kit.migrate(database_url)
    apps = [
        SchedulerApp(
            kit.make_settings(
                database_url,
                instance_id=f"nt-{i}",
                dispatch_poll_seconds=30.0,  # polling cannot explain a fast dispatch
                leader_retry_seconds=0.2,
            ),
            kafka=False,
            grpc=False,
        )
        for i in range(2)
    ]
    await kit.reset(apps[0].engine)
    for app in apps:
        await app.start()
    try:
        [leader] = await _leaders(apps, 5)
        follower = apps[1] if leader is apps[0] else apps[0]
        await asyncio.sleep(0.3)  # the leader's first cycles are done; it now waits on NOTIFY
        started = time.monotonic()
        [(row, _)] = await follower.core.submit("t", 1, [kit.item()])
        took = await _wait_dispatched(follower, 1, 5)
        assert took < 1.0, took
        # A slot freed on the follower (results consumer) also wakes the leader at once.
        await follower.core.submit("t", 1, [kit.item() for _ in range(5)])
        await _wait_dispatched(follower, 3, 5)  # tenant limit 3
        await _complete_all(follower)
        took = await _wait_dispatched(follower, 3, 5)
        assert took < 1.0, took
        print(f"\nnotify: follower submit -> dispatch in {time.monotonic() - started:.3f}s total")
        await kit.check_invariants(follower.engine, follower.core.policy)
        assert row["status"] == 1
    finally:
        for app in apps:
            await app.stop()


@pytest.mark.parametrize(
    "sent", [["SELECT 1"], ["SELECT 1", "COMMIT"]], ids=["mid-transaction", "after-its-commit"]
)
async def test_a_leader_frozen_mid_pipeline_is_ended_and_replaced(
    database_url: str, sent: list[str]
) -> None:
    """PostgreSQL's idle timeouts are armed only at a Sync: a leader frozen after sending part of a
    pipelined transaction (or all of it, its COMMIT included, but not the Sync) keeps its session,
    waiting on ``ClientRead``, and the lock. The stall watch ends such a session once it stalled
    the lease (1 s here, the idle transaction bound too), and a follower takes the lock next."""
    from conveyor_scheduler.dispatch.leadership import Leader

    await kit.migrate(database_url)
    settings = kit.make_settings(database_url, leader_lease_seconds=1.0)
    frozen = Leader(settings, database_url, "frozen")
    follower = Leader(settings, database_url, "follower")
    watch = StallWatch(database_url, settings, "follower")
    try:
        assert await frozen.try_acquire()
        conn = frozen.conn
        assert conn is not None
        driver: Any = (await conn.get_raw_connection()).driver_connection
        pipeline = driver.pipeline()
        await pipeline.__aenter__()
        for statement in sent:
            await driver.execute(statement)  # sent; the Sync never is (the process froze)
        assert not await follower.try_acquire()
        assert await watch.check() == []  # not stalled for a lease yet
        await asyncio.sleep(1.3)  # past both idle timeouts of the lease: still alive
        assert await kit.session_state(database_url, frozen.backend_pid) != "gone"
        assert not await follower.try_acquire()
        assert await watch.check() == [frozen.backend_pid]
        assert await follower.try_acquire()
        assert follower.is_leader
        with pytest.raises(psycopg.OperationalError):  # resumed, the zombie finds no session
            await pipeline.__aexit__(None, None, None)
    finally:
        frozen.conn = None  # its session was ended; nothing to release
        await watch.close()
        await follower.dispose()
        await frozen.dispose()


async def test_a_live_idle_leader_is_not_ended(database_url: str) -> None:
    from conveyor_scheduler.dispatch.leadership import Leader

    await kit.migrate(database_url)
    settings = kit.make_settings(database_url, leader_lease_seconds=1.0)
    leader = Leader(settings, database_url, "live")
    follower = Leader(settings, database_url, "follower")
    try:
        assert await leader.try_acquire()
        for _ in range(6):  # 1.8 s, the leader touching its session as a live one does
            assert not await follower.try_acquire()
            assert await leader.check()
            await asyncio.sleep(0.3)
    finally:
        await follower.dispose()
        await leader.dispose()


async def test_a_leader_woken_often_with_nothing_to_dispatch_keeps_its_session(
    database_url: str,
) -> None:
    """Woken every 50 ms with nothing queued (an idle leader whose submits dispatch their own
    tasks on pool connections, freed slots nothing can take), the dispatch loop never reaches its
    poll's heartbeat; it touches its lock session itself at least every third of the lease, so
    neither PostgreSQL's idle_session_timeout nor the stall watch ends the session (before, they
    ended it every lease, and a task submitted then waited for the re-election)."""
    from conveyor_scheduler.settings import to_libpq_url
    from tests.integration.dispatch_env import running_app

    async with running_app(database_url, leader_lease_seconds=1.0) as app:
        leader = app.loops.leader
        for _ in range(200):
            if leader.is_leader and app.loops.dispatcher.nothing_queued():
                break
            await asyncio.sleep(0.02)
        assert leader.is_leader
        pid = leader.backend_pid
        started = time.monotonic()
        while time.monotonic() - started < 3.5:  # three and a half leases
            app.loops.wakeups.dispatch.set()
            await asyncio.sleep(0.05)
        async with await psycopg.AsyncConnection.connect(
            to_libpq_url(database_url), autocommit=True
        ) as conn:
            alive = await (
                await conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,))
            ).fetchone()
        assert alive == (1,), "the leader's lock session was ended"
        assert leader.is_leader
        assert leader.backend_pid == pid
