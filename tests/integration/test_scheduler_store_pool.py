"""conveyor_scheduler.store.db: pooled connections are pinged only after sitting idle (real
PostgreSQL; a backend is ended with ``pg_terminate_backend`` as a restart or a dropped connection
would end it)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor_scheduler.store import db


def count_pings(engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the real pings the engine sends (the ping still runs)."""
    dialect = engine.sync_engine.dialect
    real = dialect.do_ping
    pings = [0]

    def ping(dbapi_connection: Any) -> bool:
        pings[0] += 1
        return bool(real(dbapi_connection))

    monkeypatch.setattr(dialect, "do_ping", ping)
    return pings


async def backend_pid(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(text("SELECT pg_backend_pid()")))


async def terminate(sched_url: str, pid: int) -> None:
    other = db.create_engine(sched_url, pool_size=1)
    try:
        async with other.connect() as conn:
            assert await conn.scalar(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            await conn.commit()
    finally:
        await other.dispose()
    await asyncio.sleep(0.1)


async def test_a_connection_used_moments_ago_is_not_pinged(
    sched_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = db.create_engine(sched_url, pool_size=1, ping_idle_seconds=30)
    pings = count_pings(engine, monkeypatch)
    try:
        first = await backend_pid(engine)
        for _ in range(5):
            assert await backend_pid(engine) == first
        assert pings[0] == 0
    finally:
        await engine.dispose()


async def test_after_a_burst_one_at_a_time_use_stays_on_the_hot_connection(
    sched_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pool hands out its most recently used connection (LIFO): a burst opens several, and the
    one-at-a-time use that follows keeps taking the same one, never an idle one that would need a
    ping (first in, first out rotated through all of them, each idle past the threshold)."""
    engine = db.create_engine(sched_url, pool_size=4, ping_idle_seconds=0.25)
    pings = count_pings(engine, monkeypatch)
    try:

        async def hold() -> int:
            async with engine.connect() as conn:
                pid = int(await conn.scalar(text("SELECT pg_backend_pid()")))
                await asyncio.sleep(0.05)
                return pid

        assert len(set(await asyncio.gather(*(hold() for _ in range(4))))) == 4
        used = set()
        for _ in range(12):  # 12 x 0.1 s: a rotation through 4 would idle each 0.4 s
            used.add(await backend_pid(engine))
            await asyncio.sleep(0.1)
        assert len(used) == 1
        assert pings[0] < 4  # a rotation pinged (nearly) every checkout
    finally:
        await engine.dispose()


async def test_an_idle_dead_connection_is_replaced_before_use(
    sched_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = db.create_engine(sched_url, pool_size=1, ping_idle_seconds=0.2)
    pings = count_pings(engine, monkeypatch)
    try:
        first = await backend_pid(engine)
        await terminate(sched_url, first)
        await asyncio.sleep(0.3)
        # Idle past the threshold: the ping finds it dead and the pool connects anew, unseen.
        second = await backend_pid(engine)
        assert second != first
        assert pings[0] >= 1
    finally:
        await engine.dispose()


async def test_an_idle_live_connection_is_pinged_and_kept(
    sched_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = db.create_engine(sched_url, pool_size=1, ping_idle_seconds=0.2)
    pings = count_pings(engine, monkeypatch)
    try:
        first = await backend_pid(engine)
        await asyncio.sleep(0.3)
        assert await backend_pid(engine) == first
        assert pings[0] == 1
    finally:
        await engine.dispose()


async def test_a_connection_dropped_within_the_threshold_fails_once_then_recovers(
    sched_url: str,
) -> None:
    """The trade-off the threshold makes, pinned: one statement fails (a DBAPIError, which the RPCs
    answer as retryable UNAVAILABLE), and the pool is replaced for the next one."""
    engine = db.create_engine(sched_url, pool_size=1, ping_idle_seconds=30)
    try:
        first = await backend_pid(engine)
        await terminate(sched_url, first)
        with pytest.raises(DBAPIError):
            await backend_pid(engine)
        assert await backend_pid(engine) != first
    finally:
        await engine.dispose()
