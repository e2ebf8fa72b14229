"""An OTLP/gRPC trace receiver inside the tests: the services export their spans to it."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Collects exported spans: ``spans[trace_id hex] -> [(service.name, span)]``."""

    def __init__(self) -> None:
        self.spans: dict[str, list[tuple[str, Any]]] = defaultdict(list)
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            service = next(
                (
                    a.value.string_value
                    for a in resource_spans.resource.attributes
                    if a.key == "service.name"
                ),
                "",
            )
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    self.spans[span.trace_id.hex()].append((service, span))
        return trace_service_pb2.ExportTraceServiceResponse()

    async def start(self) -> str:
        """Serve on a free loopback port; returns the endpoint URL for OTEL_EXPORTER_OTLP_ENDPOINT."""
        self.server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)  # type: ignore[no-untyped-call]
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)

    def trace_of(self, attribute: str, value: str) -> str | None:
        """The trace id of a span carrying ``attribute == value``."""
        for trace_id, spans in self.spans.items():
            for _, span in spans:
                for a in span.attributes:
                    if a.key == attribute and a.value.string_value == value:
                        return trace_id
        return None

    def services(self, trace_id: str) -> set[str]:
        """service.name of every span of a trace."""
        return {service for service, _ in self.spans.get(trace_id, [])}
