"""Queue statistics per kind and model (GetQueueStats), cached by the caller.

A tenant sees its own tasks only (counts, oldest waiting, recent run times); ``tenant_id=None``
(the admin role) sees every tenant's.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from conveyor_scheduler.store.reads import recent_run_time_p50

_STATUS_FIELD = {
    1: "waiting",
    2: "active",
    3: "active",
    4: "succeeded",
    5: "failed",
    6: "canceled",
    7: "dead_lettered",
    8: "expired",
}
_FIELDS = ("waiting", "active", "succeeded", "failed", "canceled", "dead_lettered", "expired")


async def queue_stats(
    conn: AsyncConnection, kind: int, model: str, now: datetime, tenant_id: str | None
) -> list[dict[str, Any]]:
    """One dict per (kind, model) plus one per kind with model "" (the kind's total), over the
    tasks of ``tenant_id`` (every tenant's when None)."""
    rows = await conn.execute(
        text(
            "SELECT kind, model, status, count(*) AS n,"
            " min(enqueued_at) FILTER (WHERE status = 1) AS oldest"
            " FROM tasks WHERE (CAST(:kind AS int) = 0 OR kind = :kind)"
            " AND (CAST(:model AS text) = '' OR model = :model)"
            " AND (CAST(:tenant AS text) IS NULL OR tenant_id = :tenant)"
            " GROUP BY kind, model, status"
        ),
        {"kind": kind, "model": model, "tenant": tenant_id},
    )
    groups: dict[tuple[int, str], dict[str, Any]] = defaultdict(
        lambda: dict.fromkeys(_FIELDS, 0) | {"oldest": None}
    )
    for r in rows:
        for key in ((r.kind, r.model), (r.kind, "")):
            g = groups[key]
            g[_STATUS_FIELD[r.status]] += r.n
            if r.oldest is not None and (g["oldest"] is None or r.oldest < g["oldest"]):
                g["oldest"] = r.oldest
    out: list[dict[str, Any]] = []
    for (k, mdl), g in sorted(groups.items()):
        p50 = await recent_run_time_p50(conn, k, mdl or None, tenant_id=tenant_id)
        out.append(
            {
                "kind": k,
                "model": mdl,
                **{f: g[f] for f in _FIELDS},
                "oldest_waiting_age": (now - g["oldest"]).total_seconds() if g["oldest"] else 0.0,
                "recent_run_time_p50": p50,
            }
        )
    return out
