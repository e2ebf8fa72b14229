"""Two adapter replicas: a delivery to both (or after a restart) yields the same results; two replicas in one group create one prediction per task."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from aiokafka.partitioner import DefaultPartitioner
from prometheus_client import CollectorRegistry

from conveyor_common.standard_webhooks import sign_headers
from conveyor_provider_adapter.app import Adapter
from conveyor_provider_adapter.webhook_token import webhook_url
from conveyor_testkit.adapter import (
    free_port,
    has_terminal,
    outcomes,
)
from tests.integration.adapter_env import SECRET, Env, S, second_replica, task_id, wait_until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.kafka,
    pytest.mark.usefixtures("fresh_fake_config"),
]


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
        replica, _registry = await second_replica(env, kafka_bootstrap)
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
