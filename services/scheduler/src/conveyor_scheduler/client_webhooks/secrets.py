"""Tenants' webhook signing secrets: created on first use, sealed at rest (AES-GCM under a key id,
resealed after a key rotation), rotated with an overlap during which both secrets sign.

Every function takes an ``AsyncSession`` inside a transaction the caller opened.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from conveyor_common.standard_webhooks import generate_secret
from conveyor_scheduler.client_webhooks.models import (
    WebhookSecret,
)
from conveyor_scheduler.client_webhooks.settings import SecretCodec

CLEAR = SecretCodec(None)
"""No sealing (tests and callers without keys)."""


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
