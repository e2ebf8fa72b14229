"""conveyor_scheduler.store.models: the alembic migrations build exactly the models' schema."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from conveyor_scheduler.store import db


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
