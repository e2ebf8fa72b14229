"""conveyor_provider_adapter.commands through a real Kafka, the real fake Replicate and a scripted scheduler: creates, redelivered dispatches, 429 bursts, cancels, run deadlines, ambiguous creates and rejections."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from conveyor.events.v1 import events_pb2
from conveyor_common import vocabulary
from conveyor_testkit.adapter import (
    has_terminal,
    outcomes,
)
from tests.integration.adapter_env import Env, task_id, wait_until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.kafka,
    pytest.mark.usefixtures("fresh_fake_config"),
]


async def test_happy_path_reports_progress_and_copied_outputs(env: Env) -> None:
    task = task_id()
    env.coordination.dispatched(task, model="acme/flux")
    deadline = datetime.now(UTC) + timedelta(minutes=10)
    await env.commands.dispatch(
        task,
        inputs={"prompt": "a red fox", "steps": 30, "__fake_duration_s": 1.2},
        run_deadline=deadline,
    )
    results = await env.collector.wait_for(has_terminal, task)
    names = outcomes(results)
    # The create is recorded by a ``started`` result naming its prediction (no CompleteSubmit
    # round trip); the start webhook adds no result of its own.
    assert not [c for c in env.coordination.calls if c[0] == "CompleteSubmit"]
    assert names[0] == "started"
    assert names.count("started") == 1
    assert results[0].result_id == f"create:{task}:1:started"
    assert results[0].source == events_pb2.RESULT_SOURCE_CREATE
    assert names[-1] == "succeeded"
    assert names.count("succeeded") == 1
    percents = [r.progress.percent for r in results if r.WhichOneof("outcome") == "progress"]
    assert percents, names
    assert percents == sorted(set(percents)), percents  # monotonic, no repeats
    assert all(0 <= p <= 100 for p in percents)
    assert {r.source for r in results[1:]} == {events_pb2.RESULT_SOURCE_WEBHOOK}
    assert all(r.result_id.startswith("wh:") for r in results[1:])
    assert len({r.prediction_id for r in results}) == 1
    assert all(r.tenant_id == "tenant-a" and r.attempt == 1 for r in results)

    creates = await env.ledger(task)
    assert len(creates) == 1
    create = creates[0]
    assert create["prediction_id"] == results[0].prediction_id
    assert create["model"] == "acme/flux"
    assert create["input"]["steps"] == 30  # integral numbers survive the protobuf Struct
    assert set(create["events_filter"]) == {"start", "logs", "completed"}
    assert create["params"]["attempt"] == "1"
    assert create["params"]["token"]
    assert create["deadline"] is not None  # Cancel-After was sent

    done = results[-1].succeeded
    assert len(done.files) >= 1
    async with httpx.AsyncClient() as client:
        for f in done.files:
            assert f.source_url.startswith(env.fake.url)
            assert f.url.startswith("file://")
            path = Path(f.url.removeprefix("file://"))
            assert env.storage_root in path.parents
            original = (await client.get(f.source_url)).content
            assert await asyncio.to_thread(path.read_bytes) == original
            assert f.size_bytes == len(original)
    assert done.predict_time.ToTimedelta() > timedelta(0)
    assert env.coordination.decisions(task) == ["PROCEED"]
    assert env.metric("conveyor_adapter_output_copy_bytes_total", backend="filesystem") > 0


async def test_create_forms_version_and_deployment(env: Env) -> None:
    version = "a" * 64
    t1, t2 = task_id(), task_id()
    env.coordination.dispatched(t1)
    env.coordination.dispatched(t2)
    await env.commands.dispatch(t1, model=f"acme/flux:{version}", inputs={"prompt": "v"})
    await env.commands.dispatch(t2, model=None, deployment="acme/flux-prod", inputs={"prompt": "d"})
    await env.collector.wait_for(has_terminal, t1)
    await env.collector.wait_for(has_terminal, t2)
    (c1,) = await env.ledger(t1)
    (c2,) = await env.ledger(t2)
    assert c1["version"] == version
    assert c1["model"] == "acme/flux"
    assert c2["deployment"] == "acme/flux-prod"


async def test_dispatch_redelivered_five_times_creates_one_prediction(env: Env) -> None:
    task = task_id()
    env.coordination.dispatched(task)
    for _ in range(5):
        await env.commands.dispatch(task, inputs={"prompt": "same", "__fake_duration_s": 0.8})
    await env.collector.wait_for(has_terminal, task)
    await wait_until(lambda: len(env.coordination.decisions(task)) >= 5)
    decisions = env.coordination.decisions(task)
    assert len(decisions) == 5
    assert decisions[0] == "PROCEED"
    assert "PROCEED" not in decisions[1:]
    assert len(await env.ledger(task)) == 1


async def test_dropped_completed_webhook_is_reconciled_by_polling(env: Env) -> None:
    task = task_id()
    env.coordination.dispatched(task)
    await env.commands.dispatch(
        task,
        inputs={"prompt": "lost", "__fake_duration_s": 0.6, "__fake_webhook_drop": ["completed"]},
    )
    results = await env.collector.wait_for(has_terminal, task, wait_s=20)
    final = results[-1]
    assert final.WhichOneof("outcome") == "succeeded"
    assert final.source == events_pb2.RESULT_SOURCE_POLL
    assert final.result_id == f"poll:{final.prediction_id}:succeeded"
    assert len(final.succeeded.files) >= 1
    assert final.succeeded.files[0].url
    dropped = await env.ledger_all("webhook")
    assert any(
        e["prediction_id"] == final.prediction_id
        and e["event"] == "completed"
        and e["outcome"] == "dropped"
        for e in dropped
    )
    assert env.metric("conveyor_adapter_reconcile_actions_total", action="poll") >= 1


async def test_429_burst_pauses_creates_and_reports_throttled(env: Env) -> None:
    env.fake.configure(script_429_retry_after_s=1, create_script=[429, 429])
    tasks = [task_id() for _ in range(3)]
    for t in tasks:
        env.coordination.dispatched(t)
    before_429 = env.metric("conveyor_adapter_rate_limited_total", call="create")
    started = time.time()
    # The first command meets the first 429; the others arrive during its pause (commands are
    # handled side by side, so sent together they could all be in flight before any answer).
    await env.commands.dispatch(tasks[0], inputs={"prompt": tasks[0], "__fake_duration_s": 0.3})
    deadline = time.monotonic() + 10
    while not await env.ledger_all("create_rejected"):
        assert time.monotonic() < deadline, "no 429 answered"
        await asyncio.sleep(0.02)
    for t in tasks[1:]:
        await env.commands.dispatch(t, inputs={"prompt": t, "__fake_duration_s": 0.3})
    for t in tasks:
        await env.collector.wait_for(has_terminal, t, wait_s=30)
    rejected = [e for e in await env.ledger_all("create_rejected") if e["task"] in tasks]
    assert [e["status"] for e in rejected] == [429, 429]
    creates = [e for t in tasks for e in await env.ledger(t)]
    assert len(creates) == 3  # one prediction per task, none lost
    # Nothing reached the provider during the pause (1 s retry_after): the second 429 and every
    # accepted create came after it, the commands that arrived during it included.
    first_429, second_429 = sorted(e["t"] for e in rejected)
    assert second_429 - first_429 >= 0.9
    assert min(e["t"] for e in creates) - first_429 >= 0.9
    assert min(e["t"] for e in creates) >= started
    throttled = [
        r
        for t in tasks
        for r in env.collector.for_task(t)
        if r.WhichOneof("outcome") == "throttled"
    ]
    assert len(throttled) == 2
    for r in throttled:
        assert r.throttled.provider == "replicate"
        delay = r.throttled.retry_at.ToDatetime(tzinfo=UTC) - r.observed_at.ToDatetime(tzinfo=UTC)
        assert timedelta(seconds=0.5) <= delay <= timedelta(seconds=2)
    assert env.metric("conveyor_adapter_rate_limited_total", call="create") - before_429 == 2


async def test_cancel_reaches_the_provider(env: Env) -> None:
    task = task_id()
    env.coordination.dispatched(task)
    await env.commands.dispatch(task, inputs={"prompt": "long", "__fake_duration_s": 30})
    await wait_until(lambda: env.coordination.running(task))
    await env.commands.cancel(task)
    results = await env.collector.wait_for(has_terminal, task)
    assert outcomes(results)[-1] == "canceled"
    assert results[-1].canceled.deadline_exceeded is False
    (cancel,) = await env.ledger(task, kind="cancel") or [
        e for e in await env.ledger_all("cancel") if e["prediction_id"] == results[-1].prediction_id
    ]
    assert cancel["by"] == "api"


async def test_a_stale_creates_prediction_is_canceled_on_the_schedulers_word(env: Env) -> None:
    """ADR 0003: the scheduler answers a create's ``started`` it refuses (the attempt went stale)
    with a CancelTask naming the prediction, reason ``stale_create``: the adapter cancels it at the
    provider and counts the create as stale."""
    stale_before = env.metric("conveyor_adapter_creates_total", outcome="stale")
    task = task_id()
    env.coordination.dispatched(task)
    await env.commands.dispatch(task, inputs={"prompt": "went stale", "__fake_duration_s": 30})
    await wait_until(lambda: env.coordination.running(task))
    (create,) = await env.ledger(task)
    await env.commands.cancel(
        task, prediction_id=create["prediction_id"], reason=vocabulary.STALE_CREATE
    )
    results = await env.collector.wait_for(has_terminal, task)
    assert outcomes(results)[-1] == "canceled"
    cancels = [
        e for e in await env.ledger_all("cancel") if e["prediction_id"] == create["prediction_id"]
    ]
    assert len(cancels) == 1
    assert env.metric("conveyor_adapter_creates_total", outcome="stale") == stale_before + 1


async def test_cancel_before_the_prediction_exists_is_applied_when_it_appears(env: Env) -> None:
    task = task_id()
    env.coordination.dispatched(task)
    await env.commands.cancel(task)  # arrives first: the prediction id is not known yet
    await env.commands.dispatch(task, inputs={"prompt": "early cancel", "__fake_duration_s": 30})
    results = await env.collector.wait_for(has_terminal, task)
    assert outcomes(results)[-1] == "canceled"
    cancels = [
        e for e in await env.ledger_all("cancel") if e["prediction_id"] == results[-1].prediction_id
    ]
    assert len(cancels) == 1
    assert cancels[0]["by"] == "api"
    assert len(await env.ledger(task)) == 1


async def test_run_deadline_becomes_cancel_after(env: Env) -> None:
    task = task_id()
    env.coordination.dispatched(task)
    await env.commands.dispatch(
        task,
        inputs={"prompt": "too slow", "__fake_duration_s": 30},
        run_deadline=datetime.now(UTC) + timedelta(seconds=40),
    )
    await wait_until(lambda: env.coordination.running(task))
    (create,) = await env.ledger(task)
    created = datetime.fromtimestamp(create["t"], UTC)
    deadline = datetime.fromisoformat(create["deadline"])
    assert 38 <= (deadline - created).total_seconds() <= 41  # Cancel-After from the deadline
    await env.commands.cancel(task)
    await env.collector.wait_for(has_terminal, task)


async def test_run_deadline_under_five_seconds_is_enforced_by_the_adapter(env: Env) -> None:
    """Replicate refuses Cancel-After under 5 s: the adapter sends 5 s and cancels at 2 s itself."""
    task = task_id()
    env.coordination.dispatched(task)
    sent = datetime.now(UTC)
    await env.commands.dispatch(
        task,
        inputs={"prompt": "too slow", "__fake_duration_s": 30},
        run_deadline=sent + timedelta(seconds=2),
    )
    results = await env.collector.wait_for(has_terminal, task, wait_s=15)
    final = results[-1]
    assert final.WhichOneof("outcome") == "canceled"
    assert final.canceled.deadline_exceeded is True
    (create,) = await env.ledger(task)
    # Cancel-After: 5s, Replicate's minimum (the fake refuses less), as the backstop.
    created = datetime.fromtimestamp(create["t"], UTC)
    assert (datetime.fromisoformat(create["deadline"]) - created).total_seconds() == pytest.approx(
        5, abs=0.05
    )
    cancels = [
        e for e in await env.ledger_all("cancel") if e["prediction_id"] == final.prediction_id
    ]
    assert [c["by"] for c in cancels][:1] == ["api"]  # the adapter's own cancel, before 5 s
    assert env.metric("conveyor_adapter_cancels_total", outcome="deadline_timer") >= 1


async def test_ambiguous_create_is_adopted_through_its_start_webhook(env: Env) -> None:
    env.fake.configure(create_script=["drop"])
    task = task_id()
    env.coordination.dispatched(task)
    await env.commands.dispatch(task, inputs={"prompt": "dropped answer", "__fake_duration_s": 0.8})
    results = await env.collector.wait_for(has_terminal, task)
    assert outcomes(results)[-1] == "succeeded"
    (create,) = await env.ledger(task)
    assert create["response_dropped"] is True
    methods = [(m, what) for (m, t, _a, what) in env.coordination.calls if t == task]
    assert ("MarkSubmitUnknown", "True") in methods
    assert ("CompleteSubmit", "True") in methods  # adopted, never re-created
    assert env.coordination.tasks[task].prediction_id == create["prediction_id"]


async def test_ambiguous_create_that_created_nothing_fails_retryable_after_grace(env: Env) -> None:
    env.fake.configure(create_script=[503])
    task = task_id()
    env.coordination.dispatched(task)
    await env.commands.dispatch(task, inputs={"prompt": "5xx", "__fake_duration_s": 0.5})
    results = await env.collector.wait_for(has_terminal, task, wait_s=20)
    final = results[-1]
    assert final.WhichOneof("outcome") == "failed"
    assert final.failed.code == "submit_unknown"
    assert final.failed.retryable is True
    assert final.result_id == f"unknown:{task}:1"
    assert await env.ledger(task) == []  # nothing was created, and nothing was re-created


async def test_definite_rejections_fail_without_retry(env: Env) -> None:
    bad_input, bad_model = task_id(), task_id()
    env.coordination.dispatched(bad_input)
    env.coordination.dispatched(bad_model)
    await env.commands.dispatch(bad_input, inputs={"prompt": "x", "__fake_create_status": 422})
    await env.commands.dispatch(bad_model, model="not a model", inputs={"prompt": "x"})
    r1 = (await env.collector.wait_for(has_terminal, bad_input))[-1]
    r2 = (await env.collector.wait_for(has_terminal, bad_model))[-1]
    for r in (r1, r2):
        assert r.WhichOneof("outcome") == "failed"
        assert r.failed.retryable is False
        assert r.failed.code == "invalid_input"
        assert r.source == events_pb2.RESULT_SOURCE_CREATE
    assert "422" in r1.failed.message
    assert await env.ledger(bad_input) == []
    assert await env.ledger(bad_model) == []


@pytest.mark.parametrize(("status", "code"), [(408, "timeout"), (409, "conflict")])
async def test_passing_4xx_on_create_is_a_retryable_failure(
    env: Env, status: int, code: str
) -> None:
    """408/409 say nothing was created and the refusal passes: not a verdict on the task."""
    env.fake.configure(create_script=[status])
    task = task_id()
    env.coordination.dispatched(task)
    await env.commands.dispatch(task, inputs={"prompt": "passing", "__fake_duration_s": 0.3})
    final = (await env.collector.wait_for(has_terminal, task))[-1]
    assert final.WhichOneof("outcome") == "failed"
    assert final.failed.retryable is True
    assert final.failed.code == code
    assert await env.ledger(task) == []


async def test_stale_dispatch_is_stopped(env: Env) -> None:
    task = task_id()
    env.coordination.dispatched(task, attempt=2)
    await env.commands.dispatch(task, attempt=1, inputs={"prompt": "old attempt"})
    await env.commands.dispatch(task, attempt=2, inputs={"prompt": "new attempt"})
    results = await env.collector.wait_for(has_terminal, task)
    assert {r.attempt for r in results} == {2}
    assert env.coordination.decisions(task) == ["STOP", "PROCEED"]
    (create,) = await env.ledger(task)
    assert create["attempt"] == 2
