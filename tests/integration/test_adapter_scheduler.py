"""The adapter against the real scheduler (PostgreSQL + Kafka) and the fake Replicate.

A task submitted to the scheduler is dispatched through the outbox to the commands topic, created
at the fake by the adapter after BeginSubmit, and finished by the adapter's provider results: the
scheduler shows it succeeded with its outputs copied. The same DispatchTask published four more
times (as a relay or the re-driver would) creates no second prediction.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from conveyor.events.v1 import events_pb2
from conveyor.tasks.v1 import task_pb2
from conveyor_common import topics
from conveyor_common.kafka import EventProducer, ProducerConfig
from conveyor_common.standard_webhooks import generate_secret
from conveyor_provider_adapter.app import Adapter
from conveyor_provider_adapter.settings import AdapterSettings
from conveyor_scheduler.admission.submit import NewTask, fingerprint
from conveyor_scheduler.app import SchedulerApp
from conveyor_testkit import scheduler as kit
from conveyor_testkit.adapter import free_port
from fake_replicate import FakeConfig, FakeReplicate

pytestmark = [pytest.mark.integration, pytest.mark.postgres, pytest.mark.kafka]

TOKEN = "r8_adapter_sched"
SECRET = generate_secret()
TENANT = "tenant-adapter"
TERMINAL = {
    task_pb2.TASK_STATUS_SUCCEEDED,
    task_pb2.TASK_STATUS_FAILED,
    task_pb2.TASK_STATUS_CANCELED,
    task_pb2.TASK_STATUS_DEAD_LETTERED,
    task_pb2.TASK_STATUS_EXPIRED,
}


@dataclass
class Stack:
    scheduler: SchedulerApp
    adapter: Adapter
    fake: FakeReplicate
    storage_root: Path

    async def submit(self, inputs: dict[str, Any]) -> str:
        spec = kit.spec(model="acme/flux")
        spec.input.update(inputs)
        rows = await self.scheduler.core.submit(
            TENANT, 1, [NewTask(uuid.uuid4().hex, spec, fingerprint(spec))]
        )
        return str(rows[0][0]["id"])

    async def finished(self, task_id: str, wait_s: float = 30) -> task_pb2.Task:
        async with asyncio.timeout(wait_s):
            while True:
                task = await self.scheduler.core.get_task(TENANT, task_id)
                if task.status in TERMINAL:
                    return task
                await asyncio.sleep(0.1)

    async def creates(self, task_id: str) -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=self.fake.url) as client:
            resp = await client.get("/_fake/ledger", params={"kind": "create", "task": task_id})
            return list(resp.json()["events"])


@pytest.fixture(scope="module")
async def stack(
    database_url: str,
    kafka_bootstrap: str,
    conveyor_kafka_topics: dict[str, int],
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Stack]:
    await kit.migrate(database_url)
    scheduler = SchedulerApp(
        kit.make_settings(
            database_url,
            kafka_bootstrap_servers=kafka_bootstrap,
            results_consumer_group=f"sched-adapter-{uuid.uuid4().hex[:8]}",
            instance_id="adapter-test",
            global_concurrency=20,
            tier_concurrency={"free": 20, "premium": 20, "pro": 20},
        )
    )
    await scheduler.start()
    assert scheduler.server is not None
    fake = FakeReplicate(
        FakeConfig(
            token=TOKEN,
            webhook_secret=SECRET,
            min_duration_s=0.8,
            max_duration_s=0.8,
            progress_steps=4,
            webhook_throttle_s=0.1,
        )
    )
    await fake.start()
    storage_root = tmp_path_factory.mktemp("adapter-sched-outputs")
    port = free_port()
    adapter = Adapter(
        AdapterSettings(
            replicate_api_token=SecretStr(TOKEN),
            replicate_base_url=fake.url,
            replicate_webhook_secret=SecretStr(SECRET),
            webhook_public_base_url=f"http://127.0.0.1:{port}",
            webhook_token_key=SecretStr("sched-test-token-key-0123456789"),
            webhook_host="127.0.0.1",
            webhook_port=port,
            grpc_host="127.0.0.1",
            grpc_port=0,
            scheduler_address=f"127.0.0.1:{scheduler.server.port}",
            kafka_bootstrap=kafka_bootstrap,
            consumer_group=f"adapter-sched-{uuid.uuid4().hex[:8]}",
            reconcile_interval_s=0.5,
            webhook_overdue_s=3.0,
            storage_fs_root=storage_root,
            output_allowed_hosts=["127.0.0.1"],
            output_allow_http=True,
        )
    )
    await adapter.start()
    try:
        yield Stack(scheduler, adapter, fake, storage_root)
    finally:
        await adapter.stop()
        await fake.stop()
        await scheduler.stop()


async def test_task_runs_through_scheduler_adapter_and_fake(stack: Stack) -> None:
    task_id = await stack.submit({"prompt": "a heron", "__fake_duration_s": 1.0})
    task = await stack.finished(task_id)
    assert task.status == task_pb2.TASK_STATUS_SUCCEEDED, task
    assert task.progress == 100
    creates = await stack.creates(task_id)
    assert len(creates) == 1
    assert task.prediction_id == creates[0]["prediction_id"]
    assert len(task.result.files) == 1
    stored = task.result.files[0]
    assert stored.url.startswith("file://")
    assert stored.source_url.startswith(stack.fake.url)
    path = Path(stored.url.removeprefix("file://"))
    assert stack.storage_root in path.parents
    assert stored.size_bytes == (await asyncio.to_thread(path.stat)).st_size > 0
    events, terminal, _ = await stack.scheduler.core.task_events(TENANT, task_id, 0, 100)
    assert terminal
    types = [e.type for e in events]
    assert task_pb2.TASK_EVENT_TYPE_STARTED in types
    assert task_pb2.TASK_EVENT_TYPE_PROGRESS in types


async def test_redelivered_dispatch_creates_one_prediction(
    stack: Stack, kafka_bootstrap: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="conveyor_provider_adapter.commands")
    inputs: dict[str, Any] = {"prompt": "redelivered", "__fake_duration_s": 1.5}

    def decisions() -> list[str]:
        return [
            str(getattr(r, "decision", ""))
            for r in caplog.records
            if getattr(r, "action", "") == "submit_decision"
            and getattr(r, "task_id", "") == task_id
        ]

    task_id = await stack.submit(inputs)
    async with asyncio.timeout(15):
        while not await stack.creates(task_id):  # noqa: ASYNC110 - polling the fake over HTTP
            await asyncio.sleep(0.05)
    # The relay (or the re-driver) publishes the same command again, four times.
    again = events_pb2.DispatchTask(
        task_id=task_id, tenant_id=TENANT, attempt=1, model="acme/flux", provider="replicate"
    )
    again.input.update(inputs)
    producer = EventProducer(
        ProducerConfig(kafka_bootstrap, "adapter-sched-test"), source="/services/scheduler"
    )
    await producer.start()
    try:
        for _ in range(4):
            await producer.send(topics.PROVIDER_COMMANDS, again, key=task_id)
    finally:
        await producer.stop()
    task = await stack.finished(task_id)
    assert task.status == task_pb2.TASK_STATUS_SUCCEEDED
    async with asyncio.timeout(10):
        while len(decisions()) < 5:  # noqa: ASYNC110 - the adapter logs each decision
            await asyncio.sleep(0.05)
    assert decisions()[0] == "PROCEED"
    assert "PROCEED" not in decisions()[1:], decisions()
    assert len(await stack.creates(task_id)) == 1
    events, _, _ = await stack.scheduler.core.task_events(TENANT, task_id, 0, 100)
    assert sum(1 for e in events if e.type == task_pb2.TASK_EVENT_TYPE_SUCCEEDED) == 1
