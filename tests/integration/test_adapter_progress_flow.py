"""Progress is cheap, end to end (issue #13 item 2, docs/adr/0005): an in-process adapter over real
Kafka and loopback HTTP, the fake Replicate sending a logs webhook for every tqdm line, and a collector
of the results topic.

The adapter asks only for ``start``, ``logs`` and ``completed``; a prediction printing many progress
lines yields ``started`` first, at most one progress result per interval (each raising the
percentage), and exactly one terminal result, last.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from conveyor.events.v1 import events_pb2
from conveyor_common.standard_webhooks import generate_secret
from conveyor_devstack.topics import ensure_topics
from conveyor_provider_adapter.app import Adapter
from conveyor_provider_adapter.settings import AdapterSettings
from conveyor_testkit.adapter import (
    Commands,
    InMemoryCoordination,
    ResultCollector,
    free_port,
    has_terminal,
    outcomes,
)
from fake_replicate import FakeConfig, FakeReplicate

pytestmark = [pytest.mark.integration, pytest.mark.kafka]

TOKEN = "r8_adapter_progress"
SECRET = generate_secret()
INTERVAL_S = 0.5
"""ADAPTER_PROGRESS_MIN_INTERVAL_SECONDS of the adapter under test."""
RUN_S = 2.5
STEPS = 50
TERMINAL = {"succeeded", "failed", "canceled", "aborted"}


@dataclass
class Env:
    fake: FakeReplicate
    coordination: InMemoryCoordination
    collector: ResultCollector
    commands: Commands
    registry: CollectorRegistry

    async def ledger(self, kind: str) -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=self.fake.url) as client:
            resp = await client.get("/_fake/ledger", params={"kind": kind})
            resp.raise_for_status()
        return list(resp.json()["events"])

    def metric(self, name: str) -> float:
        return self.registry.get_sample_value(name) or 0.0


@pytest.fixture(scope="module")
async def env(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    stem = f"test.adapter-progress.{uuid.uuid4().hex[:8]}"
    commands_topic, results_topic = f"{stem}.commands", f"{stem}.results"
    await ensure_topics(
        kafka_bootstrap, {commands_topic: 3, f"{commands_topic}.dlq": 1, results_topic: 3}
    )
    fake = FakeReplicate(
        FakeConfig(
            token=TOKEN,
            webhook_secret=SECRET,
            seed=13,
            progress_steps=STEPS,
            webhook_throttle_s=0.02,  # a logs delivery for (nearly) every tqdm line
            webhook_retry_base_s=0.1,
            output_bytes=1024,
        )
    )
    await fake.start()
    coordination = InMemoryCoordination()
    await coordination.start()
    collector = ResultCollector(kafka_bootstrap, results_topic, coordination)
    await collector.start()
    commands = Commands(kafka_bootstrap, commands_topic)
    await commands.start()
    storage_root: Path = tmp_path_factory.mktemp("adapter-progress-outputs")
    port = free_port()
    settings = AdapterSettings(
        replicate_api_token=SecretStr(TOKEN),
        replicate_base_url=fake.url,
        webhook_public_base_url=f"http://127.0.0.1:{port}",
        webhook_token_key=SecretStr("test-webhook-token-key-progress-0123"),
        webhook_host="127.0.0.1",
        webhook_port=port,
        grpc_host="127.0.0.1",
        grpc_port=0,
        scheduler_address=coordination.address,
        kafka_bootstrap=kafka_bootstrap,
        consumer_group=f"adapter-progress-{uuid.uuid4().hex[:8]}",
        commands_topic=commands_topic,
        results_topic=results_topic,
        progress_min_interval_seconds=INTERVAL_S,
        reconcile_interval_s=5.0,
        webhook_overdue_s=60.0,  # no poll during the runs: every result comes from a webhook
        storage_fs_root=storage_root,
        output_allowed_hosts=["127.0.0.1"],
        output_allow_http=True,
    )
    registry = CollectorRegistry()
    adapter = Adapter(settings, registry=registry)
    await adapter.start()
    try:
        yield Env(fake, coordination, collector, commands, registry)
    finally:
        await adapter.stop()
        await commands.stop()
        await collector.stop()
        await coordination.stop()
        await fake.stop()


async def run_task(env: Env, inputs: dict[str, Any]) -> tuple[str, list[events_pb2.ProviderResult]]:
    task = f"task-{uuid.uuid4().hex[:12]}"
    env.coordination.dispatched(task, model="acme/flux")
    await env.commands.dispatch(task, inputs=inputs)
    results = await env.collector.wait_for(has_terminal, task, wait_s=30.0)
    return task, results


def assert_started_by_the_create(task: str, results: list[events_pb2.ProviderResult]) -> None:
    """The create's ``started`` (held ADAPTER_PROGRESS_HOLD_SECONDS, 0.3 s) recorded the prediction
    first; no webhook added another."""
    names = outcomes(results)
    assert names[0] == "started", names
    assert names.count("started") == 1, names
    assert results[0].result_id == f"create:{task}:1:started"
    assert results[0].prediction_id == results[-1].prediction_id


async def test_many_log_lines_give_coalesced_progress_and_one_terminal_result_in_order(
    env: Env,
) -> None:
    coalesced_before = env.metric("conveyor_adapter_progress_coalesced_total")
    task, results = await run_task(
        env, {"prompt": "a long denoise", "__fake_duration_s": RUN_S, "__fake_starting_s": 0.1}
    )
    names = outcomes(results)
    assert_started_by_the_create(task, results)
    results = results[1:]
    names = names[1:]
    assert names[-1] == "succeeded", names
    assert sum(1 for n in names if n in TERMINAL) == 1, names
    assert set(names[:-1]) <= {"progress"}, names

    progress = [r for r in results if r.WhichOneof("outcome") == "progress"]
    percents = [r.progress.percent for r in progress]
    assert percents, names
    assert percents == sorted(set(percents)), percents  # only changes, never backwards
    # At most one per interval: consecutive progress results are observed >= INTERVAL_S apart
    # (observed_at is wall time; the adapter decides on its monotonic clock: a few ms of slack).
    times = [r.observed_at.ToDatetime().timestamp() for r in progress]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(g >= INTERVAL_S - 0.02 for g in gaps), gaps

    (create,) = [c for c in await env.ledger("create") if c.get("task") == task]
    assert set(create["events_filter"]) == {"start", "logs", "completed"}
    prediction = create["prediction_id"]
    hooks = [h for h in await env.ledger("webhook") if h["prediction_id"] == prediction]
    sent = [h["event"] for h in hooks if h["outcome"] == "delivered"]
    assert "output" not in sent
    logs = sent.count("logs")
    # The fake sent many more logs deliveries than there were progress results: the rest were
    # coalesced (superseded by a later one or by the terminal result).
    assert len(progress) < logs, (len(progress), logs)
    bound = int((times[-1] - times[0]) / (INTERVAL_S - 0.02)) + 1 if times else 0
    assert len(progress) <= bound
    assert env.metric("conveyor_adapter_progress_coalesced_total") > coalesced_before
    # Results of a delivery keep the idempotent ids of results.py (the webhook-id).
    assert all(r.result_id.startswith("wh:") for r in results)
    assert len({r.result_id for r in results}) == len(results)


async def test_a_prediction_shorter_than_the_interval_costs_at_most_one_progress_and_terminal(
    env: Env,
) -> None:
    task, results = await run_task(
        env, {"prompt": "quick", "__fake_duration_s": 0.3, "__fake_starting_s": 0.05}
    )
    names = outcomes(results)
    # The create's ``started`` (held 0.3 s, about the run) may have been superseded by the
    # terminal result, which then recorded the prediction alone.
    if names[0] == "started":
        assert_started_by_the_create(task, results)
        names = names[1:]
    assert "started" not in names, names
    assert names[-1] == "succeeded", names
    assert names.count("progress") <= 1, names
    assert len(names) <= 2, names


async def test_a_failure_right_after_progress_is_published_at_once_and_last(env: Env) -> None:
    task, results = await run_task(
        env,
        {
            "prompt": "doomed",
            "__fake_duration_s": 1.0,
            "__fake_starting_s": 0.05,
            "__fake_outcome": "failed",
            "__fake_error": "CUDA error: an illegal memory access",
        },
    )
    names = outcomes(results)
    assert_started_by_the_create(task, results)
    assert names[-1] == "failed", names
    assert sum(1 for n in names if n in TERMINAL) == 1, names
    assert results[-1].failed.retryable
