"""Tenants (tier, limits, weight), paused models and the provider throttle (429 back-off) rows."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from conveyor.tasks.v1 import task_pb2
from conveyor_scheduler.store import models as m
from conveyor_scheduler.store.control_models import ModelControl, ProviderControl


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
    stmt = pg_insert(ModelControl).values(model=model, paused=paused, reason=reason)
    stmt = stmt.on_conflict_do_update(
        index_elements=[ModelControl.model],
        set_={"paused": paused, "reason": reason, "updated_at": text("now()")},
    )
    await conn.execute(stmt)
    return paused


async def set_provider_throttle(conn: AsyncConnection, provider: str, until: datetime) -> None:
    """Pause dispatch to a provider until ``until`` (keeps the later of two throttles)."""
    stmt = pg_insert(ProviderControl).values(provider=provider, throttled_until=until)
    stmt = stmt.on_conflict_do_update(
        index_elements=[ProviderControl.provider],
        set_={
            "throttled_until": text(
                "GREATEST(provider_controls.throttled_until, excluded.throttled_until)"
            ),
            "updated_at": text("now()"),
        },
    )
    await conn.execute(stmt)


async def set_tenant_paused(
    conn: AsyncConnection, tenant_id: str, paused: bool, reason: str | None
) -> bool | None:
    """Pause or resume a tenant; whether it is paused now, or None for an unknown tenant."""
    row = await conn.execute(
        text(
            "UPDATE tenants SET paused = :paused, paused_reason = :reason,"
            " paused_at = CASE WHEN :paused THEN coalesce(paused_at, now()) END, updated_at = now()"
            " WHERE tenant_id = :t RETURNING paused"
        ),
        {"t": tenant_id, "paused": paused, "reason": reason if paused else None},
    )
    found = row.scalar_one_or_none()
    return None if found is None else bool(found)


async def model_known(conn: AsyncConnection, model: str) -> bool:
    """Whether Conveyor has seen ``model``: a task used it, or it has a pause record already."""
    return bool(
        await conn.scalar(
            text(
                "SELECT EXISTS (SELECT 1 FROM tasks WHERE model = :m)"
                " OR EXISTS (SELECT 1 FROM model_controls WHERE model = :m)"
            ),
            {"m": model},
        )
    )


async def list_paused(conn: AsyncConnection) -> list[dict[str, Any]]:
    """Paused models then paused tenants, each sorted, with their queued task counts."""
    rows = await conn.execute(
        text(
            "SELECT 'model' AS kind, c.model AS name, c.reason, c.updated_at AS since,"
            " (SELECT count(*) FROM tasks t WHERE t.status = 1 AND t.model = c.model) AS queued"
            " FROM model_controls c WHERE c.paused"
            " UNION ALL SELECT 'tenant', n.tenant_id, n.paused_reason, n.paused_at, n.waiting"
            " FROM tenants n WHERE n.paused ORDER BY 1, 2"
        )
    )
    return [dict(r._mapping) for r in rows]


async def held_reason(conn: AsyncConnection, tenant_id: str, model: str) -> str:
    """Why a queued task of ``tenant_id`` on ``model`` is held by an operator ("" when it is not)."""
    row = (
        await conn.execute(
            text(
                "SELECT EXISTS (SELECT 1 FROM model_controls WHERE model = :m AND paused) AS model,"
                " EXISTS (SELECT 1 FROM tenants WHERE tenant_id = :t AND paused) AS tenant"
            ),
            {"m": model, "t": tenant_id},
        )
    ).one()
    return "model paused" if row.model else "tenant paused" if row.tenant else ""
