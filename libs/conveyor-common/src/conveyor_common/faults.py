"""One mapping of infrastructure failures to gRPC statuses, used at every RPC boundary.

A handler that lets a driver or client exception escape would otherwise answer INTERNAL, which the
SDK (rightly) does not retry: a PostgreSQL failover, a broker restart or a downstream replica that
went away are transient, and a caller that retries with the same request id loses nothing. So the
server interceptor asks :func:`classify` about every exception that is not already an
:class:`~conveyor_common.errors.RpcError`:

* connection loss, shutdown, pool exhaustion, serialization failures and deadlocks of the database,
  retriable Kafka errors, a downstream gRPC call that failed with a transient status, and OS-level
  connection errors and timeouts become UNAVAILABLE with RetryInfo;
* a value the database cannot store (a NUL character in jsonb, an untranslatable character, a
  document past a size limit) becomes INVALID_ARGUMENT: the request, not the server, is at fault;
* anything else stays a bug: INTERNAL, logged with its stack trace.

Exceptions are recognised by duck typing (the ``sqlstate`` of psycopg errors, the ``orig`` of
SQLAlchemy's wrappers, aiokafka's ``retriable`` flag), so this module needs no database driver, and
the whole ``__cause__``/``__context__`` chain is searched (SQLAlchemy and our own wrappers chain the
driver's error).
"""

from __future__ import annotations

import asyncio

import grpc
from aiokafka import errors as kafka_errors

from conveyor_common.channels import call_code
from conveyor_common.errors import FieldViolation, InvalidArgument, RpcError, Unavailable

RETRY_AFTER_SECONDS = 1.0
"""RetryInfo of a transient infrastructure failure."""

CONTENTION_RETRY_AFTER_SECONDS = 0.05
"""RetryInfo of a serialization failure or deadlock (retry at once, with jitter)."""

_TRANSIENT_SQLSTATE_CLASSES = ("08", "53", "57", "58", "25P03", "25P04")
"""Connection exception, insufficient resources, operator intervention, system error; and the
server ending a session whose transaction stalled (idle in transaction, or over PostgreSQL 17's
transaction timeout: a process starved of CPU past ``idle_in_transaction_session_timeout``)."""

_CONTENTION_SQLSTATES = frozenset({"40001", "40P01", "55P03"})
"""Serialization failure, deadlock detected, lock not available."""

_UNSTORABLE_SQLSTATES = frozenset({"22P05", "22021", "54000", "54001"})
"""Untranslatable character (NUL in jsonb), character not in repertoire, program limit exceeded,
statement too complex."""

_TRANSIENT_GRPC_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)

_MAX_CHAIN = 16


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc``, its causes and contexts, and the driver errors SQLAlchemy wraps (no cycles)."""
    seen: list[BaseException] = []
    todo: list[BaseException] = [exc]
    while todo and len(seen) < _MAX_CHAIN:
        item = todo.pop(0)
        if any(item is s for s in seen):
            continue
        seen.append(item)
        orig = getattr(item, "orig", None)
        if isinstance(orig, BaseException):
            todo.append(orig)
        if isinstance(item, BaseExceptionGroup):
            todo.extend(item.exceptions)
        if item.__cause__ is not None:
            todo.append(item.__cause__)
        if item.__context__ is not None:
            todo.append(item.__context__)
    return seen


def _one(exc: BaseException) -> RpcError | None:
    if isinstance(exc, RpcError):
        return exc
    sqlstate = getattr(exc, "sqlstate", "")
    module = type(exc).__module__
    if isinstance(sqlstate, str) and sqlstate:
        if sqlstate in _UNSTORABLE_SQLSTATES:
            return InvalidArgument(
                [FieldViolation("request", "holds a value the database cannot store")],
                message="invalid request: a value cannot be stored (e.g. a NUL character)",
            )
        if sqlstate in _CONTENTION_SQLSTATES:
            return Unavailable("concurrent update; retry", CONTENTION_RETRY_AFTER_SECONDS)
        if sqlstate.startswith(_TRANSIENT_SQLSTATE_CLASSES):
            return Unavailable("database unavailable; retry", RETRY_AFTER_SECONDS)
    if module.startswith("psycopg") and type(exc).__name__ in {
        "OperationalError",
        "InterfaceError",
        "PoolTimeout",
        "TooManyRequests",
    }:
        return Unavailable("database unavailable; retry", RETRY_AFTER_SECONDS)
    if module.startswith("sqlalchemy") and (
        getattr(exc, "connection_invalidated", False)
        or type(exc).__name__ in {"OperationalError", "InterfaceError", "TimeoutError"}
    ):
        return Unavailable("database unavailable; retry", RETRY_AFTER_SECONDS)
    if isinstance(exc, kafka_errors.KafkaError) and (
        getattr(exc, "retriable", False)
        or isinstance(exc, kafka_errors.KafkaTimeoutError | kafka_errors.KafkaConnectionError)
    ):
        return Unavailable("event bus unavailable; retry", RETRY_AFTER_SECONDS)
    if isinstance(exc, grpc.aio.AioRpcError) and call_code(exc) in _TRANSIENT_GRPC_CODES:
        return Unavailable("a downstream service is unavailable; retry", RETRY_AFTER_SECONDS)
    if isinstance(exc, ConnectionError | TimeoutError | asyncio.TimeoutError):
        return Unavailable("a dependency is unavailable; retry", RETRY_AFTER_SECONDS)
    return None


def classify(exc: BaseException) -> RpcError | None:
    """The status an unexpected exception answers with, or None for a bug (INTERNAL).

    The first recognised exception of the chain decides, so an INVALID_ARGUMENT-worthy driver error
    wrapped by SQLAlchemy (which also looks like an OperationalError) is still INVALID_ARGUMENT.
    """
    for item in _chain(exc):
        found = _one(item)
        if found is not None:
            return found
    return None
