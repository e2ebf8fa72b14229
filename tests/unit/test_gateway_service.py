"""The gateway in-process against in-memory fakes of the scheduler and notifier.

Covers the gateway's own logic: principal forwarding, validation before forwarding, retries on
UNAVAILABLE with the same request_id, rich status pass-through, deadline propagation, auth/role/rate
limit in the interceptor, and the gap-free watch (live + history, gap fill, fallback to polling).
The real scheduler on PostgreSQL is exercised by tests/integration/test_gateway_*.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from conveyor_testkit.gateway import (
    FakeNotifier,
    FakeScheduler,
    notifier_binding,
    scheduler_binding,
    serve,
)
from conveyor_testkit.tokens import AUDIENCE, ISSUER, Keys, metadata
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from conveyor.tasks.v1 import admin_service_pb2 as admin_pb2
from conveyor.tasks.v1 import admin_service_pb2_grpc as admin_grpc
from conveyor.tasks.v1 import task_pb2
from conveyor.tasks.v1 import task_service_pb2 as svc_pb2
from conveyor.tasks.v1 import task_service_pb2_grpc as svc_grpc
from conveyor_client import AsyncConveyorClient, ConveyorError
from conveyor_common.errors import NotFound, QuotaViolation, ResourceExhausted
from conveyor_common.grpc_server import GrpcService
from conveyor_gateway.app import Gateway, build_gateway
from conveyor_gateway.settings import GatewaySettings
from conveyor_gateway.watch import WatchConfig

E = task_pb2


@dataclass
class Env:
    keys: Keys
    scheduler: FakeScheduler
    notifier: FakeNotifier
    fakes: GrpcService
    gateway: Gateway
    channel: grpc.aio.Channel
    tasks: Any
    registry: CollectorRegistry

    def md(self, tenant: str = "tenant-a", **kw: object) -> tuple[tuple[str, str], ...]:
        return metadata(self.keys.token(tenant, **kw))  # type: ignore[arg-type]


def settings(scheduler_port: int, notifier_port: int | None, **kw: object) -> GatewaySettings:
    values: dict[str, object] = {
        "grpc_host": "127.0.0.1",
        "grpc_port": 0,
        "scheduler_address": f"127.0.0.1:{scheduler_port}",
        "notifier_address": f"127.0.0.1:{notifier_port}" if notifier_port else None,
        "jwt_hs256_secret": Keys.generate.__defaults__[0].decode(),  # type: ignore[index]
        "jwt_issuer": ISSUER,
        "jwt_audience": AUDIENCE,
        "scheduler_retry_base_seconds": 0.01,
    }
    values.update(kw)
    return GatewaySettings(**values)  # type: ignore[arg-type]


FAST_WATCH = WatchConfig(poll_interval=0.05, safety_poll_interval=0.5, resubscribe_interval=0.2)


async def start_env(**kw: object) -> Env:
    notifier = FakeNotifier()
    scheduler = FakeScheduler(notifier)
    fakes = await serve(scheduler_binding(scheduler), notifier_binding(notifier))
    registry = CollectorRegistry()
    gateway = build_gateway(
        settings(fakes.port, fakes.port, **kw), registry, watch_config=FAST_WATCH
    )
    await gateway.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}")
    return Env(
        Keys.generate(), scheduler, notifier, fakes, gateway, channel,
        svc_grpc.TaskServiceStub(channel), registry,
    )  # fmt: skip


async def stop_env(env: Env) -> None:
    await env.channel.close()
    await env.gateway.stop(0.5)
    await env.fakes.stop(0.5)


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    e = await start_env()
    try:
        yield e
    finally:
        await stop_env(e)


def submit_request(request_id: str = "r-1") -> svc_pb2.SubmitTaskRequest:
    spec = task_pb2.TaskSpec(kind=E.TASK_KIND_IMAGE, model="acme/sdxl")
    spec.input.update({"prompt": "a cat"})
    return svc_pb2.SubmitTaskRequest(request_id=request_id, spec=spec)


async def submit(env: Env, tenant: str = "tenant-a", request_id: str = "r-1") -> task_pb2.Task:
    resp: svc_pb2.SubmitTaskResponse = await env.tasks.SubmitTask(
        submit_request(request_id), metadata=env.md(tenant), timeout=5
    )
    return resp.task


async def test_submit_forwards_the_principal(env: Env) -> None:
    task = await submit(env, "acme")
    assert task.tenant_id == "acme"
    name, wrapped, _ = env.scheduler.calls[-1]
    assert name == "SubmitTask"
    assert wrapped.principal.tenant_id == "acme"
    assert wrapped.principal.subject == "svc-acme"
    assert wrapped.request.request_id == "r-1"


async def test_bad_request_is_not_forwarded(env: Env) -> None:
    req = submit_request()
    req.spec.model = "not a model"
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await env.tasks.SubmitTask(req, metadata=env.md(), timeout=5)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    err = ConveyorError.from_rpc_error(exc.value)
    assert [v.field for v in err.field_violations] == ["spec.model"]
    assert env.scheduler.calls == []


async def test_unavailable_is_retried_with_the_same_request_id(env: Env) -> None:
    env.scheduler.fail_unavailable = 2
    task = await submit(env, request_id="retry-me")
    calls = [c for c in env.scheduler.calls if c[0] == "SubmitTask"]
    assert len(calls) == 3
    assert {c[1].request.request_id for c in calls} == {"retry-me"}
    assert len(env.scheduler.tasks) == 1
    assert task.request_id == "retry-me"


async def test_rich_status_passes_through_unchanged(env: Env) -> None:
    env.scheduler.fail_with = ResourceExhausted(
        [QuotaViolation("tenant:tenant-a", "too many waiting tasks")], retry_after_seconds=2.5
    )
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await env.tasks.SubmitTask(submit_request(), metadata=env.md(), timeout=5)
    err = ConveyorError.from_rpc_error(exc.value)
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.quota_violations[0].description == "too many waiting tasks"
    assert err.retry_after_seconds == pytest.approx(2.5)
    assert err.reason == "QUOTA_EXCEEDED"


async def test_not_found_for_other_tenant_equals_missing(env: Env) -> None:
    task = await submit(env, "tenant-a")
    missing = "00000000-0000-4000-8000-000000000000"
    env.scheduler.fail_with = None
    errors = []
    for task_id in (task.task_id, missing):
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await env.tasks.GetTask(
                svc_pb2.GetTaskRequest(task_id=task_id), metadata=env.md("tenant-b"), timeout=5
            )
        errors.append((exc.value.code(), (exc.value.details() or "").replace(task_id, "<id>")))
    assert errors[0] == errors[1]
    assert errors[0][0] == grpc.StatusCode.NOT_FOUND
    assert isinstance(NotFound("task", "x").message, str)


async def test_deadline_propagates(env: Env) -> None:
    await env.tasks.GetQueueStats(svc_pb2.GetQueueStatsRequest(), metadata=env.md(), timeout=0.4)
    _, _, remaining = env.scheduler.calls[-1]
    assert remaining is not None
    assert 0.05 < remaining <= 0.4  # the caller's deadline, less the time to get there
    # A longer deadline: the first attempt is bounded by the attempt timeout (0.5 s by default).
    await env.tasks.GetQueueStats(svc_pb2.GetQueueStatsRequest(), metadata=env.md(), timeout=5)
    _, _, remaining = env.scheduler.calls[-1]
    assert remaining is not None
    assert 0.05 < remaining <= 0.51  # the attempt's bound (0.5 s), rounding aside


async def test_scheduler_down_is_unavailable_without_internal_details() -> None:
    gateway = build_gateway(
        settings(1, None, scheduler_retry_attempts=2), CollectorRegistry()
    )  # port 1: nothing listens
    await gateway.start()
    keys = Keys.generate()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await svc_grpc.TaskServiceStub(ch).GetQueueStats(
                svc_pb2.GetQueueStatsRequest(), metadata=metadata(keys.token()), timeout=5
            )
    await gateway.stop(0.1)
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "127.0.0.1" not in (exc.value.details() or "")


async def test_auth_role_health_and_metrics(env: Env) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await env.tasks.GetQueueStats(svc_pb2.GetQueueStatsRequest(), timeout=5)
    assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    admin: Any = admin_grpc.AdminServiceStub(env.channel)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await admin.GetTenant(
            admin_pb2.GetTenantRequest(tenant_id="x"), metadata=env.md(), timeout=5
        )
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
    health: Any = health_pb2_grpc.HealthStub(env.channel)
    resp = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    value = env.registry.get_sample_value(
        "conveyor_grpc_server_handled_total",
        {
            "service": "gateway",
            "grpc_method": "/conveyor.tasks.v1.TaskService/GetQueueStats",
            "grpc_code": "UNAUTHENTICATED",
        },
    )
    assert value == 1.0


async def test_rate_limit_per_tenant() -> None:
    env = await start_env(rate_limit_per_second=0.5, rate_limit_burst=2)
    try:
        for _ in range(2):
            await env.tasks.GetQueueStats(
                svc_pb2.GetQueueStatsRequest(), metadata=env.md(), timeout=5
            )
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await env.tasks.GetQueueStats(
                svc_pb2.GetQueueStatsRequest(), metadata=env.md(), timeout=5
            )
        err = ConveyorError.from_rpc_error(exc.value)
        assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert err.quota_violations[0].field == "tenant:tenant-a"
        assert err.retry_after_seconds is not None
        assert err.retry_after_seconds > 0
        # Another tenant has its own bucket.
        await env.tasks.GetQueueStats(
            svc_pb2.GetQueueStatsRequest(), metadata=env.md("other"), timeout=5
        )
    finally:
        await stop_env(env)


async def collect(
    env: Env, task_id: str, after: int = 0, tenant: str = "tenant-a"
) -> list[task_pb2.TaskEvent]:
    call = env.tasks.WatchTask(
        svc_pb2.WatchTaskRequest(task_id=task_id, after_sequence=after),
        metadata=env.md(tenant),
        timeout=10,
    )
    return [resp.event async for resp in call]


async def drive(env: Env, task_id: str, delay: float = 0.05) -> None:
    """Progress events then success, published live."""
    await asyncio.sleep(delay * 4)
    for p in (10, 50, 90):
        env.scheduler.append_event(
            task_id, E.TASK_EVENT_TYPE_PROGRESS, progress=p, status=E.TASK_STATUS_RUNNING
        )
        await asyncio.sleep(delay)
    env.scheduler.append_event(
        task_id, E.TASK_EVENT_TYPE_SUCCEEDED, progress=100, status=E.TASK_STATUS_SUCCEEDED
    )


def sequences(events: list[task_pb2.TaskEvent]) -> list[int]:
    return [e.sequence for e in events]


async def test_watch_history_then_live(env: Env) -> None:
    task = await submit(env)
    events, _ = await asyncio.gather(collect(env, task.task_id), drive(env, task.task_id))
    assert sequences(events) == [1, 2, 3, 4, 5]
    assert events[-1].type == E.TASK_EVENT_TYPE_SUCCEEDED
    assert env.notifier.subscribe_count == 1


async def test_watch_fills_gaps_of_the_live_stream(env: Env) -> None:
    task = await submit(env)
    env.notifier.drop_sequences = {3}
    events, _ = await asyncio.gather(collect(env, task.task_id), drive(env, task.task_id))
    assert sequences(events) == [1, 2, 3, 4, 5]


async def test_watch_survives_a_broken_live_stream(env: Env) -> None:
    task = await submit(env)
    env.notifier.break_after = 1
    events, _ = await asyncio.gather(collect(env, task.task_id), drive(env, task.task_id))
    assert sequences(events) == [1, 2, 3, 4, 5]


async def test_watch_polls_without_a_notifier() -> None:
    notifier = FakeNotifier()
    scheduler = FakeScheduler(notifier)
    fakes = await serve(scheduler_binding(scheduler))  # no notifier served: Subscribe fails
    gateway = build_gateway(
        settings(fakes.port, fakes.port), CollectorRegistry(), watch_config=FAST_WATCH
    )
    await gateway.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}")
    env = Env(
        Keys.generate(),
        scheduler,
        notifier,
        fakes,
        gateway,
        channel,
        svc_grpc.TaskServiceStub(channel),
        CollectorRegistry(),
    )
    try:
        task = await submit(env)
        events, _ = await asyncio.gather(collect(env, task.task_id), drive(env, task.task_id))
        assert sequences(events) == [1, 2, 3, 4, 5]
    finally:
        await stop_env(env)


async def test_watch_resumes_after_a_sequence_and_ends_at_terminal(env: Env) -> None:
    task = await submit(env)
    await drive(env, task.task_id, delay=0)
    assert sequences(await collect(env, task.task_id, after=3)) == [4, 5]
    assert await collect(env, task.task_id, after=5) == []


async def test_watch_of_another_tenants_task_is_not_found(env: Env) -> None:
    task = await submit(env)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await collect(env, task.task_id, tenant="intruder")
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND


async def test_watch_tasks_is_live_and_tenant_scoped(env: Env) -> None:
    call = env.tasks.WatchTasks(svc_pb2.WatchTasksRequest(), metadata=env.md(), timeout=5)
    for _ in range(100):
        if env.notifier.subscribers:
            break
        await asyncio.sleep(0.02)
    mine = await submit(env, request_id="w1")
    await submit(env, "someone-else", request_id="w2")
    first = await call.read()
    assert isinstance(first, svc_pb2.WatchTasksResponse)
    assert first.event.task_id == mine.task_id
    call.cancel()


async def test_sdk_wait_follows_the_watch_to_the_end(env: Env) -> None:
    token = env.keys.token()
    async with AsyncConveyorClient(f"127.0.0.1:{env.gateway.port}", token) as client:
        resp = await client.submit("image", model="acme/sdxl", input={"prompt": "p"})
        driver = asyncio.create_task(drive(env, resp.task.task_id))
        final = await client.wait(resp.task.task_id)
        await driver
        assert final.status == E.TASK_STATUS_SUCCEEDED


async def test_sdk_retries_unavailable_with_the_same_request_id() -> None:
    env = await start_env(scheduler_retry_attempts=1)  # the gateway passes UNAVAILABLE through
    try:
        env.scheduler.fail_unavailable = 2
        async with AsyncConveyorClient(
            f"127.0.0.1:{env.gateway.port}", env.keys.token(), backoff_base=0.01
        ) as client:
            resp = await client.submit("image", model="acme/sdxl", input={"prompt": "p"})
        calls = [c for c in env.scheduler.calls if c[0] == "SubmitTask"]
        assert len(calls) == 3
        assert {c[1].request.request_id for c in calls} == {resp.task.request_id}
        assert len(env.scheduler.tasks) == 1
    finally:
        await stop_env(env)


async def test_sdk_gives_up_after_its_retries() -> None:
    env = await start_env(scheduler_retry_attempts=1)
    try:
        env.scheduler.fail_unavailable = 100
        async with AsyncConveyorClient(
            f"127.0.0.1:{env.gateway.port}", env.keys.token(), retries=2, backoff_base=0.01
        ) as client:
            with pytest.raises(ConveyorError) as exc:
                await client.stats()
        assert exc.value.code == grpc.StatusCode.UNAVAILABLE
        assert exc.value.retry_after_seconds is not None
        assert len(env.scheduler.calls) == 3
    finally:
        await stop_env(env)


async def test_sdk_watch_resumes_across_a_gateway_restart() -> None:
    env = await start_env()
    port = env.gateway.port
    replacement: Gateway | None = None
    try:
        async with AsyncConveyorClient(
            f"127.0.0.1:{port}", env.keys.token(), backoff_base=0.05
        ) as client:
            task = (await client.submit("image", model="acme/sdxl", input={"p": 1})).task
            seen: list[int] = []

            async def follow() -> None:
                async for event in client.watch(task.task_id):
                    seen.append(event.sequence)  # noqa: PERF401 (read while it grows)

            follower = asyncio.create_task(follow())
            env.scheduler.append_event(task.task_id, E.TASK_EVENT_TYPE_DISPATCHED)
            for _ in range(100):
                if len(seen) >= 2:
                    break
                await asyncio.sleep(0.02)
            assert seen == [1, 2]
            await env.gateway.stop(0)  # the stream breaks mid-watch
            env.scheduler.append_event(task.task_id, E.TASK_EVENT_TYPE_STARTED)
            replacement = build_gateway(
                settings(env.fakes.port, env.fakes.port, grpc_port=port),
                CollectorRegistry(),
                watch_config=FAST_WATCH,
            )
            await replacement.start()
            env.scheduler.append_event(
                task.task_id, E.TASK_EVENT_TYPE_SUCCEEDED, status=E.TASK_STATUS_SUCCEEDED
            )
            await asyncio.wait_for(follower, 15)
        assert seen == [1, 2, 3, 4]  # no gap, no duplicate across the reconnect
    finally:
        if replacement is not None:
            await replacement.stop(0)
        await env.channel.close()
        await env.fakes.stop(0.5)


async def test_watch_tasks_without_a_reachable_notifier_is_unavailable_with_retry_info() -> None:
    scheduler = FakeScheduler()
    fakes = await serve(scheduler_binding(scheduler))  # no WatchFanoutService here
    gateway = build_gateway(settings(fakes.port, fakes.port), CollectorRegistry())
    await gateway.start()
    try:
        async with AsyncConveyorClient(f"127.0.0.1:{gateway.port}", Keys.generate().token()) as c:
            with pytest.raises(ConveyorError) as exc:
                async for _ in c.watch_all():
                    pass
        assert exc.value.code == grpc.StatusCode.UNAVAILABLE
        assert exc.value.retry_after_seconds == 1.0
    finally:
        await gateway.stop(0)
        await fakes.stop(0)


async def test_reflection_lists_the_public_services_without_a_token(env: Env) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub: Any = reflection_pb2_grpc.ServerReflectionStub(env.channel)
    call = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
    )
    names: set[str] = set()
    async for resp in call:
        names.update(s.name for s in resp.list_services_response.service)
    assert {
        "conveyor.tasks.v1.TaskService",
        "conveyor.tasks.v1.AdminService",
        "conveyor.tasks.v1.WebhookService",
        "conveyor.tasks.v1.GroupService",
        "grpc.health.v1.Health",
    } <= names


async def test_concurrent_submits_share_group_calls_and_get_their_own_outcome(env: Env) -> None:
    """Coalescing: 60 concurrent submits travel in fewer SubmitTaskGroup calls, each caller gets
    its own task, and one refused item fails alone with its rich status."""
    assert env.gateway.submits is not None
    env.scheduler.delay = 0.02  # calls in flight while the others arrive
    env.scheduler.fail_request["refused"] = ResourceExhausted(
        [QuotaViolation("tenant:tenant-b/waiting", "too many waiting tasks")],
        retry_after_seconds=3,
    )
    ids = [f"c-{i}" for i in range(60)]
    results = await asyncio.gather(
        *(submit(env, "tenant-b" if i % 2 else "tenant-a", rid) for i, rid in enumerate(ids)),
        env.tasks.SubmitTask(submit_request("refused"), metadata=env.md("tenant-b"), timeout=5),
        return_exceptions=True,
    )
    *tasks, refused = results
    assert [t.request_id for t in tasks] == ids  # type: ignore[union-attr]
    assert [t.tenant_id for t in tasks] == [  # type: ignore[union-attr]
        "tenant-b" if i % 2 else "tenant-a" for i in range(60)
    ]
    assert len({t.task_id for t in tasks}) == 60  # type: ignore[union-attr]
    assert isinstance(refused, grpc.aio.AioRpcError)
    err = ConveyorError.from_rpc_error(refused)
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.quota_violations[0].field == "tenant:tenant-b/waiting"
    assert err.retry_after_seconds == pytest.approx(3)
    assert 2 <= env.gateway.submits.calls < 30
    sizes = env.registry.get_sample_value("conveyor_gateway_submit_group_size_sum")
    assert sizes == 61


async def test_a_submit_past_its_deadline_fails_alone(env: Env) -> None:
    env.scheduler.delay = 0.5
    slow = [asyncio.create_task(submit(env, request_id=f"patient-{i}")) for i in range(3)]
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await env.tasks.SubmitTask(submit_request("hasty"), metadata=env.md(), timeout=0.2)
    assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    done = await asyncio.gather(*slow)
    assert sorted(t.request_id for t in done) == ["patient-0", "patient-1", "patient-2"]


async def test_coalescing_can_be_turned_off() -> None:
    env = await start_env(submit_coalesce=False)
    try:
        assert env.gateway.submits is None
        task = await submit(env, "acme")
        assert task.tenant_id == "acme"
        assert [c[0] for c in env.scheduler.calls] == ["SubmitTask"]
    finally:
        await stop_env(env)


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


async def test_a_stopped_coalescer_fails_its_callers_instead_of_leaving_them_waiting() -> None:
    from conveyor.scheduler.v1 import scheduler_service_pb2 as sched_pb2
    from conveyor_gateway.coalesce import SubmitCoalescer

    class SlowScheduler:
        default_timeout = 5.0

        async def call(self, *args: Any, **kwargs: Any) -> Any:
            await asyncio.sleep(30)

    coalescer = SubmitCoalescer(SlowScheduler())  # type: ignore[arg-type]
    waiters = [
        asyncio.create_task(coalescer.submit(sched_pb2.SchedulerServiceSubmitTaskRequest(), None))
        for _ in range(3)
    ]
    await asyncio.sleep(0.05)
    assert coalescer.calls == 1  # all three in flight in one call
    for flusher in list(coalescer._flushers):
        flusher.cancel()
    results = await asyncio.wait_for(asyncio.gather(*waiters, return_exceptions=True), 2)
    assert all(isinstance(r, BaseException) for r in results)


class FrozenScheduler(FakeScheduler):
    """A replica that accepts calls and never answers (a SIGSTOPped or stalled process)."""

    async def GetQueueStats(self, request: Any, context: Any) -> Any:
        self._record("GetQueueStats", request, context)
        await asyncio.Event().wait()


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
