"""Wiring of the notifier: watch fan-out, webhook deliveries, operations alerts, metrics.

Start order: metrics -> broadcast reader (positions fixed at the end of every partition) -> gRPC
server (WatchFanoutService, health, reflection) -> consumers (webhook enqueue, dead-letter alerts,
throttle monitor) -> delivery workers. Shutdown (SIGTERM): health NOT_SERVING -> readiness drain ->
end watch streams telling watchers to resume -> stop gRPC -> stop consumers -> stop workers (in-flight
deliveries finish and report) -> stop the DLQ producer -> close HTTP clients and the scheduler
channel -> stop metrics.
"""

from __future__ import annotations

import logging
from typing import Any

import httpcore
from prometheus_client import CollectorRegistry

from conveyor.events.v1 import events_pb2
from conveyor.scheduler.v1 import delivery_coordination_service_pb2_grpc as delivery_grpc
from conveyor_common import lifecycle as phases
from conveyor_common.channels import client_options
from conveyor_common.grpc_server import GrpcService, create_server
from conveyor_common.kafka import (
    ConsumerConfig,
    EventConsumer,
    EventProducer,
    ProducerConfig,
    TypeRegistry,
)
from conveyor_common.lifecycle import Lifecycle
from conveyor_common.metrics import KafkaMetrics, MetricsServer, RpcMetrics
from conveyor_common.ratelimit import TokenBucket
from conveyor_common.service import (
    register_grpc,
    run_service,
    serve_until_stopped,
    start_metrics,
)
from conveyor_common.ssrf import Resolver, system_resolver
from conveyor_common.tls import open_channel
from conveyor_notifier import fanout
from conveyor_notifier.alerts import (
    AlertTicker,
    DeadLetterAlerts,
    OpsAlerter,
    ThrottleMonitor,
)
from conveyor_notifier.broadcast import EventBroadcaster
from conveyor_notifier.delivery import BacklogPoller, DeliveryWorker, RetryPolicy
from conveyor_notifier.egress import WebhookSender, webhook_client
from conveyor_notifier.enqueue import DeliveryEnqueuer
from conveyor_notifier.fanout import WatchHub
from conveyor_notifier.metrics import NotifierMetrics
from conveyor_notifier.settings import NotifierSettings

logger = logging.getLogger(__name__)

SERVICE = "notifier"
END_STREAMS = 25
"""Shutdown phase between the readiness drain and the gRPC stop: end watch streams."""


class Notifier:
    """The notifier's components; ``start`` brings them up and registers their shutdown steps."""

    def __init__(
        self,
        settings: NotifierSettings,
        *,
        registry: CollectorRegistry | None = None,
        resolver: Resolver = system_resolver,
        egress_backend: httpcore.AsyncNetworkBackend | None = None,
        lifecycle: Lifecycle | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry or CollectorRegistry()
        self.resolver = resolver
        self.egress_backend = egress_backend
        self.lifecycle = lifecycle or Lifecycle()
        self.metrics = NotifierMetrics(self.registry)
        self.kafka_metrics = KafkaMetrics(self.registry, SERVICE)
        self.rpc_metrics = RpcMetrics(self.registry, SERVICE)
        self.hub = WatchHub(self.metrics, settings.watch_buffer_events)
        self.grpc: GrpcService | None = None
        self.metrics_server: MetricsServer | None = None

    @property
    def grpc_port(self) -> int:
        """The bound gRPC port."""
        assert self.grpc is not None
        return self.grpc.port

    async def start(self, *, serve_metrics: bool = True) -> None:
        """Start everything; on failure, what was started is stopped again."""
        try:
            await self._start(serve_metrics)
        except BaseException:
            await self.lifecycle.shutdown()
            raise

    async def _start(self, serve_metrics: bool) -> None:
        s = self.settings
        life = self.lifecycle
        if serve_metrics:
            self.metrics_server = start_metrics(life, self.registry, s)

        # Scheduler channel and the HTTP clients, closed last.
        channel = open_channel(
            s.scheduler_address, s.internal_tls, client_options(("grpc.enable_retries", 1))
        )
        life.on_shutdown("scheduler_channel_close", channel.close, phase=phases.STORAGE)
        stub = delivery_grpc.DeliveryCoordinationServiceStub(channel)
        client = webhook_client(
            s.allow_list,
            resolver=self.resolver,
            ca_bundle=s.webhook_ca_bundle,
            connect_timeout=s.webhook_connect_timeout_seconds,
            timeout=s.webhook_timeout_seconds,
            inner_backend=self.egress_backend,
        )
        life.on_shutdown("webhook_client_close", client.aclose, phase=phases.STORAGE)
        ops_url = s.ops_webhook_url.get_secret_value() if s.ops_webhook_url else None
        if not ops_url:
            logger.warning(
                "NOTIFIER_OPS_WEBHOOK_URL is not set: operations alerts go to the logs only",
                extra={"action": "ops_alerts_log_only"},
            )
        alerter = OpsAlerter(
            ops_url,
            TokenBucket(s.ops_alert_per_minute / 60.0, s.ops_alert_burst),
            self.metrics,
        )
        life.on_shutdown("ops_client_close", alerter.aclose, phase=phases.STORAGE)

        # Live watch: the reader's positions are fixed before the server answers.
        broadcaster = EventBroadcaster(
            bootstrap_servers=s.kafka_bootstrap_servers,
            topic=s.events_topic,
            hub=self.hub,
            client_id=f"notifier-watch-{s.replica_id}",
            kafka_metrics=self.kafka_metrics,
            security=s.kafka_security,
        )
        await broadcaster.start()
        life.on_shutdown("watch_reader_stop", broadcaster.stop, phase=phases.CONSUMERS)

        tls = s.internal_tls
        self.grpc = create_server(
            [fanout.binding(self.hub)],
            host=s.grpc_host,
            port=s.grpc_port,
            metrics=self.rpc_metrics,
            credentials=tls.server_credentials() if tls else None,
            extra_interceptors=tls.interceptors() if tls else (),
        )
        register_grpc(life, self.grpc, s)

        async def end_streams() -> None:
            ended = self.hub.close()
            logger.info("watch streams ended", extra={"action": "watch_closed", "count": ended})

        life.on_shutdown("watch_streams_end", end_streams, phase=END_STREAMS)
        await self.grpc.start()

        # Consumers.
        producer = EventProducer(
            ProducerConfig(
                s.kafka_bootstrap_servers,
                client_id=f"notifier-{s.replica_id}",
                security=s.kafka_security,
            ),
            source="/services/notifier",
            metrics=self.kafka_metrics,
        )
        await producer.start()
        life.on_shutdown("dlq_producer_stop", producer.stop, phase=phases.PRODUCERS)
        enqueuer = DeliveryEnqueuer(stub, self.metrics)
        monitor = ThrottleMonitor(
            alerter,
            self.metrics,
            threshold_seconds=s.throttle_alert_after_seconds,
            quiet_seconds=s.throttle_quiet_seconds,
        )
        dead_letters = DeadLetterAlerts(alerter)
        task_events = TypeRegistry([events_pb2.TaskStateChanged])
        results = TypeRegistry([events_pb2.ProviderResult])
        consumers: list[tuple[str, str, Any, Any, TypeRegistry]] = [
            (s.dead_letter_group, s.dead_letter_topic, dead_letters.handle, None, task_events),
            (s.throttle_group, s.provider_results_topic, monitor.handle, None, results),
        ]
        if s.enqueue_deliveries:  # a rolling upgrade from schedulers before ADR 0007
            consumers.append(
                (
                    s.webhook_group,
                    s.events_topic,
                    enqueuer.handle,
                    enqueuer.handle_batch,
                    task_events,
                )
            )
        for group, topic, handler, batch_handler, registry in consumers:
            consumer = EventConsumer(
                ConsumerConfig(
                    bootstrap_servers=s.kafka_bootstrap_servers,
                    group_id=group,
                    topics=[topic],
                    client_id=f"notifier-{s.replica_id}",
                    security=s.kafka_security,
                ),
                handler,
                registry=registry,
                dlq_producer=producer,
                metrics=self.kafka_metrics,
                batch_handler=batch_handler,
            )
            await consumer.start()
            life.on_shutdown(
                f"consumer_stop:{group}", consumer.stop, phase=phases.CONSUMERS, timeout=45
            )

        # Workers.
        worker = DeliveryWorker(
            stub,
            WebhookSender(
                client,
                timeout_s=s.webhook_timeout_seconds,
                max_response_bytes=s.webhook_max_response_bytes,
            ),
            RetryPolicy(
                base_seconds=s.retry_base_seconds,
                max_seconds=s.retry_max_seconds,
                period_seconds=s.retry_period_seconds,
                disable_after_failures=s.endpoint_disable_after_failures,
                disable_after_seconds=s.endpoint_disable_after_seconds,
            ),
            self.metrics,
            alerter,
            worker_id=s.replica_id,
            max_in_flight=s.delivery_max_in_flight,
            claim_batch=s.delivery_claim_batch,
            lease_seconds=s.delivery_lease_seconds,
            poll_seconds=s.delivery_poll_seconds,
        )
        worker.start()
        broadcaster.on_webhook_hint = worker.wake

        async def stop_worker() -> None:
            await worker.stop(grace_seconds=s.webhook_timeout_seconds + 5)

        life.on_shutdown(
            "delivery_worker_stop",
            stop_worker,
            phase=phases.WORKERS,
            timeout=s.webhook_timeout_seconds + 15,
        )
        poller = BacklogPoller(stub, self.metrics, period_seconds=s.backlog_poll_seconds)
        poller.start()
        life.on_shutdown("backlog_poller_stop", poller.stop, phase=phases.WORKERS)
        ticker = AlertTicker(alerter, monitor, min(s.ops_summary_seconds, s.throttle_quiet_seconds))
        ticker.start()
        life.on_shutdown("alert_ticker_stop", ticker.stop, phase=phases.WORKERS)
        logger.info(
            "notifier started",
            extra={
                "action": "notifier_started",
                "grpc_port": self.grpc.port,
                "replica_id": s.replica_id,
            },
        )

    async def stop(self) -> None:
        """Run the shutdown steps (idempotent)."""
        self.lifecycle.request_stop()
        await self.lifecycle.shutdown()


async def run(settings: NotifierSettings) -> None:
    """Run until SIGTERM/SIGINT, then shut down in order."""
    notifier = Notifier(settings)
    await notifier.start()
    await serve_until_stopped(notifier.lifecycle)


def main_async(settings: NotifierSettings) -> None:
    """Run the notifier on the configured event loop."""
    run_service(run(settings), settings)
