"""Engine, migrations and the schema check.

The service never migrates on start: ``python -m conveyor_scheduler migrate`` (a Kubernetes Job) runs
``alembic upgrade head``; ``serve`` checks that the database is at head and refuses to start
otherwise, so an old replica never writes to a schema it does not know and a new one never runs on a
schema that lacks its columns.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from psycopg.types.array import ListBinaryDumper
from sqlalchemy import MetaData, event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from conveyor_scheduler.metrics import DatabasePoolMetrics
from conveyor_scheduler.settings import to_sqlalchemy_url
from conveyor_scheduler.store.models import Base

PG_OPTIONS = "-c timezone=UTC -c plan_cache_mode=force_custom_plan"
"""Session options. Custom plans always: psycopg prepares a statement after a few executions, and a
generic plan of the dispatcher's LATERAL candidate query (array parameters, per-tenant LIMIT) was
measured 30-100x slower than its custom plan."""


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


def create_engine(
    url: str,
    *,
    pool_size: int = 10,
    idle_transaction_seconds: float | None = None,
    pool_metrics: DatabasePoolMetrics | None = None,
) -> AsyncEngine:
    """Async engine (psycopg 3) with pre-ping, sized pool, UTC sessions, binary arrays; with
    ``idle_transaction_seconds``, transactions idle that long are aborted by the server; with
    ``pool_metrics``, the pool's state and checkout waits are exported (``conveyor_db_pool_*``)."""
    options = PG_OPTIONS
    if idle_transaction_seconds is not None:
        options += lease_options(idle_transaction_seconds)
    extra: dict[str, Any] = {}
    if pool_metrics is not None:
        extra["poolclass"] = pool_metrics.pool_class()
    engine = binary_arrays(
        create_async_engine(
            to_sqlalchemy_url(url),
            pool_size=pool_size,
            max_overflow=pool_size,
            pool_pre_ping=True,
            pool_recycle=1800,
            connect_args={"options": options, "application_name": "conveyor-scheduler"},
            **extra,
        )
    )
    return engine if pool_metrics is None else pool_metrics.watch(engine)
