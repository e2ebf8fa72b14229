"""OpenTelemetry traces: spans for RPCs, Kafka records, Replicate calls and database transactions.

Off by default. A service exports spans over OTLP when the standard variables ask for it:
``OTEL_TRACES_EXPORTER=otlp`` or an ``OTEL_EXPORTER_OTLP_ENDPOINT`` /
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (``OTEL_SDK_DISABLED=true`` wins). Everything else the SDK
reads itself: the protocol (``OTEL_EXPORTER_OTLP_PROTOCOL``: ``grpc``, or ``http/protobuf``),
headers, certificates, ``OTEL_SERVICE_NAME`` (default ``conveyor-<service>``),
``OTEL_RESOURCE_ATTRIBUTES``, the sampler (``OTEL_TRACES_SAMPLER``) and the batch processor
(``OTEL_BSP_*``).

Context travels the way it always did: the W3C ``traceparent`` in gRPC metadata, in Kafka record
headers and in outbox rows, bound in :mod:`conveyor_common.context` while a request or record is
handled. :func:`span` starts a span whose parent is that ``traceparent`` and binds the new span's
``traceparent`` for the block, so everything written meanwhile (logs, records, outbox rows, calls)
names the span; a task's spans in every service share the trace id it got at submit.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import grpc
import httpx
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from conveyor_common.context import bound, current_traceparent, traceparent_var

logger = logging.getLogger(__name__)

__all__ = [
    "SpanKind",
    "TraceparentClientInterceptor",
    "TracingTransport",
    "configure_tracing",
    "enabled",
    "set_error",
    "shutdown_tracing",
    "span",
    "trace_id",
]

_PROPAGATOR = TraceContextTextMapPropagator()
_TRACER_NAME = "conveyor"
MAX_LINKS = 64
"""Most links of one span (a group commit of hundreds of submits links the first ones)."""
_provider: Any = None


def enabled() -> bool:
    """Whether this process exports spans."""
    return _provider is not None


def _wanted() -> bool:
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    if exporter not in ("", "otlp"):
        logger.warning(
            "OTEL_TRACES_EXPORTER=%s is not supported (otlp or none): traces stay off",
            exporter,
            extra={"action": "tracing_unsupported_exporter"},
        )
        return False
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    return exporter == "otlp" or bool(endpoint)


def configure_tracing(service: str, *, exporter: Any = None) -> bool:
    """Install the OTLP exporting tracer provider when the environment asks for it (idempotent);
    ``exporter`` (a SpanExporter, for tests) installs one that exports there, whatever the
    environment says. Returns whether spans are exported.
    """
    global _provider
    if _provider is not None:
        return True
    if exporter is None and not _wanted():
        return False
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    ).strip()
    if exporter is not None:
        protocol = "given"
    elif protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    elif protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpSpanExporter,
        )

        exporter = HttpSpanExporter()
    else:
        logger.warning(
            "OTEL_EXPORTER_OTLP_PROTOCOL=%s is not supported (grpc or http/protobuf)",
            protocol,
            extra={"action": "tracing_unsupported_protocol"},
        )
        return False
    name = os.environ.get("OTEL_SERVICE_NAME") or f"conveyor-{service}"
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: name}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _provider = provider
    logger.info(
        "exporting traces over OTLP (%s)", protocol, extra={"action": "tracing_on", "otel": name}
    )
    return True


async def shutdown_tracing() -> None:
    """Flush and stop the exporter (a shutdown step)."""
    global _provider
    provider, _provider = _provider, None
    if provider is not None:
        provider.shutdown()


def _link(traceparent: str) -> trace.Link:
    ctx = trace.get_current_span(_PROPAGATOR.extract({"traceparent": traceparent}))
    return trace.Link(ctx.get_span_context())


def _traceparent(ctx: trace.SpanContext) -> str:
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


@contextmanager
def span(
    name: str,
    kind: SpanKind = SpanKind.INTERNAL,
    *,
    parent: str | None = None,
    attributes: Mapping[str, str | int | float | bool] | None = None,
    links: Sequence[str] = (),
) -> Iterator[Any]:
    """A span named ``name``, child of ``parent`` (a traceparent; "" for a new trace) or, when
    None, of the bound traceparent, with the new span's traceparent bound for the block. Yields the
    span (None when tracing is off: nothing is done then). An exception marks the span as an error
    and propagates. ``links`` (traceparents) relate a span that serves several traces (a group
    commit of many submits) to each of them."""
    if _provider is None:
        yield None
        return
    source = traceparent_var.get() if parent is None else parent
    ctx = _PROPAGATOR.extract({"traceparent": source}) if source else Context()
    tracer = _provider.get_tracer(_TRACER_NAME)
    with (
        tracer.start_as_current_span(
            name,
            context=ctx,
            kind=kind,
            attributes=dict(attributes or {}),
            links=[_link(tp) for tp in links[:MAX_LINKS] if tp],
            record_exception=True,
            set_status_on_exception=True,
        ) as current,
        bound(traceparent=_traceparent(current.get_span_context())),
    ):
        yield current


def set_error(current: Any, description: str) -> None:
    """Mark a span (from :func:`span`; None allowed) as failed without an exception."""
    if current is not None:
        current.set_status(Status(StatusCode.ERROR, description))


def trace_id() -> str | None:
    """The trace id (32 hex digits) of the bound traceparent, for exemplars; None when off."""
    if _provider is None:
        return None
    tp = traceparent_var.get()
    if not tp:
        return None
    parts = tp.split("-")
    return parts[1] if len(parts) == 4 else None


def _with_traceparent(details: Any, traceparent: str) -> Any:
    metadata = grpc.aio.Metadata(
        *[(k, v) for k, v in (details.metadata or ()) if k != "traceparent"],
        ("traceparent", traceparent),
    )
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class TraceparentClientInterceptor(
    grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor
):
    """Sends the bound trace context with every call to another Conveyor service (a CLIENT span
    around unary calls when traces are exported), so the callee's spans and logs join the
    caller's trace."""

    async def intercept_unary_unary(
        self, continuation: Callable[[Any, Any], Any], client_call_details: Any, request: Any
    ) -> Any:
        method = client_call_details.method
        name = method.decode() if isinstance(method, bytes) else str(method)
        with span(name, SpanKind.CLIENT, attributes={"rpc.system": "grpc"}):
            details = _with_traceparent(client_call_details, current_traceparent())
            call = await continuation(details, request)
            await call  # the span lasts until the answer (errors are raised to the caller)
            return call

    async def intercept_unary_stream(
        self, continuation: Callable[[Any, Any], Any], client_call_details: Any, request: Any
    ) -> Any:
        details = _with_traceparent(client_call_details, current_traceparent())
        return await continuation(details, request)


class TracingTransport(httpx.AsyncBaseTransport):
    """An httpx transport making a CLIENT span of every request (Replicate's API, client
    webhooks); the request is sent by ``inner``."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        attributes = {
            "http.request.method": request.method,
            "server.address": request.url.host,
            "url.path": request.url.path,
        }
        with span(f"HTTP {request.method}", SpanKind.CLIENT, attributes=attributes) as current:
            response = await self.inner.handle_async_request(request)
            if current is not None:
                current.set_attribute("http.response.status_code", response.status_code)
                if response.status_code >= 500:
                    set_error(current, f"HTTP {response.status_code}")
            return response

    async def aclose(self) -> None:
        await self.inner.aclose()


def flush() -> None:
    """Export the spans batched so far (tests, shutdown hooks)."""
    if _provider is not None:
        _provider.force_flush()
