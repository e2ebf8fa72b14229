"""conveyor_gateway.servicers against in-memory scheduler and notifier doubles: the principal forwarded,
bad requests never forwarded, retries with the same request id, rich statuses passed through, tenant
scoping, deadlines, auth, health, metrics, rate limits and reflection.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from conveyor.tasks.v1 import admin_service_pb2 as admin_pb2
from conveyor.tasks.v1 import admin_service_pb2_grpc as admin_grpc
from conveyor.tasks.v1 import task_service_pb2 as svc_pb2
from conveyor.tasks.v1 import task_service_pb2_grpc as svc_grpc
from conveyor_client import ConveyorError
from conveyor_common.errors import NotFound, QuotaViolation, ResourceExhausted
from conveyor_gateway.app import build_gateway
from conveyor_testkit.tokens import Keys, metadata
from tests.unit.gateway_env import (
    Env,
    env_fixture,  # noqa: F401 (the env fixture)
    settings,
    start_env,
    stop_env,
    submit,
    submit_request,
)


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
