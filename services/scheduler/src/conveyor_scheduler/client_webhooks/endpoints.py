"""Client webhook endpoints: tenant-wide endpoints (create, list, delete, which events each wants) and
the per-task endpoint made from a task's own ``spec.webhook``.

Every function takes an ``AsyncSession`` inside a transaction the caller opened; times come from the
database clock (``now()``) so every scheduler and notifier replica agrees.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from conveyor_common.vocabulary import TERMINAL_EVENT_TYPES
from conveyor_scheduler.client_webhooks.models import (
    FAILED,
    PENDING,
    WebhookDelivery,
    WebhookEndpoint,
)


def wants(event_types: Sequence[int], event_type: int) -> bool:
    """Whether an endpoint subscribed to ``event_types`` receives ``event_type``."""
    if not event_types:
        return event_type in TERMINAL_EVENT_TYPES
    return event_type in event_types


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
            WebhookEndpoint.group_id.is_(None),
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
    group_event_types: Sequence[int] = (),
) -> WebhookEndpoint:
    """Insert a tenant-wide endpoint."""
    endpoint = WebhookEndpoint(
        id=uuid.uuid4(),
        tenant_id=tenant_id,
        url=url,
        event_types=list(event_types),
        group_event_types=list(group_event_types),
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
            WebhookEndpoint.group_id.is_(None),
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
            WebhookEndpoint.group_id.is_(None),
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
        await fail_pending(session, endpoint_id, "endpoint deleted")
    return True


async def fail_pending(session: AsyncSession, endpoint_id: uuid.UUID, reason: str) -> None:
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
            WebhookEndpoint.group_id.is_(None),
            WebhookEndpoint.enabled.is_(True),
        )
    )
    out: dict[str, list[WebhookEndpoint]] = {}
    for endpoint in rows.all():
        out.setdefault(endpoint.tenant_id, []).append(endpoint)
    return out
