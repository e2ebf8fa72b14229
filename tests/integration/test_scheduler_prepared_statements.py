"""The scheduler's connections keep their prepared statements across a clean rollback.

psycopg forgets (and deallocates) every prepared statement of a session at each ROLLBACK, and
SQLAlchemy ends every transaction that did not commit with one: the periodic reads made the hot
statements run unprepared, planned again at each execution. These tests hold the scheduler's
connection class (``store.db.KeepPreparedConnection``) to what it relies on in psycopg.
"""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from conveyor_scheduler.store.bulk import pipeline_within, raw_execute
from conveyor_scheduler.store.db import KeepPreparedConnection, create_engine
from conveyor_testkit import scheduler as kit

pytestmark = [pytest.mark.integration]

HOT = text("SELECT count(*) FROM tasks WHERE id = ANY(CAST(:ids AS uuid[]))")


async def prepared(conn: AsyncConnection) -> list[str]:
    rows = await conn.execute(text("SELECT statement FROM pg_prepared_statements"))
    return [r[0] for r in rows]


async def test_prepared_statements_survive_a_clean_rollback_not_an_error(database_url: str) -> None:
    await kit.migrate(database_url)
    engine = create_engine(database_url, pool_size=1)
    try:
        async with engine.connect() as conn:
            driver = (await conn.get_raw_connection()).driver_connection
            assert isinstance(driver, KeepPreparedConnection)
            for _ in range(8):  # psycopg prepares a statement at its sixth execution
                await conn.execute(HOT, {"ids": []})
            assert any("FROM tasks WHERE id = ANY" in s for s in await prepared(conn))
            # The block ends without a commit: SQLAlchemy rolls the transaction back.

        async with engine.connect() as conn:
            assert (await conn.get_raw_connection()).driver_connection is driver  # same session
            kept = await prepared(conn)
            assert any("FROM tasks WHERE id = ANY" in s for s in kept), kept
            before = len(kept)
            await conn.execute(HOT, {"ids": []})  # runs the prepared statement: none added
            assert len(await prepared(conn)) == before

        # A rollback after an error forgets them all (a statement whose preparation the error
        # skipped must not be taken for prepared): the server's and psycopg's lists agree.
        async with engine.connect() as conn:
            with pytest.raises(DBAPIError):
                await conn.execute(text("SELECT 1 / 0"))
        async with engine.connect() as conn:
            assert await prepared(conn) == []
            for _ in range(8):
                await conn.execute(HOT, {"ids": []})  # prepared again without an error
            assert any("FROM tasks WHERE id = ANY" in s for s in await prepared(conn))
            await conn.commit()
    finally:
        await engine.dispose()


async def test_pipeline_within_can_ask_for_generic_plans(database_url: str) -> None:
    await kit.migrate(database_url)
    engine = create_engine(database_url, pool_size=1)
    show = text("SELECT current_setting('plan_cache_mode')")
    try:
        async with engine.connect() as conn:
            assert await conn.scalar(show) == "force_custom_plan"
            async with pipeline_within(conn):
                pass
            assert (await raw_execute(conn, show, {}))[0][0] == "force_custom_plan"
            async with pipeline_within(conn, generic_plans=True):
                pass
            assert (await raw_execute(conn, show, {}))[0][0] == "force_generic_plan"
            await conn.rollback()
            # SET LOCAL: the next transaction is back to the session's custom plans.
            assert await conn.scalar(show) == "force_custom_plan"
    finally:
        await engine.dispose()
