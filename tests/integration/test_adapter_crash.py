"""kill -9 of the adapter process in the middle of a create, then a restart: one prediction.

The adapter runs as ``python -m conveyor_provider_adapter`` (configured only through ``ADAPTER_*``
environment variables). The fake executes the create and then holds the connection open without
answering; the process is killed while it waits. The restarted process gets the dispatch again (its
offset was never committed), the scheduler answers RECONCILE (the intent was recorded, no
prediction id), and the adapter (every webhook being lost as well) finds the prediction in the list endpoint instead of creating
another. Finally SIGTERM stops it gracefully (exit code 0).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from conveyor_common.standard_webhooks import generate_secret
from conveyor_devstack.topics import ensure_topics
from conveyor_testkit.adapter import (
    Commands,
    InMemoryCoordination,
    ResultCollector,
    free_port,
    has_terminal,
    outcomes,
)
from fake_replicate import FakeConfig, FakeReplicate

pytestmark = [pytest.mark.integration, pytest.mark.kafka, pytest.mark.slow]

TOKEN = "r8_adapter_crash"
SECRET = generate_secret()


class AdapterProcess:
    """The adapter as a child process."""

    def __init__(self, env: dict[str, str], log: Path, webhook_port: int) -> None:
        self.env = env
        self.log = log
        self.webhook_port = webhook_port
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "conveyor_provider_adapter",
                env=self.env,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
            )
        async with httpx.AsyncClient(timeout=1) as client, asyncio.timeout(30):
            while True:
                assert self.proc.returncode is None, self.log.read_text()[-3000:]
                try:
                    resp = await client.get(f"http://127.0.0.1:{self.webhook_port}/healthz")
                    if resp.status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)

    async def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        assert await self.proc.wait() == -signal.SIGKILL

    async def terminate(self) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            return await self.proc.wait()

    async def ensure_stopped(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@pytest.fixture
async def fake() -> AsyncIterator[FakeReplicate]:
    server = FakeReplicate(
        FakeConfig(
            token=TOKEN,
            webhook_secret=SECRET,
            min_duration_s=0.5,
            max_duration_s=0.5,
            webhook_retry_base_s=0.2,
            webhook_throttle_s=0.1,
        )
    )
    await server.start()
    yield server
    await server.stop()


async def test_kill9_mid_create_then_restart_creates_one_prediction(
    kafka_bootstrap: str, fake: FakeReplicate, tmp_path: Path
) -> None:
    stem = f"test.adapter-crash.{uuid.uuid4().hex[:8]}"
    commands_topic, results_topic = f"{stem}.commands", f"{stem}.results"
    await ensure_topics(
        kafka_bootstrap, {commands_topic: 2, f"{commands_topic}.dlq": 1, results_topic: 2}
    )
    coordination = InMemoryCoordination()
    await coordination.start()
    collector = ResultCollector(kafka_bootstrap, results_topic, coordination)
    await collector.start()
    commands = Commands(kafka_bootstrap, commands_topic)
    await commands.start()
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("ADAPTER_")},
        "ADAPTER_REPLICATE_API_TOKEN": TOKEN,
        "ADAPTER_REPLICATE_BASE_URL": fake.url,
        "ADAPTER_WEBHOOK_PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
        "ADAPTER_WEBHOOK_TOKEN_KEY": "crash-test-token-key-0123456789",
        "ADAPTER_WEBHOOK_HOST": "127.0.0.1",
        "ADAPTER_WEBHOOK_PORT": str(port),
        "ADAPTER_GRPC_HOST": "127.0.0.1",
        "ADAPTER_GRPC_PORT": "0",
        "ADAPTER_METRICS_PORT": "0",
        "ADAPTER_SCHEDULER_ADDRESS": coordination.address,
        "ADAPTER_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "ADAPTER_CONSUMER_GROUP": f"adapter-crash-{uuid.uuid4().hex[:8]}",
        "ADAPTER_COMMANDS_TOPIC": commands_topic,
        "ADAPTER_RESULTS_TOPIC": results_topic,
        "ADAPTER_KAFKA_SESSION_TIMEOUT_MS": "6000",
        "ADAPTER_STORAGE_FS_ROOT": str(tmp_path / "outputs"),
        "ADAPTER_OUTPUT_ALLOWED_HOSTS": "127.0.0.1",
        "ADAPTER_OUTPUT_ALLOW_HTTP": "true",
        "ADAPTER_RECONCILE_INTERVAL_S": "0.5",
        "ADAPTER_WEBHOOK_OVERDUE_S": "2",
        "ADAPTER_RECONCILE_SKEW_S": "5",
        "ADAPTER_REPLICATE_CREATE_TIMEOUT_S": "20",
    }
    log = tmp_path / "adapter.log"
    adapter = AdapterProcess(env, log, port)
    task = f"task-{uuid.uuid4().hex[:12]}"
    try:
        # The create takes effect at the fake, which then holds the answer for 6 s.
        fake.configure(create_script=["drop"], create_drop_delay_s=6.0)
        await adapter.start()
        coordination.dispatched(task, model="acme/flux")
        # Its webhooks are all lost too, so only the list endpoint can find the prediction.
        await commands.dispatch(
            task,
            inputs={"prompt": "crash me", "__fake_duration_s": 3, "__fake_webhook_drop": "all"},
        )

        async def creates() -> list[dict[str, object]]:
            async with httpx.AsyncClient(base_url=fake.url) as client:
                resp = await client.get("/_fake/ledger", params={"kind": "create", "task": task})
                return list(resp.json()["events"])

        async with asyncio.timeout(30):
            while not await creates():  # noqa: ASYNC110 - polling the fake over HTTP
                await asyncio.sleep(0.05)
        await adapter.kill9()  # between the create call and recording its answer
        assert coordination.decisions(task) == ["PROCEED"]
        assert coordination.tasks[task].prediction_id == ""

        await adapter.start()
        results = await collector.wait_for(has_terminal, task, wait_s=60)
        assert outcomes(results)[-1] == "succeeded", outcomes(results)
        assert results[-1].result_id.startswith("poll:")
        ledger = await creates()
        assert len(ledger) == 1, ledger
        pid = ledger[0]["prediction_id"]
        assert {r.prediction_id for r in results} == {pid}
        decisions = coordination.decisions(task)
        assert decisions[:2] == ["PROCEED", "RECONCILE"], decisions
        assert "PROCEED" not in decisions[1:]
        assert coordination.tasks[task].prediction_id == pid
        assert ("CompleteSubmit", task, 1, "True") in coordination.calls

        assert await adapter.terminate() == 0
        text = log.read_text()
        for step in ("webhooks_stop", "consumer_stop", "webhook_queue_drain", "producer_stop"):
            assert f'"step": "{step}"' in text, step
    finally:
        await adapter.ensure_stopped()
        await commands.stop()
        await collector.stop()
        await coordination.stop()
