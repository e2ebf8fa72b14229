"""``python -m conveyor_scheduler [serve|migrate]``.

``serve`` (default) runs one replica and refuses to start unless the schema is at head; ``migrate``
runs ``alembic upgrade head`` (the Kubernetes migrate Job) and exits; ``rerank`` recomputes the
dispatch rank of waiting tasks after the aging rate or tier boosts changed.
"""

# ruff: noqa: E402
from __future__ import annotations

from conveyor_common.redact import limit_grpc_core_logs

# Before anything imports grpc: its C core reads GRPC_VERBOSITY once, and its INFO/DEBUG trace
# lines print request headers (credentials).
limit_grpc_core_logs()

import asyncio
import logging
import sys

from sqlalchemy import text

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
from conveyor_scheduler.app import SchedulerApp
from conveyor_scheduler.client_webhooks.settings import WebhookSettings
from conveyor_scheduler.dispatch.policy import Policy
from conveyor_scheduler.settings import SchedulerSettings
from conveyor_scheduler.store.db import SchemaNotAtHead, check_schema, create_engine, migrate

logger = logging.getLogger("conveyor_scheduler")


async def run(settings: SchedulerSettings) -> None:
    """Serve until SIGTERM/SIGINT."""
    engine = create_engine(settings.database_url.get_secret_value(), pool_size=1)
    try:
        await check_schema(engine)
    except SchemaNotAtHead as exc:
        logger.error(str(exc), extra={"action": "schema_not_at_head"})
        raise SystemExit(3) from None
    finally:
        await engine.dispose()
    app = SchedulerApp(settings)
    lifecycle = Lifecycle()
    start_metrics(lifecycle, app.registry, settings)
    await app.start(check=False)
    assert app.server is not None
    register_grpc(lifecycle, app.server, settings)
    app.register(lifecycle)
    await serve_until_stopped(lifecycle)


async def rerank(settings: SchedulerSettings) -> int:
    """Recompute ``rank`` of queued tasks with the settings in force; returns how many."""
    engine = create_engine(settings.database_url.get_secret_value(), pool_size=1)
    try:
        async with engine.begin() as conn:
            result = await conn.execute(
                text(
                    f"UPDATE tasks SET rank = {Policy.from_settings(settings).rank_sql()} WHERE status = 1"
                )
            )
            return int(result.rowcount)
    finally:
        await engine.dispose()


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    args = sys.argv[1:] if argv is None else argv
    command = args[0] if args else "serve"
    settings = load_settings(SchedulerSettings)
    load_settings(WebhookSettings)  # the sealing keys too: exit 2 naming a bad variable
    configure_logging("scheduler", settings.log_level)
    configure_tracing("scheduler")
    if command == "migrate":
        migrate(settings.database_url.get_secret_value())
        logger.info("schema migrated to head", extra={"action": "migrated"})
        return
    if command == "rerank":
        n = asyncio.run(rerank(settings))
        logger.info("waiting tasks reranked", extra={"action": "reranked", "tasks": n})
        return
    if command != "serve":
        sys.stderr.write("usage: python -m conveyor_scheduler [serve|migrate|rerank]\n")
        raise SystemExit(2)
    run_service(run(settings), settings)


if __name__ == "__main__":
    main()
