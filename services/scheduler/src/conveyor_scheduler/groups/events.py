"""A group's events: the group's proto snapshot, events encoded once per group (children's CHILD
events share the group's serialized snapshot), and their batched insert into ``group_events``.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from conveyor.tasks.v1 import group_pb2
from conveyor_common.ids import uuid7
from conveyor_scheduler.client_webhooks.group_deliveries import deliver_group_events
from conveyor_scheduler.store.convert import set_ts


def group_event(
    row: GroupRow,
    event_type: int,
    now: datetime,
    *,
    outputs: Sequence[group_pb2.GroupChildOutput] = (),
    child_ids: Sequence[uuid.UUID] = (),
) -> dict[str, Any]:
    """A group_events row (bumps the group's last_sequence)."""
    row["last_sequence"] += 1
    event_id = uuid7()
    ev = group_pb2.GroupEvent(
        event_id=str(event_id),
        group_id=str(row["id"]),
        tenant_id=row["tenant_id"],
        sequence=row["last_sequence"],
        type=event_type,  # type: ignore[arg-type]
        group=group_proto(row, child_ids),
        outputs=outputs,
    )
    set_ts(ev.occurred_at, now)
    payload = ev.SerializeToString()
    return {
        "group_id": row["id"],
        "tenant_id": row["tenant_id"],
        "sequence": row["last_sequence"],
        "event_id": event_id,
        "type": event_type,
        "occurred_at": now,
        "payload": payload,
        "child_task_id": None,
        "child_sequence": None,
    }


def varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def length_delimited(field_number: int, data: bytes) -> bytes:
    out = bytearray()
    for value in ((field_number << 3) | 2, len(data)):
        while value >= 0x80:
            out.append((value & 0x7F) | 0x80)
            value >>= 7
        out.append(value)
    return bytes(out) + data


INSERT_EVENTS_SQL = text(
    "INSERT INTO group_events (group_id, sequence, event_id, type, occurred_at, payload,"
    " child_task_id, child_sequence)"
    " SELECT * FROM unnest(CAST(:g AS uuid[]), CAST(:s AS bigint[]), CAST(:e AS uuid[]),"
    " CAST(:t AS smallint[]), CAST(:o AS timestamptz[]), CAST(:p AS bytea[]),"
    " CAST(:ct AS uuid[]), CAST(:cs AS bigint[]))"
)


async def insert_events(conn: AsyncConnection, events: list[dict[str, Any]]) -> None:
    """Append ``events`` to their groups' histories and create their client webhook deliveries."""
    if not events:
        return
    await conn.execute(
        INSERT_EVENTS_SQL,
        {
            "g": [e["group_id"] for e in events],
            "s": [e["sequence"] for e in events],
            "e": [e["event_id"] for e in events],
            "t": [e["type"] for e in events],
            "o": [e["occurred_at"] for e in events],
            "p": [e["payload"] for e in events],
            "ct": [e["child_task_id"] for e in events],
            "cs": [e["child_sequence"] for e in events],
        },
    )
    await deliver_group_events(conn, events)


GroupRow = dict[str, Any]


def group_proto(row: GroupRow, child_ids: Sequence[uuid.UUID] = ()) -> group_pb2.Group:
    """The public Group of a row."""
    total = row["total"]
    g = group_pb2.Group(
        group_id=str(row["id"]),
        tenant_id=row["tenant_id"],
        request_id=row["request_id"],
        status=row["status"],
        policy=row["policy"],
        follow_up_task_id=str(row["follow_up_task_id"]) if row["follow_up_task_id"] else "",
        cancel_requested=row["cancel_requested"],
        cancel_reason=row["cancel_reason"] or "",
        last_sequence=row["last_sequence"],
        labels=row["labels"] or {},
        has_follow_up=row["follow_up"] is not None,
        progress=group_pb2.GroupProgress(
            total=total,
            done=row["done"],
            succeeded=row["succeeded"],
            failed=row["failed"],
            canceled=row["canceled"],
            running=row["running"],
            queued=row["queued"],
            percent=round(row["progress_sum"] / total, 2) if total else 0.0,
        ),
    )
    g.child_task_ids.extend(str(c) for c in child_ids)
    for name in ("created_at", "updated_at", "finished_at"):
        if row[name] is not None:
            set_ts(getattr(g, name), row[name])
    return g
