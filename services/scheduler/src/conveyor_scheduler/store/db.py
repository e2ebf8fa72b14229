"""Engine, migrations and the schema check.

The service never migrates on start: ``python -m conveyor_scheduler migrate`` (a Kubernetes Job) runs
``alembic upgrade head``; ``serve`` checks that the database is at head and refuses to start
otherwise, so an old replica never writes to a schema it does not know and a new one never runs on a
schema that lacks its columns.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path
from typing import Any

import psycopg
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from psycopg import pq
from psycopg.types.array import ListBinaryDumper
from sqlalchemy import MetaData, event
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from conveyor_scheduler.metrics import DatabasePoolMetrics
from conveyor_scheduler.settings import to_libpq_url, to_sqlalchemy_url
from conveyor_scheduler.store.models import Base

PG_OPTIONS = "-c timezone=UTC -c plan_cache_mode=force_custom_plan"
"""Session options. Custom plans by default: psycopg prepares a statement after a few executions, and
a generic plan of the dispatcher's LATERAL candidate query (array parameters, per-tenant LIMIT) was
measured 30-100x slower than its custom plan. The hot writes ask for generic plans for their
transaction (``store.bulk.GENERIC_PLANS``: the pipelined transactions, the dispatch's writes), which
their foreign-key checks then use too instead of planning each checked row again; so do the dispatch
cycle's small reads, switching back to custom plans for its candidate reads (``dispatch.cycle``)."""


def _keep() -> bool:
    return False


class KeepPreparedConnection(psycopg.AsyncConnection[Any]):
    """A psycopg connection whose prepared statements outlive a clean rollback.

    psycopg forgets every statement it prepared on the session (and sends ``DEALLOCATE ALL``) at
    each ROLLBACK, in case the rollback undid DDL they depended on. The scheduler runs no DDL on
    these connections (migrations have their own), and SQLAlchemy ends every transaction that did
    not commit with a rollback: the periodic reads (group progress, presence, sweeps) wiped a pooled
    connection's statements about twice a second, so the hot statements kept running unprepared
    and were planned again at each execution (a third of PostgreSQL's statements planned, measured
    at full load). A rollback after an error (or inside a pipeline) still forgets them all: a
    statement whose preparation the error skipped must not be taken for prepared. So does the one
    after a migration changed a table under a running replica: its prepared ``SELECT *`` fails once
    ("cached plan must not change result type"), as it could before, and is prepared again after.
    """

    async def rollback(self) -> None:
        pg = self.pgconn
        # psycopg's prepared-statement manager is private: without it (another psycopg) this is
        # psycopg's own rollback, and tests/integration/test_scheduler_prepared_statements.py fails.
        manager: Any = getattr(self, "_prepared", None)
        if (
            pg.transaction_status != pq.TransactionStatus.INTRANS
            or pg.pipeline_status != pq.PipelineStatus.OFF
            or not callable(getattr(manager, "clear", None))
        ):
            await super().rollback()
            return
        manager.clear = _keep
        try:
            await super().rollback()
        finally:
            del manager.clear


def async_engine(url: str, *, options: str, application_name: str, **kw: Any) -> AsyncEngine:
    """``create_async_engine`` on :class:`KeepPreparedConnection` connections with the session
    ``options`` and ``application_name``, list parameters sent in binary (:func:`binary_arrays`)."""
    conninfo = to_libpq_url(url)

    async def connect() -> KeepPreparedConnection:
        return await KeepPreparedConnection.connect(
            conninfo, options=options, application_name=application_name
        )

    return binary_arrays(create_async_engine(to_sqlalchemy_url(url), async_creator=connect, **kw))


class SchemaNotAtHead(RuntimeError):
    """The database's alembic revision is not the code's head."""


def target_metadata() -> MetaData:
    """The full metadata: core models plus the webhook models (same Base)."""
    importlib.import_module("conveyor_scheduler.store.control_models")
    importlib.import_module("conveyor_scheduler.client_webhooks.models")
    importlib.import_module("conveyor_scheduler.groups.models")
    return Base.metadata


def alembic_ini_path() -> Path:
    """``services/scheduler/alembic.ini`` (source tree) or the copy packaged in the wheel."""
    package = Path(__file__).resolve().parents[1]  # conveyor_scheduler/
    for candidate in (package.parents[1] / "alembic.ini", package / "_alembic" / "alembic.ini"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("alembic.ini of the scheduler not found")


def alembic_config(url: str) -> Config:
    """An alembic Config pointing at the scheduler's migrations and ``url``."""
    cfg = Config(str(alembic_ini_path()))
    cfg.attributes["sqlalchemy.url"] = to_sqlalchemy_url(url)
    return cfg


def migrate(url: str, revision: str = "head") -> None:
    """``alembic upgrade <revision>`` (blocking: call from a thread inside an event loop)."""
    command.upgrade(alembic_config(url), revision)


def head_revisions() -> set[str]:
    """The code's head revision(s)."""
    script = ScriptDirectory.from_config(alembic_config("postgresql://unused/x"))
    return set(script.get_heads())


def _current(connection: Connection) -> set[str]:
    return set(MigrationContext.configure(connection).get_current_heads())


async def check_schema(engine: AsyncEngine) -> None:
    """Raise :class:`SchemaNotAtHead` unless the database is at the code's head."""
    async with engine.connect() as conn:
        current = await conn.run_sync(_current)
    heads = head_revisions()
    if current != heads:
        raise SchemaNotAtHead(
            f"database schema is at {sorted(current) or 'nothing'}, code expects {sorted(heads)}: "
            "run `python -m conveyor_scheduler migrate` first"
        )


def binary_arrays(engine: AsyncEngine) -> AsyncEngine:
    """Send list parameters (the column arrays of the batched writes) in binary format.

    psycopg's text array dumper quotes every element through regular expressions, which was the
    largest Python cost of the batched writes; the binary dumper copies values as they are.
    """

    @event.listens_for(engine.sync_engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.driver_connection.adapters.register_dumper(list, ListBinaryDumper)

    return engine


def lease_options(idle_transaction_seconds: float, lease_seconds: float | None = None) -> str:
    """Session options bounding how long a stalled client holds what it holds: a transaction
    idle ``idle_transaction_seconds`` is aborted (its row locks released), and with
    ``lease_seconds`` (the leader's connection) a session idle that long is ended, releasing its
    advisory lock."""
    options = (
        f" -c idle_in_transaction_session_timeout={max(1, int(idle_transaction_seconds * 1000))}"
    )
    if lease_seconds is not None:
        options += f" -c idle_session_timeout={max(1, int(lease_seconds * 1000))}"
    return options


PING_IDLE_SECONDS = 1.0
"""A pooled connection idle at least this long is pinged before it is handed out."""

_CHECKED_IN = "conveyor_checked_in"


def ping_when_idle(engine: AsyncEngine, idle_s: float = PING_IDLE_SECONDS) -> AsyncEngine:
    """Ping a pooled connection on checkout only when it sat idle ``idle_s`` or longer.

    ``pool_pre_ping`` pings on every checkout: a round trip and a server transaction before each of
    ours, about half of all the transactions PostgreSQL ran per task (measured). A connection
    checked in moments ago is alive as far as a ping can tell, so only an idle one is pinged (a
    failed ping replaces it before use, as with ``pool_pre_ping``). A connection the server dropped
    within ``idle_s`` of its last use fails its next statement once; SQLAlchemy then invalidates
    the whole pool, and the caller's error is the retryable one every database fault already is
    (UNAVAILABLE at the RPCs, a retried pass in the loops)."""
    pool = engine.sync_engine.pool
    dialect = engine.sync_engine.dialect

    @event.listens_for(pool, "checkin")
    def _checkin(_dbapi_connection: Any, record: Any) -> None:
        record.info[_CHECKED_IN] = time.monotonic()

    @event.listens_for(pool, "checkout")
    def _checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        checked_in = record.info.get(_CHECKED_IN)
        if checked_in is None or time.monotonic() - checked_in < idle_s:
            return  # just connected, or used moments ago
        try:
            dialect.do_ping(dbapi_connection)
        except Exception as exc:
            raise DisconnectionError("idle connection failed its ping") from exc

    return engine


def create_engine(
    url: str,
    *,
    pool_size: int = 10,
    idle_transaction_seconds: float | None = None,
    pool_metrics: DatabasePoolMetrics | None = None,
    ping_idle_seconds: float = PING_IDLE_SECONDS,
) -> AsyncEngine:
    """Async engine (psycopg 3) with a sized pool, UTC sessions, binary arrays, and a ping of
    connections idle ``ping_idle_seconds`` (:func:`ping_when_idle`). The pool hands out its most
    recently used connection (LIFO): first in, first out rotated through every pooled connection,
    so at a moderate load each sat idle past the threshold and most checkouts paid a ping (1,500
    pings in a 25 s run at 100 tasks/s, 42 with LIFO; PostgreSQL's statement log); with
    ``idle_transaction_seconds``, transactions idle that long are aborted by the server; with
    ``pool_metrics``, the pool's state and checkout waits are exported (``conveyor_db_pool_*``)."""
    options = PG_OPTIONS
    if idle_transaction_seconds is not None:
        options += lease_options(idle_transaction_seconds)
    extra: dict[str, Any] = {}
    if pool_metrics is not None:
        extra["poolclass"] = pool_metrics.pool_class()
    engine = async_engine(
        url,
        options=options,
        application_name="conveyor-scheduler",
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_recycle=1800,
        pool_use_lifo=True,
        **extra,
    )
    ping_when_idle(engine, ping_idle_seconds)
    return engine if pool_metrics is None else pool_metrics.watch(engine)
