"""Batched SQL: new task rows, events, outbox records and slots written in a few statements.

``unnest`` INSERTs with one array per column (a value shared by every row is sent once), raw psycopg
statements in pipeline mode for the hot paths, and cached statement texts per shape.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from psycopg.rows import dict_row
from sqlalchemy import TextClause, text
from sqlalchemy.ext.asyncio import AsyncConnection

from conveyor_common.randomness import rng
from conveyor_scheduler.client_webhooks.decide import (
    TASK_ENDPOINTS_SQL,
    deliveries_sql,
    task_endpoints_params,
)
from conveyor_scheduler.store import models as m
from conveyor_scheduler.store.convert import TaskRow

if TYPE_CHECKING:
    from conveyor_scheduler.store.changes import Changes

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
    f"WITH e AS ({_unnest_insert('task_events', EVENT_COLUMNS, 'e_')}), "
    f"o AS ({_unnest_insert('outbox', OUTBOX_COLUMNS, 'o_')}), "
    "ev AS (SELECT * FROM unnest(CAST(:e_task_id AS uuid[]), CAST(:e_sequence AS bigint[]),"
    " CAST(:e_event_id AS uuid[]), CAST(:e_type AS smallint[]), CAST(:e_terminal AS bool[]),"
    " CAST(:e_payload AS bytea[]), CAST(:e_tenant AS text[]), CAST(:e_hook AS bool[]))"
    " AS ev(task_id, sequence, event_id, type, terminal, payload, tenant, hook)) "
    + deliveries_sql("ev")
)
"""Events, their outbox records and their client webhook deliveries in one round trip."""


_BIND = re.compile(r"(?<![:\w\\]):(\w+)(?!:)")
_RAW_SQL: dict[str, str] = {}


def _raw_sql(statement: TextClause) -> str:
    sql = _RAW_SQL.get(statement.text)
    if sql is None:
        if "%" in statement.text:
            raise ValueError("raw_execute: statements may not contain %")
        sql = _BIND.sub(r"%(\1)s", statement.text)
        _RAW_SQL[statement.text] = sql
    return sql


async def raw_mappings(
    conn: AsyncConnection,
    statement: TextClause,
    params: dict[str, Any],
    *,
    generic_plans: bool = False,
) -> list[dict[str, Any]]:
    """:func:`raw_execute` returning the rows as dicts (what ``result.mappings()`` gives). With
    ``generic_plans`` the statement goes out after a ``SET LOCAL plan_cache_mode`` in one round trip
    (and the rest of the transaction keeps generic plans)."""
    raw = await conn.get_raw_connection()
    driver: Any = raw.driver_connection
    cursor = driver.cursor(row_factory=dict_row)
    if generic_plans:
        async with driver.pipeline():
            await driver.execute(GENERIC_PLANS)
            await cursor.execute(_raw_sql(statement), params)
    else:
        await cursor.execute(_raw_sql(statement), params)
    rows: list[dict[str, Any]] = await cursor.fetchall()
    return rows


async def raw_dict_cursor(
    conn: AsyncConnection, statement: TextClause, params: dict[str, Any]
) -> Any:
    """:func:`raw_cursor` with rows as dicts (in pipeline mode: sent, its rows read later)."""
    driver: Any = (await conn.get_raw_connection()).driver_connection
    cursor = driver.cursor(row_factory=dict_row)
    await cursor.execute(_raw_sql(statement), params)
    return cursor


async def raw_cursor(conn: AsyncConnection, statement: TextClause, params: dict[str, Any]) -> Any:
    """Send a ``text()`` statement straight on the psycopg connection of ``conn``; returns its
    cursor (in pipeline mode its rows can be fetched once the pipeline synchronized)."""
    driver: Any = (await conn.get_raw_connection()).driver_connection
    return await driver.execute(_raw_sql(statement), params)


async def raw_execute(
    conn: AsyncConnection, statement: TextClause, params: dict[str, Any], *, fetch: bool = True
) -> list[tuple[Any, ...]]:
    """Run a ``text()`` statement straight on the psycopg connection of ``conn`` (same
    transaction), skipping SQLAlchemy's per-statement work; for the submit hot path.

    ``:name`` binds become ``%(name)s`` (the text must contain no other ``%``). With ``fetch`` the
    rows come back as tuples; without, nothing is read, so in pipeline mode the statement travels
    with the next synchronization (the commit) and its error, if any, is raised there.
    """
    cursor = await raw_cursor(conn, statement, params)
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
    endpoints = task_endpoints_params(rows)
    if endpoints is not None:  # the tasks' own webhooks, before their first event
        await raw_execute(conn, TASK_ENDPOINTS_SQL, endpoints, fetch=False)
    counter = bool(queue_shard_delta)
    if counter:
        params |= {"q_d": queue_shard_delta, "q_s": rng.randrange(m.QUEUE_SHARDS)}
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
        sql = text(
            f"WITH t AS ({t} RETURNING id, tenant_id, webhook_url),"
            f" e AS ({e} RETURNING task_id, sequence, event_id, type, terminal, payload),"
            f" o AS ({o}),"
            " ev AS (SELECT e.task_id, e.sequence, e.event_id, e.type, e.terminal, e.payload,"
            " t.tenant_id AS tenant, t.webhook_url IS NOT NULL AS hook"
            " FROM e JOIN t ON t.id = e.task_id),"
            f" d AS ({deliveries_sql('ev')}) {tail}"
        )
        if len(_NEW_TASKS_SQL) >= _NEW_TASKS_SQL_MAX:
            _NEW_TASKS_SQL.clear()
        _NEW_TASKS_SQL[key] = sql
    await raw_execute(conn, sql, params, fetch=False)
    changes.dirty.clear()
    changes.events.clear()
    changes.outbox.clear()


INSERT_SQL = {
    "task_events": _unnest_insert_sql("task_events", EVENT_COLUMNS),
    "outbox": _unnest_insert_sql("outbox", OUTBOX_COLUMNS),
    "active_slots": _unnest_insert_sql("active_slots", SLOT_COLUMNS),
}
COLUMNS = {"task_events": EVENT_COLUMNS, "outbox": OUTBOX_COLUMNS, "active_slots": SLOT_COLUMNS}


async def insert_rows(
    conn: AsyncConnection, table: str, rows: list[dict[str, Any]], *, raw: bool = False
) -> None:
    """Multi-row INSERT through ``unnest`` of column arrays (one statement, typed arrays);
    ``raw``: through :func:`raw_execute`, not waiting for it (pipeline mode)."""
    if not rows:
        return
    if raw:
        await raw_execute(conn, INSERT_SQL[table], _params(rows, COLUMNS[table]), fetch=False)
    else:
        await conn.execute(INSERT_SQL[table], _params(rows, COLUMNS[table]))


GENERIC_PLANS = "SET LOCAL plan_cache_mode = force_generic_plan"
"""Generic plans for the rest of the transaction (the session default is custom plans, db.py)."""
CUSTOM_PLANS = "SET LOCAL plan_cache_mode = force_custom_plan"
"""Custom plans again for the rest of the transaction (the dispatcher's LATERAL candidate reads)."""


async def plans_within(conn: AsyncConnection, *, generic: bool) -> None:
    """Generic or custom plans for the statements that follow in the transaction open on ``conn``:
    queued with them inside :func:`pipeline_within` (no round trip of its own there)."""
    driver: Any = (await conn.get_raw_connection()).driver_connection
    await driver.execute(GENERIC_PLANS if generic else CUSTOM_PLANS)


Outer = Callable[[], Awaitable[None]] | None
"""The ``leave`` of a caller's :func:`pipelined` transaction, or None (see :func:`pipeline_within`)."""


@contextlib.asynccontextmanager
async def pipeline_within(
    conn: AsyncConnection,
    *,
    generic_plans: bool = False,
    outer: Outer = None,
) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """psycopg's pipeline mode inside the transaction open on ``conn``; yields ``leave`` (as
    :func:`pipelined`). The statements sent through :func:`raw_execute` without ``fetch`` go out
    together and are synchronized once on exit (their first error raised there); the caller
    commits after it, so the tail of a transaction costs two round trips, not one per statement.
    With ``generic_plans`` the rest of the transaction uses generic plans (as :func:`pipelined`;
    the foreign-key checks of its inserts too, which a custom plan re-plans at every row).
    ``outer``: the ``leave`` of the caller's :func:`pipelined` transaction, yielded as it is: the
    statements are not synchronized here but travel with that transaction's commit.
    """
    if outer is not None:
        yield outer
        return
    driver: Any = (await conn.get_raw_connection()).driver_connection
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(driver.pipeline())
        piped = True
        if generic_plans:
            await driver.execute(GENERIC_PLANS)

        async def leave() -> None:
            nonlocal piped
            if piped:
                piped = False
                await stack.aclose()

        yield leave


async def commit_raw(conn: AsyncConnection) -> None:
    """COMMIT the transaction open on ``conn`` on its psycopg connection. Inside
    :func:`pipeline_within` it travels with the closing Sync, so the statements before it and the
    commit cost one round trip; SQLAlchemy's own commit afterwards finds nothing left to do."""
    driver: Any = (await conn.get_raw_connection()).driver_connection
    await driver.execute("COMMIT")


@contextlib.asynccontextmanager
async def pipelined(conn: AsyncConnection) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """One transaction on ``conn`` in psycopg's pipeline mode (submits, the outbox relay); yields
    ``leave``.

    BEGIN travels with the first statement, the last statement with COMMIT and the closing Sync,
    so the common path costs a round trip per statement whose result it needs, plus none. The
    statements are prepared; with their array parameters PostgreSQL would plan them again at every
    execution (a custom plan each time: about a quarter of its CPU per group, measured), so the
    transaction asks for generic plans. A slow path awaits ``leave`` before any SQLAlchemy
    statement (SQLAlchemy cannot read results in pipeline mode) and then commits as usual. An
    exception rolls everything back.
    """
    driver: Any = (await conn.get_raw_connection()).driver_connection
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(driver.pipeline())
        piped = True
        await driver.execute(GENERIC_PLANS)

        async def leave() -> None:
            nonlocal piped
            if piped:
                piped = False
                await stack.aclose()

        yield leave
        if piped:
            await driver.execute("COMMIT")  # sent with the Sync when the pipeline closes
            await stack.aclose()
        else:
            await driver.commit()
    if conn.in_transaction():  # SQLAlchemy's own bookkeeping of a slow path's statements
        await conn.commit()
