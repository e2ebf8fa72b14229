"""conveyor_scheduler.results.submit_protocol on real PostgreSQL:
BeginSubmit/CompleteSubmit/MarkSubmitUnknown fenced by attempt.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from conveyor_scheduler.store import models
from conveyor_testkit import scheduler as kit
from tests.integration.scheduler_env import Env


async def test_submit_protocol(make_env: Callable[..., Awaitable[Env]]) -> None:
    env = await make_env(lead=True)
    [(row, _)] = await env.core.submit("a", 1, [kit.item()])
    tid = str(row["id"])
    assert await env.dispatch() == 1
    assert (await env.core.begin_submit(tid, 2))[0] == 2  # stale attempt: STOP
    assert (await env.core.begin_submit(tid, 1))[0] == 1  # PROCEED
    decision, r = await env.core.begin_submit(tid, 1)  # duplicate dispatch: RECONCILE
    assert decision == 4
    assert r is not None
    assert r["submit_started_at"] is not None
    assert await env.core.mark_submit_unknown(tid, 1)
    assert (await env.core.begin_submit(tid, 1))[0] == 4
    in_flight, _ = await env.core.list_in_flight(None, 10, "")
    assert [(str(x["id"]), x["submit_state"]) for x in in_flight] == [(tid, 3)]
    assert await env.core.complete_submit(tid, 1, "pred-1")
    assert not await env.core.complete_submit(tid, 1, "pred-2")
    t = await env.task(row["id"])
    assert (t["status"], t["prediction_id"], t["submit_state"]) == (models.RUNNING, "pred-1", 4)
    decision, r = await env.core.begin_submit(tid, 1)
    assert decision == 3
    assert r is not None
    assert r["prediction_id"] == "pred-1"
    await env.check()
