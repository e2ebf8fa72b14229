"""A batch of provider results on real PostgreSQL: the inbox and the row locks in one round trip."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from conveyor_scheduler.store import models, reads
from conveyor_testkit import scheduler as kit
from tests.integration.scheduler_env import Env


async def test_a_results_batch_sends_its_inbox_and_row_locks_together(
    make_env: Callable[..., Awaitable[Env]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The common batch queues the inbox insert and the row locks before reading either (no
    separate lock round trip), and still applies each result once: a result repeated in the batch
    or redelivered later changes nothing, results of unknown or malformed task ids are skipped. A
    batch with a throttle (written outside the pipeline) takes the separate path and applies the
    same."""
    separate: list[list[uuid.UUID]] = []
    real = reads.lock_tasks

    async def counting(conn: Any, ids: Any, **kwargs: Any) -> Any:
        separate.append(list(ids))
        return await real(conn, ids, **kwargs)

    monkeypatch.setattr("conveyor_scheduler.results.apply.lock_tasks", counting)
    env = await make_env(lead=True, global_concurrency=10)
    rows = [r for r, _ in await env.core.submit("a", 1, [kit.item(), kit.item(), kit.item()])]
    one, two, three = (r["id"] for r in rows)
    assert await env.dispatch() == 3
    done_two = kit.result(two, 1, "succeeded")
    batch = [
        kit.result(one, 1, "started"),
        kit.result(one, 1, "succeeded"),
        done_two,
        kit.result(two, 1, "succeeded", result_id=done_two.result_id),  # repeated in the batch
        kit.result(uuid.uuid4(), 1, "succeeded"),  # no such task
        kit.result("not-a-uuid", 1, "succeeded"),
    ]
    await env.core.apply_results(batch)
    assert separate == []
    assert (await env.task(one))["status"] == models.SUCCEEDED
    assert (await env.task(two))["status"] == models.SUCCEEDED
    events = "SELECT count(*) FROM task_events WHERE task_id = :t"
    counts = [await env.scalar(events, t=t) for t in (one, two)]
    await env.core.apply_results(batch)  # redelivered: every result is a duplicate
    assert [await env.scalar(events, t=t) for t in (one, two)] == counts
    assert separate == []

    until = datetime.now(UTC) + timedelta(seconds=30)
    await env.core.apply_results(
        [kit.result(three, 1, "throttled", retry_at=until), kit.result(three, 1, "succeeded")]
    )
    assert separate == [[three]]
    assert (await env.task(three))["status"] == models.SUCCEEDED
    throttled = await env.scalar(
        "SELECT throttled_until FROM provider_controls WHERE provider = 'replicate'"
    )
    assert throttled is not None
    assert abs((throttled - until).total_seconds()) < 1
    await env.check()
