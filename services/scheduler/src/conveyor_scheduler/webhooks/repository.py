"""SQL of client webhooks: secrets, endpoints, deliveries (enqueue, claim, report, log).

Every function takes an ``AsyncSession`` inside a transaction the caller opened; times come from the
database clock (``now()``) so every scheduler and notifier replica agrees.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from conveyor.tasks.v1 import task_pb2
from conveyor_common.standard_webhooks import generate_secret
from conveyor_common.vocabulary import TERMINAL_EVENT_TYPES
from conveyor_scheduler.webhooks.models import (
    DELIVERED,
    FAILED,
    PENDING,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookSecret,
)
from conveyor_scheduler.webhooks.settings import SecretCodec

CLEAR = SecretCodec(None)
"""No sealing (tests and callers without keys)."""


def wants(event_types: Sequence[int], event_type: int) -> bool:
    """Whether an endpoint subscribed to ``event_types`` receives ``event_type``."""
    if not event_types:
        return event_type in TERMINAL_EVENT_TYPES
    return event_type in event_types


# --------------------------------------------------------------------------------------------
# Secrets


async def ensure_secret(
    session: AsyncSession, tenant_id: str, codec: SecretCodec = CLEAR
) -> WebhookSecret:
    """The tenant's secret row (values as stored: sealed), created with a fresh secret when
    missing."""
    await session.execute(
        insert(WebhookSecret)
        .values(tenant_id=tenant_id, current_secret=codec.seal(tenant_id, generate_secret()))
        .on_conflict_do_nothing(index_elements=[WebhookSecret.tenant_id])
    )
    row = await session.scalar(select(WebhookSecret).where(WebhookSecret.tenant_id == tenant_id))
    assert row is not None
    return row


async def current_secret(session: AsyncSession, tenant_id: str, codec: SecretCodec) -> str:
    """The tenant's current signing secret in clear (created when missing)."""
    return codec.open(tenant_id, (await ensure_secret(session, tenant_id, codec)).current_secret)


async def reseal_secrets(session: AsyncSession, codec: SecretCodec, limit: int = 500) -> int:
    """Rewrite stored secrets that are in clear or sealed under an older key with the current
    key (after keys were configured or rotated); returns how many rows changed."""
    if codec.keyring is None:
        return 0
    rows = (
        await session.scalars(
            select(WebhookSecret)
            .with_for_update(skip_locked=True)
            .order_by(WebhookSecret.tenant_id)
        )
    ).all()
    changed = 0
    for row in rows:
        if changed >= limit:
            break
        touched = False
        if codec.needs_reseal(row.current_secret):
            row.current_secret = codec.seal(
                row.tenant_id, codec.open(row.tenant_id, row.current_secret)
            )
            touched = True
        if row.previous_secret and codec.needs_reseal(row.previous_secret):
            row.previous_secret = codec.seal(
                row.tenant_id, codec.open(row.tenant_id, row.previous_secret)
            )
            touched = True
        changed += touched
    return changed


async def lock_tenant(
    session: AsyncSession, tenant_id: str, codec: SecretCodec = CLEAR
) -> WebhookSecret:
    """The tenant's secret row, created when missing and locked until the transaction ends: it
    serializes a tenant's endpoint creations (idempotency-key check and endpoint limit)."""
    await ensure_secret(session, tenant_id, codec)
    row = await session.scalar(
        select(WebhookSecret)
        .where(WebhookSecret.tenant_id == tenant_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    assert row is not None
    return row


@dataclass(frozen=True)
class Rotation:
    """Result of a rotation."""

    secret: str
    previous_valid_until: datetime | None


async def rotate_secret(
    session: AsyncSession,
    tenant_id: str,
    request_id: str,
    overlap_seconds: int,
    codec: SecretCodec = CLEAR,
) -> Rotation:
    """New current secret; the old one signs alongside for ``overlap_seconds``.

    A replay of the latest rotation's request id returns its result without rotating again.
    """
    row = await session.scalar(
        select(WebhookSecret).where(WebhookSecret.tenant_id == tenant_id).with_for_update()
    )
    if row is None:
        created = await ensure_secret(session, tenant_id, codec)
        created.rotate_request_id = request_id or None
        created.rotated_at = await session.scalar(select(func.now()))
        return Rotation(codec.open(tenant_id, created.current_secret), None)
    if request_id and row.rotate_request_id == request_id:
        return Rotation(codec.open(tenant_id, row.current_secret), row.previous_valid_until)
    now = await session.scalar(select(func.now()))
    assert now is not None
    until = now + timedelta(seconds=overlap_seconds)
    fresh = generate_secret()
    row.previous_secret = row.current_secret
    row.previous_valid_until = until
    row.current_secret = codec.seal(tenant_id, fresh)
    row.rotate_request_id = request_id or None
    row.rotated_at = now
    return Rotation(fresh, until)


# --------------------------------------------------------------------------------------------
# Endpoints


async def endpoint_by_request(
    session: AsyncSession, tenant_id: str, request_id: str
) -> WebhookEndpoint | None:
    """The endpoint a previous create with this idempotency key made."""
    result: WebhookEndpoint | None = await session.scalar(
        select(WebhookEndpoint).where(
            WebhookEndpoint.tenant_id == tenant_id, WebhookEndpoint.request_id == request_id
        )
    )
    return result


async def count_live_endpoints(session: AsyncSession, tenant_id: str) -> int:
    """Registered (tenant-wide, not deleted) endpoints of a tenant."""
    count = await session.scalar(
        select(func.count())
        .select_from(WebhookEndpoint)
        .where(
            WebhookEndpoint.tenant_id == tenant_id,
            WebhookEndpoint.deleted_at.is_(None),
            WebhookEndpoint.task_id.is_(None),
        )
    )
    return int(count or 0)


async def create_endpoint(
    session: AsyncSession,
    *,
    tenant_id: str,
    url: str,
    event_types: Sequence[int],
    request_id: str,
) -> WebhookEndpoint:
    """Insert a tenant-wide endpoint."""
    endpoint = WebhookEndpoint(
        id=uuid.uuid4(),
        tenant_id=tenant_id,
        url=url,
        event_types=list(event_types),
        enabled=True,
        request_id=request_id or None,
        consecutive_failures=0,
    )
    session.add(endpoint)
    await session.flush()
    await session.refresh(endpoint)
    return endpoint


async def list_endpoints(session: AsyncSession, tenant_id: str) -> Sequence[WebhookEndpoint]:
    """Live registered endpoints of a tenant, oldest first."""
    rows = await session.scalars(
        select(WebhookEndpoint)
        .where(
            WebhookEndpoint.tenant_id == tenant_id,
            WebhookEndpoint.deleted_at.is_(None),
            WebhookEndpoint.task_id.is_(None),
        )
        .order_by(WebhookEndpoint.created_at, WebhookEndpoint.id)
    )
    return rows.all()


async def delete_endpoint(session: AsyncSession, tenant_id: str, endpoint_id: uuid.UUID) -> bool:
    """Soft-delete a registered endpoint and fail its pending deliveries; False when not found."""
    endpoint = await session.scalar(
        select(WebhookEndpoint)
        .where(
            WebhookEndpoint.id == endpoint_id,
            WebhookEndpoint.tenant_id == tenant_id,
            WebhookEndpoint.task_id.is_(None),
        )
        .with_for_update()
    )
    if endpoint is None:
        return False
    if endpoint.deleted_at is None:
        now = await session.scalar(select(func.now()))
        assert now is not None
        endpoint.deleted_at = now
        endpoint.updated_at = now
        await _fail_pending(session, endpoint_id, "endpoint deleted")
    return True


async def _fail_pending(session: AsyncSession, endpoint_id: uuid.UUID, reason: str) -> None:
    await session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.endpoint_id == endpoint_id, WebhookDelivery.state == PENDING)
        .values(
            state=FAILED,
            next_attempt_at=None,
            lease_owner=None,
            lease_until=None,
            last_error=reason,
            updated_at=func.now(),
        )
    )


async def task_endpoint(
    session: AsyncSession, tenant_id: str, task_id: str
) -> WebhookEndpoint | None:
    """The per-task endpoint of a task, if one was made."""
    result: WebhookEndpoint | None = await session.scalar(
        select(WebhookEndpoint).where(
            WebhookEndpoint.tenant_id == tenant_id, WebhookEndpoint.task_id == task_id
        )
    )
    return result


async def ensure_task_endpoint(
    session: AsyncSession,
    *,
    tenant_id: str,
    task_id: str,
    url: str,
    event_types: Sequence[int],
    refusal: str | None,
) -> WebhookEndpoint:
    """The per-task endpoint of a task (from TaskSpec.webhook); disabled when its URL was refused."""
    values: dict[str, Any] = {
        "id": uuid.uuid4(),
        "tenant_id": tenant_id,
        "task_id": task_id,
        "url": url,
        "event_types": list(event_types),
        "enabled": refusal is None,
        "disabled_reason": None if refusal is None else f"url refused: {refusal}"[:500],
        "disabled_at": None if refusal is None else func.now(),
    }
    await session.execute(
        insert(WebhookEndpoint)
        .values(**values)
        .on_conflict_do_nothing(
            index_elements=[WebhookEndpoint.tenant_id, WebhookEndpoint.task_id],
            index_where=text("task_id IS NOT NULL"),
        )
    )
    endpoint = await task_endpoint(session, tenant_id, task_id)
    assert endpoint is not None
    return endpoint


# --------------------------------------------------------------------------------------------
# Deliveries


async def tenant_endpoints_by_tenant(
    session: AsyncSession, tenant_ids: Sequence[str]
) -> dict[str, list[WebhookEndpoint]]:
    """Enabled, live, tenant-wide endpoints of several tenants in one query (tenants without any
    are absent)."""
    rows = await session.scalars(
        select(WebhookEndpoint).where(
            WebhookEndpoint.tenant_id.in_(list(tenant_ids)),
            WebhookEndpoint.deleted_at.is_(None),
            WebhookEndpoint.task_id.is_(None),
            WebhookEndpoint.enabled.is_(True),
        )
    )
    out: dict[str, list[WebhookEndpoint]] = {}
    for endpoint in rows.all():
        out.setdefault(endpoint.tenant_id, []).append(endpoint)
    return out


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
    RETURNING d.id, d.tenant_id, d.endpoint_id, d.event, d.attempts, d.lease_until, d.created_at
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
        await _fail_pending(session, endpoint.id, "endpoint disabled")
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
