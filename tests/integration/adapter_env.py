"""Shared fixtures of the provider adapter's integration tests (a plugin loaded by tests/conftest.py):
the adapter end to end over real Kafka, real loopback HTTP and the fake Replicate.

One adapter (in-process), one fake, one in-memory coordination service with the scheduler's fencing
rules, and a collector of the results topic that feeds results back into it, for the module.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from conveyor.scheduler.v1 import provider_coordination_service_pb2 as provider_pb2
from conveyor_common.standard_webhooks import generate_secret
from conveyor_devstack.topics import ensure_topics
from conveyor_provider_adapter.app import Adapter
from conveyor_provider_adapter.settings import AdapterSettings
from conveyor_testkit.adapter import (
    Commands,
    InMemoryCoordination,
    ResultCollector,
    free_port,
)
from fake_replicate import FakeConfig, FakeReplicate
from fake_replicate.openapi import Exchange, OpenApiChecker

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


@pytest.fixture
def fresh_fake_config(env: Env) -> Iterator[None]:
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


async def second_replica(env: Env, kafka_bootstrap: str) -> tuple[Adapter, CollectorRegistry]:
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
