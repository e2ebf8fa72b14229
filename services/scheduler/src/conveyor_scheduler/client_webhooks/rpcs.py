"""The five SchedulerService webhook RPCs, as a mixin of the scheduler's servicer.

``class SchedulerServicer(WebhookRpcs, SchedulerServiceServicer)``: the mixin has no ``__init__``;
it reads ``self.sessionmaker`` and, optionally, ``self.webhook_policy`` (a
:class:`~conveyor_scheduler.client_webhooks.settings.WebhookPolicy`; built from ``SCHEDULER_WEBHOOK_*`` on
first use when absent). Every call is scoped to ``request.principal.tenant_id``: another tenant's
endpoint is NOT_FOUND, exactly like a missing one.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from datetime import datetime
from typing import Any

import grpc
from google.protobuf import timestamp_pb2
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from conveyor.scheduler.v1 import scheduler_service_pb2 as pb
from conveyor.tasks.v1 import group_pb2, task_pb2, webhook_service_pb2
from conveyor_common.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    QuotaViolation,
    ResourceExhausted,
    Unavailable,
)
from conveyor_common.ssrf import RefusalReason, UrlRefused
from conveyor_scheduler.client_webhooks.decide import PRESENCE
from conveyor_scheduler.client_webhooks.deliveries import list_deliveries
from conveyor_scheduler.client_webhooks.endpoints import (
    count_live_endpoints,
    create_endpoint,
    delete_endpoint,
    endpoint_by_request,
    list_endpoints,
)
from conveyor_scheduler.client_webhooks.models import WebhookDelivery, WebhookEndpoint
from conveyor_scheduler.client_webhooks.secrets import current_secret, lock_tenant, rotate_secret
from conveyor_scheduler.client_webhooks.settings import WebhookPolicy

MAX_ID_LENGTH = 200
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500


def timestamp(moment: datetime | None) -> timestamp_pb2.Timestamp | None:
    """A protobuf Timestamp of an aware datetime (None stays None)."""
    if moment is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def endpoint_message(row: WebhookEndpoint) -> webhook_service_pb2.WebhookEndpoint:
    """The public view of an endpoint (never its secret)."""
    message = webhook_service_pb2.WebhookEndpoint(
        endpoint_id=str(row.id),
        url=row.url,
        events=list(row.event_types),  # type: ignore[arg-type]
        group_events=list(row.group_event_types),  # type: ignore[arg-type]
        enabled=row.enabled,
        disabled_reason=row.disabled_reason or "",
    )
    created = timestamp(row.created_at)
    if created is not None:
        message.created_at.CopyFrom(created)
    return message


def delivery_message(row: WebhookDelivery) -> webhook_service_pb2.WebhookDelivery:
    """The public view of a delivery."""
    message = webhook_service_pb2.WebhookDelivery(
        delivery_id=str(row.id),
        endpoint_id=str(row.endpoint_id),
        sequence=row.sequence,
        state=row.state,  # type: ignore[arg-type]
        attempts=row.attempts,
        last_status_code=row.last_status_code or 0,
        last_error=row.last_error or "",
    )
    if row.group_id is not None:
        message.group_id = str(row.group_id)
        message.group_event_type = row.event_type  # type: ignore[assignment]
    else:
        message.task_id = row.task_id
        message.event_type = row.event_type  # type: ignore[assignment]
    for field, value in (
        ("next_attempt_at", row.next_attempt_at),
        ("created_at", row.created_at),
        ("delivered_at", row.delivered_at),
    ):
        stamp = timestamp(value)
        if stamp is not None:
            getattr(message, field).CopyFrom(stamp)
    return message


def _tenant(principal: pb.Principal) -> str:
    if not principal.tenant_id:
        raise InvalidArgument([FieldViolation("principal.tenant_id", "required")])
    return principal.tenant_id


def _parse_id(value: str, field: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidArgument([FieldViolation(field, "not a valid id")]) from None


def _check_request_id(value: str) -> None:
    if len(value) > MAX_ID_LENGTH:
        raise InvalidArgument([FieldViolation("request_id", f"at most {MAX_ID_LENGTH} characters")])


def group_event_type_violations(
    events: list[int], field: str = "group_events"
) -> list[FieldViolation]:
    """Violations of a group-event-type list (unknown, UNSPECIFIED or CHILD values, duplicates)."""
    violations = []
    known = set(group_pb2.GroupEventType.values()) - {group_pb2.GROUP_EVENT_TYPE_UNSPECIFIED}
    for i, value in enumerate(events):
        if value == group_pb2.GROUP_EVENT_TYPE_CHILD:
            violations.append(
                FieldViolation(f"{field}[{i}]", "a child's events are task events: use events")
            )
        elif value not in known:
            violations.append(FieldViolation(f"{field}[{i}]", "unknown group event type"))
    if len(set(events)) != len(events):
        violations.append(FieldViolation(field, "duplicate group event types"))
    return violations


def event_type_violations(events: list[int], field: str = "events") -> list[FieldViolation]:
    """Violations of an event-type list (unknown or UNSPECIFIED values, duplicates)."""
    violations = []
    known = set(task_pb2.TaskEventType.values()) - {task_pb2.TASK_EVENT_TYPE_UNSPECIFIED}
    for i, value in enumerate(events):
        if value not in known:
            violations.append(FieldViolation(f"{field}[{i}]", "unknown event type"))
    if len(set(events)) != len(events):
        violations.append(FieldViolation(field, "duplicate event types"))
    return violations


async def check_callback_url(url: str, policy: WebhookPolicy, field: str = "url") -> None:
    """Apply the SSRF policy (with DNS); INVALID_ARGUMENT naming ``field`` when refused.

    The system resolver runs ``getaddrinfo`` in the loop's thread pool (the event loop never
    blocks on DNS), bounded by ``dns_timeout_seconds`` (UNAVAILABLE when it runs out).
    """
    try:
        await policy.url_policy.check(url)
    except UrlRefused as exc:
        if exc.reason is RefusalReason.RESOLVER_UNAVAILABLE:
            raise Unavailable(f"{field}: {exc.message}", retry_after_seconds=5) from None
        raise InvalidArgument([FieldViolation(field, exc.message)]) from None


def encode_cursor(row: WebhookDelivery) -> str:
    """Opaque page token of the position after ``row``."""
    raw = json.dumps([row.created_at.isoformat(), str(row.id)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(token: str) -> tuple[datetime, uuid.UUID]:
    """Inverse of :func:`encode_cursor`; INVALID_ARGUMENT when it is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        created, last = json.loads(raw)
        moment = datetime.fromisoformat(created)
        if moment.tzinfo is None:
            raise ValueError("naive")
        return moment, uuid.UUID(last)
    except (binascii.Error, ValueError, TypeError):
        raise InvalidArgument([FieldViolation("page_token", "not a valid page token")]) from None


class WebhookRpcs:
    """CreateWebhookEndpoint, ListWebhookEndpoints, DeleteWebhookEndpoint, RotateWebhookSecret,
    ListWebhookDeliveries."""

    sessionmaker: async_sessionmaker[AsyncSession]
    webhook_policy: WebhookPolicy | None = None

    def _policy(self) -> WebhookPolicy:
        if self.webhook_policy is None:
            self.webhook_policy = WebhookPolicy()
        return self.webhook_policy

    async def CreateWebhookEndpoint(
        self,
        request: pb.SchedulerServiceCreateWebhookEndpointRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.SchedulerServiceCreateWebhookEndpointResponse:
        """Register an endpoint after the SSRF check; returns the tenant's current secret."""
        tenant = _tenant(request.principal)
        body = request.request
        policy = self._policy()
        _check_request_id(body.request_id)
        events = [int(e) for e in body.events]
        group_events = [int(e) for e in body.group_events]
        violations = event_type_violations(events) + group_event_type_violations(group_events)
        if violations:
            raise InvalidArgument(violations)
        if body.request_id:
            async with self.sessionmaker() as session:
                existing = await endpoint_by_request(session, tenant, body.request_id)
            if existing is not None:
                return await self._replay_create(existing, body.url, events, group_events, tenant)
        await check_callback_url(body.url, policy)
        async with self.sessionmaker() as session, session.begin():
            # Concurrent creates of one tenant queue here, so the key check and the limit hold.
            row = await lock_tenant(session, tenant, policy.codec)
            signing_secret = policy.codec.open(tenant, row.current_secret)
            if body.request_id:
                existing = await endpoint_by_request(session, tenant, body.request_id)
                if existing is not None:
                    return await self._replay_create(
                        existing, body.url, events, group_events, tenant, signing_secret
                    )
            limit = policy.settings.max_endpoints_per_tenant
            if await count_live_endpoints(session, tenant) >= limit:
                raise ResourceExhausted(
                    [
                        QuotaViolation(
                            subject=f"tenant:{tenant}:webhook_endpoints",
                            description=f"at most {limit} webhook endpoints per tenant",
                        )
                    ],
                    retry_after_seconds=0,
                )
            PRESENCE.add(tenant)  # this replica's events hint the notifier at once
            endpoint = await create_endpoint(
                session,
                tenant_id=tenant,
                url=body.url,
                event_types=events,
                request_id=body.request_id,
                group_event_types=group_events,
            )
            return pb.SchedulerServiceCreateWebhookEndpointResponse(
                response=webhook_service_pb2.CreateWebhookEndpointResponse(
                    endpoint=endpoint_message(endpoint), signing_secret=signing_secret
                )
            )

    async def _replay_create(
        self,
        existing: WebhookEndpoint,
        url: str,
        events: list[int],
        group_events: list[int],
        tenant: str,
        signing_secret: str | None = None,
    ) -> pb.SchedulerServiceCreateWebhookEndpointResponse:
        if (
            existing.url != url
            or list(existing.event_types) != events
            or list(existing.group_event_types) != group_events
        ):
            raise FailedPrecondition(
                "request_id was already used to create a different endpoint",
                reason="IDEMPOTENCY_KEY_REUSED",
            )
        if signing_secret is None:
            async with self.sessionmaker() as session, session.begin():
                signing_secret = await current_secret(session, tenant, self._policy().codec)
        return pb.SchedulerServiceCreateWebhookEndpointResponse(
            response=webhook_service_pb2.CreateWebhookEndpointResponse(
                endpoint=endpoint_message(existing), signing_secret=signing_secret
            )
        )

    async def ListWebhookEndpoints(
        self,
        request: pb.SchedulerServiceListWebhookEndpointsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.SchedulerServiceListWebhookEndpointsResponse:
        """The tenant's registered endpoints (no secrets)."""
        tenant = _tenant(request.principal)
        async with self.sessionmaker() as session:
            rows = await list_endpoints(session, tenant)
        return pb.SchedulerServiceListWebhookEndpointsResponse(
            response=webhook_service_pb2.ListWebhookEndpointsResponse(
                endpoints=[endpoint_message(r) for r in rows]
            )
        )

    async def DeleteWebhookEndpoint(
        self,
        request: pb.SchedulerServiceDeleteWebhookEndpointRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.SchedulerServiceDeleteWebhookEndpointResponse:
        """Delete an endpoint of the tenant; its pending deliveries fail ("endpoint deleted")."""
        tenant = _tenant(request.principal)
        body = request.request
        _check_request_id(body.request_id)
        if not body.endpoint_id:
            raise InvalidArgument([FieldViolation("endpoint_id", "required")])
        endpoint_id = _parse_id(body.endpoint_id, "endpoint_id")
        async with self.sessionmaker() as session, session.begin():
            found = await delete_endpoint(session, tenant, endpoint_id)
        if not found:
            raise NotFound("webhook endpoint", body.endpoint_id)
        return pb.SchedulerServiceDeleteWebhookEndpointResponse(
            response=webhook_service_pb2.DeleteWebhookEndpointResponse()
        )

    async def RotateWebhookSecret(
        self,
        request: pb.SchedulerServiceRotateWebhookSecretRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.SchedulerServiceRotateWebhookSecretResponse:
        """New secret; the previous one keeps signing for the overlap (0 = the default, 24 h)."""
        tenant = _tenant(request.principal)
        body = request.request
        _check_request_id(body.request_id)
        settings = self._policy().settings
        overlap = body.overlap_seconds or settings.default_rotation_overlap_seconds
        if body.overlap_seconds < 0 or overlap > settings.max_rotation_overlap_seconds:
            raise InvalidArgument(
                [
                    FieldViolation(
                        "overlap_seconds",
                        f"must be 0..{settings.max_rotation_overlap_seconds}",
                    )
                ]
            )
        async with self.sessionmaker() as session, session.begin():
            rotation = await rotate_secret(
                session, tenant, body.request_id, overlap, self._policy().codec
            )
        response = webhook_service_pb2.RotateWebhookSecretResponse(signing_secret=rotation.secret)
        until = timestamp(rotation.previous_valid_until)
        if until is not None:
            response.previous_valid_until.CopyFrom(until)
        return pb.SchedulerServiceRotateWebhookSecretResponse(response=response)

    async def ListWebhookDeliveries(
        self,
        request: pb.SchedulerServiceListWebhookDeliveriesRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.SchedulerServiceListWebhookDeliveriesResponse:
        """The tenant's delivery log, newest first, paged."""
        tenant = _tenant(request.principal)
        body = request.request
        violations = []
        if not 0 <= body.page_size <= MAX_PAGE_SIZE:
            violations.append(FieldViolation("page_size", f"must be 0..{MAX_PAGE_SIZE}"))
        if len(body.task_id) > MAX_ID_LENGTH:
            violations.append(FieldViolation("task_id", f"at most {MAX_ID_LENGTH} characters"))
        if violations:
            raise InvalidArgument(violations)
        endpoint_id = _parse_id(body.endpoint_id, "endpoint_id") if body.endpoint_id else None
        after = decode_cursor(body.page_token) if body.page_token else None
        size = body.page_size or DEFAULT_PAGE_SIZE
        async with self.sessionmaker() as session:
            rows = list(
                await list_deliveries(
                    session,
                    tenant_id=tenant,
                    task_id=body.task_id,
                    endpoint_id=endpoint_id,
                    limit=size + 1,
                    after=after,
                )
            )
        more = len(rows) > size
        rows = rows[:size]
        return pb.SchedulerServiceListWebhookDeliveriesResponse(
            response=webhook_service_pb2.ListWebhookDeliveriesResponse(
                deliveries=[delivery_message(r) for r in rows],
                next_page_token=encode_cursor(rows[-1]) if more and rows else "",
            )
        )
