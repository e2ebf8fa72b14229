"""Writing task events and Kafka records in the transaction of the state change (outbox).

:class:`Changes` collects, within one transaction, the task rows that changed, their new events, the
outbox records, the waiting-counter deltas and the slots to free; :meth:`Changes.flush` writes them
with a few batched statements. Every state change of a task goes through :meth:`Changes.event`, which
bumps the task's ``last_sequence`` (under the row lock held by the caller), so sequences have no gaps.
"""

from __future__ import annotations

import json
import random
import re
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from google.protobuf.message import Message
from sqlalchemy import TextClause, delete, text
from sqlalchemy.ext.asyncio import AsyncConnection

from conveyor.events.v1 import events_pb2
from conveyor.tasks.v1 import task_pb2
from conveyor_common import topics
from conveyor_common.context import current_traceparent
from conveyor_common.ids import uuid7
from conveyor_scheduler import models as m
from conveyor_scheduler.convert import TERMINAL_EVENT_TYPES, TaskRow, TrackedRow, event_proto

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


EVENT_COLUMNS = {
    "task_id": "uuid",
    "sequence": "bigint",
    "event_id": "uuid",
    "type": "smallint",
    "generation": "int",
    "terminal": "bool",
    "occurred_at": "timestamptz",
    "payload": "bytea",
}
OUTBOX_COLUMNS = {
    "event_id": "uuid",
    "topic": "text",
    "key": "text",
    "ce_type": "text",
    "payload": "bytea",
    "headers": "jsonb",
    "created_at": "timestamptz",
}
SLOT_COLUMNS = {
    "task_id": "uuid",
    "tenant_id": "text",
    "model": "text",
    "kind": "smallint",
    "cost": "smallint",
    "provider": "text",
    "attempt": "int",
    "acquired_at": "timestamptz",
}


def _unnest_insert(table: str, columns: dict[str, str], prefix: str = "") -> str:
    casts = ", ".join(
        f"CAST(CAST(:{prefix}{c} AS text[]) AS jsonb[])"
        if typ == "jsonb"
        else f"CAST(:{prefix}{c} AS {typ}[])"
        for c, typ in columns.items()
    )
    return f"INSERT INTO {table} ({', '.join(columns)}) SELECT * FROM unnest({casts})"


def _unnest_insert_sql(table: str, columns: dict[str, str]) -> Any:
    return text(_unnest_insert(table, columns))


def _params(
    rows: list[dict[str, Any]], columns: dict[str, str], prefix: str = ""
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for c, typ in columns.items():
        if typ != "jsonb":
            out[prefix + c] = [r[c] for r in rows]
            continue
        dumped: dict[int, str] = {}  # rows of one transaction share their headers object
        values = []
        for r in rows:
            v = r[c]
            text_value = dumped.get(id(v))
            if text_value is None:
                text_value = dumped[id(v)] = json.dumps(v)
            values.append(text_value)
        out[prefix + c] = values
    return out


_EVENTS_AND_OUTBOX_SQL = text(
    f"WITH e AS ({_unnest_insert('task_events', EVENT_COLUMNS, 'e_')}) "
    + _unnest_insert("outbox", OUTBOX_COLUMNS, "o_")
)
"""Events and their outbox records in one round trip."""


_BIND = re.compile(r"(?<![:\w\\]):(\w+)(?!:)")
_RAW_SQL: dict[str, str] = {}


async def raw_execute(
    conn: AsyncConnection, statement: TextClause, params: dict[str, Any], *, fetch: bool = True
) -> list[tuple[Any, ...]]:
    """Run a ``text()`` statement straight on the psycopg connection of ``conn`` (same
    transaction), skipping SQLAlchemy's per-statement work; for the submit hot path.

    ``:name`` binds become ``%(name)s`` (the text must contain no other ``%``). With ``fetch`` the
    rows come back as tuples; without, nothing is read, so in pipeline mode the statement travels
    with the next synchronization (the commit) and its error, if any, is raised there.
    """
    sql = _RAW_SQL.get(statement.text)
    if sql is None:
        if "%" in statement.text:
            raise ValueError("raw_execute: statements may not contain %")
        sql = _BIND.sub(r"%(\1)s", statement.text)
        _RAW_SQL[statement.text] = sql
    raw = await conn.get_raw_connection()
    driver: Any = raw.driver_connection
    cursor = await driver.execute(sql, params)
    if not fetch:
        return []
    rows: list[tuple[Any, ...]] = await cursor.fetchall()
    return rows


def _task_column_types() -> dict[str, str]:
    from sqlalchemy.dialects import postgresql

    dialect: Any = postgresql.dialect()  # type: ignore[no-untyped-call]
    return {c.name: str(c.type.compile(dialect=dialect)).lower() for c in m.Task.__table__.columns}


TASK_COLUMNS = _task_column_types()
"""Every column of ``tasks`` with its PostgreSQL type (from the model)."""
_NEW_TASKS_SQL: dict[tuple[Any, ...], Any] = {}
_NEW_TASKS_SQL_MAX = 256


def _via_text(typ: str) -> bool:
    """jsonb and array values travel as text (unnest of a 2-D array would flatten it)."""
    return typ == "jsonb" or typ.endswith("[]")


def _text_value(typ: str, value: Any) -> Any:
    if value is None:
        return None
    if typ == "jsonb":
        return json.dumps(value)
    return "{" + ",".join(str(int(v)) for v in value) + "}"  # integer arrays only


def _folded_params(
    types: dict[str, str], prefix: str, columns: dict[str, list[Any]]
) -> tuple[tuple[tuple[str, bool], ...], dict[str, Any]]:
    """Parameters of a multi-row insert from column lists: a column whose value is the same in
    every row is ONE scalar parameter, the others are arrays (dumping an array costs per element).
    The first column is always an array (it sets the row count). Returns (shape, parameters)."""
    shape: list[tuple[str, bool]] = []
    params: dict[str, Any] = {}
    first = True
    for c, values in columns.items():
        typ = types[c]
        scalar = not first and values.count(values[0]) == len(values)
        first = False
        if typ == "jsonb" or typ.endswith("[]"):
            params[prefix + c] = (
                _text_value(typ, values[0]) if scalar else [_text_value(typ, v) for v in values]
            )
        else:
            params[prefix + c] = values[0] if scalar else values
        shape.append((c, scalar))
    return tuple(shape), params


def _folded_sql(table: str, types: dict[str, str], prefix: str, shape: Any) -> str:
    """``INSERT INTO table ... SELECT ... FROM unnest(...)`` for a shape of :func:`_folded_params`."""
    arrays = [c for c, scalar in shape if not scalar]
    args = ", ".join(
        f"CAST(:{prefix}{c} AS {'text' if _via_text(types[c]) else types[c]}[])" for c in arrays
    )
    select = []
    for c, scalar in shape:
        typ = types[c]
        if scalar:
            source = f"CAST(:{prefix}{c} AS text)" if _via_text(typ) else f":{prefix}{c}"
        else:
            source = f"u.{c}"
        select.append(f"CAST({source} AS {typ})" if scalar or _via_text(typ) else source)
    return (
        f"INSERT INTO {table} ({', '.join(c for c, _ in shape)}) SELECT {', '.join(select)}"
        f" FROM unnest({args}) AS u({', '.join(arrays)})"
    )


async def insert_new_tasks(
    conn: AsyncConnection, rows: list[TaskRow], changes: Changes, *, queue_shard_delta: int = 0
) -> None:
    """New task rows, their events and outbox records in one round trip (and, when
    ``queue_shard_delta`` is set, that many more waiting tasks on a random queue-counter shard).

    ``changes`` must hold only the rows' SUBMITTED events (nothing to save, no slots, no waiting
    deltas): the submit paths' shape. Columns that are NULL in every row are left to the default;
    a value shared by every row travels once (:func:`_folded_insert`).
    """
    if changes.free_slots or any(changes.waiting.values()):
        raise ValueError("insert_new_tasks writes new tasks and their events only")
    task_columns: dict[str, list[Any]] = {"id": [r["id"] for r in rows]}
    for c in TASK_COLUMNS:
        if c != "id":
            values = [r.get(c) for r in rows]
            if values.count(None) != len(values):
                task_columns[c] = values
    tables = (
        ("tasks", TASK_COLUMNS, "t_", task_columns),
        (
            "task_events",
            EVENT_COLUMNS,
            "e_",
            {c: [e[c] for e in changes.events] for c in EVENT_COLUMNS},
        ),
        (
            "outbox",
            OUTBOX_COLUMNS,
            "o_",
            {c: [o[c] for o in changes.outbox] for c in OUTBOX_COLUMNS},
        ),
    )
    params: dict[str, Any] = {}
    shapes = []
    for _, types, prefix, columns in tables:
        shape, part = _folded_params(types, prefix, columns)
        shapes.append(shape)
        params |= part
    counter = bool(queue_shard_delta)
    if counter:
        params |= {"q_d": queue_shard_delta, "q_s": random.randrange(m.QUEUE_SHARDS)}
    key = (*shapes, counter)
    sql = _NEW_TASKS_SQL.get(key)
    if sql is None:
        t, e, o = (
            _folded_sql(table, types, prefix, shape)
            for (table, types, prefix, _), shape in zip(tables, shapes, strict=True)
        )
        tail = (
            "UPDATE queue_counters SET waiting = waiting + :q_d WHERE shard = :q_s"
            if counter
            else "SELECT 1"
        )
        sql = text(f"WITH t AS ({t}), e AS ({e}), o AS ({o}) {tail}")
        if len(_NEW_TASKS_SQL) >= _NEW_TASKS_SQL_MAX:
            _NEW_TASKS_SQL.clear()
        _NEW_TASKS_SQL[key] = sql
    await raw_execute(conn, sql, params, fetch=False)
    changes.dirty.clear()
    changes.events.clear()
    changes.outbox.clear()


_INSERT_SQL = {
    "task_events": _unnest_insert_sql("task_events", EVENT_COLUMNS),
    "outbox": _unnest_insert_sql("outbox", OUTBOX_COLUMNS),
    "active_slots": _unnest_insert_sql("active_slots", SLOT_COLUMNS),
}
_COLUMNS = {"task_events": EVENT_COLUMNS, "outbox": OUTBOX_COLUMNS, "active_slots": SLOT_COLUMNS}


async def insert_rows(conn: AsyncConnection, table: str, rows: list[dict[str, Any]]) -> None:
    """Multi-row INSERT through ``unnest`` of column arrays (one statement, typed arrays)."""
    if not rows:
        return
    await conn.execute(_INSERT_SQL[table], _params(rows, _COLUMNS[table]))


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


def state_changed_bytes(event_payload: bytes, previous_status: int) -> bytes:
    """A serialized TaskStateChanged from its serialized event, without parsing or copying it
    (``event = 1`` then ``previous_status = 2``: what SerializeToString writes)."""
    status = events_pb2.TaskStateChanged(previous_status=previous_status)  # type: ignore[arg-type]
    return _length_delimited(1, event_payload) + status.SerializeToString()


@dataclass
class Changes:
    """What one transaction writes besides the task rows' own columns."""

    now: datetime
    dirty: dict[uuid.UUID, TaskRow] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    outbox: list[dict[str, Any]] = field(default_factory=list)
    waiting: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    free_slots: list[uuid.UUID] = field(default_factory=list)
    new_event_types: list[int] = field(default_factory=list)
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
            }
        )
        changed = state_changed_bytes(payload, previous_status)
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

    async def flush(self, conn: AsyncConnection, *, save: bool = True) -> None:
        """Write everything collected (task rows unless ``save`` is False)."""
        if save and self.dirty:
            rows = list(self.dirty.values())
            changed: set[str] = set()
            for r in rows:
                changed |= r.changed if isinstance(r, TrackedRow) else set(MUTABLE)
            columns = tuple(c for c in MUTABLE if c in changed)
            params: dict[str, Any] = {"id": [r["id"] for r in rows]}
            for c in columns:
                params[c] = [r[c] for r in rows]
            await conn.execute(_save_sql(columns), params)
        if self.free_slots:
            await conn.execute(
                delete(m.ActiveSlot).where(m.ActiveSlot.task_id.in_(self.free_slots))
            )
        await adjust_waiting(conn, self.waiting)
        if self.events and self.outbox:
            await conn.execute(
                _EVENTS_AND_OUTBOX_SQL,
                _params(self.events, EVENT_COLUMNS, "e_")
                | _params(self.outbox, OUTBOX_COLUMNS, "o_"),
            )
        else:
            await insert_rows(conn, "task_events", self.events)
            await insert_rows(conn, "outbox", self.outbox)
        if any(r.get("group_id") is not None for r in self.dirty.values()):
            from conveyor_scheduler.groups.store import on_flush  # task groups' aggregate

            await on_flush(conn, self)


async def adjust_waiting(conn: AsyncConnection, deltas: dict[str, int]) -> None:
    """Apply waiting-count deltas to the tenants' counters and one global shard.

    Tenant rows are updated in sorted order so two transactions touching several tenants cannot
    deadlock; every writer takes task rows first, then tenant rows, then one shard row.
    """
    items = sorted((t, d) for t, d in deltas.items() if d)
    if not items:
        return
    await conn.execute(
        text("UPDATE tenants SET waiting = waiting + :d WHERE tenant_id = :t"),
        [{"t": t, "d": d} for t, d in items],
    )
    total = sum(d for _, d in items)
    if total:
        await conn.execute(
            text("UPDATE queue_counters SET waiting = waiting + :d WHERE shard = :s"),
            {"d": total, "s": random.randrange(m.QUEUE_SHARDS)},
        )
