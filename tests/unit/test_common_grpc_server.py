"""The grpc.aio bootstrap: health, reflection, rich errors, metrics and graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiokafka.errors
import grpc
import psycopg
import pytest
import sqlalchemy.exc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from prometheus_client import CollectorRegistry

from conveyor.tasks.v1 import task_pb2, task_service_pb2, task_service_pb2_grpc
from conveyor_common.errors import (
    FieldViolation,
    InvalidArgument,
    NotFound,
    QuotaViolation,
    ResourceExhausted,
    unpack_details,
)
from conveyor_common.grpc_server import GrpcService, ServiceBinding, create_server
from conveyor_common.metrics import RpcMetrics

SERVICE = "conveyor.tasks.v1.TaskService"


def _wrapped(orig: Exception, wrapper: type[sqlalchemy.exc.DBAPIError]) -> Exception:
    try:
        raise wrapper("INSERT ...", {}, orig)
    except wrapper as exc:
        return exc


def _chained_timeout() -> Exception:
    try:
        try:
            raise TimeoutError("connect timed out")
        except TimeoutError as inner:
            raise RuntimeError("could not open a connection") from inner
    except RuntimeError as exc:
        return exc


INFRASTRUCTURE: dict[str, Any] = {
    "db-down": lambda: psycopg.OperationalError("connection to server at 127.0.0.1 refused"),
    "db-shutdown": lambda: _wrapped(
        psycopg.errors.AdminShutdown("terminating connection"), sqlalchemy.exc.OperationalError
    ),
    "deadlock": lambda: psycopg.errors.DeadlockDetected("deadlock detected"),
    "pool": lambda: sqlalchemy.exc.TimeoutError("QueuePool limit reached"),
    "kafka": lambda: aiokafka.errors.KafkaConnectionError("no broker"),
    "chained": _chained_timeout,
    "nul": lambda: _wrapped(
        psycopg.errors.UntranslatableCharacter("unsupported Unicode escape sequence"),
        sqlalchemy.exc.DataError,
    ),
}


class Servicer(task_service_pb2_grpc.TaskServiceServicer):
    """Answers by task id: scripted errors, a slow call and a stream."""

    def __init__(self) -> None:
        self.slow_started = asyncio.Event()

    async def GetTask(
        self, request: task_service_pb2.GetTaskRequest, context: Any
    ) -> task_service_pb2.GetTaskResponse:
        if request.task_id == "missing":
            raise NotFound("task", request.task_id)
        if request.task_id == "bad":
            raise InvalidArgument([FieldViolation("task_id", "must be a UUID")])
        if request.task_id == "full":
            raise ResourceExhausted([QuotaViolation("tenant:acme", "queue full")], 2.5)
        if request.task_id == "crash":
            raise ZeroDivisionError("secret internal detail")
        if request.task_id in INFRASTRUCTURE:
            raise INFRASTRUCTURE[request.task_id]()
        if request.task_id == "slow":
            self.slow_started.set()
            await asyncio.sleep(0.5)
        return task_service_pb2.GetTaskResponse(task=task_pb2.Task(task_id=request.task_id))

    async def WatchTask(
        self, request: task_service_pb2.WatchTaskRequest, context: Any
    ) -> AsyncIterator[task_service_pb2.WatchTaskResponse]:
        for seq in range(1, 4):
            yield task_service_pb2.WatchTaskResponse(
                event=task_pb2.TaskEvent(task_id=request.task_id, sequence=seq)
            )
        if request.task_id == "crash":
            raise RuntimeError("mid-stream failure")


@pytest.fixture
async def served() -> AsyncIterator[tuple[GrpcService, Servicer, CollectorRegistry]]:
    registry = CollectorRegistry()
    servicer = Servicer()  # type: ignore[abstract]  # only the methods under test
    svc = create_server(
        [
            ServiceBinding(
                task_service_pb2_grpc.add_TaskServiceServicer_to_server, servicer, SERVICE
            )
        ],
        host="127.0.0.1",
        port=0,
        metrics=RpcMetrics(registry, "test"),
    )
    await svc.start()
    yield svc, servicer, registry
    await svc.stop(0)


def channel(svc: GrpcService) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{svc.port}")


async def test_health_and_reflection(
    served: tuple[GrpcService, Servicer, CollectorRegistry],
) -> None:
    svc, _, _ = served
    async with channel(svc) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for name in ("", SERVICE):
            resp = await health.Check(health_pb2.HealthCheckRequest(service=name))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)

        async def one() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        names = set()
        async for resp in refl.ServerReflectionInfo(one()):
            names = {s.name for s in resp.list_services_response.service}
        assert {SERVICE, "grpc.health.v1.Health"} <= names


@pytest.mark.parametrize(
    ("task_id", "code", "detail"),
    [
        ("missing", grpc.StatusCode.NOT_FOUND, "ResourceInfo"),
        ("bad", grpc.StatusCode.INVALID_ARGUMENT, "BadRequest"),
        ("full", grpc.StatusCode.RESOURCE_EXHAUSTED, "QuotaFailure"),
    ],
)
async def test_rpc_errors_become_rich_statuses(
    served: tuple[GrpcService, Servicer, CollectorRegistry],
    task_id: str,
    code: grpc.StatusCode,
    detail: str,
) -> None:
    svc, _, registry = served
    async with channel(svc) as ch:
        stub = task_service_pb2_grpc.TaskServiceStub(ch)
        call = stub.GetTask(task_service_pb2.GetTaskRequest(task_id=task_id))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == code
        status = await rpc_status.aio.from_call(call)
        assert status is not None
        details = unpack_details(status)
        assert detail in details
        assert "ErrorInfo" in details
        if task_id == "bad":
            assert details["BadRequest"].field_violations[0].field == "task_id"  # type: ignore[attr-defined]
        if task_id == "full":
            retry = details["RetryInfo"].retry_delay  # type: ignore[attr-defined]
            assert (retry.seconds, retry.nanos) == (2, 500_000_000)
    value = registry.get_sample_value(
        "conveyor_grpc_server_handled_total",
        {"service": "test", "grpc_method": f"/{SERVICE}/GetTask", "grpc_code": code.name},
    )
    assert value == 1.0


async def test_unexpected_errors_are_internal_without_details(
    served: tuple[GrpcService, Servicer, CollectorRegistry],
) -> None:
    svc, _, _ = served
    async with channel(svc) as ch:
        stub = task_service_pb2_grpc.TaskServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetTask(task_service_pb2.GetTaskRequest(task_id="crash"))
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert "secret" not in (err.value.details() or "")
        seen: list[int] = []

        async def consume() -> None:
            async for item in stub.WatchTask(task_service_pb2.WatchTaskRequest(task_id="crash")):
                seen.append(item.event.sequence)  # noqa: PERF401 - the stream fails midway

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await consume()
        assert seen == [1, 2, 3]
        assert err.value.code() == grpc.StatusCode.INTERNAL


@pytest.mark.parametrize(
    ("task_id", "code"),
    [
        ("db-down", grpc.StatusCode.UNAVAILABLE),
        ("db-shutdown", grpc.StatusCode.UNAVAILABLE),
        ("deadlock", grpc.StatusCode.UNAVAILABLE),
        ("pool", grpc.StatusCode.UNAVAILABLE),
        ("kafka", grpc.StatusCode.UNAVAILABLE),
        ("chained", grpc.StatusCode.UNAVAILABLE),
        ("nul", grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
async def test_infrastructure_failures_are_retryable_never_internal(
    served: tuple[GrpcService, Servicer, CollectorRegistry],
    task_id: str,
    code: grpc.StatusCode,
    caplog: pytest.LogCaptureFixture,
) -> None:
    svc, _, registry = served
    async with channel(svc) as ch:
        stub = task_service_pb2_grpc.TaskServiceStub(ch)
        call = stub.GetTask(task_service_pb2.GetTaskRequest(task_id=task_id))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == code
        status = await rpc_status.aio.from_call(call)
        assert status is not None
        details = unpack_details(status)
        if code == grpc.StatusCode.UNAVAILABLE:
            assert "RetryInfo" in details
        else:
            assert "BadRequest" in details
    assert not [r for r in caplog.records if r.exc_info], "no stack trace for a known failure"
    value = registry.get_sample_value(
        "conveyor_grpc_server_handled_total",
        {"service": "test", "grpc_method": f"/{SERVICE}/GetTask", "grpc_code": code.name},
    )
    assert value == 1.0


async def test_graceful_shutdown_drains_in_flight_calls(
    served: tuple[GrpcService, Servicer, CollectorRegistry],
) -> None:
    svc, servicer, _ = served
    async with channel(svc) as ch:
        stub = task_service_pb2_grpc.TaskServiceStub(ch)
        health = health_pb2_grpc.HealthStub(ch)
        slow = asyncio.ensure_future(stub.GetTask(task_service_pb2.GetTaskRequest(task_id="slow")))
        await servicer.slow_started.wait()
        await svc.enter_graceful_shutdown()
        resp = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING
        await svc.stop(grace=5)
        done = await slow
        assert done.task.task_id == "slow"


async def test_a_frozen_replica_is_dropped_from_round_robin_within_seconds(
    tmp_path: Any,
) -> None:
    """SIGSTOP one of two replicas (its TCP session stays up): the channel options' keepalive
    pings evict it, so calls stop timing out on it after a few seconds."""
    import signal
    import sys
    import time

    from grpc_health.v1 import health_pb2 as hpb

    from conveyor_common.channels import client_options

    script = tmp_path / "server.py"
    script.write_text(
        "import asyncio, sys\n"
        "from prometheus_client import CollectorRegistry\n"
        "from conveyor_common.grpc_server import create_server\n"
        "from conveyor_common.metrics import RpcMetrics\n"
        "async def main():\n"
        "    srv = create_server([], host='127.0.0.1', port=0,"
        " metrics=RpcMetrics(CollectorRegistry(), 'x'))\n"
        "    await srv.start(); print(srv.port, flush=True); await asyncio.Event().wait()\n"
        "asyncio.run(main())\n"
    )
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, str(script), stdout=asyncio.subprocess.PIPE
        )
        for _ in range(2)
    ]
    try:
        ports = [int(await p.stdout.readline()) for p in procs if p.stdout is not None]
        target = f"ipv4:127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}"
        async with grpc.aio.insecure_channel(target, options=client_options()) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            for _ in range(4):
                await stub.Check(hpb.HealthCheckRequest(), timeout=5)
            procs[0].send_signal(signal.SIGSTOP)
            frozen_at = time.monotonic()
            last_failure = 0.0
            while time.monotonic() - frozen_at < 6:
                try:
                    await stub.Check(hpb.HealthCheckRequest(), timeout=0.3)
                except grpc.aio.AioRpcError:
                    last_failure = time.monotonic() - frozen_at
                await asyncio.sleep(0.1)
        assert last_failure < 5.0, f"calls still reached the frozen replica after {last_failure} s"
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGCONT)
                p.kill()
            await p.wait()
