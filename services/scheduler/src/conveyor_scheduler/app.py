"""Wiring: one scheduler replica (gRPC server, results consumer, leader loops, relay, wake-ups).

``SchedulerApp`` is used by ``python -m conveyor_scheduler`` and by tests that run several in-process
replicas (each with its own engines and leader loops). Shutdown order (phases of
conveyor_common.lifecycle): health off -> stop gRPC -> stop the consumer -> stop the leader loops and
the relay -> flush the producer -> dispose the engines -> stop /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from conveyor.scheduler.v1 import provider_coordination_service_pb2_grpc as provider_grpc
from conveyor.scheduler.v1 import scheduler_service_pb2_grpc as pb_grpc
from conveyor_common import lifecycle as phases
from conveyor_common import limits, topics
from conveyor_common.grpc_server import GrpcService, ServiceBinding, create_server
from conveyor_common.kafka import (
    ConsumerConfig,
    EventConsumer,
    EventProducer,
    ProducerConfig,
    default_registry,
)
from conveyor_common.lifecycle import Lifecycle
from conveyor_common.metrics import KafkaMetrics, RpcMetrics
from conveyor_scheduler import client_webhooks
from conveyor_scheduler.api.provider import ProviderCoordinationServicer
from conveyor_scheduler.api.servicer import SchedulerServicer
from conveyor_scheduler.client_webhooks.decide import PRESENCE
from conveyor_scheduler.client_webhooks.secrets import reseal_secrets
from conveyor_scheduler.core import SchedulerCore
from conveyor_scheduler.dispatch.leadership import Leader
from conveyor_scheduler.dispatch.loops import LeaderLoops
from conveyor_scheduler.dispatch.stalls import StallWatch
from conveyor_scheduler.dispatch.wakeups import Wakeups, WorkAnnouncer, WorkListener
from conveyor_scheduler.groups.service import binding as groups_binding
from conveyor_scheduler.metrics import SchedulerMetrics
from conveyor_scheduler.results.consumer import results_batch_handler, results_handler
from conveyor_scheduler.settings import SchedulerSettings
from conveyor_scheduler.store.db import check_schema, create_engine
from conveyor_scheduler.store.relay import OutboxRelay

logger = logging.getLogger(__name__)


def instance_id(settings: SchedulerSettings) -> str:
    """This replica's id."""
    return settings.instance_id or f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class SchedulerApp:
    """One replica. ``kafka=False`` runs without relay and consumer (tests of the DB side)."""

    settings: SchedulerSettings
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    kafka: bool = True
    grpc: bool = True

    def __post_init__(self) -> None:
        s = self.settings
        url = s.database_url.get_secret_value()
        self.instance = instance_id(s)
        self.metrics = SchedulerMetrics(self.registry)
        self.engine = create_engine(
            url,
            pool_size=s.db_pool_size,
            ping_idle_seconds=s.db_ping_idle_seconds,
            idle_transaction_seconds=s.idle_transaction_seconds,
            pool_metrics=self.metrics.db_pool,
        )
        self._presence_task: asyncio.Task[None] | None = None
        self.wakeups = Wakeups()
        self.announcer = WorkAnnouncer(
            self.engine, s.notify_coalesce_seconds, s.notify_work_coalesce_seconds
        )
        self.wakeups.announcer = self.announcer
        self.listener = WorkListener(url, self.wakeups)
        self.core = SchedulerCore(self.engine, s, wakeups=self.wakeups, metrics=self.metrics)
        self.leader = Leader(s, url, self.instance)
        self.stalls = StallWatch(url, s, self.instance)
        self.loops = LeaderLoops(
            s, self.core.policy, self.engine, self.leader, self.wakeups, self.metrics, self.stalls
        )
        self.core.dispatcher = self.loops.dispatcher
        self.groups_binding, self.groups = groups_binding(self.core, self.registry)
        self.producer: EventProducer | None = None
        self.consumer: EventConsumer | None = None
        self.relay: OutboxRelay | None = None
        self.server: GrpcService | None = None
        if self.kafka:
            kafka_metrics = KafkaMetrics(self.registry, "scheduler")
            self.producer = EventProducer(
                ProducerConfig(
                    s.kafka_bootstrap_servers,
                    f"{s.kafka_client_id}-{self.instance}",
                    security=s.kafka_security,
                ),
                source="/services/scheduler",
                metrics=kafka_metrics,
            )
            self.relay = OutboxRelay(
                self.engine,
                self.producer,
                self.leader,
                self.wakeups,
                batch=s.outbox_batch,
                poll_seconds=s.outbox_poll_seconds,
                keep_published=s.outbox_retention_seconds > 0,
                metrics=self.metrics,
            )
            self.consumer = EventConsumer(
                ConsumerConfig(
                    bootstrap_servers=s.kafka_bootstrap_servers,
                    group_id=s.results_consumer_group,
                    topics=[topics.PROVIDER_RESULTS],
                    client_id=f"{s.kafka_client_id}-{self.instance}",
                    security=s.kafka_security,
                    session_timeout_ms=s.kafka_session_timeout_ms,
                    heartbeat_interval_ms=max(300, s.kafka_session_timeout_ms // 6),
                ),
                results_handler(self.core),
                registry=default_registry(),
                dlq_producer=self.producer,
                metrics=kafka_metrics,
                batch_handler=results_batch_handler(self.core),
            )
        if self.grpc:
            bindings = [
                ServiceBinding(
                    pb_grpc.add_SchedulerServiceServicer_to_server,
                    SchedulerServicer(self.core),
                    "conveyor.scheduler.v1.SchedulerService",
                ),
                ServiceBinding(
                    provider_grpc.add_ProviderCoordinationServiceServicer_to_server,
                    ProviderCoordinationServicer(self.core),
                    "conveyor.scheduler.v1.ProviderCoordinationService",
                ),
            ]
            bindings.append(client_webhooks.binding(self.core.sessionmaker))
            bindings.append(self.groups_binding)
            tls = s.internal_tls
            self.server = create_server(
                bindings,
                host=s.grpc_host,
                port=s.grpc_port,
                metrics=RpcMetrics(self.registry, "scheduler"),
                max_receive_message_length=limits.MESSAGE_BYTES_CEILING,
                credentials=tls.server_credentials() if tls else None,
                extra_interceptors=tls.interceptors() if tls else (),
            )

    async def start(self, *, check: bool = True) -> None:
        """Check the schema, then start every component."""
        if check:
            await check_schema(self.engine)
        codec = client_webhooks.WebhookPolicy().codec
        if codec.keyring is None:
            logger.warning(
                "SCHEDULER_WEBHOOK_SECRET_KEYS is unset: webhook signing secrets are stored in clear",
                extra={"action": "secrets_in_clear"},
            )
        else:
            async with self.core.sessionmaker() as session, session.begin():
                resealed = await reseal_secrets(session, codec)
            if resealed:
                logger.info(
                    "webhook signing secrets resealed with the current key",
                    extra={"action": "secrets_resealed", "count": resealed},
                )
        await self._refresh_presence()
        self._presence_task = asyncio.create_task(self._presence_loop(), name="webhook-presence")
        self.announcer.start()
        self.listener.start()
        if self.producer is not None:
            await self.producer.start()
        self.loops.start()
        self.groups.start()
        if self.relay is not None:
            self.relay.start()
        if self.consumer is not None:
            await self.consumer.start()
        if self.server is not None:
            await self.server.start()
        logger.info("scheduler started", extra={"action": "started", "instance": self.instance})

    def register(self, lifecycle: Lifecycle) -> None:
        """Register the shutdown steps in order (gRPC steps are registered by the caller)."""
        if self.consumer is not None:
            lifecycle.on_shutdown("consumer_stop", self.consumer.stop, phase=phases.CONSUMERS)
        lifecycle.on_shutdown("leader_stop", self.stop_loops, phase=phases.WORKERS)
        if self.producer is not None:
            lifecycle.on_shutdown("producer_stop", self.producer.stop, phase=phases.PRODUCERS)
        lifecycle.on_shutdown("engine_dispose", self.dispose, phase=phases.STORAGE)

    async def _refresh_presence(self) -> None:
        async with self.engine.connect() as conn:
            await PRESENCE.refresh(conn)

    async def _presence_loop(self) -> None:
        """Re-read the tenants with webhook endpoints (the notifier's hint, ADR 0007)."""
        while True:
            await asyncio.sleep(self.settings.webhook_presence_seconds)
            try:
                await self._refresh_presence()
            except Exception:  # the database is away: keep the last view, try again
                logger.warning(
                    "webhook presence refresh failed",
                    extra={"action": "webhook_presence_failed"},
                    exc_info=True,
                )

    async def stop_loops(self) -> None:
        """Stop the presence refresh, leader loops, relay, work listener and work announcer."""
        task, self._presence_task = self._presence_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.loops.stop()
        await self.groups.stop()
        if self.relay is not None:
            await self.relay.stop()
        await self.listener.stop()
        await self.announcer.stop()

    async def dispose(self) -> None:
        """Close the engines."""
        await self.stalls.close()
        await self.leader.dispose()
        await self.engine.dispose()

    async def stop(self) -> None:
        """Stop everything (tests; the service uses the lifecycle)."""
        if self.server is not None:
            await self.server.enter_graceful_shutdown()
            await self.server.stop(1.0)
        if self.consumer is not None:
            await self.consumer.stop()
        await self.stop_loops()
        if self.producer is not None:
            await self.producer.stop()
        await self.dispose()
