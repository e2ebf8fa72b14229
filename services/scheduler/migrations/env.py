"""Async alembic environment of the scheduler (psycopg 3).

The URL comes from ``config.attributes["sqlalchemy.url"]`` (set by ``conveyor_scheduler.store.db`` and the
tests) or else from ``SCHEDULER_DATABASE_URL``. Every model module is imported so autogenerate and the
migrations-equal-models test see the whole metadata (the webhook models too, when present).
"""

from __future__ import annotations

import asyncio
import os

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from conveyor_scheduler.settings import to_sqlalchemy_url
from conveyor_scheduler.store.db import target_metadata

config = context.config


def _url() -> str:
    url = config.attributes.get("sqlalchemy.url") or os.environ.get("SCHEDULER_DATABASE_URL")
    if not url:
        raise RuntimeError("set SCHEDULER_DATABASE_URL (or config.attributes['sqlalchemy.url'])")
    return to_sqlalchemy_url(str(url))


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata(),
        compare_type=True,
        compare_server_default=True,
        transaction_per_migration=True,
    )


def _run(connection: Connection) -> None:
    _configure(connection)
    with context.begin_transaction():
        context.run_migrations()


async def _run_async() -> None:
    engine = create_async_engine(_url())
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
            await connection.commit()
    finally:
        await engine.dispose()


def run_migrations_online() -> None:
    """Run with an async engine; reuse a connection handed in by the caller if there is one."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    asyncio.run(_run_async())


if context.is_offline_mode():
    context.configure(url=_url(), target_metadata=target_metadata(), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()
