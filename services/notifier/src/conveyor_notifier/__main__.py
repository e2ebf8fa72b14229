"""``python -m conveyor_notifier``: settings from ``NOTIFIER_*``, JSON logs, run until SIGTERM."""

# ruff: noqa: E402
from __future__ import annotations

from conveyor_common.redact import limit_grpc_core_logs

# Before anything imports grpc: its C core reads GRPC_VERBOSITY once, and its INFO/DEBUG trace
# lines print request headers (credentials).
limit_grpc_core_logs()

from conveyor_common.logging import configure_logging
from conveyor_common.settings import load_settings
from conveyor_common.tracing import configure_tracing
from conveyor_notifier.app import main_async
from conveyor_notifier.settings import NotifierSettings


def main() -> None:
    """Entry point."""
    settings = load_settings(NotifierSettings)
    configure_logging("notifier", settings.log_level)
    configure_tracing("notifier")
    main_async(settings)


if __name__ == "__main__":
    main()
