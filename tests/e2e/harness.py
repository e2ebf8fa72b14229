"""Helpers of the end-to-end tests: the session system's settings, clients, the fake's ledger, watches."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable
from typing import Any

import httpx

from conveyor.tasks.v1 import task_pb2
from conveyor_client import TERMINAL_EVENTS, AsyncConveyorClient
from conveyor_devstack.system import ConveyorSystem, SystemConfig
from fake_replicate.testing import FakeAdmin

SUBMIT_UNKNOWN_GRACE_S = 20.0
"""The adapter's wait before it fails an attempt whose create outcome is unknown and whose prediction
it cannot find (``ADAPTER_SUBMIT_UNKNOWN_GRACE_S``; 180 s by default)."""

GLOBAL_LIMIT = 5
"""Global slots of the session system (slot-cost weighted)."""
LIMITED_MODEL = "e2e/limited-model"
MODEL_LIMIT = 2
KIND_COST = {"video": 2, "image": 1, "text": 1, "audio": 1}
AGING_PER_MINUTE = 12.0
"""0.2 class steps per second: a low task that waited more than 5 s outranks a new normal one."""


def session_config(**overrides: Any) -> SystemConfig:
    """The settings every e2e test shares (one system per session keeps the run short)."""
    config = SystemConfig(
        schedulers=2,
        adapters=2,
        notifiers=1,
        gateways=1,
        # Every e2e test runs over internal mutual TLS (test_e2e_flow checks the refusals).
        internal_tls=True,
        scheduler_env={
            "SCHEDULER_GLOBAL_CONCURRENCY": str(GLOBAL_LIMIT),
            "SCHEDULER_MODEL_LIMITS": f'{{"{LIMITED_MODEL}": {MODEL_LIMIT}}}',
            "SCHEDULER_AGING_RATE_PER_MINUTE": str(AGING_PER_MINUTE),
            "SCHEDULER_RETRY_BASE_SECONDS": "0.2",
            "SCHEDULER_RETRY_MAX_SECONDS": "1",
            "SCHEDULER_PROVIDER_RATE_PER_SECOND": "200",
            "SCHEDULER_PROVIDER_BURST": "50",
            "SCHEDULER_TENANT_SUBMIT_RATE": "500",
            "SCHEDULER_TENANT_SUBMIT_BURST": "1000",
            "SCHEDULER_LEADER_RETRY_SECONDS": "0.5",
            "SCHEDULER_SUBMIT_LEASE_SECONDS": "10",
        },
        adapter_env={
            # A create that never reached the provider is failed (retryably) after 20 s, not 3 min.
            "ADAPTER_SUBMIT_UNKNOWN_GRACE_S": str(SUBMIT_UNKNOWN_GRACE_S),
            "ADAPTER_THROTTLE_MAX_WAIT_S": "10",
        },
        gateway_env={"GATEWAY_WATCH_POLL_INTERVAL_SECONDS": "1.0"},
        fake={
            "seed": 7,
            "min_duration_s": 0.2,
            "max_duration_s": 0.6,
            "webhook_retry_base_s": 0.2,
            "webhook_retries": 5,
            "webhook_throttle_s": 0.1,
        },
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def unique(prefix: str) -> str:
    """A tenant id (or anything) no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class E2E:
    """The running system plus clients for tests."""

    def __init__(self, system: ConveyorSystem) -> None:
        self.system = system
        self.fake = FakeAdmin(system.fake_url)
        self._http = httpx.AsyncClient(timeout=10.0, trust_env=False)
        self._clients: list[AsyncConveyorClient] = []
        self.admin = self.client("ops", role="admin")

    @property
    def address(self) -> str:
        """The gateway."""
        return self.system.gateway_address

    def client(
        self, tenant: str, *, tier: str = "free", role: str = "tenant", **kwargs: Any
    ) -> AsyncConveyorClient:
        """An SDK client with a token for ``tenant`` (closed at session end)."""
        client = AsyncConveyorClient(
            self.address, self.system.mint_token(tenant, tier=tier, role=role), **kwargs
        )
        self._clients.append(client)
        return client

    async def tenant(
        self, prefix: str, *, tier: str = "free", max_concurrency: int = 0, **kwargs: Any
    ) -> tuple[str, AsyncConveyorClient]:
        """A new tenant (created through the admin API with its tier and limit) and its client."""
        tenant_id = unique(prefix)
        limits = task_pb2.TenantLimits(max_concurrency=max_concurrency)
        await self.admin.upsert_tenant(tenant_id, tier=tier, limits=limits)
        return tenant_id, self.client(tenant_id, tier=tier, **kwargs)

    async def ledger_seq(self) -> int:
        """The fake's next ledger sequence number (events from here on are new)."""
        resp = await self._http.get(f"{self.system.fake_url}/_fake/ledger", params={"kind": "none"})
        resp.raise_for_status()
        return int(resp.json()["next_seq"])

    async def ledger(self, since_seq: int = 0, **filters: Any) -> list[dict[str, Any]]:
        """Ledger events recorded after ``since_seq`` (a value of ``ledger_seq()``)."""
        params = {"since_seq": since_seq, **filters}
        resp = await self._http.get(f"{self.system.fake_url}/_fake/ledger", params=params)
        resp.raise_for_status()
        events: list[dict[str, Any]] = resp.json()["events"]
        return events

    async def close(self) -> None:
        """Close every client."""
        for client in self._clients:
            await client.close()
        await self.fake.aclose()
        await self._http.aclose()


def creates(events: Iterable[dict[str, Any]], tasks: Iterable[str] | None = None) -> list[str]:
    """Task ids of the ledger's executed creates, in order (optionally only ``tasks``)."""
    wanted = set(tasks) if tasks is not None else None
    return [
        str(e["task"])
        for e in events
        if e["kind"] == "create" and (wanted is None or str(e["task"]) in wanted)
    ]


async def follow(
    client: AsyncConveyorClient, task_id: str, *, after: int = 0, within: float = 60.0
) -> list[task_pb2.TaskEvent]:
    """The task's events after sequence ``after`` until a terminal one (the SDK's resuming watch)."""
    async with asyncio.timeout(within):
        return [event async for event in client.watch(task_id, after_sequence=after)]


async def wait_for_event(
    client: AsyncConveyorClient,
    task_id: str,
    types: Iterable[task_pb2.TaskEventType.ValueType],
    *,
    within: float = 30.0,
) -> task_pb2.TaskEvent:
    """The first event of one of ``types`` (history included), then the watch is closed."""
    wanted = set(types)
    stream = client.watch(task_id)
    try:
        async with asyncio.timeout(within):
            async for event in stream:
                if event.type in wanted:
                    return event
    finally:
        await aclose(stream)
    raise AssertionError(f"task {task_id} ended without any of {sorted(wanted)}")


async def wait_terminal(
    client: AsyncConveyorClient, task_ids: Iterable[str], *, within: float = 60.0
) -> dict[str, task_pb2.Task]:
    """Wait until every task is terminal; returns their final states."""
    ids = list(task_ids)
    results = await asyncio.gather(
        *(wait_for_event(client, t, TERMINAL_EVENTS, within=within) for t in ids)
    )
    return {t: e.task for t, e in zip(ids, results, strict=True)}


async def aclose(stream: object) -> None:
    """Close an async generator now (not whenever the garbage collector gets to it)."""
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()


def types_of(events: Iterable[task_pb2.TaskEvent]) -> list[str]:
    """Event type names without the prefix, lower case."""
    return [
        task_pb2.TaskEventType.Name(e.type).removeprefix("TASK_EVENT_TYPE_").lower() for e in events
    ]
