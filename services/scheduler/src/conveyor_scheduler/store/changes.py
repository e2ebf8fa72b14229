"""The unit of work of a state change: task rows, their events and outbox records in one transaction.

:class:`Changes` collects, within one transaction, the task rows that changed, their new events, the
outbox records, the waiting-counter deltas and the slots to free; :meth:`Changes.flush` writes them
with a few batched statements. Every state change of a task goes through :meth:`Changes.event`, which
bumps the task's ``last_sequence`` (under the row lock held by the caller), so sequences have no gaps.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from google.protobuf.message import Message
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from conveyor.events.v1 import events_pb2
from conveyor.tasks.v1 import task_pb2
from conveyor_common import topics
from conveyor_common.context import current_traceparent
from conveyor_common.ids import uuid7
from conveyor_common.randomness import rng
from conveyor_common.vocabulary import (
    SS_SUBMITTED,
    SS_SUBMITTING,
    SS_UNKNOWN,
    TERMINAL_EVENT_TYPES,
)
from conveyor_scheduler.client_webhooks.decide import PRESENCE
from conveyor_scheduler.store import models as m
from conveyor_scheduler.store.bulk import (
    _EVENTS_AND_OUTBOX_SQL,
    COLUMNS,
    EVENT_COLUMNS,
    INSERT_SQL,
    OUTBOX_COLUMNS,
    _params,
    raw_execute,
)
from conveyor_scheduler.store.convert import TaskRow, TrackedRow, event_proto

DEAD_LETTER_NS = uuid.UUID("5b0c7e52-3f39-4a53-9c43-0b7d1a0f2c11")
"""Namespace of the ce_id of a dead-letter copy (uuid5 of the event id: stable across retries)."""


MUTABLE = {
    "status": "smallint",
    "progress": "smallint",
    "attempt": "int",
    "attempt_base": "int",
    "max_attempts": "int",
    "generation": "int",
    "prediction_id": "text",
    "submit_state": "smallint",
    "submit_started_at": "timestamptz",
    "cancel_requested": "bool",
    "cancel_reason": "text",
    "run_deadline": "timestamptz",
    "not_before": "timestamptz",
    "updated_at": "timestamptz",
    "enqueued_at": "timestamptz",
    "dispatched_at": "timestamptz",
    "dispatch_emitted_at": "timestamptz",
    "started_at": "timestamptz",
    "finished_at": "timestamptz",
    "last_provider_update_at": "timestamptz",
    "result": "bytea",
    "error_code": "text",
    "error_message": "text",
    "error_retryable": "bool",
    "last_sequence": "bigint",
    "rank": "float8",
}


MUTABLE_COLUMNS = tuple(MUTABLE)
"""Columns a transition may change (``save`` writes them all, so one executemany fits every row)."""


_SAVE_CACHE: dict[frozenset[str], Any] = {}


def _save_sql(columns: tuple[str, ...]) -> Any:
    """``UPDATE tasks`` of ``columns`` for many rows in one statement (column arrays)."""
    key = frozenset(columns)
    sql = _SAVE_CACHE.get(key)
    if sql is None:
        sql = text(
            "UPDATE tasks AS t SET "
            + ", ".join(f"{c} = v.{c}" for c in columns)
            + " FROM unnest(CAST(:id AS uuid[]), "
            + ", ".join(f"CAST(:{c} AS {MUTABLE[c]}[])" for c in columns)
            + ") AS v(id, "
            + ", ".join(columns)
            + ") WHERE t.id = v.id"
        )
        _SAVE_CACHE[key] = sql
    return sql


def outbox_row(
    topic: str,
    key: str,
    message: Message | None,
    now: datetime,
    event_id: uuid.UUID | None = None,
    *,
    payload: bytes | None = None,
    ce_type: str | None = None,
    headers: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """An outbox row carrying ``message`` (or its ``payload`` bytes and ``ce_type``); its ce
    headers are completed by the relay."""
    if message is not None:
        payload = message.SerializeToString()
        ce_type = message.DESCRIPTOR.full_name
    return {
        "event_id": event_id or uuid7(),
        "topic": topic,
        "key": key,
        "ce_type": ce_type,
        "payload": payload,
        "headers": headers if headers is not None else ce_headers(now),
        "created_at": now,
    }


def ce_headers(now: datetime, traceparent: str | None = None) -> dict[str, Any]:
    """The ce headers an outbox row starts with (time and the trace: the task's, else the
    caller's)."""
    return {
        "ce_time": now.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "traceparent": traceparent or current_traceparent(),
    }


def _length_delimited(field_number: int, data: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2): tag, varint length, bytes."""
    out = bytearray()
    for value in ((field_number << 3) | 2, len(data)):
        while value >= 0x80:
            out.append((value & 0x7F) | 0x80)
            value >>= 7
        out.append(value)
    return bytes(out) + data


_STATE_CHANGED = events_pb2.TaskStateChanged.DESCRIPTOR.full_name


def state_changed_bytes(event_payload: bytes, previous_status: int, hint: bool = False) -> bytes:
    """A serialized TaskStateChanged from its serialized event, without parsing or copying it
    (``event = 1``, then ``previous_status = 2`` and ``webhook_deliveries = 3``: what
    SerializeToString writes)."""
    status = events_pb2.TaskStateChanged(
        previous_status=previous_status,  # type: ignore[arg-type]
        webhook_deliveries=hint,
    )
    return _length_delimited(1, event_payload) + status.SerializeToString()


_PAST_BEGIN = frozenset({SS_SUBMITTING, SS_UNKNOWN, SS_SUBMITTED})
"""Submit states of an attempt an adapter has begun to create: it left the dispatch window."""


@dataclass
class Changes:
    """What one transaction writes besides the task rows' own columns."""

    now: datetime
    dirty: dict[uuid.UUID, TaskRow] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    outbox: list[dict[str, Any]] = field(default_factory=list)
    waiting: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    free_slots: list[uuid.UUID] = field(default_factory=list)
    frees_window: bool = False
    """A freed attempt may have been awaiting an adapter (in the dispatch window): unless each
    one is known past its BeginSubmit, the window may have room."""
    new_event_types: list[int] = field(default_factory=list)
    origins: dict[uuid.UUID, tuple[int, int]] = field(default_factory=dict)
    """(status, progress) of each task with an event here, before its first one (0, 0 for a new
    task): the group aggregate applies the difference to each group's counters."""
    _headers: dict[str, Any] | None = field(default=None, repr=False)
    _task_headers: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)

    def touch(self, row: TaskRow) -> None:
        """Mark a row changed (saved by ``flush``)."""
        row["updated_at"] = self.now
        self.dirty[row["id"]] = row

    def event(self, row: TaskRow, event_type: int, previous_status: int) -> task_pb2.TaskEvent:
        """Append an event (and its TaskStateChanged record) with a snapshot of ``row`` now;
        returns the event."""
        self.touch(row)
        if row["id"] not in self.origins:
            # Before its first event: as loaded (a locked row), else new (SUBMITTED), else a queued
            # task (dispatch; a queued task's progress is always 0).
            self.origins[row["id"]] = (
                row.origin
                if isinstance(row, TrackedRow)
                else (0, 0)
                if previous_status == 0
                else (previous_status, 0)
            )
        row["last_sequence"] += 1
        event_id = uuid7()
        event = event_proto(row, event_type, event_id, self.now)
        payload = event.SerializeToString()
        self.events.append(
            {
                "task_id": row["id"],
                "sequence": row["last_sequence"],
                "event_id": event_id,
                "type": event_type,
                "generation": row["generation"],
                "terminal": event_type in TERMINAL_EVENT_TYPES,
                "occurred_at": self.now,
                "payload": payload,
                "tenant": row["tenant_id"],
                "hook": bool(row.get("webhook_url")),
            }
        )
        changed = state_changed_bytes(payload, previous_status, PRESENCE.hint(row))
        key = str(row["id"])
        headers = self._headers_for(row)
        for topic, ce_id in (
            ((topics.TASK_EVENTS, event_id),)
            if event_type != 10
            else (  # DEAD_LETTERED: also to the operators' dead-letter topic
                (topics.TASK_EVENTS, event_id),
                (topics.TASK_DEAD_LETTER, uuid.uuid5(DEAD_LETTER_NS, str(event_id))),
            )
        ):
            self.outbox.append(
                outbox_row(
                    topic,
                    key,
                    None,
                    self.now,
                    ce_id,
                    payload=changed,
                    ce_type=_STATE_CHANGED,
                    headers=headers,
                )
            )
        self.new_event_types.append(event_type)
        return event

    def command(self, row: TaskRow, message: Message) -> None:
        """Append a provider command (DispatchTask, CancelTask) keyed by the task id."""
        self.outbox.append(
            outbox_row(
                topics.PROVIDER_COMMANDS,
                str(row["id"]),
                message,
                self.now,
                headers=self._headers_for(row),
            )
        )

    def _headers_for(self, row: TaskRow) -> dict[str, Any]:
        """The ce headers of a task's records: the transaction's time and the task's trace (the
        one it was submitted under), one dict per trace and transaction."""
        trace = row.get("traceparent")
        if trace is None:
            if self._headers is None:
                self._headers = ce_headers(self.now)
            return self._headers
        headers = self._task_headers.get(trace)
        if headers is None:
            headers = self._task_headers[trace] = ce_headers(self.now, trace)
        return headers

    def free_slot(self, row: TaskRow) -> None:
        """The provider side of ``row``'s attempt is terminal: release its slots."""
        self.free_slots.append(row["id"])
        if row["submit_state"] not in _PAST_BEGIN:
            self.frees_window = True

    async def flush(
        self,
        conn: AsyncConnection,
        *,
        save: bool = True,
        leave_pipeline: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Write everything collected (task rows unless ``save`` is False).

        With ``leave_pipeline`` (the caller holds ``conn`` in psycopg's pipeline mode, see
        ``store.bulk.pipelined``) the statements go out through ``raw_execute`` without waiting for
        their results: they travel with the commit. The group aggregate, written with SQLAlchemy,
        leaves the pipeline first.
        """
        piped = leave_pipeline is not None

        async def run(statement: Any, params: dict[str, Any]) -> None:
            if piped:
                await raw_execute(conn, statement, params, fetch=False)
            else:
                await conn.execute(statement, params)

        if save and self.dirty:
            rows = list(self.dirty.values())
            changed: set[str] = set()
            for r in rows:
                changed |= r.changed if isinstance(r, TrackedRow) else set(MUTABLE)
            columns = tuple(c for c in MUTABLE if c in changed)
            params: dict[str, Any] = {"id": [r["id"] for r in rows]}
            for c in columns:
                params[c] = [r[c] for r in rows]
            await run(_save_sql(columns), params)
        if self.free_slots:
            await run(_FREE_SLOTS_SQL, {"ids": self.free_slots})
        if piped:
            tenants, shard = waiting_updates(self.waiting)
            for params in tenants:
                await run(_TENANT_WAITING_SQL, params)
            if shard is not None:
                await run(_SHARD_WAITING_SQL, shard)
        else:
            await adjust_waiting(conn, self.waiting)
        if self.events and self.outbox:
            await run(
                _EVENTS_AND_OUTBOX_SQL,
                _params(self.events, EVENT_COLUMNS, "e_")
                | _params(self.outbox, OUTBOX_COLUMNS, "o_")
                | {
                    "e_tenant": [e["tenant"] for e in self.events],
                    "e_hook": [e["hook"] for e in self.events],
                },
            )
        else:
            for table, rows_ in (("task_events", self.events), ("outbox", self.outbox)):
                if rows_:
                    await run(INSERT_SQL[table], _params(rows_, COLUMNS[table]))
        if any(r.get("group_id") is not None for r in self.dirty.values()):
            from conveyor_scheduler.groups.aggregate import on_flush  # task groups' aggregate

            if leave_pipeline is not None:
                await leave_pipeline()
            await on_flush(conn, self)


_FREE_SLOTS_SQL = text("DELETE FROM active_slots WHERE task_id = ANY(CAST(:ids AS uuid[]))")
_TENANT_WAITING_SQL = text("UPDATE tenants SET waiting = waiting + :d WHERE tenant_id = :t")
_SHARD_WAITING_SQL = text("UPDATE queue_counters SET waiting = waiting + :d WHERE shard = :s")


def waiting_updates(
    deltas: dict[str, int],
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The parameters of :func:`adjust_waiting`'s statements: the tenants' in sorted order, then
    one shard's (None when the deltas sum to zero)."""
    items = sorted((t, d) for t, d in deltas.items() if d)
    total = sum(d for _, d in items)
    shard = {"d": total, "s": rng.randrange(m.QUEUE_SHARDS)} if total else None
    return [{"t": t, "d": d} for t, d in items], shard


async def adjust_waiting(conn: AsyncConnection, deltas: dict[str, int]) -> None:
    """Apply waiting-count deltas to the tenants' counters and one global shard.

    Tenant rows are updated in sorted order so two transactions touching several tenants cannot
    deadlock; every writer takes task rows first, then tenant rows, then one shard row.
    """
    tenants, shard = waiting_updates(deltas)
    if tenants:
        await conn.execute(_TENANT_WAITING_SQL, tenants)
    if shard is not None:
        await conn.execute(_SHARD_WAITING_SQL, shard)
