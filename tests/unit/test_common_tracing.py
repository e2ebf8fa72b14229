"""Traces: off by default; spans join the bound trace; gRPC calls and Kafka records carry it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from conveyor.tasks.v1 import task_pb2, task_service_pb2, task_service_pb2_grpc
from conveyor_common import tracing
from conveyor_common.context import bound, current_traceparent
from conveyor_common.grpc_server import ServiceBinding, create_server
from conveyor_common.kafka.producer import _published_span
from conveyor_common.metrics import RpcMetrics
from conveyor_common.tls import open_channel

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
def exported() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    assert tracing.configure_tracing("test", exporter=exporter)
    try:
        yield exporter
    finally:
        import asyncio

        asyncio.run(tracing.shutdown_tracing())


def spans(exporter: InMemorySpanExporter) -> list[Any]:
    tracing.flush()
    return list(exporter.get_finished_spans())


def test_traces_are_off_unless_the_environment_asks(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    assert not tracing.configure_tracing("test")
    assert not tracing.enabled()
    with tracing.span("nothing") as current:
        assert current is None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert not tracing.configure_tracing("test")


def test_a_span_joins_the_bound_trace_and_binds_its_own(exported: InMemorySpanExporter) -> None:
    with bound(traceparent=PARENT), tracing.span("outer") as outer:
        inner_tp = current_traceparent()
        with tracing.span("inner", links=[PARENT]):
            pass
    with tracing.span("root", parent=""):
        pass
    by_name = {s.name: s for s in spans(exported)}
    assert f"{by_name['outer'].context.trace_id:032x}" == PARENT.split("-")[1]
    assert f"{by_name['outer'].parent.span_id:016x}" == PARENT.split("-")[2]
    assert inner_tp.split("-")[2] == f"{outer.get_span_context().span_id:016x}"
    assert by_name["inner"].parent.span_id == by_name["outer"].context.span_id
    assert len(by_name["inner"].links) == 1
    assert by_name["root"].parent is None
    assert by_name["root"].context.trace_id != by_name["outer"].context.trace_id


class Servicer(task_service_pb2_grpc.TaskServiceServicer):
    async def GetTask(
        self, request: task_service_pb2.GetTaskRequest, context: Any
    ) -> task_service_pb2.GetTaskResponse:
        return task_service_pb2.GetTaskResponse(task=task_pb2.Task(task_id=current_traceparent()))


@pytest.fixture
async def server() -> AsyncIterator[int]:
    servicer = Servicer()  # type: ignore[abstract]  # only GetTask is called
    svc = create_server(
        [
            ServiceBinding(
                task_service_pb2_grpc.add_TaskServiceServicer_to_server,
                servicer,
                "conveyor.tasks.v1.TaskService",
            )
        ],
        host="127.0.0.1",
        port=0,
        metrics=RpcMetrics(CollectorRegistry(), "test"),
    )
    await svc.start()
    yield svc.port
    await svc.stop(0)


async def test_calls_carry_the_trace_even_when_spans_are_not_exported(server: int) -> None:
    async with open_channel(f"127.0.0.1:{server}", None, []) as channel:
        stub = task_service_pb2_grpc.TaskServiceStub(channel)
        with bound(traceparent=PARENT):
            resp = await stub.GetTask(task_service_pb2.GetTaskRequest(task_id="t"), timeout=5)
    assert resp.task.task_id.split("-")[1] == PARENT.split("-")[1]  # the server's context


async def test_client_and_server_spans_of_a_call_are_parent_and_child(
    server: int, exported: InMemorySpanExporter
) -> None:
    async with open_channel(f"127.0.0.1:{server}", None, []) as channel:
        stub = task_service_pb2_grpc.TaskServiceStub(channel)
        with bound(traceparent=PARENT):
            await stub.GetTask(task_service_pb2.GetTaskRequest(task_id="t"), timeout=5)
    got = spans(exported)
    client = next(s for s in got if s.kind.name == "CLIENT")
    served = next(s for s in got if s.kind.name == "SERVER")
    assert served.parent.span_id == client.context.span_id
    assert f"{served.context.trace_id:032x}" == PARENT.split("-")[1]


def test_a_published_record_names_its_producer_span(exported: InMemorySpanExporter) -> None:
    headers = [("ce_id", b"x"), ("traceparent", PARENT.encode())]
    out = dict(_published_span("topic", headers))
    [producer] = spans(exported)
    assert producer.kind.name == "PRODUCER"
    assert out["traceparent"].decode().split("-")[2] == f"{producer.context.span_id:016x}"
    assert f"{producer.parent.span_id:016x}" == PARENT.split("-")[2]


def test_new_traceparents_are_valid_unique_and_keep_a_valid_parents_trace() -> None:
    import re

    from conveyor_common.context import new_traceparent

    shape = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-01$")
    made = [new_traceparent() for _ in range(2000)]
    assert all(shape.match(tp) for tp in made)
    assert len({tp.split("-")[1] for tp in made}) == 2000  # a new trace each
    assert len({tp.split("-")[2] for tp in made}) == 2000
    child = new_traceparent(PARENT)
    assert child.split("-")[1] == PARENT.split("-")[1]  # same trace, new span
    assert child.split("-")[2] != PARENT.split("-")[2]
    assert shape.match(new_traceparent("garbage"))  # an invalid parent starts a new trace
