"""The webhook receiver alone over loopback HTTP: fast answers, 503 when its queue is full, body
limits, and the signing secret fetched from (and re-fetched after a rotation at) the fake."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from conveyor_common.standard_webhooks import generate_secret, sign_headers
from conveyor_provider_adapter.metrics import AdapterMetrics
from conveyor_provider_adapter.provider_webhooks import Pipeline, SecretSource, WebhookReceiver
from conveyor_provider_adapter.replicate import ReplicateClient
from conveyor_provider_adapter.webhook_token import webhook_url
from fake_replicate import FakeConfig, FakeReplicate

KEY = b"receiver-test-key-0123456789abcd"


class Rig:
    def __init__(self, secrets: SecretSource, queue_size: int) -> None:
        self.registry = CollectorRegistry()
        self.metrics = AdapterMetrics(self.registry)
        observer: Any = None  # the workers are never started: deliveries stay queued
        self.pipeline = Pipeline(observer, self.metrics, workers=1, queue_size=queue_size)
        self.receiver = WebhookReceiver(
            secrets=secrets,
            token_key=KEY,
            pipeline=self.pipeline,
            metrics=self.metrics,
            max_body_bytes=64 * 1024,
        )

    def url(self, task: str, attempt: int = 1) -> str:
        return webhook_url(f"http://127.0.0.1:{self.receiver.port}", KEY, task, attempt)

    def count(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


def body_for(pid: str, status: str = "starting") -> bytes:
    return json.dumps({"id": pid, "status": status, "input": {}}).encode()


@pytest.fixture
async def rig() -> AsyncIterator[tuple[Rig, str]]:
    secret = generate_secret()
    client = ReplicateClient("http://127.0.0.1:9", "unused")
    r = Rig(SecretSource(configured=secret, client=client), queue_size=2)
    await r.receiver.start("127.0.0.1", 0)
    yield r, secret
    await r.receiver.stop()
    await client.close()


async def test_full_queue_answers_503_so_the_delivery_is_retried(rig: tuple[Rig, str]) -> None:
    r, secret = rig
    async with httpx.AsyncClient(timeout=5) as client:
        answers = []
        latencies = []
        headers = []
        for i in range(3):
            body = body_for(f"p{i}")
            h = sign_headers([secret], body)
            headers.append((h, body))
            started = time.perf_counter()
            resp = await client.post(r.url("task-q"), content=body, headers=h)
            latencies.append(time.perf_counter() - started)
            answers.append(resp.status_code)
        assert answers == [200, 200, 503]
        assert max(latencies) < 0.25
        # The 503'd delivery was not remembered: its retry is not a "duplicate".
        h, body = headers[2]
        resp = await client.post(r.url("task-q"), content=body, headers=h)
        assert resp.status_code == 503
    assert r.count("conveyor_adapter_webhooks_total", outcome="overloaded") == 2
    assert r.count("conveyor_adapter_webhooks_total", outcome="accepted") == 2
    assert r.count("conveyor_adapter_webhooks_total", outcome="duplicate") == 0
    assert r.count("conveyor_adapter_webhook_queue_depth") == 2


async def test_bodies_too_large_unparseable_or_without_our_parameters(
    rig: tuple[Rig, str],
) -> None:
    r, secret = rig
    async with httpx.AsyncClient(timeout=5) as client:
        big = b'{"id": "p", "pad": "' + b"x" * 70_000 + b'"}'
        resp = await client.post(r.url("t"), content=big, headers=sign_headers([secret], big))
        assert resp.status_code == 413
        junk = b"not json"
        resp = await client.post(r.url("t"), content=junk, headers=sign_headers([secret], junk))
        assert resp.status_code == 200
        assert resp.json()["error"] == "bad_body"
        body = body_for("p-foreign")
        bare = f"http://127.0.0.1:{r.receiver.port}/webhooks/replicate"
        resp = await client.post(bare, content=body, headers=sign_headers([secret], body))
        assert resp.status_code == 200
        assert resp.json() == {"status": "ignored"}
        resp = await client.get(f"http://127.0.0.1:{r.receiver.port}/healthz")
        assert resp.status_code == 200
    assert r.count("conveyor_adapter_webhooks_rejected_total", reason="too_large") == 1
    assert r.count("conveyor_adapter_webhooks_rejected_total", reason="bad_body") == 1
    assert r.count("conveyor_adapter_webhooks_total", outcome="unknown") == 1
    assert r.count("conveyor_adapter_webhook_queue_depth") == 0


async def test_secret_is_fetched_and_refetched_after_a_rotation() -> None:
    old = generate_secret()
    async with FakeReplicate(FakeConfig(token="r8_rx", webhook_secret=old)) as fake:
        client = ReplicateClient(fake.url, "r8_rx")
        source = SecretSource(configured=None, client=client, refresh_s=1.0)
        r = Rig(source, queue_size=10)
        await source.load()
        await r.receiver.start("127.0.0.1", 0)
        try:
            async with httpx.AsyncClient(timeout=5) as http:
                body = body_for("p-old")
                resp = await http.post(r.url("t1"), content=body, headers=sign_headers([old], body))
                assert resp.status_code == 200
                new = generate_secret()
                fake.configure(webhook_secret=new)
                await asyncio.sleep(1.05)  # past the refresh gap since the fetch at start
                body = body_for("p-new")
                resp = await http.post(r.url("t1"), content=body, headers=sign_headers([new], body))
                assert resp.status_code == 401  # triggers the background re-fetch
                async with asyncio.timeout(5):
                    while True:
                        h = sign_headers([new], body)
                        resp = await http.post(r.url("t1"), content=body, headers=h)
                        if resp.status_code == 200:
                            break
                        await asyncio.sleep(0.05)
                # Deliveries signed with the previous secret still verify during the overlap.
                body = body_for("p-old-2")
                resp = await http.post(r.url("t1"), content=body, headers=sign_headers([old], body))
                assert resp.status_code == 200
        finally:
            await r.receiver.stop()
            await source.close()
            await client.close()
