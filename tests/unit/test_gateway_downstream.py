"""conveyor_gateway.downstream: calls spread over every scheduler replica, an unresponsive replica
costs one short attempt, scheduler targets split into replicas.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from prometheus_client import CollectorRegistry

from conveyor.tasks.v1 import task_service_pb2 as svc_pb2
from conveyor.tasks.v1 import task_service_pb2_grpc as svc_grpc
from conveyor_gateway.app import build_gateway
from conveyor_testkit.gateway import (
    FakeScheduler,
    scheduler_binding,
    serve,
)
from conveyor_testkit.tokens import Keys, metadata
from tests.unit.gateway_env import FrozenScheduler, settings


async def test_calls_are_spread_over_every_scheduler_replica() -> None:
    """A target naming several replicas (a headless Service in Kubernetes) gets round_robin: every
    replica serves calls, none is left idle behind pick_first."""
    a, b = FakeScheduler(), FakeScheduler()
    fake_a, fake_b = await serve(scheduler_binding(a)), await serve(scheduler_binding(b))
    gateway = build_gateway(
        settings(0, None, scheduler_channels=1).model_copy(
            update={"scheduler_address": f"ipv4:127.0.0.1:{fake_a.port},127.0.0.1:{fake_b.port}"}
        ),
        CollectorRegistry(),
    )
    await gateway.start()
    keys = Keys.generate()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as ch:
            stub = svc_grpc.TaskServiceStub(ch)
            for _ in range(20):
                await stub.GetQueueStats(
                    svc_pb2.GetQueueStatsRequest(), metadata=metadata(keys.token()), timeout=5
                )
        assert len(a.calls) + len(b.calls) == 20
        assert len(a.calls) >= 5
        assert len(b.calls) >= 5
    finally:
        await gateway.stop(0.5)
        await fake_a.stop(0.5)
        await fake_b.stop(0.5)


async def test_an_unresponsive_replica_costs_one_short_attempt() -> None:
    """With one of two replicas frozen, every call still succeeds, each within about one attempt
    timeout: the timed-out attempt is retried at once on the other replica."""
    frozen, healthy = FrozenScheduler(), FakeScheduler()
    fake_a, fake_b = await serve(scheduler_binding(frozen)), await serve(scheduler_binding(healthy))
    gateway = build_gateway(
        settings(0, None, scheduler_channels=1, scheduler_attempt_timeout_seconds=0.3).model_copy(
            update={"scheduler_address": f"ipv4:127.0.0.1:{fake_a.port},127.0.0.1:{fake_b.port}"}
        ),
        CollectorRegistry(),
    )
    await gateway.start()
    keys = Keys.generate()
    took: list[float] = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as ch:
            stub = svc_grpc.TaskServiceStub(ch)
            for _ in range(10):
                started = asyncio.get_running_loop().time()
                await stub.GetQueueStats(
                    svc_pb2.GetQueueStatsRequest(), metadata=metadata(keys.token()), timeout=10
                )
                took.append(asyncio.get_running_loop().time() - started)
        assert frozen.calls, "round_robin sent the frozen replica some attempts"
        assert len(healthy.calls) == 10
        assert max(took) < 0.3 * 4, took  # never the caller's 10 s: at most a few short attempts
    finally:
        await gateway.stop(0.5)
        await fake_a.stop(0.5)
        await fake_b.stop(0.5)


@pytest.mark.parametrize(
    ("target", "split"),
    [
        (
            "ipv4:10.0.0.1:50051,10.0.0.2:50051",
            (["ipv4:10.0.0.1:50051", "ipv4:10.0.0.2:50051"], "", 0),
        ),
        ("dns:///scheduler-headless:50051", ([], "scheduler-headless", 50051)),
        ("scheduler:50051", ([], "scheduler", 50051)),
        ("unix:///tmp/socket", None),
        ("scheduler", None),
    ],
)
def test_scheduler_targets_split_into_replicas(target: str, split: object) -> None:
    from conveyor_gateway.downstream import _split_target

    assert _split_target(target) == split
