"""``python -m conveyor_gateway``: serve the public API until SIGTERM."""

# ruff: noqa: E402
from __future__ import annotations

from conveyor_common.redact import limit_grpc_core_logs

# Before anything imports grpc: its C core reads GRPC_VERBOSITY once, and its INFO/DEBUG trace
# lines print request headers (bearer tokens).
limit_grpc_core_logs()

import logging

from prometheus_client import CollectorRegistry

from conveyor_common import lifecycle as phases
from conveyor_common.lifecycle import Lifecycle
from conveyor_common.logging import configure_logging
from conveyor_common.service import (
    register_grpc,
    run_service,
    serve_until_stopped,
    start_metrics,
)
from conveyor_common.settings import load_settings
from conveyor_common.tracing import configure_tracing
from conveyor_gateway.app import build_gateway
from conveyor_gateway.settings import GatewaySettings

logger = logging.getLogger("conveyor_gateway")


async def run(settings: GatewaySettings) -> None:
    """Start the gateway and serve until a stop is requested."""
    registry = CollectorRegistry()
    lifecycle = Lifecycle()
    start_metrics(lifecycle, registry, settings)
    gateway = build_gateway(settings, registry)
    register_grpc(lifecycle, gateway.service, settings)
    lifecycle.on_shutdown("downstream_close", gateway.close_downstream, phase=phases.STORAGE)
    await gateway.start()
    logger.info(
        "gateway serving",
        extra={
            "action": "gateway_started",
            "port": gateway.port,
            "scheduler": settings.scheduler_address,
            "notifier": settings.notifier_address or "",
        },
    )
    await serve_until_stopped(lifecycle)


def main() -> None:
    """Entry point."""
    settings = load_settings(GatewaySettings)
    configure_logging("gateway", settings.log_level)
    configure_tracing("gateway")
    run_service(run(settings), settings)


if __name__ == "__main__":
    main()
