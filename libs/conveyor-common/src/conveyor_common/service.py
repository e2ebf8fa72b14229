"""The shape every ``python -m conveyor_<service>`` follows.

``main()`` of a service: ``settings = load_settings(Settings)``, ``configure_logging(...)``, then
``run_service(run(settings), settings)``. ``run`` builds its components by constructor injection, registers them
with a :class:`~conveyor_common.lifecycle.Lifecycle` and calls :func:`serve_until_stopped`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry

from conveyor_common import lifecycle as phases
from conveyor_common import tracing
from conveyor_common.grpc_server import GrpcService
from conveyor_common.lifecycle import Lifecycle
from conveyor_common.metrics import MetricsServer, start_metrics_server
from conveyor_common.settings import ServiceSettings

logger = logging.getLogger(__name__)

T = TypeVar("T")


def loop_factory(settings: ServiceSettings) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop a service runs on (``settings.event_loop``); ``None`` is asyncio's own."""
    if settings.event_loop == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None


def run_service(main: Coroutine[Any, Any, T], settings: ServiceSettings) -> T:
    """Run a service's ``main`` coroutine to completion on the configured event loop.

    uvloop runs the same asyncio code (gRPC aio, aiokafka, psycopg, aiohttp) with less CPU per
    callback and I/O event than the standard library's selector loop.
    """
    with asyncio.Runner(loop_factory=loop_factory(settings)) as runner:
        return runner.run(main)


def register_grpc(lifecycle: Lifecycle, grpc: GrpcService, settings: ServiceSettings) -> None:
    """Shutdown steps of a gRPC server: health off, drain for the probe period, stop with grace."""
    lifecycle.on_shutdown(
        "health_not_serving", grpc.enter_graceful_shutdown, phase=phases.HEALTH_OFF
    )

    async def drain() -> None:
        await asyncio.sleep(settings.readiness_drain_seconds)

    lifecycle.on_shutdown("readiness_drain", drain, phase=phases.READINESS_DRAIN, timeout=120)

    async def stop() -> None:
        await grpc.stop(settings.shutdown_grace_seconds)

    lifecycle.on_shutdown(
        "grpc_stop", stop, phase=phases.GRPC_STOP, timeout=settings.shutdown_grace_seconds + 5
    )


def start_metrics(
    lifecycle: Lifecycle, registry: CollectorRegistry, settings: ServiceSettings
) -> MetricsServer:
    """Serve /metrics on its own port and stop it last."""
    server = start_metrics_server(registry, settings.metrics_port, settings.metrics_host)

    async def stop() -> None:
        await asyncio.to_thread(server.stop)

    lifecycle.on_shutdown("metrics_stop", stop, phase=phases.METRICS)
    # Spans still batched are exported before the process ends (nothing when traces are off).
    lifecycle.on_shutdown("traces_flush", tracing.shutdown_tracing, phase=phases.STORAGE)
    logger.info("metrics server started", extra={"action": "metrics_started", "port": server.port})
    return server


GC_THRESHOLDS = (20_000, 20, 20)
"""Cyclic GC thresholds of a serving process (CPython's default is (700, 10, 10))."""


def settle_gc() -> None:
    """Once started: collect, freeze what survived, and collect young objects less often.

    A full collection scans every tracked object: on a started service (modules, SQLAlchemy and
    protobuf machinery, clients, caches) that took 25-90 ms on our 2-core machine, stalling every
    request in flight. The startup heap lives as long as the process, so :func:`gc.freeze` moves it
    out of the collector's scans; reference counting still frees ordinary garbage at once, and the
    higher gen-0 threshold makes the remaining (small) collections rarer.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def serve_until_stopped(lifecycle: Lifecycle) -> None:
    """Settle the GC, install signal handlers, wait for SIGTERM/SIGINT, then run the shutdown
    steps in order."""
    settle_gc()
    lifecycle.install_signal_handlers()
    try:
        await lifecycle.wait()
    finally:
        await lifecycle.shutdown()
