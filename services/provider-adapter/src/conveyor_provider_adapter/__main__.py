"""``python -m conveyor_provider_adapter``: the provider adapter service."""

# ruff: noqa: E402
from __future__ import annotations

from conveyor_common.redact import limit_grpc_core_logs

# Before anything imports grpc: its C core reads GRPC_VERBOSITY once, and its INFO/DEBUG trace
# lines print request headers (credentials).
limit_grpc_core_logs()


from prometheus_client import CollectorRegistry

from conveyor_common.lifecycle import Lifecycle
from conveyor_common.logging import configure_logging
from conveyor_common.service import run_service, serve_until_stopped, start_metrics
from conveyor_common.settings import load_settings
from conveyor_common.tracing import configure_tracing
from conveyor_provider_adapter.app import SERVICE, Adapter
from conveyor_provider_adapter.settings import AdapterSettings


async def run(settings: AdapterSettings) -> None:
    """Start the adapter and serve until SIGTERM/SIGINT, then shut down in order."""
    lifecycle = Lifecycle()
    registry = CollectorRegistry()
    start_metrics(lifecycle, registry, settings)
    adapter = Adapter(settings, registry=registry)
    await adapter.start(lifecycle)
    await serve_until_stopped(lifecycle)


def main() -> None:
    """Entry point."""
    settings = load_settings(AdapterSettings)
    configure_logging(SERVICE, settings.log_level)
    configure_tracing(SERVICE)
    run_service(run(settings), settings)


if __name__ == "__main__":
    main()
