"""A real scheduler replica on real PostgreSQL behind a real gateway (integration tests of the gateway,
the SDK and the CLI)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from conveyor_testkit.tokens import AUDIENCE, ISSUER, Keys


@dataclass
class Stack:
    """A real scheduler (in-process, on a real PostgreSQL database) plus a gateway in front of it."""

    scheduler: Any
    gateway: Any
    keys: Keys
    database_url: str
    registry: CollectorRegistry
    on_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    @property
    def address(self) -> str:
        """The gateway's host:port."""
        return f"127.0.0.1:{self.gateway.port}"

    async def count_tasks(self) -> int:
        """Rows in the scheduler's ``tasks`` table (checks that rejected requests wrote nothing)."""
        import psycopg

        async with await psycopg.AsyncConnection.connect(self.database_url) as conn:
            cur = await conn.execute("SELECT count(*) FROM tasks")
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def stop(self) -> None:
        """Stop the gateway, then what ``on_stop`` lists (e.g. a notifier), then the scheduler."""
        await self.gateway.stop(0.5)
        for step in self.on_stop:
            await step()
        await self.scheduler.stop()


async def start_stack(
    database_url: str,
    *,
    gateway: dict[str, Any] | None = None,
    scheduler: dict[str, Any] | None = None,
    notifier_address: str | None = None,
    watch_config: Any = None,
    kafka: bool = False,
    before_gateway: Callable[[int], Awaitable[str | None]] | None = None,
) -> Stack:
    """Migrate ``database_url``, start the real scheduler and a gateway on 127.0.0.1:0.

    ``kafka`` runs the scheduler's outbox relay and results consumer (set
    ``scheduler={"kafka_bootstrap_servers": ...}``). ``before_gateway`` receives the scheduler's port
    once it serves (e.g. to start a notifier) and may return the notifier address for the gateway.
    """
    from conveyor_gateway.app import build_gateway
    from conveyor_gateway.settings import GatewaySettings
    from conveyor_scheduler.app import SchedulerApp
    from conveyor_scheduler.settings import SchedulerSettings
    from conveyor_scheduler.store.db import migrate

    await asyncio.to_thread(migrate, database_url)
    sched_values: dict[str, Any] = {
        "database_url": database_url,
        "grpc_host": "127.0.0.1",
        "grpc_port": 0,
        "metrics_port": 0,
        "tenant_submit_rate": 10_000.0,
        "tenant_submit_burst": 10_000,
        "queue_capacity": 1_000_000,
        "tenant_max_waiting": 1_000_000,
    }
    sched_values.update(scheduler or {})
    app = SchedulerApp(SchedulerSettings(**sched_values), kafka=kafka)
    await app.start()
    server = app.server
    if server is None:
        raise RuntimeError("the scheduler app has no gRPC server")
    if before_gateway is not None:
        notifier_address = await before_gateway(server.port) or notifier_address
    keys = Keys.generate()
    registry = CollectorRegistry()
    gw_values: dict[str, Any] = {
        "grpc_host": "127.0.0.1",
        "grpc_port": 0,
        "metrics_port": 0,
        "scheduler_address": f"127.0.0.1:{server.port}",
        "notifier_address": notifier_address,
        "jwt_hs256_secret": keys.hs_secret.decode(),
        "jwt_rs256_public_key": keys.rsa_public_pem.decode(),
        "jwt_issuer": ISSUER,
        "jwt_audience": AUDIENCE,
        "watch_poll_interval_seconds": 0.1,
    }
    gw_values.update(gateway or {})
    gw = build_gateway(GatewaySettings(**gw_values), registry, watch_config=watch_config)
    await gw.start()
    return Stack(app, gw, keys, database_url, registry)
