"""The scheduler's database pool metrics on a real PostgreSQL: the gauges follow checkouts, every
checkout is timed, and a dispose (which replaces the pool) keeps the reporting."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import text

from conveyor_scheduler.metrics import SchedulerMetrics
from conveyor_scheduler.store.db import create_engine

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


def sample(registry: CollectorRegistry, name: str) -> float | None:
    return registry.get_sample_value(name, {"pool": "main"})


async def test_pool_gauges_follow_checkouts_and_waits_are_timed(database_url: str) -> None:
    registry = CollectorRegistry()
    metrics = SchedulerMetrics(registry)
    engine = create_engine(database_url, pool_size=2, pool_metrics=metrics.db_pool)
    try:
        assert sample(registry, "conveyor_db_pool_size") == 2
        assert sample(registry, "conveyor_db_pool_max_overflow") == 2
        assert sample(registry, "conveyor_db_pool_checked_out") == 0
        assert sample(registry, "conveyor_db_pool_wait_seconds_count") == 0
        held = [await engine.connect() for _ in range(3)]  # two pooled, one overflow
        for conn in held:
            assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
        assert sample(registry, "conveyor_db_pool_checked_out") == 3
        assert sample(registry, "conveyor_db_pool_overflow") == 1
        assert sample(registry, "conveyor_db_pool_wait_seconds_count") == 3
        await asyncio.gather(*(conn.close() for conn in held))
        assert sample(registry, "conveyor_db_pool_checked_out") == 0
        assert sample(registry, "conveyor_db_pool_checked_in") == 2  # the overflow one closed
        assert sample(registry, "conveyor_db_pool_timeouts_total") == 0
        await engine.dispose()  # a new pool of the same (timed) class
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
            assert sample(registry, "conveyor_db_pool_checked_out") == 1
        assert sample(registry, "conveyor_db_pool_wait_seconds_count") == 4
    finally:
        await engine.dispose()


def test_without_pool_metrics_the_engine_exports_nothing() -> None:
    registry = CollectorRegistry()
    metrics = SchedulerMetrics(registry)
    create_engine("postgresql://u:p@127.0.0.1:1/db", pool_size=1)
    assert metrics.db_pool.pools() == []
    assert sample(registry, "conveyor_db_pool_size") is None


async def test_the_scheduler_app_exports_its_pool(database_url: str) -> None:
    from conveyor_scheduler.app import SchedulerApp
    from conveyor_testkit import scheduler as kit

    await kit.migrate(database_url)
    settings = kit.make_settings(database_url, instance_id="pool-metrics", grpc_port=0)
    app = SchedulerApp(settings, kafka=False, grpc=False)
    await app.start()
    try:
        assert sample(app.registry, "conveyor_db_pool_size") == settings.db_pool_size
        assert (sample(app.registry, "conveyor_db_pool_wait_seconds_count") or 0) >= 1
    finally:
        await app.stop()
