"""conveyor_scheduler.core on real PostgreSQL: the use cases end to end (submit, get, list, cancel and
the event history).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

import pytest

from conveyor.tasks.v1 import task_pb2
from conveyor_common.errors import NotFound
from conveyor_scheduler.store import models
from conveyor_testkit import scheduler as kit
from tests.integration.scheduler_env import Env

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


# ------------------------------------------------------------------------------------------------
# Submit, read, cancel


async def test_submit_get_list_cancel_and_history(make_env: Callable[..., Awaitable[Env]]) -> None:
    env = await make_env()
    [(row, dedup)] = await env.core.submit("t1", task_pb2.TIER_FREE, [kit.item("r1")])
    assert not dedup
    assert row["status"] == models.QUEUED
    task = await env.core.get_task("t1", str(row["id"]))
    assert task.status == task_pb2.TASK_STATUS_QUEUED
    assert task.queue_position == 1
    assert task.spec.model == "acme/img"
    assert task.last_sequence == 1
    # Another tenant's task answers exactly like a missing one.
    with pytest.raises(NotFound) as other:
        await env.core.get_task("t2", str(row["id"]))
    with pytest.raises(NotFound) as missing:
        await env.core.get_task("t2", str(uuid.uuid4()))
    assert other.value.code == missing.value.code

    second = [await env.core.submit("t1", 1, [kit.item()]) for _ in range(3)]
    listed, token = await env.core.list_tasks("t1", page_size=2)
    assert [r["id"] for r in listed] == [second[2][0][0]["id"], second[1][0][0]["id"]]
    rest, token2 = await env.core.list_tasks("t1", page_size=2, page_token=token)
    assert [r["id"] for r in rest] == [second[0][0][0]["id"], row["id"]]
    assert token2 == ""
    assert (await env.core.list_tasks("t2"))[0] == []

    canceled = await env.core.cancel("t1", str(row["id"]), "changed my mind")
    assert canceled["status"] == models.CANCELED
    events, terminal, last = await env.core.task_events("t1", str(row["id"]), 0, 100)
    assert terminal
    assert last == 2
    assert [e.type for e in events] == [
        task_pb2.TASK_EVENT_TYPE_SUBMITTED,
        task_pb2.TASK_EVENT_TYPE_CANCELED,
    ]
    assert [e.sequence for e in events] == [1, 2]
    assert events[1].task.status == task_pb2.TASK_STATUS_CANCELED
    resumed, _, _ = await env.core.task_events("t1", str(row["id"]), 1, 100)
    assert [e.sequence for e in resumed] == [2]
    # Cancel again: idempotent, nothing new.
    again = await env.core.cancel("t1", str(row["id"]), "")
    assert again["last_sequence"] == 2
    # Every event went to the outbox keyed by the task id, in sequence order.
    keys = await env.rows(
        "SELECT key, topic FROM outbox WHERE key = :k ORDER BY id", k=str(row["id"])
    )
    assert [k.topic for k in keys] == ["conveyor.tasks.v1.events"] * 2
    await env.check()


# ------------------------------------------------------------------------------------------------
# Dispatch within limits, results


# ------------------------------------------------------------------------------------------------
# Priority: aging and fair share


# ------------------------------------------------------------------------------------------------
# Schema


# ------------------------------------------------------------------------------------------------
# Maintenance, stats, ETA
