"""A scheduler replica for dispatch tests: its leader loops on a fresh database, no Kafka or gRPC."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from conveyor_scheduler.app import SchedulerApp
from conveyor_testkit import scheduler as kit


@contextlib.asynccontextmanager
async def running_app(database_url: str, **overrides: Any) -> AsyncIterator[SchedulerApp]:
    """A replica (no Kafka, no gRPC) on a fresh database; its poll is 30 s, so any prompt
    dispatch below is event-driven (the leader's heartbeat still wakes it about every second)."""
    await kit.migrate(database_url)
    settings = kit.make_settings(database_url, dispatch_poll_seconds=30.0, grpc_port=0, **overrides)
    app = SchedulerApp(settings, kafka=False, grpc=False)
    await kit.reset(app.engine)
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


def count_cycles(app: SchedulerApp) -> list[int]:
    """Counts the leader's dispatch cycles from now on (one-element list, updated in place)."""
    dispatcher = app.loops.dispatcher
    counted = [0]
    real_cycle = dispatcher.cycle

    async def counting_cycle() -> int:
        counted[0] += 1
        return await real_cycle()

    dispatcher.cycle = counting_cycle  # type: ignore[method-assign]
    return counted


async def wait_status(app: SchedulerApp, task_id: str, status: int, within: float) -> float:
    """Seconds until acme's task ``task_id`` is in ``status`` (fails after ``within``)."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        task = await app.core.get_task("acme", task_id)
        if task.status == status:
            return time.monotonic() - started
        await asyncio.sleep(0.01)
    raise AssertionError(f"task {task_id} not in status {status} after {within} s")
