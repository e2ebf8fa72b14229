"""Live watch fan-out on real Kafka: ready first, live events by task and by tenant, a slow
subscriber told to resume, shutdown telling watchers to resume, and a watcher that loses its
notifier to ``kill -9`` resuming through a restarted notifier plus history with nothing lost or
repeated."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from conveyor.notifier.v1 import notifier_service_pb2 as npb
from conveyor.notifier.v1 import notifier_service_pb2_grpc as npb_grpc
from conveyor.tasks.v1 import task_pb2
from conveyor_common.kafka import EventProducer
from conveyor_devstack.topics import ensure_topics
from conveyor_notifier.app import Notifier
from conveyor_notifier.broadcast import EventBroadcaster
from conveyor_notifier.fanout import WatchHub
from conveyor_notifier.metrics import NotifierMetrics
from tests.integration.notifier_support import (
    SchedulerSide,
    eventually,
    free_port,
    make_event,
    make_topics,
    notifier_settings,
    publish,
    start_producer,
    start_scheduler_side,
)

pytestmark = [pytest.mark.integration, pytest.mark.kafka, pytest.mark.postgres]

PROGRESS = task_pb2.TASK_EVENT_TYPE_PROGRESS


@pytest.fixture(scope="module")
async def side(database_url: str) -> AsyncIterator[SchedulerSide]:
    s = await start_scheduler_side(database_url, allow_hosts=["127.0.0.1"])
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture(scope="module")
async def topics(kafka_bootstrap: str) -> dict[str, str]:
    return await make_topics(kafka_bootstrap, "notifier-watch")


@pytest.fixture(scope="module")
async def producer(kafka_bootstrap: str) -> AsyncIterator[EventProducer]:
    p = await start_producer(kafka_bootstrap)
    try:
        yield p
    finally:
        await p.stop()


@contextlib.asynccontextmanager
async def running(
    kafka_bootstrap: str, side: SchedulerSide, topics: dict[str, str], **overrides: Any
) -> AsyncIterator[tuple[Notifier, npb_grpc.WatchFanoutServiceAsyncStub]]:
    app = Notifier(notifier_settings(kafka_bootstrap, side.address, topics, **overrides))
    await app.start(serve_metrics=False)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}")
    try:
        yield app, npb_grpc.WatchFanoutServiceStub(channel)
    finally:
        await channel.close()
        await app.stop()


async def subscribe(
    stub: npb_grpc.WatchFanoutServiceAsyncStub, tenant_id: str, task_id: str = ""
) -> Any:
    """Open a Subscribe stream and read its ready marker."""
    call: Any = stub.Subscribe(npb.SubscribeRequest(tenant_id=tenant_id, task_id=task_id))
    first = await asyncio.wait_for(call.read(), timeout=10)
    assert first.WhichOneof("item") == "ready"
    assert first.ready
    return call


async def read_events(call: Any, count: int) -> list[task_pb2.TaskEvent]:
    out = []
    for _ in range(count):
        message = await asyncio.wait_for(call.read(), timeout=15)
        assert message.WhichOneof("item") == "event"
        out.append(message.event)
    return out


async def test_subscribe_sends_ready_then_live_events_by_task_and_tenant(
    kafka_bootstrap: str, side: SchedulerSide, topics: dict[str, str], producer: EventProducer
) -> None:
    tenant_a, tenant_b = f"a-{uuid.uuid4().hex[:6]}", f"b-{uuid.uuid4().hex[:6]}"
    task_1, task_2, task_3 = (str(uuid.uuid4()) for _ in range(3))
    async with running(kafka_bootstrap, side, topics) as (app, stub):
        # Published before anyone subscribed: never part of the live stream.
        await publish(producer, topics["events"], [make_event(tenant_a, task_1, 1, PROGRESS)])
        await asyncio.sleep(0.5)
        one = await subscribe(stub, tenant_a, task_1)
        whole_a = await subscribe(stub, tenant_a)
        whole_b = await subscribe(stub, tenant_b)
        assert (
            app.registry.get_sample_value("conveyor_notifier_active_watchers", {"scope": "tenant"})
            == 2
        )
        events = [
            make_event(tenant_a, task_1, 2, PROGRESS),
            make_event(tenant_a, task_2, 1, task_pb2.TASK_EVENT_TYPE_SUBMITTED),
            make_event(tenant_b, task_3, 1, task_pb2.TASK_EVENT_TYPE_SUBMITTED),
            make_event(tenant_a, task_1, 3, task_pb2.TASK_EVENT_TYPE_SUCCEEDED),
        ]
        await publish(producer, topics["events"], events)
        got_one = await read_events(one, 2)
        assert [(e.task_id, e.sequence) for e in got_one] == [(task_1, 2), (task_1, 3)]
        assert got_one[1].task.status == task_pb2.TASK_STATUS_SUCCEEDED
        got_a = await read_events(whole_a, 3)
        assert sorted((e.task_id, e.sequence) for e in got_a) == sorted(
            [(task_1, 2), (task_2, 1), (task_1, 3)]
        )
        got_b = await read_events(whole_b, 1)
        assert [(e.task_id, e.sequence) for e in got_b] == [(task_3, 1)]
        for call in (one, whole_a, whole_b):
            call.cancel()
        await eventually(lambda: app.hub.count == 0, what="subscribers removed")

        with pytest.raises(grpc.aio.AioRpcError) as info:
            await subscribe(stub, "")
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_slow_subscriber_is_told_to_resume_never_skipped(
    kafka_bootstrap: str, side: SchedulerSide, topics: dict[str, str], producer: EventProducer
) -> None:
    tenant, task_id = f"slow-{uuid.uuid4().hex[:6]}", str(uuid.uuid4())
    async with running(kafka_bootstrap, side, topics, watch_buffer_events=8) as (app, _):
        # A client that does not read: HTTP/2 flow control fills, the server's buffer fills.
        channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{app.grpc_port}",
            options=[("grpc.http2.bdp_probe", 0), ("grpc.max_receive_message_length", 1 << 20)],
        )
        try:
            call = await subscribe(npb_grpc.WatchFanoutServiceStub(channel), tenant, task_id)
            total = 400
            events = [
                make_event(tenant, task_id, i, PROGRESS, padding=16_000)
                for i in range(1, total + 1)
            ]
            await publish(producer, topics["events"], events)
            await eventually(
                lambda: (
                    (
                        app.registry.get_sample_value(
                            "conveyor_notifier_watch_streams_ended_total", {"reason": "overflow"}
                        )
                        or 0
                    )
                    >= 1
                ),
                what="overflow",
            )
            sequences: list[int] = []

            async def drain() -> None:
                while True:
                    message = await asyncio.wait_for(call.read(), timeout=10)
                    if message is grpc.aio.EOF:
                        return
                    sequences.append(message.event.sequence)

            with pytest.raises(grpc.aio.AioRpcError) as info:
                await drain()
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "resume from your last sequence" in (info.value.details() or "")
            # What arrived is a gap-free prefix; the rest comes from history on resume.
            assert sequences == list(range(1, len(sequences) + 1))
            assert len(sequences) < total
        finally:
            await channel.close()


async def test_shutdown_tells_watchers_to_resume(
    kafka_bootstrap: str, side: SchedulerSide, topics: dict[str, str]
) -> None:
    async with running(kafka_bootstrap, side, topics) as (app, stub):
        call = await subscribe(stub, f"t-{uuid.uuid4().hex[:6]}")
        stopping = asyncio.create_task(app.stop())
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await asyncio.wait_for(call.read(), timeout=10)
        await stopping
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "resume from your last sequence" in (info.value.details() or "")


# --------------------------------------------------------------------------------------------
# kill -9 and resume


class NotifierProcess:
    """``python -m conveyor_notifier`` as a subprocess on a fixed port."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.log = log
        self.env = {**os.environ, **env, "NOTIFIER_GRPC_PORT": str(self.port)}
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "conveyor_notifier",
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                assert self.proc.returncode is None, self.log.read_text()[-3000:]
                with contextlib.suppress(grpc.aio.AioRpcError):
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                if time.monotonic() > deadline:
                    raise AssertionError("notifier did not start:\n" + self.log.read_text()[-3000:])
                await asyncio.sleep(0.2)

    async def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def terminate(self) -> int | None:
        """SIGTERM and wait for the graceful shutdown; the exit code (None if never started)."""
        if self.proc is None:
            return None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout=30)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        return self.proc.returncode


class Watcher:
    """What the gateway does for one task: live subscription + history, dedup by sequence."""

    def __init__(self, tenant_id: str, task_id: str, history: list[task_pb2.TaskEvent]) -> None:
        self.tenant_id = tenant_id
        self.task_id = task_id
        self.history = history
        self.seen: list[int] = []
        self.duplicates = 0
        self.live = 0
        self.done = False

    @property
    def last(self) -> int:
        return self.seen[-1] if self.seen else 0

    def _deliver(self, event: task_pb2.TaskEvent, live: bool) -> None:
        if event.sequence <= self.last:
            self.duplicates += 1
            return
        assert event.sequence == self.last + 1, f"gap: {self.last} -> {event.sequence}"
        self.seen.append(event.sequence)
        self.live += int(live)
        self.done = event.type == task_pb2.TASK_EVENT_TYPE_SUCCEEDED

    async def follow(self, port: int) -> None:
        """Subscribe at ``port``; ready -> history after ``last`` -> live, until the terminal event."""
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = await subscribe(
                npb_grpc.WatchFanoutServiceStub(channel), self.tenant_id, self.task_id
            )
            for event in list(self.history):  # the scheduler's GetTaskEvents(after=last)
                if event.sequence > self.last:
                    self._deliver(event, live=False)
            while not self.done:
                message = await call.read()
                if message is grpc.aio.EOF:
                    raise AssertionError("stream ended")
                self._deliver(message.event, live=True)
            call.cancel()


async def test_watch_resumes_through_a_restarted_notifier_after_kill_9(
    kafka_bootstrap: str,
    side: SchedulerSide,
    topics: dict[str, str],
    producer: EventProducer,
    tmp_path: Path,
) -> None:
    suffix = uuid.uuid4().hex[:6]
    env = {
        "NOTIFIER_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "NOTIFIER_SCHEDULER_ADDRESS": side.address,
        "NOTIFIER_GRPC_HOST": "127.0.0.1",
        "NOTIFIER_METRICS_PORT": "0",
        "NOTIFIER_EVENTS_TOPIC": topics["events"],
        "NOTIFIER_DEAD_LETTER_TOPIC": topics["dead_letter"],
        "NOTIFIER_PROVIDER_RESULTS_TOPIC": topics["results"],
        "NOTIFIER_WEBHOOK_GROUP": f"kill9-webhooks-{suffix}",
        "NOTIFIER_DEAD_LETTER_GROUP": f"kill9-dl-{suffix}",
        "NOTIFIER_THROTTLE_GROUP": f"kill9-thr-{suffix}",
        "NOTIFIER_SHUTDOWN_GRACE_SECONDS": "1",
        "NOTIFIER_LOG_LEVEL": "WARNING",
    }
    tenant, task_id = f"k9-{uuid.uuid4().hex[:6]}", str(uuid.uuid4())
    history: list[task_pb2.TaskEvent] = []
    restarted = asyncio.Event()
    finished: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def publish_until_after_the_restart() -> None:
        """Events every 20 ms until 50 after the restart, then the terminal one."""
        sequence, after_restart = 0, 0
        while after_restart < 50:
            sequence += 1
            after_restart += int(restarted.is_set())
            event = make_event(tenant, task_id, sequence, PROGRESS)
            history.append(event)  # committed first (the outbox), published after
            await publish(producer, topics["events"], [event])
            await asyncio.sleep(0.02)
        last = make_event(tenant, task_id, sequence + 1, task_pb2.TASK_EVENT_TYPE_SUCCEEDED)
        history.append(last)
        await publish(producer, topics["events"], [last])
        finished.set_result(last.sequence)

    first = NotifierProcess(env, tmp_path / "notifier-1.log")
    second = NotifierProcess(env, tmp_path / "notifier-2.log")
    watcher = Watcher(tenant, task_id, history)
    await first.start()
    try:
        publisher = asyncio.create_task(publish_until_after_the_restart())
        following = asyncio.create_task(watcher.follow(first.port))
        await eventually(lambda: watcher.last >= 40, what="first events live")
        await first.kill9()
        with pytest.raises(grpc.aio.AioRpcError):
            await asyncio.wait_for(following, timeout=15)
        lost_at, live_before = watcher.last, watcher.live
        await second.start()
        restarted.set()
        await asyncio.wait_for(watcher.follow(second.port), timeout=60)
        total = await finished
        await publisher
    finally:
        second_code = await second.terminate()
        await first.terminate()
    assert watcher.seen == list(range(1, total + 1))
    resumed_live = watcher.live - live_before
    assert resumed_live > 0  # the restarted notifier delivered live events...
    assert total - lost_at - resumed_live > 0  # ...after the history filled the gap
    assert second_code == 0  # SIGTERM: graceful shutdown


async def test_a_partition_added_later_does_not_skip_events_of_the_others(
    kafka_bootstrap: str, producer: EventProducer
) -> None:
    topic = f"test.notifier-watch.grow.{uuid.uuid4().hex[:8]}"
    await ensure_topics(kafka_bootstrap, {topic: 1})
    hub = WatchHub(NotifierMetrics(CollectorRegistry()), buffer_events=100)
    reader = EventBroadcaster(
        bootstrap_servers=kafka_bootstrap,
        topic=topic,
        hub=hub,
        client_id="test-grow",
        partition_check_seconds=3600,
    )
    tenant = f"t-{uuid.uuid4().hex[:6]}"
    sub = hub.subscribe(tenant, "")
    await reader.start()
    try:
        first = make_event(tenant, "task-a", 1, PROGRESS)
        await publish(producer, topic, [first])
        assert (await asyncio.wait_for(sub.next(), timeout=15)).sequence == 1
        # Hold the reader between fetches, publish, grow the topic, let the periodic check run:
        # the event published meanwhile must still be read from partition 0.
        reader._stopping.set()
        assert reader._task is not None
        await reader._task
        reader._stopping.clear()
        await publish(producer, topic, [make_event(tenant, "task-a", 2, PROGRESS)])
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        try:
            await admin.create_partitions({topic: NewPartitions(total_count=2)})
        finally:
            await admin.close()
        for _ in range(100):
            if len(await reader._partitions()) == 2:
                break
            await asyncio.sleep(0.1)
        await reader._assign_new_partitions(initial=False)
        reader._task = asyncio.create_task(reader._run())
        second = await asyncio.wait_for(sub.next(), timeout=15)
        assert (second.task_id, second.sequence) == ("task-a", 2)
    finally:
        await reader.stop()
