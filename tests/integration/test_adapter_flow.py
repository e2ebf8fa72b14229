"""The provider adapter end to end over real Kafka, real loopback HTTP and the fake Replicate.

One adapter (in-process), one fake, one in-memory coordination service with the scheduler's fencing
rules, and a collector of the results topic that feeds results back into it, for the module.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka.partitioner import DefaultPartitioner
from conveyor_testkit.adapter import (
    Commands,
    InMemoryCoordination,
    ResultCollector,
    free_port,
    has_terminal,
    outcomes,
)
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from conveyor.events.v1 import events_pb2
from conveyor.scheduler.v1 import provider_coordination_service_pb2 as provider_pb2
from conveyor_common.standard_webhooks import generate_secret, sign_headers
from conveyor_devstack.topics import ensure_topics
from conveyor_provider_adapter.app import Adapter
from conveyor_provider_adapter.binding import UNBOUND_REASONS
from conveyor_provider_adapter.settings import AdapterSettings
from conveyor_provider_adapter.webhook_token import webhook_url
from fake_replicate import FakeConfig, FakeReplicate
from fake_replicate.openapi import Exchange, OpenApiChecker

pytestmark = [pytest.mark.integration, pytest.mark.kafka]

TOKEN = "r8_adapter_flow"
SECRET = generate_secret()
S = provider_pb2.SubmitState


@dataclass
class Env:
    fake: FakeReplicate
    coordination: InMemoryCoordination
    collector: ResultCollector
    commands: Commands
    adapter: Adapter
    registry: CollectorRegistry
    storage_root: Path

    async def ledger(self, task: str, kind: str = "create") -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=self.fake.url) as client:
            resp = await client.get("/_fake/ledger", params={"kind": kind, "task": task})
            resp.raise_for_status()
            body = resp.json()
        events = body["events"] if isinstance(body, dict) else body
        return list(events)

    async def ledger_all(self, kind: str) -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=self.fake.url) as client:
            resp = await client.get("/_fake/ledger", params={"kind": kind})
            resp.raise_for_status()
            body = resp.json()
        return list(body["events"] if isinstance(body, dict) else body)

    def metric(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


async def wait_until(condition: Callable[[], bool], wait_s: float = 10.0) -> None:
    async with asyncio.timeout(wait_s):
        while not condition():  # noqa: ASYNC110 - polling state another task mutates
            await asyncio.sleep(0.05)


def task_id() -> str:
    return f"task-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
async def env(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    stem = f"test.adapter-flow.{uuid.uuid4().hex[:8]}"
    commands_topic, results_topic = f"{stem}.commands", f"{stem}.results"
    await ensure_topics(
        kafka_bootstrap, {commands_topic: 3, f"{commands_topic}.dlq": 1, results_topic: 3}
    )
    fake = FakeReplicate(
        FakeConfig(
            token=TOKEN,
            webhook_secret=SECRET,
            seed=5,
            min_duration_s=0.6,
            max_duration_s=0.8,
            progress_steps=4,
            webhook_throttle_s=0.1,
            webhook_retry_base_s=0.1,
            output_bytes=4096,
        )
    )
    await fake.start()
    coordination = InMemoryCoordination()
    await coordination.start()
    collector = ResultCollector(kafka_bootstrap, results_topic, coordination)
    await collector.start()
    commands = Commands(kafka_bootstrap, commands_topic)
    await commands.start()
    storage_root = tmp_path_factory.mktemp("adapter-outputs")
    port = free_port()
    settings = AdapterSettings(
        replicate_api_token=SecretStr(TOKEN),
        replicate_base_url=fake.url,
        webhook_public_base_url=f"http://127.0.0.1:{port}",
        webhook_token_key=SecretStr("test-webhook-token-key-0123456789"),
        webhook_host="127.0.0.1",
        webhook_port=port,
        grpc_host="127.0.0.1",
        grpc_port=0,
        scheduler_address=coordination.address,
        kafka_bootstrap=kafka_bootstrap,
        consumer_group=f"adapter-{uuid.uuid4().hex[:8]}",
        commands_topic=commands_topic,
        results_topic=results_topic,
        replicate_create_timeout_s=3.0,
        reconcile_interval_s=0.3,
        webhook_overdue_s=2.0,
        submit_unknown_grace_s=2.0,
        reconcile_skew_s=5.0,
        default_retry_after_s=1.0,
        throttle_max_wait_s=15.0,
        storage_fs_root=storage_root,
        output_allowed_hosts=["127.0.0.1"],
        output_allow_http=True,
    )
    registry = CollectorRegistry()
    adapter = Adapter(settings, registry=registry)
    await adapter.start()
    try:
        yield Env(fake, coordination, collector, commands, adapter, registry, storage_root)
    finally:
        await adapter.stop()
        await commands.stop()
        await collector.stop()
        await coordination.stop()
        await fake.stop()


@pytest.fixture(autouse=True)
def _fresh_fake_config(env: Env) -> Iterator[None]:
    """Each test starts from the fake's default faults, and every request the adapter (or the test)
    sent to the fake, every answer and every webhook the fake delivered during the test is checked
    against Replicate's OpenAPI document."""
    env.fake.configure(create_script=[], create_drop_delay_s=0.0)
    exchanges: list[Exchange] = []
    env.fake.engine.recorder = exchanges.append
    yield
    env.fake.engine.recorder = None
    problems = OpenApiChecker.load().check_all(exchanges)
    assert problems == [], problems[:10]


async def test_happy_path_reports_started_progress_and_copied_outputs(env: Env) -> None:
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
    assert names[0] == "started"
    assert names[-1] == "succeeded"
    assert names.count("succeeded") == 1
    percents = [r.progress.percent for r in results if r.WhichOneof("outcome") == "progress"]
    assert percents, names
    assert percents == sorted(set(percents)), percents  # monotonic, no repeats
    assert all(0 <= p <= 100 for p in percents)
    assert {r.source for r in results} == {events_pb2.RESULT_SOURCE_WEBHOOK}
    assert all(r.result_id.startswith("wh:") for r in results)
    assert len({r.prediction_id for r in results}) == 1
    assert all(r.tenant_id == "tenant-a" and r.attempt == 1 for r in results)

    creates = await env.ledger(task)
    assert len(creates) == 1
    create = creates[0]
    assert create["prediction_id"] == results[0].prediction_id
    assert create["model"] == "acme/flux"
    assert create["input"]["steps"] == 30  # integral numbers survive the protobuf Struct
    assert set(create["events_filter"]) == {"start", "output", "logs", "completed"}
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
    for t in tasks:
        await env.commands.dispatch(t, inputs={"prompt": t, "__fake_duration_s": 0.3})
    for t in tasks:
        await env.collector.wait_for(has_terminal, t, wait_s=30)
    rejected = [e for e in await env.ledger_all("create_rejected") if e["task"] in tasks]
    assert [e["status"] for e in rejected] == [429, 429]
    creates = [e for t in tasks for e in await env.ledger(t)]
    assert len(creates) == 3  # one prediction per task, none lost
    # Every create waited out the pauses: two 1 s retry_after windows after the first 429.
    first_429 = min(e["t"] for e in rejected)
    assert min(e["t"] for e in creates) - first_429 >= 1.8
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
    await env.collector.wait_for(lambda rs: "started" in outcomes(rs), task)
    await env.commands.cancel(task)
    results = await env.collector.wait_for(has_terminal, task)
    assert outcomes(results)[-1] == "canceled"
    assert results[-1].canceled.deadline_exceeded is False
    (cancel,) = await env.ledger(task, kind="cancel") or [
        e for e in await env.ledger_all("cancel") if e["prediction_id"] == results[-1].prediction_id
    ]
    assert cancel["by"] == "api"


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
    await env.collector.wait_for(lambda rs: "started" in outcomes(rs), task)
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


# --------------------------------------------------------------------------------------------------
# Webhook security: forged, stale, tampered and replayed deliveries change nothing.


def _hook_url(env: Env, task: str, attempt: int = 1) -> str:
    settings = env.adapter.settings
    url = webhook_url(
        f"http://127.0.0.1:{env.adapter.webhook_port}",
        settings.webhook_token_key.get_secret_value().encode(),
        task,
        attempt,
    )
    return url


def _rejected(env: Env) -> dict[str, float]:
    reasons = (
        "bad_signature",
        "missing_headers",
        "stale",
        "future",
        "bad_token",
        "malformed_signature",
    )
    return {r: env.metric("conveyor_adapter_webhooks_rejected_total", reason=r) for r in reasons}


async def test_forged_stale_tampered_and_replayed_webhooks_change_nothing(env: Env) -> None:
    task = task_id()
    pid = f"pforged{uuid.uuid4().hex[:10]}"
    record = env.coordination.dispatched(task)
    record.state = S.SUBMIT_STATE_SUBMITTED
    record.prediction_id = pid
    body = json.dumps(
        {
            "id": pid,
            "status": "processing",
            "model": "acme/flux",
            "input": {"prompt": "x"},
            "logs": "Using seed: 1\n 40%|####      | 4/10 [00:01<00:01,  3.00it/s]\n",
            "created_at": datetime.now(UTC).isoformat(),
        }
    ).encode()
    url = _hook_url(env, task)
    valid = sign_headers([SECRET], body)
    now = int(time.time())
    flipped = bytearray(body)
    flipped[len(flipped) // 2] ^= 0x01
    forged: list[tuple[str, dict[str, str], bytes]] = [
        (
            "bad_signature",
            {**valid, "webhook-signature": "v1," + base64.b64encode(os.urandom(32)).decode()},
            body,
        ),
        ("bad_signature", sign_headers([generate_secret()], body), body),  # wrong secret
        ("bad_signature", valid, bytes(flipped)),  # one flipped body byte
        ("missing_headers", {k: v for k, v in valid.items() if k != "webhook-id"}, body),
        ("missing_headers", {k: v for k, v in valid.items() if k != "webhook-timestamp"}, body),
        ("missing_headers", {k: v for k, v in valid.items() if k != "webhook-signature"}, body),
        ("stale", sign_headers([SECRET], body, timestamp=now - 301), body),
        ("future", sign_headers([SECRET], body, timestamp=now + 301), body),
    ]
    before = _rejected(env)
    dup_before = env.metric("conveyor_adapter_webhooks_total", outcome="duplicate")
    async with httpx.AsyncClient(timeout=5) as client:
        for reason, headers, content in forged:
            resp = await client.post(url, content=content, headers=headers)
            assert resp.status_code == 401, (reason, resp.text)
            assert resp.json()["error"] == reason
        # Signed by Replicate, but not a URL we issued (token of another attempt).
        wrong_token = url.replace("attempt=1", "attempt=7")
        resp = await client.post(wrong_token, content=body, headers=valid)
        assert resp.status_code == 200
        assert resp.json()["error"] == "bad_token"
        # The genuine delivery, then its replay.
        started = time.perf_counter()
        resp = await client.post(url, content=body, headers=valid)
        answer_s = time.perf_counter() - started
        assert resp.status_code == 200
        assert resp.json() == {"status": "accepted"}
        resp = await client.post(url, content=body, headers=valid)
        assert resp.status_code == 200
        assert resp.json() == {"status": "duplicate"}
    assert answer_s < 5.0  # "within milliseconds" in practice; generous for a loaded CI machine
    results = await env.collector.wait_for(lambda rs: "progress" in outcomes(rs), task)
    await asyncio.sleep(1.0)  # anything a forgery or the replay caused would be here by now
    results = env.collector.for_task(task)
    msg_id = valid["webhook-id"]
    assert outcomes(results) == ["started", "progress"]
    assert [r.result_id for r in results] == [f"wh:{msg_id}", f"wh:{msg_id}:progress"]
    assert results[1].progress.percent == 40
    after = _rejected(env)
    delta = {k: after[k] - before[k] for k in after}
    assert delta == {
        "bad_signature": 3,
        "missing_headers": 3,
        "stale": 1,
        "future": 1,
        "bad_token": 1,
        "malformed_signature": 0,
    }
    assert env.metric("conveyor_adapter_webhooks_total", outcome="duplicate") - dup_before == 1


async def test_signed_webhook_of_a_prediction_not_recorded_for_its_attempt_changes_nothing(
    env: Env,
) -> None:
    """A delivery's word is not enough to cancel: a prediction the scheduler never recorded for
    the attempt of the URL (here a stale attempt) is neither adopted nor canceled; the orphan ends
    at its Cancel-After deadline."""
    task = task_id()
    env.coordination.dispatched(task, attempt=2)
    async with httpx.AsyncClient(
        base_url=env.fake.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5
    ) as api:
        resp = await api.post(
            "/v1/models/acme/flux/predictions",
            json={"input": {"prompt": "stale", "__fake_duration_s": 30}},
            headers={"Cancel-After": "20s"},
        )
        assert resp.status_code == 201
        pid = resp.json()["id"]
        body = (await api.get(f"/v1/predictions/{pid}")).content
    before = env.metric("conveyor_adapter_webhooks_unbound_total", reason="not_in_flight")
    async with httpx.AsyncClient(timeout=5) as client:
        resp = await client.post(
            _hook_url(env, task, 1), content=body, headers=sign_headers([SECRET], body)
        )
        assert resp.status_code == 200
    await wait_until(
        lambda: (
            env.metric("conveyor_adapter_webhooks_unbound_total", reason="not_in_flight") > before
        )
    )
    assert not any(e["prediction_id"] == pid for e in await env.ledger_all("cancel"))
    assert not [c for c in env.coordination.calls if c[1] == task and c[0] == "CompleteSubmit"]
    assert env.collector.for_task(task) == []


async def _running_pair(env: Env) -> tuple[str, str, str, str]:
    """Two running tasks (T2, T4) and their prediction ids."""
    t2, t4 = task_id(), task_id()
    for t in (t2, t4):
        env.coordination.dispatched(t)
        await env.commands.dispatch(t, inputs={"prompt": f"{t} long", "__fake_duration_s": 6})
    p: dict[str, str] = {}
    for t in (t2, t4):
        results = await env.collector.wait_for(lambda rs: "started" in outcomes(rs), t)
        p[t] = results[0].prediction_id
    await wait_until(lambda: all(env.coordination.tasks[t].prediction_id for t in (t2, t4)))
    return t2, p[t2], t4, p[t4]


async def _second_replica(env: Env, kafka_bootstrap: str) -> tuple[Adapter, CollectorRegistry]:
    """A second adapter replica serving webhooks (its commands topic is its own, idle)."""
    port = free_port()
    topic = f"test.adapter-flow.idle.{uuid.uuid4().hex[:8]}"
    await ensure_topics(kafka_bootstrap, {topic: 1, f"{topic}.dlq": 1})
    settings = env.adapter.settings.model_copy(
        update={
            "webhook_port": port,
            "webhook_public_base_url": f"http://127.0.0.1:{port}",
            "adapter_id": "replica-webhooks",
            "commands_topic": topic,
            "consumer_group": f"adapter-idle-{uuid.uuid4().hex[:8]}",
        }
    )
    registry = CollectorRegistry()
    second = Adapter(settings, registry=registry)
    await second.start()
    return second, registry


def _unbound(registry: CollectorRegistry) -> float:
    return sum(
        registry.get_sample_value("conveyor_adapter_webhooks_unbound_total", {"reason": r}) or 0.0
        for r in UNBOUND_REASONS
    )


@pytest.mark.parametrize("replica", ["same", "other"])
@pytest.mark.parametrize("webhook_id", ["original", "fresh"])
async def test_retargeted_genuine_delivery_changes_nothing_and_cancels_nothing(
    env: Env, kafka_bootstrap: str, replica: str, webhook_id: str
) -> None:
    """#15: T4's genuine delivery posted to T2's webhook URL (same or another replica, original or
    fresh webhook-id) is not bound to T2's attempt: no adoption, no result, no cancel; counted."""
    t2, p2, t4, p4 = await _running_pair(env)
    async with httpx.AsyncClient(
        base_url=env.fake.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5
    ) as api:
        body = (await api.get(f"/v1/predictions/{p4}")).content
    genuine = sign_headers([SECRET], body)
    second: Adapter | None = None
    registry = env.registry
    try:
        if replica == "other":
            second, registry = await _second_replica(env, kafka_bootstrap)
        port = env.adapter.webhook_port if second is None else second.webhook_port
        key = env.adapter.settings.webhook_token_key.get_secret_value().encode()
        before = _unbound(registry)
        t2_results = list(env.collector.for_task(t2))
        t4_results = list(env.collector.for_task(t4))
        async with httpx.AsyncClient(timeout=5) as client:
            if webhook_id == "original":
                # The genuine delivery at T4's own URL first, then the same one re-targeted.
                resp = await client.post(
                    webhook_url(f"http://127.0.0.1:{port}", key, t4, 1),
                    content=body,
                    headers=genuine,
                )
                assert resp.status_code == 200
                headers = genuine
            else:
                headers = sign_headers([SECRET], body)  # re-signed under a fresh webhook-id
            resp = await client.post(
                webhook_url(f"http://127.0.0.1:{port}", key, t2, 1), content=body, headers=headers
            )
            assert resp.status_code == 200
            assert resp.json() == {"status": "accepted"}
        await wait_until(lambda: _unbound(registry) > before)
        # Nothing changed for T2: no result about P4, nothing canceled, P2 still recorded.
        assert all(r.prediction_id == p2 for r in env.collector.for_task(t2))
        assert env.collector.for_task(t2)[: len(t2_results)] == t2_results
        assert env.coordination.tasks[t2].prediction_id == p2
        assert env.coordination.tasks[t4].prediction_id == p4
        assert not [
            c
            for c in env.coordination.calls
            if c[0] == "CompleteSubmit" and c[1] == t2 and c[3] == "False"
        ]
        cancels = {e["prediction_id"] for e in await env.ledger_all("cancel")}
        assert p4 not in cancels
        assert p2 not in cancels
        # T4 itself finishes normally, and its results are only about P4.
        final4 = await env.collector.wait_for(has_terminal, t4, wait_s=20)
        assert outcomes(final4)[-1] == "succeeded"
        assert all(r.prediction_id == p4 for r in final4)
        assert final4[: len(t4_results)] == t4_results
        final2 = await env.collector.wait_for(has_terminal, t2, wait_s=20)
        assert outcomes(final2)[-1] == "succeeded"
        assert all(r.prediction_id == p2 for r in final2)
    finally:
        if second is not None:
            await second.stop()


async def test_a_delivery_to_two_replicas_and_after_a_restart_yields_the_same_result_ids(
    env: Env, kafka_bootstrap: str
) -> None:
    """Duplicate suppression across replicas and restarts is the scheduler's inbox: a delivery's
    result ids derive from its webhook-id, so the copy another replica handles, or a replica that
    restarted with empty memory, is the same result (applied once)."""
    task = task_id()
    pid = f"pdup{uuid.uuid4().hex[:10]}"
    record = env.coordination.dispatched(task)
    record.state = S.SUBMIT_STATE_SUBMITTED
    record.prediction_id = pid
    body = json.dumps(
        {
            "id": pid,
            "status": "processing",
            "model": "acme/flux",
            "input": {"prompt": "d"},
            "logs": "",
            "created_at": datetime.now(UTC).isoformat(),
        }
    ).encode()
    headers = sign_headers([SECRET], body)
    key = env.adapter.settings.webhook_token_key.get_secret_value().encode()

    async def post(port: int) -> Any:
        async with httpx.AsyncClient(timeout=5) as client:
            resp = await client.post(
                webhook_url(f"http://127.0.0.1:{port}", key, task, 1), content=body, headers=headers
            )
            return resp.json()

    async def one_more_result() -> None:
        n = len(env.collector.for_task(task))
        await env.collector.wait_for(lambda rs: len(rs) > n, task)

    published = asyncio.create_task(one_more_result())
    assert await post(env.adapter.webhook_port) == {"status": "accepted"}
    await published
    assert await post(env.adapter.webhook_port) == {"status": "duplicate"}  # the replica's LRU
    for _ in range(2):  # another replica, then a "restarted" one with empty memory
        replica, _registry = await _second_replica(env, kafka_bootstrap)
        try:
            published = asyncio.create_task(one_more_result())
            assert await post(replica.webhook_port) == {"status": "accepted"}
            await published
        finally:
            await replica.stop()
    results = env.collector.for_task(task)
    assert len(results) == 3
    assert {r.result_id for r in results} == {f"wh:{headers['webhook-id']}"}
    assert len(record.applied) == 1


async def test_two_replicas_in_one_group_create_one_prediction_per_task(env: Env) -> None:
    port = free_port()
    settings = env.adapter.settings.model_copy(
        update={
            "webhook_port": port,
            "webhook_public_base_url": f"http://127.0.0.1:{port}",
            "adapter_id": "replica-b",
        }
    )
    second_registry = CollectorRegistry()
    second = Adapter(settings, registry=second_registry)
    # Two tasks on each of the commands topic's three partitions (the producer's partitioner).
    partitioner = DefaultPartitioner()
    per_partition: dict[int, list[str]] = {0: [], 1: [], 2: []}
    while any(len(v) < 2 for v in per_partition.values()):
        t = task_id()
        bucket = per_partition[partitioner(t.encode(), [0, 1, 2], [0, 1, 2])]
        if len(bucket) < 2:
            bucket.append(t)
    tasks = [t for ts in per_partition.values() for t in ts]
    for t in tasks:
        env.coordination.dispatched(t)

    async def send_all() -> None:
        for t in tasks:
            await env.commands.dispatch(t, inputs={"prompt": f"{t} two", "__fake_duration_s": 0.4})

    await second.start()
    try:
        await send_all()  # while the group rebalances
        async with asyncio.timeout(30):  # until the second replica owns partitions
            while not second.consumer._consumer.assignment():  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        await send_all()
        await send_all()
        for t in tasks:
            results = await env.collector.wait_for(has_terminal, t, wait_s=30)
            assert outcomes(results)[-1] == "succeeded"
        await wait_until(lambda: all(len(env.coordination.decisions(t)) == 3 for t in tasks), 20)
    finally:
        await second.stop()
    for t in tasks:
        assert len(await env.ledger(t)) == 1, t
        assert env.coordination.decisions(t).count("PROCEED") == 1
    handled_by_b = sum(
        second_registry.get_sample_value("conveyor_adapter_submit_decisions_total", {"decision": d})
        or 0.0
        for d in ("proceed", "already_submitted", "reconcile", "stop")
    )
    assert handled_by_b >= 2  # both replicas did part of the work
