"""Client webhook deliveries: created per (endpoint, event) (a group event's by
:mod:`.group_deliveries`), leased by the notifier (at most one per
endpoint and task at a time, so per-task order holds), reported, listed and purged.

Every function takes an ``AsyncSession`` inside a transaction the caller opened; times come from the
database clock (``now()``) so every scheduler and notifier replica agrees.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, func, or_, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from conveyor.tasks.v1 import task_pb2
from conveyor_scheduler.client_webhooks.endpoints import fail_pending
from conveyor_scheduler.client_webhooks.models import (
    DELIVERED,
    FAILED,
    PENDING,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookSecret,
)
from conveyor_scheduler.client_webhooks.secrets import CLEAR, current_secret
from conveyor_scheduler.client_webhooks.settings import SecretCodec

# --------------------------------------------------------------------------------------------
# Secrets


# --------------------------------------------------------------------------------------------
# Endpoints


# --------------------------------------------------------------------------------------------
# Deliveries


async def insert_deliveries(
    session: AsyncSession, event: task_pb2.TaskEvent, endpoint_ids: Sequence[uuid.UUID]
) -> int:
    """One pending delivery of ``event`` per endpoint; existing (endpoint, event) pairs are kept."""
    if not endpoint_ids:
        return 0
    payload = event.SerializeToString()
    rows = [
        {
            "id": uuid.uuid4(),
            "tenant_id": event.tenant_id,
            "endpoint_id": endpoint_id,
            "task_id": event.task_id,
            "event_id": event.event_id,
            "sequence": event.sequence,
            "event_type": int(event.type),
            "event": payload,
            "state": PENDING,
            "next_attempt_at": func.now(),
        }
        for endpoint_id in endpoint_ids
    ]
    result = await session.execute(
        insert(WebhookDelivery)
        .values(rows)
        .on_conflict_do_nothing(
            index_elements=[WebhookDelivery.endpoint_id, WebhookDelivery.event_id]
        )
        .returning(WebhookDelivery.id)
    )
    return len(result.all())


_CLAIM = text(
    """
    WITH heads AS (
        SELECT DISTINCT ON (d.endpoint_id, d.task_id)
               d.id, d.endpoint_id, d.next_attempt_at, d.lease_until
        FROM webhook_deliveries d
        WHERE d.state = 1
        ORDER BY d.endpoint_id, d.task_id, d.sequence, d.created_at
    ), candidates AS (
        SELECT h.id
        FROM heads h
        JOIN webhook_endpoints e ON e.id = h.endpoint_id
        WHERE h.next_attempt_at <= now()
          AND (h.lease_until IS NULL OR h.lease_until < now())
          AND e.enabled AND e.deleted_at IS NULL
        ORDER BY h.next_attempt_at
        LIMIT :limit * 4
    ), locked AS (
        SELECT d.id
        FROM webhook_deliveries d
        WHERE d.id IN (SELECT id FROM candidates)
          AND d.state = 1
          AND (d.lease_until IS NULL OR d.lease_until < now())
        ORDER BY d.next_attempt_at
        LIMIT :limit
        FOR UPDATE SKIP LOCKED
    )
    UPDATE webhook_deliveries d
    SET lease_owner = :worker,
        lease_until = now() + make_interval(secs => :lease),
        updated_at = now()
    FROM locked
    WHERE d.id = locked.id
    RETURNING d.id, d.tenant_id, d.endpoint_id, d.event, d.attempts, d.lease_until, d.created_at,
              d.group_id IS NOT NULL AS group_event
    """
)


@dataclass(frozen=True)
class Lease:
    """A leased delivery with what the notifier needs to send it."""

    delivery_id: uuid.UUID
    tenant_id: str
    endpoint_id: uuid.UUID
    url: str
    secrets: list[str]
    event: bytes
    attempts: int
    lease_until: datetime
    created_at: datetime
    consecutive_failures: int
    failing_since: datetime | None
    group_event: bool = False
    """True when ``event`` is a serialized GroupEvent (not a TaskEvent)."""


async def claim(
    session: AsyncSession,
    worker_id: str,
    limit: int,
    lease_seconds: int,
    codec: SecretCodec = CLEAR,
) -> list[Lease]:
    """Lease due deliveries: the lowest-sequence pending one per (endpoint, task), if unleased.

    Concurrent claimers skip each other's locked rows; each looks at four times ``limit``
    candidates so that racing claimers still fill their batches.
    """
    claimed = (
        await session.execute(_CLAIM, {"limit": limit, "worker": worker_id, "lease": lease_seconds})
    ).all()
    if not claimed:
        return []
    endpoint_ids = {row.endpoint_id for row in claimed}
    tenants = {row.tenant_id for row in claimed}
    endpoints = {
        e.id: e
        for e in (
            await session.scalars(
                select(WebhookEndpoint).where(WebhookEndpoint.id.in_(endpoint_ids))
            )
        ).all()
    }
    secret_rows = (
        await session.execute(
            select(
                WebhookSecret.tenant_id,
                WebhookSecret.current_secret,
                WebhookSecret.previous_secret,
                (WebhookSecret.previous_valid_until > func.now()).label("previous_valid"),
            ).where(WebhookSecret.tenant_id.in_(tenants))
        )
    ).all()
    secrets: dict[str, list[str]] = {}
    for row in secret_rows:
        in_force = [codec.open(row.tenant_id, row.current_secret)]
        if row.previous_secret and row.previous_valid:
            in_force.append(codec.open(row.tenant_id, row.previous_secret))
        secrets[row.tenant_id] = in_force
    missing = tenants - secrets.keys()
    for tenant_id in missing:  # a per-task webhook of a tenant that never registered an endpoint
        secrets[tenant_id] = [await current_secret(session, tenant_id, codec)]
    leases = []
    for row in claimed:
        endpoint = endpoints[row.endpoint_id]
        leases.append(
            Lease(
                delivery_id=row.id,
                tenant_id=row.tenant_id,
                endpoint_id=row.endpoint_id,
                url=endpoint.url,
                secrets=secrets[row.tenant_id],
                event=row.event,
                attempts=row.attempts,
                lease_until=row.lease_until,
                created_at=row.created_at,
                consecutive_failures=endpoint.consecutive_failures,
                failing_since=endpoint.failing_since,
                group_event=row.group_event,
            )
        )
    return leases


@dataclass(frozen=True)
class Outcome:
    """A reported attempt."""

    delivery_id: uuid.UUID
    delivered: bool
    status_code: int
    error: str
    retry_at: datetime | None
    duration_ms: int
    disable_endpoint: bool
    disabled_reason: str


async def report(session: AsyncSession, worker_id: str, outcome: Outcome) -> bool:
    """Apply one attempt's outcome; False when the lease is no longer this worker's (stale)."""
    delivery = await session.scalar(
        select(WebhookDelivery)
        .where(
            WebhookDelivery.id == outcome.delivery_id,
            WebhookDelivery.state == PENDING,
            WebhookDelivery.lease_owner == worker_id,
        )
        .with_for_update()
    )
    if delivery is None:
        return False
    endpoint = await session.scalar(
        select(WebhookEndpoint).where(WebhookEndpoint.id == delivery.endpoint_id).with_for_update()
    )
    assert endpoint is not None
    now = await session.scalar(select(func.now()))
    assert now is not None
    delivery.attempts += 1
    session.add(
        WebhookAttempt(
            delivery_id=delivery.id,
            attempt=delivery.attempts,
            worker_id=worker_id[:200],
            delivered=outcome.delivered,
            status_code=outcome.status_code or None,
            error=outcome.error[:1000] or None,
            duration_ms=max(0, min(outcome.duration_ms, 2**31 - 1)),
        )
    )
    delivery.last_status_code = outcome.status_code or None
    delivery.lease_owner = None
    delivery.lease_until = None
    delivery.updated_at = now
    endpoint.updated_at = now
    if outcome.delivered:
        delivery.state = DELIVERED
        delivery.delivered_at = now
        delivery.next_attempt_at = None
        delivery.last_error = None
        endpoint.consecutive_failures = 0
        endpoint.failing_since = None
        return True
    delivery.last_error = (outcome.error or f"HTTP {outcome.status_code}")[:1000]
    endpoint.consecutive_failures += 1
    if endpoint.failing_since is None:
        endpoint.failing_since = now
    if outcome.disable_endpoint:
        delivery.state = FAILED
        delivery.next_attempt_at = None
        if endpoint.enabled:
            endpoint.enabled = False
            endpoint.disabled_at = now
            endpoint.disabled_reason = (outcome.disabled_reason or "kept failing")[:1000]
        await session.flush()
        await fail_pending(session, endpoint.id, "endpoint disabled")
        return True
    if outcome.retry_at is not None:
        delivery.next_attempt_at = outcome.retry_at
    else:
        delivery.state = FAILED
        delivery.next_attempt_at = None
    return True


@dataclass(frozen=True)
class Backlog:
    """Backlog counts."""

    pending: int
    due: int
    disabled_endpoints: int
    oldest_due_at: datetime | None


async def backlog(session: AsyncSession) -> Backlog:
    """Pending and due deliveries, disabled endpoints."""
    row = (
        await session.execute(
            select(
                func.count(),
                func.count().filter(WebhookDelivery.next_attempt_at <= func.now()),
                func.min(WebhookDelivery.next_attempt_at).filter(
                    WebhookDelivery.next_attempt_at <= func.now()
                ),
            ).where(WebhookDelivery.state == PENDING)
        )
    ).one()
    disabled = await session.scalar(
        select(func.count())
        .select_from(WebhookEndpoint)
        .where(WebhookEndpoint.enabled.is_(False), WebhookEndpoint.deleted_at.is_(None))
    )
    return Backlog(int(row[0]), int(row[1]), int(disabled or 0), row[2])


async def list_deliveries(
    session: AsyncSession,
    *,
    tenant_id: str,
    task_id: str,
    endpoint_id: uuid.UUID | None,
    limit: int,
    after: tuple[datetime, uuid.UUID] | None,
) -> Sequence[WebhookDelivery]:
    """A tenant's deliveries, newest first, after a (created_at, id) cursor."""
    query = select(WebhookDelivery).where(WebhookDelivery.tenant_id == tenant_id)
    if task_id:
        query = query.where(WebhookDelivery.task_id == task_id)
    if endpoint_id is not None:
        query = query.where(WebhookDelivery.endpoint_id == endpoint_id)
    if after is not None:
        created_at, last_id = after
        query = query.where(
            or_(
                WebhookDelivery.created_at < created_at,
                and_(WebhookDelivery.created_at == created_at, WebhookDelivery.id < last_id),
            )
        )
    query = query.order_by(WebhookDelivery.created_at.desc(), WebhookDelivery.id.desc()).limit(
        limit
    )
    return (await session.scalars(query)).all()


async def purge_finished(
    session: AsyncSession, older_than_seconds: int, limit: int = 10_000
) -> int:
    """Delete delivered/failed deliveries (and their attempts) older than the retention."""
    result = await session.execute(
        text(
            """
            DELETE FROM webhook_deliveries
            WHERE id IN (
                SELECT id FROM webhook_deliveries
                WHERE state <> 1 AND updated_at < now() - make_interval(secs => :age)
                LIMIT :limit
            )
            """
        ),
        {"age": older_than_seconds, "limit": limit},
    )
    return int(getattr(result, "rowcount", 0) or 0)
