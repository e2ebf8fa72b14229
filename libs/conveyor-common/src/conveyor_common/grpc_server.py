"""grpc.aio server bootstrap: health checking, reflection, interceptors, ordered graceful shutdown.

``create_server`` builds the server and binds it (port 0 = any free port, so tests bind ``127.0.0.1:0``)
without starting it; ``GrpcService.start``/``stop`` serve and drain. The interceptor binds request ids
into the logging context, records metrics by method and status code, and maps exceptions to statuses:
an :class:`~conveyor_common.errors.RpcError` becomes its rich status, a recognised infrastructure
failure (database, broker, downstream service: :mod:`conveyor_common.faults`) UNAVAILABLE with
RetryInfo, anything else INTERNAL with a generic message (never UNKNOWN, never a stack trace to the
caller).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.trace import SpanKind

from conveyor_common import tracing
from conveyor_common.context import bound, new_traceparent
from conveyor_common.errors import RpcError
from conveyor_common.faults import classify
from conveyor_common.metrics import RpcMetrics

logger = logging.getLogger(__name__)

AddServicer = Callable[[Any, grpc.aio.Server], None]


@dataclass(frozen=True)
class ServiceBinding:
    """A servicer to mount: the generated ``add_XServicer_to_server`` function and full name."""

    add: AddServicer
    servicer: object
    full_name: str


def _metadata(details: grpc.HandlerCallDetails) -> dict[str, str]:
    pairs: Any = getattr(details, "invocation_metadata", None) or ()
    return {key: value for key, value in pairs if isinstance(value, str)}


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: RpcError) -> None:
    status = error.to_status()
    await context.abort(status.code, status.details, status.trailing_metadata)


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """Context binding, metrics, access logs and error mapping for every RPC."""

    def __init__(self, metrics: RpcMetrics) -> None:
        self.metrics = metrics
        self._children: dict[str, tuple[Any, Any, dict[grpc.StatusCode, Any]]] = {}

    def _method_metrics(self, method: str) -> tuple[Any, Any, dict[grpc.StatusCode, Any]]:
        """The method's in-flight gauge and latency histogram children (looked up once), and its
        handled counters by code (filled on first use)."""
        children = self._children.get(method)
        if children is None:
            m, svc = self.metrics, self.metrics.service
            children = (m.in_flight.labels(svc, method), m.latency.labels(svc, method), {})
            self._children[method] = children
        return children

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler: Any = await continuation(handler_call_details)
        if handler is None:
            return None
        method: str = getattr(handler_call_details, "method", "")
        meta = _metadata(handler_call_details)
        request_id = meta.get("x-request-id") or uuid.uuid4().hex
        # The caller's trace id with a new span id (the span's own, when traces are exported).
        traceparent = new_traceparent(meta.get("traceparent"))
        rpc_attributes = {"rpc.system": "grpc", "rpc.method": method}
        metrics = self.metrics
        svc = metrics.service
        in_flight, latency, handled = self._method_metrics(method)

        def finish(start: float, code: grpc.StatusCode, current: Any = None) -> None:
            in_flight.dec()
            trace = tracing.trace_id()
            if trace is not None:  # an exemplar: Grafana links the latency to the trace
                latency.observe(time.perf_counter() - start, exemplar={"trace_id": trace})
            else:
                latency.observe(time.perf_counter() - start)
            if code != grpc.StatusCode.OK:
                tracing.set_error(current, code.name)
            counter = handled.get(code)
            if counter is None:
                counter = handled[code] = metrics.handled.labels(svc, method, code.name)
            counter.inc()

        def code_of(context: grpc.aio.ServicerContext[Any, Any]) -> grpc.StatusCode:
            code: Any = context.code()
            if isinstance(code, grpc.StatusCode):
                return code
            return grpc.StatusCode.OK

        if handler.unary_unary is not None:
            inner_uu: Any = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                start = time.perf_counter()
                in_flight.inc()
                code = grpc.StatusCode.OK
                with (
                    bound(request_id=request_id, traceparent=traceparent),
                    tracing.span(
                        method,
                        SpanKind.SERVER,
                        parent=meta.get("traceparent", ""),
                        attributes=rpc_attributes,
                    ) as current,
                ):
                    try:
                        response = await inner_uu(request, context)
                        code = code_of(context)
                        return response
                    except RpcError as exc:
                        code = exc.code
                        _log_error(method, exc)
                        await _abort(context, exc)
                    except (grpc.aio.AbortError, grpc.aio.UsageError):
                        code = code_of(context)
                        raise
                    except Exception as exc:
                        answer = _unexpected(method, exc)
                        code = answer.code
                        await _abort(context, answer)
                    finally:
                        finish(start, code, current)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )

        if handler.unary_stream is not None:
            inner_us: Any = handler.unary_stream

            async def unary_stream(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                start = time.perf_counter()
                in_flight.inc()
                code = grpc.StatusCode.OK
                with (
                    bound(request_id=request_id, traceparent=traceparent),
                    tracing.span(
                        method,
                        SpanKind.SERVER,
                        parent=meta.get("traceparent", ""),
                        attributes=rpc_attributes,
                    ) as current,
                ):
                    try:
                        async for item in inner_us(request, context):
                            yield item
                        code = code_of(context)
                    except RpcError as exc:
                        code = exc.code
                        _log_error(method, exc)
                        await _abort(context, exc)
                    except (grpc.aio.AbortError, grpc.aio.UsageError):
                        code = code_of(context)
                        raise
                    except Exception as exc:
                        answer = _unexpected(method, exc)
                        code = answer.code
                        await _abort(context, answer)
                    finally:
                        finish(start, code, current)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


def _unexpected(method: str, exc: Exception) -> RpcError:
    """The answer to an exception that is not an RpcError: a recognised infrastructure failure
    maps to its status (UNAVAILABLE with RetryInfo, or INVALID_ARGUMENT for an unstorable value)
    and is logged in one line; anything else is a bug: INTERNAL, logged with its stack trace."""
    mapped = classify(exc)
    if mapped is None:
        logger.exception(
            "unhandled error", extra={"action": "rpc_internal_error", "grpc_method": method}
        )
        return RpcError("internal error")
    first_line = str(exc).splitlines()[0][:300] if str(exc) else ""
    logger.warning(
        "%s (%s: %s)",
        mapped.message,
        type(exc).__name__,
        first_line,
        extra={
            "action": "rpc_infrastructure_error",
            "grpc_method": method,
            "grpc_code": mapped.code.name,
        },
    )
    return mapped


def _log_error(method: str, exc: RpcError) -> None:
    level = logging.ERROR if exc.code == grpc.StatusCode.INTERNAL else logging.INFO
    logger.log(
        level,
        exc.message,
        extra={"action": "rpc_error", "grpc_method": method, "grpc_code": exc.code.name},
    )


@dataclass
class GrpcService:
    """A bound (not yet started) gRPC server with its health servicer."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    service_names: list[str] = field(default_factory=list)

    async def start(self) -> None:
        """Start serving and report SERVING for the server and each service."""
        await self.server.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        for name in self.service_names:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        logger.info("grpc server started", extra={"action": "grpc_started", "port": self.port})

    async def set_serving(self, serving: bool) -> None:
        """Flip readiness (e.g. when a dependency goes away)."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.health.set("", status)

    async def enter_graceful_shutdown(self) -> None:
        """Health NOT_SERVING for everything, permanently (first shutdown step)."""
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace: float) -> None:
        """Stop accepting RPCs and let in-flight ones finish within ``grace`` seconds."""
        await self.server.stop(grace)


def create_server(
    bindings: Sequence[ServiceBinding],
    *,
    host: str,
    port: int,
    metrics: RpcMetrics,
    max_receive_message_length: int = 4 * 1024 * 1024,
    max_concurrent_rpcs: int | None = None,
    extra_interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    credentials: grpc.ServerCredentials | None = None,
) -> GrpcService:
    """Build a grpc.aio server with health, reflection and interceptors, bound to host:port."""
    server = grpc.aio.server(
        interceptors=[ServerInterceptor(metrics), *extra_interceptors],
        options=[
            ("grpc.max_receive_message_length", max_receive_message_length),
            ("grpc.max_send_message_length", 16 * 1024 * 1024),
            ("grpc.max_connection_age_ms", 300_000),
            ("grpc.max_connection_age_grace_ms", 30_000),
            ("grpc.keepalive_time_ms", 30_000),
            # Our clients ping every 2 s to notice a frozen peer (conveyor_common.channels).
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 1_000),
            ("grpc.http2.max_ping_strikes", 0),
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=max_concurrent_rpcs,
    )
    for binding in bindings:
        binding.add(binding.servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [b.full_name for b in bindings]
    reflection.enable_server_reflection(
        (*names, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"{host}:{port}"
    bound_port = (
        server.add_secure_port(address, credentials)
        if credentials is not None
        else server.add_insecure_port(address)
    )
    return GrpcService(server=server, port=bound_port, health=health_servicer, service_names=names)
