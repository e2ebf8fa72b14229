"""``DeliveryCoordinationService``: the notifier's access to durable webhook deliveries.

EnqueueDeliveries turns task events into deliveries (idempotent per (endpoint, event id));
ClaimDeliveries leases due deliveries, at most the lowest-sequence pending one per (endpoint, task);
ReportDeliveries applies attempt outcomes (fenced by the lease owner); GetDeliveryBacklog feeds the
notifier's gauges.
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from conveyor.scheduler.v1 import delivery_coordination_service_pb2 as delivery_pb2
from conveyor.scheduler.v1 import delivery_coordination_service_pb2_grpc as delivery_grpc
from conveyor.tasks.v1 import task_pb2
from conveyor_common.errors import FieldViolation, InvalidArgument, RpcError
from conveyor_common.grpc_server import ServiceBinding
from conveyor_scheduler.client_webhooks import deliveries
from conveyor_scheduler.client_webhooks.deliveries import (
    Outcome,
    claim,
    insert_deliveries,
    report,
)
from conveyor_scheduler.client_webhooks.endpoints import (
    ensure_task_endpoint,
    task_endpoint,
    tenant_endpoints_by_tenant,
    wants,
)
from conveyor_scheduler.client_webhooks.rpcs import (
    MAX_ID_LENGTH,
    check_callback_url,
    event_type_violations,
    timestamp,
)
from conveyor_scheduler.client_webhooks.settings import WebhookPolicy

logger = logging.getLogger(__name__)

MAX_EVENTS = 500


def _event_violations(events: list[task_pb2.TaskEvent]) -> list[FieldViolation]:
    violations = []
    if len(events) > MAX_EVENTS:
        violations.append(FieldViolation("events", f"at most {MAX_EVENTS} events"))
    for i, event in enumerate(events):
        for name in ("event_id", "task_id", "tenant_id"):
            value = getattr(event, name)
            if not value or len(value) > MAX_ID_LENGTH:
                violations.append(
                    FieldViolation(
                        f"events[{i}].{name}", f"required, at most {MAX_ID_LENGTH} characters"
                    )
                )
        if event.sequence < 1:
            violations.append(FieldViolation(f"events[{i}].sequence", "must be >= 1"))
        if event.type == task_pb2.TASK_EVENT_TYPE_UNSPECIFIED:
            violations.append(FieldViolation(f"events[{i}].type", "required"))
    return violations


class DeliveryCoordinationServicer(delivery_grpc.DeliveryCoordinationServiceServicer):
    """Servicer over the scheduler's database."""

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        policy: WebhookPolicy | None = None,
    ) -> None:
        self.sessionmaker = sessionmaker
        self.policy = policy or WebhookPolicy()

    async def EnqueueDeliveries(
        self,
        request: delivery_pb2.EnqueueDeliveriesRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> delivery_pb2.EnqueueDeliveriesResponse:
        """Create the deliveries of each event for every endpoint that wants it."""
        events = list(request.events)
        violations = _event_violations(events)
        if violations:
            raise InvalidArgument(violations)
        created = 0
        # One read for the whole call: an event of a tenant without endpoints, whose task has no
        # webhook of its own, costs no transaction at all.
        async with self.sessionmaker() as session:
            endpoints = await tenant_endpoints_by_tenant(
                session, sorted({e.tenant_id for e in events})
            )
        for event in events:
            hook = event.task.spec.webhook if event.task.spec.HasField("webhook") else None
            own = hook is not None and bool(hook.url) and event.task.task_id in ("", event.task_id)
            wanted = [
                e.id for e in endpoints.get(event.tenant_id, ()) if wants(e.event_types, event.type)
            ]
            if not own and not wanted:
                continue
            refusal = await self._task_webhook_refusal(event)
            async with self.sessionmaker() as session, session.begin():
                targets = list(wanted)
                if hook is not None and own:
                    endpoint = await task_endpoint(session, event.tenant_id, event.task_id)
                    if endpoint is None:
                        endpoint = await ensure_task_endpoint(
                            session,
                            tenant_id=event.tenant_id,
                            task_id=event.task_id,
                            url=hook.url,
                            event_types=[int(t) for t in hook.events],
                            refusal=refusal,
                        )
                    if endpoint.enabled and wants(endpoint.event_types, event.type):
                        targets.append(endpoint.id)
                created += await insert_deliveries(session, event, targets)
        return delivery_pb2.EnqueueDeliveriesResponse(created=created)

    async def _task_webhook_refusal(self, event: task_pb2.TaskEvent) -> str | None:
        """Why the task's own webhook URL is refused (checked once, when its endpoint is made)."""
        spec = event.task.spec
        if not spec.HasField("webhook") or not spec.webhook.url:
            return None
        async with self.sessionmaker() as session:
            if await task_endpoint(session, event.tenant_id, event.task_id) is not None:
                return None
        problems = event_type_violations([int(t) for t in spec.webhook.events])
        if problems:
            return problems[0].description
        try:
            await check_callback_url(spec.webhook.url, self.policy, "task.spec.webhook.url")
        except InvalidArgument as exc:
            logger.warning(
                "per-task webhook refused",
                extra={
                    "action": "task_webhook_refused",
                    "task_id": event.task_id,
                    "error": exc.message,
                },
            )
            return exc.message
        return None

    async def ClaimDeliveries(
        self,
        request: delivery_pb2.ClaimDeliveriesRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> delivery_pb2.ClaimDeliveriesResponse:
        """Lease due deliveries (per-task order kept)."""
        violations = []
        if not request.worker_id or len(request.worker_id) > MAX_ID_LENGTH:
            violations.append(
                FieldViolation("worker_id", f"required, at most {MAX_ID_LENGTH} characters")
            )
        if not 1 <= request.max_deliveries <= 500:
            violations.append(FieldViolation("max_deliveries", "must be 1..500"))
        if not 5 <= request.lease_seconds <= 600:
            violations.append(FieldViolation("lease_seconds", "must be 5..600"))
        if violations:
            raise InvalidArgument(violations)
        async with self.sessionmaker() as session, session.begin():
            leases = await claim(
                session,
                request.worker_id,
                request.max_deliveries,
                request.lease_seconds,
                self.policy.codec,
            )
        response = delivery_pb2.ClaimDeliveriesResponse()
        for lease in leases:
            item = response.deliveries.add(
                delivery_id=str(lease.delivery_id),
                tenant_id=lease.tenant_id,
                endpoint_id=str(lease.endpoint_id),
                url=lease.url,
                signing_secrets=lease.secrets,
                attempts=lease.attempts,
                endpoint_consecutive_failures=lease.consecutive_failures,
            )
            target = item.group_event if lease.group_event else item.event
            try:
                target.ParseFromString(lease.event)
            except DecodeError as exc:  # pragma: no cover - we wrote these bytes ourselves
                raise RpcError(f"stored event of {lease.delivery_id} is corrupt") from exc
            for field, value in (
                ("lease_until", lease.lease_until),
                ("created_at", lease.created_at),
                ("endpoint_failing_since", lease.failing_since),
            ):
                stamp = timestamp(value)
                if stamp is not None:
                    getattr(item, field).CopyFrom(stamp)
        return response

    async def ReportDeliveries(
        self,
        request: delivery_pb2.ReportDeliveriesRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> delivery_pb2.ReportDeliveriesResponse:
        """Apply outcomes of this worker's leases; stale ones are ignored."""
        violations = []
        if not request.worker_id:
            violations.append(FieldViolation("worker_id", "required"))
        outcomes: list[Outcome] = []
        for i, item in enumerate(request.outcomes):
            try:
                delivery_id = uuid.UUID(item.delivery_id)
            except ValueError:
                violations.append(FieldViolation(f"outcomes[{i}].delivery_id", "not a valid id"))
                continue
            outcomes.append(
                Outcome(
                    delivery_id=delivery_id,
                    delivered=item.delivered,
                    status_code=item.status_code,
                    error=item.error,
                    retry_at=item.retry_at.ToDatetime(tzinfo=UTC)
                    if item.HasField("retry_at")
                    else None,
                    duration_ms=int(item.duration_ms),
                    disable_endpoint=item.disable_endpoint,
                    disabled_reason=item.disabled_reason,
                )
            )
        if violations:
            raise InvalidArgument(violations)
        applied = 0
        for outcome in outcomes:
            async with self.sessionmaker() as session, session.begin():
                if await report(session, request.worker_id, outcome):
                    applied += 1
        return delivery_pb2.ReportDeliveriesResponse(applied=applied)

    async def GetDeliveryBacklog(
        self,
        request: delivery_pb2.GetDeliveryBacklogRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> delivery_pb2.GetDeliveryBacklogResponse:
        """Backlog counts."""
        async with self.sessionmaker() as session:
            counts = await deliveries.backlog(session)
        response = delivery_pb2.GetDeliveryBacklogResponse(
            pending=counts.pending, due=counts.due, disabled_endpoints=counts.disabled_endpoints
        )
        oldest = timestamp(counts.oldest_due_at)
        if oldest is not None:
            response.oldest_due_at.CopyFrom(oldest)
        return response


def binding(
    sessionmaker: async_sessionmaker[AsyncSession], policy: WebhookPolicy | None = None
) -> ServiceBinding:
    """The DeliveryCoordinationService servicer, for the scheduler's gRPC server."""
    return ServiceBinding(
        add=delivery_grpc.add_DeliveryCoordinationServiceServicer_to_server,
        servicer=DeliveryCoordinationServicer(sessionmaker, policy),
        full_name=delivery_pb2.DESCRIPTOR.services_by_name["DeliveryCoordinationService"].full_name,
    )
