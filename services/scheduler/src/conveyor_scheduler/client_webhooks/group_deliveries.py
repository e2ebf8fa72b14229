"""Client webhook deliveries of group events, decided where the event is written.

A group event is written by the scheduler (never read back from Kafka), so its deliveries are created
in the same transaction, by one ``INSERT ... SELECT`` over the tenant's endpoints that want it: its
registered endpoints (``group_event_types``; empty = COMPLETED only) and the group's own endpoint
(``GroupSpec.webhook``). A group's CHILD events are never delivered as group events: the child's
task events are. The notifier leases and sends them like task deliveries (``LeasedDelivery.
group_event``); ``task_id`` holds the group id so a group's deliveries reach an endpoint in order.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from conveyor.tasks.v1 import group_pb2

COMPLETED = group_pb2.GROUP_EVENT_TYPE_COMPLETED
CHILD = group_pb2.GROUP_EVENT_TYPE_CHILD

_INSERT = text(
    """
    WITH ev AS (
        SELECT * FROM unnest(
            CAST(:g AS uuid[]), CAST(:tn AS text[]), CAST(:e AS text[]), CAST(:s AS bigint[]),
            CAST(:t AS smallint[]), CAST(:p AS bytea[])
        ) AS ev(group_id, tenant_id, event_id, sequence, type, payload)
    )
    INSERT INTO webhook_deliveries (id, tenant_id, endpoint_id, task_id, group_id, event_id,
                                    sequence, event_type, event, state, next_attempt_at)
    SELECT gen_random_uuid(), ev.tenant_id, e.id, ev.group_id::text, ev.group_id, ev.event_id,
           ev.sequence, ev.type, ev.payload, 1, now()
    FROM ev
    JOIN webhook_endpoints e ON e.tenant_id = ev.tenant_id
    WHERE e.deleted_at IS NULL AND e.enabled AND e.task_id IS NULL
      AND (e.group_id IS NULL OR e.group_id = ev.group_id)
      AND CASE WHEN cardinality(e.group_event_types) = 0 THEN ev.type = :completed
               ELSE ev.type = ANY(e.group_event_types) END
    ON CONFLICT (endpoint_id, event_id) DO NOTHING
    """
)


async def deliver_group_events(conn: AsyncConnection, events: Sequence[dict[str, Any]]) -> None:
    """Create the deliveries of ``events`` (``group_events`` rows with ``tenant_id``) in the
    caller's transaction; CHILD events are skipped, and no statement runs when none is left."""
    wanted = [e for e in events if e["type"] != CHILD]
    if not wanted:
        return
    await conn.execute(
        _INSERT,
        {
            "g": [e["group_id"] for e in wanted],
            "tn": [e["tenant_id"] for e in wanted],
            "e": [str(e["event_id"]) for e in wanted],
            "s": [e["sequence"] for e in wanted],
            "t": [e["type"] for e in wanted],
            "p": [e["payload"] for e in wanted],
            "completed": COMPLETED,
        },
    )


async def create_group_endpoint(
    conn: AsyncConnection,
    *,
    tenant_id: str,
    group_id: uuid.UUID,
    webhook: group_pb2.GroupWebhook,
) -> None:
    """The group's own endpoint (GroupSpec.webhook), written with the group."""
    await conn.execute(
        text(
            "INSERT INTO webhook_endpoints (id, tenant_id, group_id, url, group_event_types)"
            " VALUES (:id, :t, :g, :url, CAST(:types AS smallint[]))"
            " ON CONFLICT DO NOTHING"
        ),
        {
            "id": uuid.uuid4(),
            "t": tenant_id,
            "g": group_id,
            "url": webhook.url,
            "types": [int(e) for e in webhook.events],
        },
    )
