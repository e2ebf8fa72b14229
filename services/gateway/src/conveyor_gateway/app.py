"""Wiring of the gateway: settings -> verifier, validator, downstream clients, gRPC server.

``Gateway`` is what ``python -m conveyor_gateway`` runs and what tests start in-process on
127.0.0.1:0.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc
from prometheus_client import CollectorRegistry

from conveyor.notifier.v1 import notifier_service_pb2_grpc as notifier_grpc
from conveyor.tasks.v1 import admin_service_pb2_grpc as admin_grpc
from conveyor.tasks.v1 import task_service_pb2 as svc_pb2
from conveyor.tasks.v1 import task_service_pb2_grpc as svc_grpc
from conveyor.tasks.v1 import webhook_service_pb2_grpc as hook_grpc
from conveyor_common.channels import client_options
from conveyor_common.grpc_server import GrpcService, ServiceBinding, create_server
from conveyor_common.metrics import RpcMetrics
from conveyor_common.ssrf import UrlPolicy
from conveyor_common.tls import open_channel
from conveyor_gateway.auth import AuthInterceptor, RateLimiter, TokenVerifier
from conveyor_gateway.coalesce import SubmitCoalescer
from conveyor_gateway.downstream import SchedulerClient
from conveyor_gateway.groups import binding as group_binding
from conveyor_gateway.jwks import JwksKeys
from conveyor_gateway.servicers import AdminServicer, TaskServicer, WebhookServicer
from conveyor_gateway.settings import GatewaySettings
from conveyor_gateway.validation import Limits, Validator
from conveyor_gateway.watch import TaskWatcher, WatchConfig

logger = logging.getLogger(__name__)

TASK_SERVICE = svc_pb2.DESCRIPTOR.services_by_name["TaskService"].full_name
ADMIN_SERVICE = "conveyor.tasks.v1.AdminService"
WEBHOOK_SERVICE = "conveyor.tasks.v1.WebhookService"


def build_verifier(settings: GatewaySettings) -> TokenVerifier:
    """The token verifier from the configured keys."""
    hs: list[bytes] = []
    if settings.jwt_hs256_secret is not None:
        hs.append(settings.jwt_hs256_secret.get_secret_value().encode())
    if settings.jwt_hs256_secret_file is not None:
        hs.append(settings.jwt_hs256_secret_file.read_bytes().strip())
    rs: list[bytes] = []
    if settings.jwt_rs256_public_key is not None:
        rs.append(settings.jwt_rs256_public_key.get_secret_value().encode())
    if settings.jwt_rs256_public_key_file is not None:
        rs.append(settings.jwt_rs256_public_key_file.read_bytes())
    jwks = None
    if settings.jwt_jwks_url or settings.jwt_oidc_issuer_url:
        jwks = JwksKeys(
            jwks_url=settings.jwt_jwks_url,
            issuer_url=settings.jwt_oidc_issuer_url,
            refresh_seconds=settings.jwt_jwks_refresh_seconds,
            min_refresh_seconds=settings.jwt_jwks_min_refresh_seconds,
        )
    return TokenVerifier(
        hs256_secrets=hs,
        rs256_public_keys=rs,
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        leeway_seconds=settings.jwt_leeway_seconds,
        max_lifetime_seconds=settings.jwt_max_lifetime_seconds,
        jwks=jwks,
    )


def build_validator(settings: GatewaySettings) -> Validator:
    """The request validator from the configured limits."""
    return Validator(
        Limits(
            max_input_bytes=settings.max_input_bytes,
            max_batch_items=settings.max_batch_items,
            max_group_children=settings.max_group_children,
            max_queue_deadline_seconds=settings.max_queue_deadline_seconds,
            max_run_timeout_seconds=settings.max_run_timeout_seconds,
            max_labels=settings.max_labels,
            max_label_key_length=settings.max_label_key_length,
            max_label_value_length=settings.max_label_value_length,
            max_input_depth=settings.max_input_depth,
            max_input_nodes=settings.max_input_nodes,
        ),
        UrlPolicy.from_entries(
            settings.url_allowed_hosts, dns_timeout=settings.dns_timeout_seconds
        ),
    )


def server_credentials(settings: GatewaySettings) -> grpc.ServerCredentials | None:
    """TLS (optionally mutual) server credentials, when a certificate is configured."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    root = settings.tls_client_ca_file.read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())],
        root_certificates=root,
        require_client_auth=settings.tls_require_client_auth,
    )


@dataclass
class Gateway:
    """A bound gateway: its gRPC server and the downstream channels it owns."""

    service: GrpcService
    scheduler: SchedulerClient
    notifier_channel: grpc.aio.Channel | None
    submits: SubmitCoalescer | None = None
    jwks: JwksKeys | None = None

    @property
    def port(self) -> int:
        """The bound gRPC port."""
        return self.service.port

    async def start(self) -> None:
        """Fetch the JWKS (when configured), start serving."""
        if self.jwks is not None:
            await self.jwks.start()
        await self.service.start()

    async def close_downstream(self) -> None:
        """Finish the submit groups in flight, close the scheduler and notifier channels."""
        if self.jwks is not None:
            await self.jwks.close()
        if self.submits is not None:
            await self.submits.close()
        await self.scheduler.close()
        if self.notifier_channel is not None:
            await self.notifier_channel.close()

    async def stop(self, grace: float = 1.0) -> None:
        """Health off, stop with a grace period, close the downstream channels."""
        await self.service.enter_graceful_shutdown()
        await self.service.stop(grace)
        await self.close_downstream()


def build_gateway(
    settings: GatewaySettings,
    registry: CollectorRegistry,
    *,
    watch_config: WatchConfig | None = None,
) -> Gateway:
    """Build and bind (not start) the gateway."""
    verifier = build_verifier(settings)
    validator = build_validator(settings)
    scheduler = SchedulerClient(
        settings.scheduler_address,
        channels=settings.scheduler_channels,
        default_timeout=settings.scheduler_timeout_seconds,
        attempts=settings.scheduler_retry_attempts,
        base_delay=settings.scheduler_retry_base_seconds,
        attempt_timeout=settings.scheduler_attempt_timeout_seconds,
        tls=settings.internal_tls,
    )
    submits = (
        SubmitCoalescer(
            scheduler,
            max_group=settings.submit_group_max,
            concurrency=settings.submit_group_concurrency,
            registry=registry,
        )
        if settings.submit_coalesce
        else None
    )
    notifier_channel: grpc.aio.Channel | None = None
    notifier: notifier_grpc.WatchFanoutServiceStub | None = None
    if settings.notifier_address:
        notifier_channel = open_channel(
            settings.notifier_address, settings.internal_tls, client_options()
        )
        notifier = notifier_grpc.WatchFanoutServiceStub(notifier_channel)
    config = watch_config or WatchConfig(poll_interval=settings.watch_poll_interval_seconds)
    watcher = TaskWatcher(scheduler, notifier, config)
    bindings = [
        ServiceBinding(
            svc_grpc.add_TaskServiceServicer_to_server,
            TaskServicer(
                scheduler, validator, watcher, notifier, config.ready_timeout, submits=submits
            ),
            TASK_SERVICE,
        ),
        ServiceBinding(
            admin_grpc.add_AdminServiceServicer_to_server,
            AdminServicer(scheduler, validator),
            ADMIN_SERVICE,
        ),
        ServiceBinding(
            hook_grpc.add_WebhookServiceServicer_to_server,
            WebhookServicer(scheduler, validator),
            WEBHOOK_SERVICE,
        ),
        group_binding(scheduler, validator, notifier, config),
    ]
    limiter = RateLimiter(settings.rate_limit_per_second, settings.rate_limit_burst)
    server = create_server(
        bindings,
        host=settings.grpc_host,
        port=settings.grpc_port,
        metrics=RpcMetrics(registry, "gateway"),
        max_receive_message_length=settings.max_message_bytes,
        max_concurrent_rpcs=settings.max_concurrent_rpcs,
        extra_interceptors=[AuthInterceptor(verifier, limiter)],
        credentials=server_credentials(settings),
    )
    return Gateway(
        service=server,
        scheduler=scheduler,
        notifier_channel=notifier_channel,
        submits=submits,
        jwks=verifier.jwks,
    )
