"""Assembly of the adapter: build every component from settings, start them, stop them in order.

Shutdown order: health NOT_SERVING -> readiness drain -> stop the webhook receiver (no new
deliveries) -> gRPC stop -> stop the consumer (finish the batch in hand, commit) -> stop the
reconciler -> drain the webhook queue -> flush and stop the producer -> close HTTP clients, the
scheduler channel and storage -> metrics server last.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry

from conveyor_common import lifecycle as phases
from conveyor_common.grpc_server import GrpcService, create_server
from conveyor_common.kafka import (
    ConsumerConfig,
    EventConsumer,
    EventProducer,
    ProducerConfig,
    default_registry,
)
from conveyor_common.lifecycle import Lifecycle
from conveyor_common.metrics import KafkaMetrics, RpcMetrics
from conveyor_common.ratelimit import AsyncTokenBucket
from conveyor_provider_adapter.binding import Binder, SubmitRecords
from conveyor_provider_adapter.commands import CommandHandler
from conveyor_provider_adapter.coordination import Coordinator
from conveyor_provider_adapter.metrics import AdapterMetrics
from conveyor_provider_adapter.progress import ProgressCoalescer
from conveyor_provider_adapter.provider_webhooks import Pipeline, SecretSource, WebhookReceiver
from conveyor_provider_adapter.publishing import ResultPublisher
from conveyor_provider_adapter.reconciler import Reconciler
from conveyor_provider_adapter.replicate import ReplicateClient
from conveyor_provider_adapter.results import Observer
from conveyor_provider_adapter.settings import AdapterSettings
from conveyor_provider_adapter.state import LocalState
from conveyor_provider_adapter.storage import (
    FilesystemStorage,
    OutputCopier,
    S3Storage,
    Storage,
)

logger = logging.getLogger(__name__)

SERVICE = "provider-adapter"
WEBHOOK_STOP = phases.READINESS_DRAIN + 5
"""Between the readiness drain and the gRPC stop: no new webhook deliveries."""


def build_storage(settings: AdapterSettings) -> Storage:
    """The configured output storage backend."""
    if settings.storage_backend == "s3":
        assert settings.storage_s3_bucket is not None
        return S3Storage(
            settings.storage_s3_bucket,
            endpoint_url=settings.storage_s3_endpoint_url,
            region=settings.storage_s3_region,
            access_key_id=(
                settings.storage_s3_access_key_id.get_secret_value()
                if settings.storage_s3_access_key_id
                else None
            ),
            secret_access_key=(
                settings.storage_s3_secret_access_key.get_secret_value()
                if settings.storage_s3_secret_access_key
                else None
            ),
            public_base_url=settings.storage_public_base_url,
        )
    return FilesystemStorage(
        settings.storage_fs_root, public_base_url=settings.storage_public_base_url
    )


class Adapter:
    """Every component of one adapter replica."""

    def __init__(
        self,
        settings: AdapterSettings,
        *,
        registry: CollectorRegistry | None = None,
        storage: Storage | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry or CollectorRegistry()
        self.metrics = AdapterMetrics(self.registry)
        kafka_metrics = KafkaMetrics(self.registry, SERVICE)
        self.state = LocalState()
        self.replicate = ReplicateClient(
            settings.replicate_base_url,
            settings.replicate_api_token.get_secret_value(),
            connect_timeout=settings.replicate_connect_timeout_s,
            create_timeout=settings.replicate_create_timeout_s,
            request_timeout=settings.replicate_request_timeout_s,
            default_retry_after=settings.default_retry_after_s,
        )
        self.coordinator = Coordinator(
            settings.scheduler_address,
            adapter_id=settings.adapter_id,
            timeout_s=settings.scheduler_timeout_s,
            retry_s=settings.scheduler_retry_s,
            tls=settings.internal_tls,
        )
        self.producer = EventProducer(
            ProducerConfig(
                bootstrap_servers=settings.kafka_bootstrap,
                client_id=f"{SERVICE}-{settings.adapter_id}",
                security=settings.kafka_security,
            ),
            source=f"/services/{SERVICE}",
            metrics=kafka_metrics,
        )
        self.publisher = ResultPublisher(self.producer, self.metrics, topic=settings.results_topic)
        self.copier = OutputCopier(
            storage or build_storage(settings),
            allowed_hosts=settings.output_allowed_hosts,
            allow_http=settings.output_allow_http,
            max_bytes=settings.output_max_bytes,
            timeout_s=settings.output_timeout_s,
            parallel=settings.output_copy_parallel,
            prefix=settings.storage_prefix,
            metrics=self.metrics,
        )
        self.observer = Observer(
            state=self.state,
            coordinator=self.coordinator,
            replicate=self.replicate,
            copier=self.copier,
            publisher=self.publisher,
            metrics=self.metrics,
            started_hold_s=settings.progress_hold_seconds,
            progress=ProgressCoalescer(
                settings.progress_min_interval_seconds,
                hold_s=settings.progress_hold_seconds,
                on_coalesced=self.metrics.progress_coalesced.inc,
            ),
        )
        self.bucket = AsyncTokenBucket(settings.create_rate_per_min / 60.0, settings.create_burst)
        self.commands = CommandHandler(
            coordinator=self.coordinator,
            replicate=self.replicate,
            bucket=self.bucket,
            observer=self.observer,
            publisher=self.publisher,
            state=self.state,
            metrics=self.metrics,
            webhook_base_url=settings.webhook_public_base_url,
            webhook_key=settings.webhook_token_key.get_secret_value().encode(),
            provider=settings.provider,
            throttle_max_wait_s=settings.throttle_max_wait_s,
            reconcile_skew_s=settings.reconcile_skew_s,
        )
        self.consumer = EventConsumer(
            ConsumerConfig(
                bootstrap_servers=settings.kafka_bootstrap,
                group_id=settings.consumer_group,
                topics=[settings.commands_topic],
                session_timeout_ms=settings.kafka_session_timeout_ms,
                heartbeat_interval_ms=max(300, settings.kafka_session_timeout_ms // 6),
                client_id=f"{SERVICE}-{settings.adapter_id}",
                max_batch=max(50, settings.command_concurrency),
                key_concurrency=settings.command_concurrency,
                security=settings.kafka_security,
            ),
            self.commands.handle,
            registry=default_registry(),
            dlq_producer=self.producer,
            metrics=kafka_metrics,
        )
        self.reconciler = Reconciler(
            coordinator=self.coordinator,
            replicate=self.replicate,
            observer=self.observer,
            publisher=self.publisher,
            state=self.state,
            metrics=self.metrics,
            interval_s=settings.reconcile_interval_s,
            overdue_s=settings.webhook_overdue_s,
            grace_s=settings.submit_unknown_grace_s,
            deadline_slack_s=settings.deadline_slack_s,
            skew_s=settings.reconcile_skew_s,
            submitting_stale_s=settings.replicate_create_timeout_s
            + settings.throttle_max_wait_s
            + 15.0,
        )
        self.secrets = SecretSource(
            configured=(
                settings.replicate_webhook_secret.get_secret_value()
                if settings.replicate_webhook_secret
                else None
            ),
            client=self.replicate,
            tolerance_s=settings.webhook_tolerance_s,
            refresh_s=settings.webhook_secret_refresh_s,
        )
        self.pipeline = Pipeline(
            self.observer,
            self.metrics,
            workers=settings.webhook_workers,
            queue_size=settings.webhook_queue_size,
            binder=Binder(
                state=self.state,
                records=SubmitRecords(self.coordinator),
                metrics=self.metrics,
                skew_s=settings.reconcile_skew_s,
                create_wait_s=settings.replicate_create_timeout_s,
            ),
        )
        self.receiver = WebhookReceiver(
            secrets=self.secrets,
            token_key=settings.webhook_token_key.get_secret_value().encode(),
            pipeline=self.pipeline,
            metrics=self.metrics,
            max_body_bytes=settings.webhook_max_body_bytes,
            dedup_size=settings.webhook_dedup_size,
        )
        tls = settings.internal_tls
        self.grpc: GrpcService = create_server(
            [],
            host=settings.grpc_host,
            port=settings.grpc_port,
            metrics=RpcMetrics(self.registry, SERVICE),
            credentials=tls.server_credentials() if tls else None,
        )

    @property
    def webhook_port(self) -> int:
        """Bound port of the webhook receiver."""
        return self.receiver.port

    async def start(self, lifecycle: Lifecycle | None = None) -> None:
        """Start everything; registers shutdown steps on ``lifecycle`` when given."""
        await self.secrets.load()
        await self.producer.start()
        self.pipeline.start()
        await self.receiver.start(self.settings.webhook_host, self.settings.webhook_port)
        await self.consumer.start()
        self.reconciler.start()
        await self.grpc.start()
        logger.info(
            "provider adapter started",
            extra={
                "action": "adapter_started",
                "webhook_port": self.receiver.port,
                "grpc_port": self.grpc.port,
            },
        )
        if lifecycle is not None:
            self.register(lifecycle)

    def register(self, lifecycle: Lifecycle) -> None:
        """Shutdown steps in the documented order."""
        s = self.settings
        lifecycle.on_shutdown(
            "health_not_serving", self.grpc.enter_graceful_shutdown, phase=phases.HEALTH_OFF
        )

        async def drain() -> None:
            import asyncio

            await asyncio.sleep(s.readiness_drain_seconds)

        lifecycle.on_shutdown("readiness_drain", drain, phase=phases.READINESS_DRAIN, timeout=120)
        lifecycle.on_shutdown("webhooks_stop", self.receiver.stop, phase=WEBHOOK_STOP)

        async def grpc_stop() -> None:
            await self.grpc.stop(s.shutdown_grace_seconds)

        lifecycle.on_shutdown(
            "grpc_stop", grpc_stop, phase=phases.GRPC_STOP, timeout=s.shutdown_grace_seconds + 5
        )
        lifecycle.on_shutdown(
            "consumer_stop", self.consumer.stop, phase=phases.CONSUMERS, timeout=60
        )
        lifecycle.on_shutdown("reconciler_stop", self.reconciler.stop, phase=phases.WORKERS)
        lifecycle.on_shutdown("deadline_timers_stop", self.commands.close, phase=phases.WORKERS)
        lifecycle.on_shutdown(
            "webhook_queue_drain", self.pipeline.drain, phase=phases.WORKERS, timeout=45
        )
        lifecycle.on_shutdown(
            "held_progress_flush", self.observer.held.flush, phase=phases.WORKERS, timeout=15
        )
        lifecycle.on_shutdown(
            "held_started_flush", self.observer.flush_started, phase=phases.WORKERS, timeout=15
        )
        lifecycle.on_shutdown("producer_stop", self.producer.stop, phase=phases.PRODUCERS)
        lifecycle.on_shutdown("clients_close", self._close_clients, phase=phases.STORAGE)

    async def _close_clients(self) -> None:
        await self.secrets.close()
        await self.replicate.close()
        await self.copier.close()
        await self.coordinator.close()

    async def stop(self) -> None:
        """Stop everything in order (for tests; services use the lifecycle)."""
        lifecycle = Lifecycle()
        self.register(lifecycle)
        await lifecycle.shutdown()
