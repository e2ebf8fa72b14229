"""Client webhook deliveries decided where the task event is written (ADR 0007).

Every statement that appends task events also inserts, in the same transaction, one pending delivery
per (event, endpoint that wants it): the tenant's registered endpoints (``event_types``; empty =
terminal events) and the task's own endpoint (``TaskSpec.webhook``, written with the task at submit).
So no event's webhook depends on a consumer downstream, and the notifier makes no call per event:
it only leases due deliveries. For a tenant without endpoints this costs one index probe per event
inside a statement the transaction runs anyway.

The notifier learns that there is something to lease from a hint on the event's Kafka record
(``TaskStateChanged.webhook_deliveries``), set from :data:`PRESENCE`: the tenants with registered
endpoints as this replica last read them (every ``SCHEDULER_WEBHOOK_PRESENCE_SECONDS``, and at once
for endpoints it creates itself), or a task with its own webhook. A stale hint only delays a
delivery to the notifier's next poll; it never loses one.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

_WANTS = (
    "w.deleted_at IS NULL AND w.enabled AND CASE WHEN cardinality(w.event_types) = 0"
    " THEN ev.terminal ELSE ev.type = ANY(w.event_types) END"
)


def deliveries_sql(source: str) -> str:
    """``INSERT INTO webhook_deliveries`` of the events of relation ``source`` (columns task_id,
    sequence, event_id, type, terminal, payload, tenant, hook): the tenant-wide endpoints and, for a
    task with its own webhook (``hook``), its endpoint; each through its own index."""
    select = (
        "SELECT gen_random_uuid(), w.tenant_id, w.id, ev.task_id::text, ev.event_id::text,"
        " ev.sequence, ev.type, ev.payload, 1, now()"
    )
    return (
        "INSERT INTO webhook_deliveries (id, tenant_id, endpoint_id, task_id, event_id, sequence,"
        " event_type, event, state, next_attempt_at) "
        f"{select} FROM {source} ev JOIN webhook_endpoints w ON w.tenant_id = ev.tenant"
        f" AND w.task_id IS NULL AND w.group_id IS NULL WHERE {_WANTS}"
        f" UNION ALL {select} FROM {source} ev JOIN webhook_endpoints w ON ev.hook"
        f" AND w.tenant_id = ev.tenant AND w.task_id = ev.task_id::text WHERE {_WANTS}"
        " ON CONFLICT (endpoint_id, event_id) DO NOTHING"
    )


_TASK_ENDPOINTS_SQL = text(
    "INSERT INTO webhook_endpoints (id, tenant_id, task_id, url, event_types)"
    " SELECT u.id, u.tenant, u.task, u.url, CAST(u.types AS smallint[])"
    " FROM unnest(CAST(:id AS uuid[]), CAST(:tenant AS text[]), CAST(:task AS text[]),"
    " CAST(:url AS text[]), CAST(:types AS text[])) AS u(id, tenant, task, url, types)"
    " ON CONFLICT DO NOTHING"
)


def task_endpoints_params(rows: Iterable[dict[str, Any]]) -> dict[str, list[Any]] | None:
    """Parameters of the per-task endpoints of new task rows with a webhook (None: none has)."""
    hooked = [r for r in rows if r.get("webhook_url")]
    if not hooked:
        return None
    return {
        "id": [uuid.uuid4() for _ in hooked],
        "tenant": [r["tenant_id"] for r in hooked],
        "task": [str(r["id"]) for r in hooked],
        "url": [r["webhook_url"] for r in hooked],
        "types": [
            "{" + ",".join(str(int(t)) for t in (r.get("webhook_events") or [])) + "}"
            for r in hooked
        ],
    }


TASK_ENDPOINTS_SQL = _TASK_ENDPOINTS_SQL
"""The per-task endpoints of new tasks (parameters from :func:`task_endpoints_params`)."""


class Presence:
    """Tenants with registered endpoints, as this replica last read them (the notifier's hint)."""

    def __init__(self) -> None:
        self.tenants: frozenset[str] = frozenset()

    def hint(self, row: dict[str, Any]) -> bool:
        """Whether an event of ``row`` may have deliveries (tenant endpoints or its own webhook)."""
        return row["tenant_id"] in self.tenants or bool(row.get("webhook_url"))

    def add(self, tenant_id: str) -> None:
        """An endpoint was just created here."""
        self.tenants = self.tenants | {tenant_id}

    async def refresh(self, conn: AsyncConnection) -> None:
        """Re-read the tenants with live registered endpoints."""
        rows = await conn.execute(
            text(
                "SELECT DISTINCT tenant_id FROM webhook_endpoints WHERE deleted_at IS NULL"
                " AND enabled AND task_id IS NULL AND group_id IS NULL"
            )
        )
        self.tenants = frozenset(r[0] for r in rows)


PRESENCE = Presence()
"""The scheduler process's presence (refreshed by the maintenance loop)."""
