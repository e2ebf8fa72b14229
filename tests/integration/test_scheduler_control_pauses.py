"""Paused models and tenants (conveyor_scheduler.control.tenants, api.admin) on real PostgreSQL:
a paused tenant's tasks are accepted but not dispatched, GetTask says why a queued task is held,
ListPaused shows what is paused with its queue, an unknown model is not paused by mistake, and a
requested cancel is visible on the task."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from conveyor.tasks.v1 import task_pb2
from conveyor_common.errors import NotFound
from conveyor_testkit import scheduler as kit
from tests.integration.scheduler_env import Env

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


async def test_a_paused_tenant_is_held_and_listed_until_resumed(
    make_env: Callable[..., Awaitable[Env]],
) -> None:
    env = await make_env(lead=True, global_concurrency=10)
    [(held, _)] = await env.core.submit("calm", 1, [kit.item(prompt="held")])
    assert await env.core.set_tenant_paused("calm", True, "billing") is True
    [(later, _)] = await env.core.submit("calm", 1, [kit.item(prompt="later")])  # still accepted
    [(other, _)] = await env.core.submit("busy", 1, [kit.item(prompt="other")])
    assert await env.dispatch() == 1  # only the other tenant's task
    assert (await env.task(other["id"]))["status"] == task_pb2.TASK_STATUS_DISPATCHED
    task = await env.core.get_task("calm", str(held["id"]))
    assert task.status == task_pb2.TASK_STATUS_QUEUED
    assert task.held_reason == "tenant paused"
    [entry] = await env.core.list_paused()
    assert (entry["kind"], entry["name"], entry["reason"], entry["queued"]) == (
        "tenant",
        "calm",
        "billing",
        2,
    )
    assert entry["since"] is not None
    assert await env.core.set_tenant_paused("calm", False, None) is False
    assert await env.dispatch() == 2
    assert await env.core.list_paused() == []
    assert (await env.core.get_task("calm", str(later["id"]))).held_reason == ""
    await env.check()


async def test_pausing_an_unknown_tenant_or_model_is_not_found(
    make_env: Callable[..., Awaitable[Env]],
) -> None:
    env = await make_env()
    with pytest.raises(NotFound, match="tenant 'nobody' not found"):
        await env.core.set_tenant_paused("nobody", True, None)
    with pytest.raises(NotFound, match="no task has used it"):
        await env.core.set_model_paused("nosuch/model", True, None, allow_unknown=False)
    assert await env.core.list_paused() == []
    # Ahead of first use, on purpose:
    assert await env.core.set_model_paused("future/model", True, "not yet", allow_unknown=True)
    [entry] = await env.core.list_paused()
    assert (entry["kind"], entry["name"], entry["queued"]) == ("model", "future/model", 0)
    # A model a task used is known:
    [(used, _)] = await env.core.submit("t", 1, [kit.item(model="acme/used")])
    assert await env.core.set_model_paused("acme/used", True, None, allow_unknown=False)
    assert (await env.core.get_task("t", str(used["id"]))).held_reason == "model paused"


async def test_a_requested_cancel_shows_on_the_task(
    make_env: Callable[..., Awaitable[Env]],
) -> None:
    env = await make_env(lead=True)
    [(row, _)] = await env.core.submit("t", 1, [kit.item()])
    assert await env.dispatch() == 1
    await env.core.begin_submit(str(row["id"]), 1)
    await env.core.cancel("t", str(row["id"]), "user changed their mind")
    task = await env.core.get_task("t", str(row["id"]))
    assert task.status == task_pb2.TASK_STATUS_DISPATCHED  # the provider has not confirmed yet
    assert task.cancel_requested
    assert task.cancel_reason == "user changed their mind"
