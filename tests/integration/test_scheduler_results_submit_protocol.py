"""conveyor_scheduler.results.submit_protocol on real PostgreSQL:
BeginSubmit/CompleteSubmit/MarkSubmitUnknown fenced by attempt.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

import psycopg
import pytest

from conveyor.events.v1 import events_pb2
from conveyor.scheduler.v1 import provider_coordination_service_pb2 as provider_pb2
from conveyor_common.errors import InvalidArgument
from conveyor_scheduler.api.provider import ProviderCoordinationServicer
from conveyor_scheduler.dispatch.wakeups import CHANNEL
from conveyor_scheduler.settings import to_libpq_url
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


def created(task_id: str, attempt: int, prediction: str) -> events_pb2.ProviderResult:
    """The ``started`` an adapter publishes when its create of (task, attempt) answered."""
    r = kit.result(task_id, attempt, "started", prediction_id=prediction)
    r.source = events_pb2.RESULT_SOURCE_CREATE
    return r


async def test_a_create_is_recorded_by_its_results_and_a_stale_ones_prediction_canceled(
    make_env: Callable[..., Awaitable[Env]],
) -> None:
    """ADR 0003: the adapter records its create with the ``started`` result (or the terminal one
    that superseded it) instead of CompleteSubmit. The first result naming a prediction records it
    and starts the task; a result naming another prediction for the attempt changes nothing; a
    create's ``started`` refused (stale attempt, task ended, another prediction) gets its
    prediction canceled by a CancelTask command, as a refused CompleteSubmit did."""
    env = await make_env(lead=True)
    rows = [r for r, _ in await env.core.submit("a", 1, [kit.item(f"c{i}") for i in range(3)])]
    assert await env.dispatch() == 3
    a, b, c = (str(r["id"]) for r in rows)
    for tid in (a, b, c):
        assert (await env.core.begin_submit(tid, 1))[0] == 1  # PROCEED
    # a: the create's started records the prediction; another prediction's results change nothing.
    await env.core.apply_results([created(a, 1, "pa")])
    t = await env.task(rows[0]["id"])
    assert (t["status"], t["prediction_id"], t["submit_state"]) == (models.RUNNING, "pa", 4)
    await env.core.apply_results([kit.result(a, 1, "succeeded", prediction_id="other")])
    assert (await env.task(rows[0]["id"]))["status"] == models.RUNNING
    await env.core.apply_results([created(a, 1, "pa-twin")])  # a second create: canceled
    # b: an instant prediction's terminal result came first and records it alone.
    await env.core.apply_results([kit.result(b, 1, "succeeded", prediction_id="pb")])
    t = await env.task(rows[1]["id"])
    assert (t["status"], t["prediction_id"]) == (models.SUCCEEDED, "pb")
    await env.core.apply_results([created(b, 1, "pb")])  # its held started, late: nothing
    # c: the attempt went stale (here: the task failed) before the create's started came.
    await env.core.apply_results([kit.result(c, 1, "failed", retryable=False, prediction_id="")])
    await env.core.apply_results([created(c, 1, "pc")])
    commands = await env.rows(
        "SELECT key, payload FROM outbox WHERE ce_type = 'conveyor.events.v1.CancelTask'"
        " ORDER BY id"
    )
    cancels = []
    for key, payload in commands:
        cancel = events_pb2.CancelTask.FromString(payload)
        cancels.append((key, cancel.attempt, cancel.prediction_id, cancel.reason))
    assert cancels == [(a, 1, "pa-twin", "stale_create"), (c, 1, "pc", "stale_create")]
    await env.check()


async def test_batched_submit_protocol(make_env: Callable[..., Awaitable[Env]]) -> None:
    """BeginSubmitBatch/CompleteSubmitBatch: one transaction, answers in order, a repeated attempt
    answered as if it came second, a missing task STOP, bad items refused by index."""
    env = await make_env(lead=True)
    rows = [r for r, _ in await env.core.submit("a", 1, [kit.item(f"b{i}") for i in range(3)])]
    assert await env.dispatch() == 3
    ids = [str(r["id"]) for r in rows]
    servicer = ProviderCoordinationServicer(env.core)
    P = provider_pb2
    begun = await servicer.BeginSubmitBatch(
        P.BeginSubmitBatchRequest(
            items=[
                P.BeginSubmitRequest(task_id=ids[0], attempt=1),
                P.BeginSubmitRequest(task_id=ids[1], attempt=1),
                P.BeginSubmitRequest(task_id=ids[0], attempt=1),  # a duplicate dispatch
                P.BeginSubmitRequest(task_id=str(uuid.uuid4()), attempt=1),
                P.BeginSubmitRequest(task_id="not-a-uuid", attempt=1),
            ]
        ),
        None,  # type: ignore[arg-type]
    )
    assert [r.decision for r in begun.results] == [
        P.SUBMIT_DECISION_PROCEED,
        P.SUBMIT_DECISION_PROCEED,
        P.SUBMIT_DECISION_RECONCILE,
        P.SUBMIT_DECISION_STOP,
        P.SUBMIT_DECISION_STOP,
    ]
    assert begun.results[2].HasField("submit_started_at")
    done = await servicer.CompleteSubmitBatch(
        P.CompleteSubmitBatchRequest(
            items=[
                P.CompleteSubmitRequest(task_id=ids[0], attempt=1, prediction_id="p0"),
                P.CompleteSubmitRequest(task_id=ids[1], attempt=2, prediction_id="p1"),  # stale
                P.CompleteSubmitRequest(task_id=ids[0], attempt=1, prediction_id="other"),
            ]
        ),
        None,  # type: ignore[arg-type]
    )
    assert [r.accepted for r in done.results] == [True, False, False]
    t = await env.task(rows[0]["id"])
    assert (t["status"], t["prediction_id"]) == (models.RUNNING, "p0")
    with pytest.raises(InvalidArgument) as bad:
        await servicer.BeginSubmitBatch(
            P.BeginSubmitBatchRequest(
                items=[
                    P.BeginSubmitRequest(task_id=ids[2], attempt=1),
                    P.BeginSubmitRequest(task_id=ids[2], attempt=0),
                ]
            ),
            None,  # type: ignore[arg-type]
        )
    assert [v.field for v in bad.value.violations] == ["items[1].attempt"]
    with pytest.raises(InvalidArgument):
        await servicer.CompleteSubmitBatch(P.CompleteSubmitBatchRequest(), None)  # type: ignore[arg-type]
    assert (await env.task(rows[2]["id"]))["submit_state"] == 1  # the refused batch wrote nothing
    await env.check()


async def test_concurrent_begins_of_one_attempt_let_exactly_one_proceed(
    make_env: Callable[..., Awaitable[Env]],
) -> None:
    """One prediction per attempt: of concurrent BeginSubmits of the same attempt (a redelivered
    dispatch, two adapters) exactly one proceeds, whichever way each is decided (the common case's
    single statement, the ordered transaction); the others reconcile, with the intent's time."""
    env = await make_env(lead=True)
    rows = [r for r, _ in await env.core.submit("a", 1, [kit.item(f"k{i}") for i in range(3)])]
    assert await env.dispatch() == 3
    ids = [str(r["id"]) for r in rows]
    calls = [env.core.begin_submits([(tid, 1)]) for tid in ids for _ in range(3)]
    calls += [env.core.begin_submits([(ids[0], 1), (ids[1], 1), (ids[0], 1)])]
    answers = await asyncio.gather(*calls)
    decisions: dict[str, list[int]] = {tid: [] for tid in ids}
    for answer, tids in zip(
        answers, [[tid] for tid in ids for _ in range(3)] + [[ids[0], ids[1], ids[0]]], strict=True
    ):
        for tid, outcome in zip(tids, answer, strict=True):
            decisions[tid].append(outcome.decision)
            assert outcome.row is not None
            assert outcome.row["submit_started_at"] is not None
    for tid in ids:
        assert sorted(decisions[tid]).count(1) == 1, decisions[tid]  # PROCEED once
        assert set(decisions[tid]) == {1, 4}  # the rest RECONCILE
        t = await env.task(uuid.UUID(tid))
        assert t["submit_state"] == 2
    await env.check()


class Requests:
    """Stands in for a non-leader replica's WorkAnnouncer: records what it is asked to announce."""

    def __init__(self) -> None:
        self.got: list[dict[str, bool]] = []

    def request(self, **kw: bool) -> None:
        self.got.append(kw)


async def test_a_followers_hot_writes_carry_their_notify_in_their_own_transaction(
    make_env: Callable[..., Awaitable[Env]], sched_url: str
) -> None:
    """On a non-leader, BeginSubmit, CompleteSubmit and applied results send their NOTIFY inside
    their transaction (delivered with the commit; no NOTIFY of the announcer after it): a begin
    that takes a command out of the window says 'window+nooutbox' (it wrote no event: the leader's
    relay stays asleep), CompleteSubmit and a non-freeing result
    (STARTED, PROGRESS) say 'outbox' (the leader's relay only), a terminal result says 'slots'
    (the task had left the dispatch window). A result that changes nothing sends nothing, and on
    the leader's replica nothing is sent: its loops are woken in process, the relay only for a
    commit that wrote events."""
    env = await make_env(lead=True)
    [(row, _)] = await env.core.submit("a", 1, [kit.item()])
    await env.dispatch()
    tid = str(row["id"])
    listen = await psycopg.AsyncConnection.connect(to_libpq_url(sched_url), autocommit=True)
    try:
        await listen.execute(f"LISTEN {CHANNEL}")

        async def notified() -> list[str]:
            """What arrived since the last call (waits 0.3 s for more)."""
            return [note.payload async for note in listen.notifies(timeout=0.3)]

        requests = Requests()
        env.core.wakeups.local_leader = False
        env.core.wakeups.announcer = requests  # type: ignore[assignment]
        env.core.wakeups.relay.clear()
        assert (await env.core.begin_submit(tid, 2))[0] == 2  # stale: STOP, and nothing to say
        assert await notified() == []
        assert (await env.core.begin_submit(tid, 1))[0] == 1
        assert await notified() == ["window+nooutbox"]
        assert await env.core.complete_submit(tid, 1, f"p-{tid}-1")  # the results' prediction
        assert await notified() == ["outbox"]
        await env.core.apply_results([kit.result(row["id"], 1, "progress", percent=40)])
        assert await notified() == ["outbox"]
        await env.core.apply_results([kit.result(row["id"], 1, "progress", percent=30)])
        assert await notified() == []  # progress went nowhere: no event, no NOTIFY
        await env.core.apply_results([kit.result(row["id"], 1, "succeeded")])
        assert await notified() == ["slots"]
        assert requests.got == []  # nothing left for the announcer
        assert not env.core.wakeups.relay.is_set()

        env.core.wakeups.local_leader = True  # the leader's replica: in-process events only
        [(row2, _)] = await env.core.submit("a", 1, [kit.item("second")])
        await env.dispatch()
        env.core.wakeups.relay.clear()
        env.core.wakeups.dispatch.clear()
        assert (await env.core.begin_submit(str(row2["id"]), 1))[0] == 1
        assert env.core.wakeups.dispatch.is_set()  # window room
        assert not env.core.wakeups.relay.is_set()  # nothing to publish
        assert await env.core.complete_submit(str(row2["id"]), 1, "pred-2")
        assert await notified() == []
        assert env.core.wakeups.relay.is_set()
    finally:
        await listen.close()


class Announcer:
    """A non-leader's announcer, quiet or in a burst of submits: records what it is asked."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.got: list[dict[str, bool]] = []
        self.carried_notifies = 0

    def quiet_for_work(self) -> bool:
        return self.quiet

    def request(self, **kw: bool) -> None:
        self.got.append(kw)

    def carried(self) -> None:
        self.carried_notifies += 1


async def test_a_followers_lone_submit_carries_its_notify_in_its_group_commit(
    make_env: Callable[..., Awaitable[Env]], sched_url: str
) -> None:
    """A submit on a non-leader whose announcer is quiet sends the leader's 'work' NOTIFY inside
    its group commit (with the commit, not in a transaction of its own after it); during a burst
    (the announcer coalescing) the announcer's NOTIFY stays the one sent. A group that created
    nothing (a repeated request id) announces nothing."""
    env = await make_env(lead=False)
    listen = await psycopg.AsyncConnection.connect(to_libpq_url(sched_url), autocommit=True)
    try:
        await listen.execute(f"LISTEN {CHANNEL}")

        async def notified() -> list[str]:
            return [note.payload async for note in listen.notifies(timeout=0.3)]

        quiet = Announcer(quiet=True)
        env.core.wakeups.local_leader = False
        env.core.wakeups.announcer = quiet  # type: ignore[assignment]
        _, dedup = await env.core.submit_one("a", 1, kit.item("lone"))
        assert not dedup
        assert await notified() == ["work"]
        assert quiet.got == []
        assert quiet.carried_notifies == 1
        _, dedup = await env.core.submit_one("a", 1, kit.item("lone"))  # the same request again
        assert dedup
        assert await notified() == []
        assert quiet.got == []

        busy = Announcer(quiet=False)
        env.core.wakeups.announcer = busy  # type: ignore[assignment]
        await env.core.submit_one("a", 1, kit.item("in-a-burst"))
        assert await notified() == []  # left to the announcer's coalesced NOTIFY
        assert busy.got == [{"new_work": True, "frees": False, "window": False, "outbox": True}]
        assert busy.carried_notifies == 0
    finally:
        await listen.close()
