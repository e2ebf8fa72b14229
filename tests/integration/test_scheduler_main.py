"""conveyor_scheduler.__main__ on real PostgreSQL: ``rerank`` recomputes ranks exactly as the policy
does.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from conveyor.tasks.v1 import task_pb2
from conveyor_testkit import scheduler as kit
from tests.integration.scheduler_env import Env


async def test_rerank_matches_the_policy(make_env: Callable[..., Awaitable[Env]]) -> None:
    from conveyor_scheduler.__main__ import rerank
    from conveyor_scheduler.dispatch.policy import Policy

    env = await make_env(aging_rate_per_minute=0.2)
    rows = [
        r
        for r, _ in await env.core.submit(
            "a", task_pb2.TIER_PRO, [kit.item(priority=p) for p in (1, 2, 3, 4)]
        )
    ]
    faster = kit.make_settings(
        env.core.settings.database_url.get_secret_value(), aging_rate_per_minute=3.0
    )
    assert await rerank(faster) == 4
    policy = Policy.from_settings(faster)
    for row in rows:
        stored = (await env.task(row["id"]))["rank"]
        assert stored == pytest.approx(
            policy.rank(row["priority"], row["tier"], row["enqueued_at"])
        )
