"""conveyor_provider_adapter.results and classify: every terminal status of Replicate's schema maps to a result; failures are classified."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from conveyor_testkit.adapter import (
    has_terminal,
)
from tests.integration.adapter_env import Env, task_id

pytestmark = [
    pytest.mark.integration,
    pytest.mark.kafka,
    pytest.mark.usefixtures("fresh_fake_config"),
]


@pytest.mark.parametrize(
    ("outcome", "expected"),
    [("aborted", "aborted"), ("canceled", "canceled"), ("failed", "failed"), ("hang", "canceled")],
)
async def test_every_terminal_status_of_the_schema_maps_to_a_result(
    env: Env, outcome: str, expected: str
) -> None:
    """Each terminal status of the OpenAPI document's enum (``aborted`` included: the prediction
    never started) reaches the scheduler as its outcome; ``hang`` runs into its run deadline."""
    task = task_id()
    env.coordination.dispatched(task)
    await env.commands.dispatch(
        task,
        inputs={"prompt": outcome, "__fake_outcome": outcome, "__fake_duration_s": 0.5},
        run_deadline=datetime.now(UTC) + timedelta(seconds=6),
    )
    results = await env.collector.wait_for(has_terminal, task, wait_s=20)
    final = results[-1]
    assert final.WhichOneof("outcome") == expected
    if outcome == "aborted":
        assert final.aborted.message
    if outcome == "hang":
        assert final.canceled.deadline_exceeded is True
    assert env.coordination.tasks[task].finished == expected


async def test_failed_prediction_is_classified(env: Env) -> None:
    oom, nsfw = task_id(), task_id()
    env.coordination.dispatched(oom)
    env.coordination.dispatched(nsfw)
    await env.commands.dispatch(
        oom, inputs={"__fake_outcome": "failed", "__fake_error": "CUDA out of memory"}
    )
    await env.commands.dispatch(
        nsfw, inputs={"__fake_outcome": "failed", "__fake_error": "NSFW content detected"}
    )
    r1 = (await env.collector.wait_for(has_terminal, oom))[-1]
    r2 = (await env.collector.wait_for(has_terminal, nsfw))[-1]
    assert (r1.failed.code, r1.failed.retryable) == ("capacity", True)
    assert (r2.failed.code, r2.failed.retryable) == ("nsfw", False)
