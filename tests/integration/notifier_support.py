"""Shared pieces of the notifier tests (no tests here): the scheduler's webhook side on a real
database and gRPC server, loopback HTTP receivers, task-event builders and Kafka publishing.

Imported by ``test_notifier_*.py`` as a sibling module.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import grpc
from aiohttp import web
from google.protobuf import timestamp_pb2
from prometheus_client import CollectorRegistry
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from conveyor.events.v1 import events_pb2
from conveyor.scheduler.v1 import delivery_coordination_service_pb2_grpc as delivery_grpc
from conveyor.scheduler.v1 import scheduler_service_pb2 as spb
from conveyor.scheduler.v1 import scheduler_service_pb2_grpc as spb_grpc
from conveyor.tasks.v1 import task_pb2, webhook_service_pb2
from conveyor_common.grpc_server import GrpcService, ServiceBinding, create_server
from conveyor_common.kafka import EventProducer, ProducerConfig, encode
from conveyor_common.metrics import RpcMetrics
from conveyor_common.ssrf import Resolver, system_resolver
from conveyor_common.standard_webhooks import WebhookVerificationError, WebhookVerifier
from conveyor_devstack.topics import ensure_topics
from conveyor_scheduler.client_webhooks import binding
from conveyor_scheduler.client_webhooks.rpcs import WebhookRpcs
from conveyor_scheduler.client_webhooks.settings import WebhookPolicy, WebhookSettings
from conveyor_scheduler.store.db import create_engine, migrate

TERMINAL: dict[int, int] = {
    task_pb2.TASK_EVENT_TYPE_SUCCEEDED: task_pb2.TASK_STATUS_SUCCEEDED,
    task_pb2.TASK_EVENT_TYPE_FAILED: task_pb2.TASK_STATUS_FAILED,
    task_pb2.TASK_EVENT_TYPE_CANCELED: task_pb2.TASK_STATUS_CANCELED,
    task_pb2.TASK_EVENT_TYPE_DEAD_LETTERED: task_pb2.TASK_STATUS_DEAD_LETTERED,
    task_pb2.TASK_EVENT_TYPE_EXPIRED: task_pb2.TASK_STATUS_EXPIRED,
}
LIFECYCLE = [
    task_pb2.TASK_EVENT_TYPE_SUBMITTED,
    task_pb2.TASK_EVENT_TYPE_DISPATCHED,
    task_pb2.TASK_EVENT_TYPE_STARTED,
    task_pb2.TASK_EVENT_TYPE_PROGRESS,
    task_pb2.TASK_EVENT_TYPE_PROGRESS,
    task_pb2.TASK_EVENT_TYPE_SUCCEEDED,
]


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a subprocess that must be told its port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def eventually(
    check: Callable[[], bool], within: float = 20.0, interval: float = 0.05, what: str = ""
) -> None:
    """Wait until ``check()`` is true or fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(interval)


async def eventually_async(
    check: Callable[[], Awaitable[bool]],
    within: float = 20.0,
    interval: float = 0.05,
    what: str = "",
) -> None:
    """``eventually`` for an async check."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(interval)


# --------------------------------------------------------------------------------------------
# Task events


def make_event(
    tenant_id: str,
    task_id: str,
    sequence: int,
    event_type: int,
    *,
    webhook: task_pb2.TaskWebhook | None = None,
    padding: int = 0,
) -> task_pb2.TaskEvent:
    """A task event with a plausible task snapshot."""
    now = timestamp_pb2.Timestamp()
    now.GetCurrentTime()
    status = TERMINAL.get(event_type, task_pb2.TASK_STATUS_QUEUED)
    if event_type in (task_pb2.TASK_EVENT_TYPE_STARTED, task_pb2.TASK_EVENT_TYPE_PROGRESS):
        status = task_pb2.TASK_STATUS_RUNNING
    task = task_pb2.Task(
        task_id=task_id,
        tenant_id=tenant_id,
        status=cast(Any, status),
        progress=min(sequence * 10, 99) if status != task_pb2.TASK_STATUS_SUCCEEDED else 100,
        attempt=1,
        last_sequence=sequence,
        spec=task_pb2.TaskSpec(kind=task_pb2.TASK_KIND_IMAGE, model="owner/model"),
    )
    if webhook is not None:
        task.spec.webhook.CopyFrom(webhook)
    if padding:
        task.spec.labels["padding"] = "x" * padding
    task.created_at.CopyFrom(now)
    return task_pb2.TaskEvent(
        event_id=str(uuid.uuid4()),
        task_id=task_id,
        tenant_id=tenant_id,
        sequence=sequence,
        type=event_type,  # type: ignore[arg-type]
        occurred_at=now,
        task=task,
    )


def lifecycle(
    tenant_id: str, task_id: str, *, webhook: task_pb2.TaskWebhook | None = None
) -> list[task_pb2.TaskEvent]:
    """A task's whole life: submitted ... succeeded."""
    return [
        make_event(tenant_id, task_id, i + 1, t, webhook=webhook) for i, t in enumerate(LIFECYCLE)
    ]


async def start_producer(bootstrap: str) -> EventProducer:
    """A started producer (stop it when done)."""
    producer = EventProducer(
        ProducerConfig(bootstrap, client_id=f"test-{uuid.uuid4().hex[:6]}"), source="/tests"
    )
    await producer.start()
    return producer


async def publish(producer: EventProducer, topic: str, events: list[task_pb2.TaskEvent]) -> None:
    """Publish TaskStateChanged records keyed by task id, in order (pipelined)."""
    items: list[tuple[str, bytes | None, bytes, list[tuple[str, bytes]]]] = []
    for event in events:
        key, value, headers = encode(
            events_pb2.TaskStateChanged(event=event),
            source="/tests",
            key=event.task_id,
            event_id=event.event_id,
        )
        items.append((topic, key, value, headers))
    await producer.send_many(items)


async def make_topics(bootstrap: str, stem: str) -> dict[str, str]:
    """Fresh events / dead-letter / results topics for one test module."""
    suffix = uuid.uuid4().hex[:8]
    names = {
        "events": f"test.{stem}.events.{suffix}",
        "dead_letter": f"test.{stem}.dead-letter.{suffix}",
        "results": f"test.{stem}.results.{suffix}",
    }
    await ensure_topics(
        bootstrap, {names["events"]: 6, names["dead_letter"]: 1, names["results"]: 3}
    )
    return names


# --------------------------------------------------------------------------------------------
# The scheduler's webhook side


class WebhookScheduler(WebhookRpcs, spb_grpc.SchedulerServiceServicer):
    """The scheduler servicer as the scheduler composes it, webhook RPCs only."""

    def __init__(
        self, sessionmaker: async_sessionmaker[AsyncSession], policy: WebhookPolicy
    ) -> None:
        self.sessionmaker = sessionmaker
        self.webhook_policy = policy


@dataclass
class SchedulerSide:
    """A migrated database with the webhook servicers on a gRPC server."""

    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    server: GrpcService
    channel: grpc.aio.Channel
    address: str

    @property
    def scheduler(self) -> spb_grpc.SchedulerServiceAsyncStub:
        """SchedulerService client."""
        return spb_grpc.SchedulerServiceStub(self.channel)

    @property
    def coordination(self) -> delivery_grpc.DeliveryCoordinationServiceAsyncStub:
        """DeliveryCoordinationService client."""
        return delivery_grpc.DeliveryCoordinationServiceStub(self.channel)

    async def close(self) -> None:
        """Stop the server and dispose of the engine."""
        await self.channel.close()
        await self.server.stop(0)
        await self.engine.dispose()


async def start_scheduler_side(
    database_url: str,
    *,
    allow_hosts: list[str],
    resolver: Resolver = system_resolver,
    migrated: bool = False,
) -> SchedulerSide:
    """Migrate ``database_url`` to head and serve the webhook RPCs on 127.0.0.1."""
    if not migrated:
        await asyncio.to_thread(migrate, database_url)
    engine = create_engine(database_url, pool_size=5)
    sessionmaker = async_sessionmaker(engine, expire_on_commit=False)
    policy = WebhookPolicy(WebhookSettings(allow_hosts=allow_hosts), resolver)
    servicer = WebhookScheduler(sessionmaker, policy)  # type: ignore[abstract]
    server = create_server(
        [
            ServiceBinding(
                add=spb_grpc.add_SchedulerServiceServicer_to_server,
                servicer=servicer,
                full_name="conveyor.scheduler.v1.SchedulerService",
            ),
            binding(sessionmaker, policy),
        ],
        host="127.0.0.1",
        port=0,
        metrics=RpcMetrics(CollectorRegistry(), "scheduler"),
    )
    await server.start()
    address = f"127.0.0.1:{server.port}"
    return SchedulerSide(engine, sessionmaker, server, grpc.aio.insecure_channel(address), address)


def principal(tenant_id: str) -> spb.Principal:
    """A tenant principal."""
    return spb.Principal(tenant_id=tenant_id, role=spb.ROLE_TENANT, subject="test")


async def create_endpoint(
    side: SchedulerSide, tenant_id: str, url: str, events: Sequence[int] = ()
) -> webhook_service_pb2.CreateWebhookEndpointResponse:
    """Register an endpoint through the real RPC."""
    response = await side.scheduler.CreateWebhookEndpoint(
        spb.SchedulerServiceCreateWebhookEndpointRequest(
            principal=principal(tenant_id),
            request=webhook_service_pb2.CreateWebhookEndpointRequest(
                request_id=str(uuid.uuid4()),
                url=url,
                events=cast(Any, list(events)),
            ),
        )
    )
    return response.response


async def list_deliveries(
    side: SchedulerSide, tenant_id: str, task_id: str = ""
) -> list[webhook_service_pb2.WebhookDelivery]:
    """Every delivery of a tenant (one big page), newest first."""
    response = await side.scheduler.ListWebhookDeliveries(
        spb.SchedulerServiceListWebhookDeliveriesRequest(
            principal=principal(tenant_id),
            request=webhook_service_pb2.ListWebhookDeliveriesRequest(
                task_id=task_id, page_size=500
            ),
        )
    )
    return list(response.response.deliveries)


async def settled_deliveries(
    side: SchedulerSide, tenant_id: str, count: int, task_id: str = ""
) -> list[webhook_service_pb2.WebhookDelivery]:
    """The tenant's deliveries once ``count`` exist and none is pending (outcomes reported)."""
    found: list[webhook_service_pb2.WebhookDelivery] = []

    async def settled() -> bool:
        found[:] = await list_deliveries(side, tenant_id, task_id)
        pending = webhook_service_pb2.DELIVERY_STATE_PENDING
        return len(found) >= count and all(d.state != pending for d in found)

    await eventually_async(settled, what=f"{count} settled deliveries")
    return found


# --------------------------------------------------------------------------------------------
# Loopback HTTP receivers


@dataclass
class Received:
    """One request a receiver got."""

    webhook_id: str
    timestamp: str
    signature: str
    body: bytes
    verified: bool
    status: int

    @property
    def document(self) -> dict[str, Any]:
        """The JSON body."""
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


Responder = Callable[["Receiver", web.Request, bytes], Awaitable[web.StreamResponse]]


@dataclass
class Receiver:
    """An aiohttp server on 127.0.0.1 that records requests and verifies signatures."""

    secrets: list[str] = field(default_factory=list)
    responder: Responder | None = None
    received: list[Received] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    runner: web.AppRunner | None = None
    port: int = 0

    @property
    def url(self) -> str:
        """Base URL."""
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        verified = False
        if self.secrets:
            try:
                WebhookVerifier(self.secrets).verify(headers, body)
                verified = True
            except WebhookVerificationError:
                verified = False
        webhook_id = headers.get("webhook-id", "")
        self.counts[webhook_id] = self.counts.get(webhook_id, 0) + 1
        if self.responder is not None:
            response = await self.responder(self, request, body)
        else:
            response = web.Response(status=200 if verified or not self.secrets else 401)
        self.received.append(
            Received(
                webhook_id=webhook_id,
                timestamp=headers.get("webhook-timestamp", ""),
                signature=headers.get("webhook-signature", ""),
                body=body,
                verified=verified,
                status=response.status,
            )
        )
        return response

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        server: Any = site._server
        self.port = int(server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def delivered(self) -> list[Received]:
        """Requests answered 2xx."""
        return [r for r in self.received if 200 <= r.status < 300]


@contextlib.asynccontextmanager
async def receiver(
    secrets: list[str] | None = None, responder: Responder | None = None
) -> AsyncIterator[Receiver]:
    """A running :class:`Receiver`."""
    rec = await Receiver(secrets=list(secrets or []), responder=responder).start()
    try:
        yield rec
    finally:
        await rec.stop()


class Canary:
    """A raw TCP server on 127.0.0.1 that counts every connection (and answers nothing useful)."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(Exception):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=2)
            length = 0
            for line in head.decode("latin-1").split("\r\n"):
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            await asyncio.wait_for(reader.readexactly(length), timeout=2)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    async def start(self) -> Canary:
        self.server = await asyncio.start_server(self._on_connect, "127.0.0.1", 0)
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


# --------------------------------------------------------------------------------------------
# The notifier


def notifier_settings(
    bootstrap: str, scheduler_address: str, topics: dict[str, str], **overrides: Any
) -> Any:
    """NotifierSettings for an in-process notifier on loopback, with fast test timings."""
    from conveyor_notifier.settings import NotifierSettings

    suffix = uuid.uuid4().hex[:6]
    values: dict[str, Any] = {
        "kafka_bootstrap_servers": bootstrap,
        "scheduler_address": scheduler_address,
        "grpc_host": "127.0.0.1",
        "grpc_port": 0,
        "metrics_port": 0,
        "shutdown_grace_seconds": 1.0,
        "events_topic": topics["events"],
        "dead_letter_topic": topics["dead_letter"],
        "provider_results_topic": topics["results"],
        "webhook_group": f"test-webhooks-{suffix}",
        "dead_letter_group": f"test-dead-letter-{suffix}",
        "throttle_group": f"test-throttle-{suffix}",
        "webhook_allow_hosts": ["127.0.0.1"],
        "delivery_poll_seconds": 0.05,
        "retry_base_seconds": 0.05,
        "retry_max_seconds": 0.2,
        "webhook_timeout_seconds": 5.0,
        "backlog_poll_seconds": 0.5,
        # These tests publish task events themselves (no scheduler writes them with their
        # deliveries): the notifier creates the deliveries, as during an upgrade (ADR 0007).
        "enqueue_deliveries": True,
    }
    values.update(overrides)
    return NotifierSettings(**values)
