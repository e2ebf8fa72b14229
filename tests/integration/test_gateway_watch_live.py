"""WatchTask and WatchTasks live through the real notifier.

Scheduler (outbox relay to real Kafka) -> task-events topic -> notifier (WatchFanoutService) ->
gateway. The gateway is configured with very long poll intervals, so an event that reaches the
watcher after the history read can only have come through the live path.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from conveyor.tasks.v1 import task_pb2
from conveyor_client import AsyncConveyorClient
from conveyor_gateway.watch import WatchConfig
from conveyor_testkit.stack import Stack, start_stack

pytestmark = [pytest.mark.integration, pytest.mark.postgres, pytest.mark.kafka]

LIVE_ONLY = WatchConfig(poll_interval=60, safety_poll_interval=60, resubscribe_interval=60)


@pytest.fixture(scope="module")
async def stack(
    database_url: str, kafka_bootstrap: str, conveyor_kafka_topics: dict[str, int]
) -> AsyncIterator[Stack]:
    from conveyor_notifier.app import Notifier
    from conveyor_notifier.settings import NotifierSettings

    notifiers: list[Any] = []

    async def start_notifier(scheduler_port: int) -> str:
        settings = NotifierSettings(
            kafka_bootstrap_servers=kafka_bootstrap,
            scheduler_address=f"127.0.0.1:{scheduler_port}",
            grpc_host="127.0.0.1",
            grpc_port=0,
            metrics_port=0,
            watch_buffer_events=32,  # small: a burst would overflow an unfiltered subscriber
        )
        notifier = Notifier(settings)
        await notifier.start(serve_metrics=False)
        notifiers.append(notifier)
        return f"127.0.0.1:{notifier.grpc_port}"

    s = await start_stack(
        database_url,
        kafka=True,
        scheduler={
            "kafka_bootstrap_servers": kafka_bootstrap,
            "results_consumer_group": f"gw-live-{uuid.uuid4().hex[:8]}",
            "tenant_submit_rate": 100_000.0,
            "tenant_submit_burst": 100_000,
            "queue_capacity": 100_000,
            "tenant_max_waiting": 100_000,
        },
        before_gateway=start_notifier,
        watch_config=LIVE_ONLY,
    )
    s.on_stop.extend(n.stop for n in notifiers)
    try:
        yield s
    finally:
        await s.stop()


async def test_watch_task_gets_live_events(stack: Stack) -> None:
    async with AsyncConveyorClient(stack.address, stack.keys.token("live-a"), timeout=10) as client:
        task = (await client.submit("image", model="acme/sdxl", input={"prompt": "live"})).task
        events: list[task_pb2.TaskEvent] = []

        async def follow() -> None:
            events.extend([e async for e in client.watch(task.task_id)])

        follower = asyncio.create_task(follow())
        await asyncio.sleep(1.0)  # the watch has read the history and waits on the live stream
        await client.cancel(task.task_id, reason="live test")
        await asyncio.wait_for(follower, 30)  # far below the 60 s poll intervals
    assert events[-1].type == task_pb2.TASK_EVENT_TYPE_CANCELED
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert all(e.tenant_id == "live-a" for e in events)


async def test_watch_tasks_streams_the_tenants_events_only(stack: Stack) -> None:
    async with (
        AsyncConveyorClient(stack.address, stack.keys.token("live-b")) as mine,
        AsyncConveyorClient(stack.address, stack.keys.token("live-c")) as other,
    ):
        received: list[task_pb2.TaskEvent] = []

        async def follow() -> None:
            async for event in mine.watch_all(types=[task_pb2.TASK_EVENT_TYPE_SUBMITTED]):
                received.append(event)
                return

        follower = asyncio.create_task(follow())
        await asyncio.sleep(1.0)
        await other.submit("text", model="acme/llm", input={"prompt": "not for b"})
        task = (await mine.submit("text", model="acme/llm", input={"prompt": "for b"})).task
        await asyncio.wait_for(follower, 30)
    assert [(e.task_id, e.type) for e in received] == [
        (task.task_id, task_pb2.TASK_EVENT_TYPE_SUBMITTED)
    ]


async def test_a_filtered_watch_tasks_survives_a_burst_of_other_events(stack: Stack) -> None:
    """1,000 submits (SUBMITTED events) do not cut a stream that asked only for CANCELED ones:
    the notifier filters before its 32-event subscriber buffer."""
    async with AsyncConveyorClient(stack.address, stack.keys.token("live-d"), timeout=30) as client:
        received: list[task_pb2.TaskEvent] = []

        async def follow() -> None:
            async for event in client.watch_all(types=[task_pb2.TASK_EVENT_TYPE_CANCELED]):
                received.append(event)
                return

        follower = asyncio.create_task(follow())
        await asyncio.sleep(1.0)  # subscribed
        for batch in range(10):
            specs = []
            for i in range(100):
                spec = task_pb2.TaskSpec(kind=task_pb2.TASK_KIND_TEXT, model="acme/llm")
                spec.input.update({"prompt": f"burst {batch}/{i}"})
                specs.append(spec)
            await client.submit_batch(specs)
        task = (await client.submit("text", model="acme/llm", input={"prompt": "last"})).task
        await client.cancel(task.task_id, reason="burst test")
        await asyncio.wait_for(follower, 60)
    assert [(e.task_id, e.type) for e in received] == [
        (task.task_id, task_pb2.TASK_EVENT_TYPE_CANCELED)
    ]
