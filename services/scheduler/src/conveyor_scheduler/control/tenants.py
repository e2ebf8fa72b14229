"""Tenants (tier, limits, weight), paused models and the provider throttle (429 back-off) rows."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from conveyor.tasks.v1 import task_pb2
from conveyor_scheduler.store import models as m


async def get_tenant(conn: AsyncConnection, tenant_id: str) -> dict[str, Any] | None:
    """A tenant row or None."""
    row = (
        (await conn.execute(text("SELECT * FROM tenants WHERE tenant_id = :t"), {"t": tenant_id}))
        .mappings()
        .first()
    )
    return dict(row) if row else None


async def upsert_tenant(
    conn: AsyncConnection, tenant_id: str, tier: int | None, limits: task_pb2.TenantLimits
) -> dict[str, Any]:
    """Create or update a tenant's tier and explicit limits (zeros = defaults)."""
    values = {
        "tier": tier or None,
        "max_concurrency": limits.max_concurrency or None,
        "max_waiting": limits.max_waiting or None,
        "submit_rate": limits.submit_rate_per_second or None,
        "submit_burst": limits.submit_burst or None,
        "weight": limits.weight or None,
    }
    # A new tenant starts with a full submit bucket (the admission SQL caps tokens at the burst);
    # the column default of 0 made a tenant's first submits after its creation by an admin fail.
    stmt = pg_insert(m.Tenant).values(tenant_id=tenant_id, tokens=1e9, **values)
    upsert = stmt.on_conflict_do_update(
        index_elements=[m.Tenant.tenant_id],
        set_={**values, "updated_at": text("now()")},
    ).returning(*m.Tenant.__table__.columns)
    row = (await conn.execute(upsert)).mappings().one()
    return dict(row)


async def set_model_paused(
    conn: AsyncConnection, model: str, paused: bool, reason: str | None
) -> bool:
    """Pause or resume a model; returns whether it is paused now."""
    stmt = pg_insert(m.ModelControl).values(model=model, paused=paused, reason=reason)
    stmt = stmt.on_conflict_do_update(
        index_elements=[m.ModelControl.model],
        set_={"paused": paused, "reason": reason, "updated_at": text("now()")},
    )
    await conn.execute(stmt)
    return paused


async def set_provider_throttle(conn: AsyncConnection, provider: str, until: datetime) -> None:
    """Pause dispatch to a provider until ``until`` (keeps the later of two throttles)."""
    stmt = pg_insert(m.ProviderControl).values(provider=provider, throttled_until=until)
    stmt = stmt.on_conflict_do_update(
        index_elements=[m.ProviderControl.provider],
        set_={
            "throttled_until": text(
                "GREATEST(provider_controls.throttled_until, excluded.throttled_until)"
            ),
            "updated_at": text("now()"),
        },
    )
    await conn.execute(stmt)
