"""Ending scheduler sessions stalled on their client: a frozen or stalled replica's locks.

PostgreSQL's own timeouts (``idle_in_transaction_session_timeout``, and ``idle_session_timeout`` on
the leader's lock session, see :mod:`~conveyor_scheduler.dispatch.leadership`) are armed only at a
protocol synchronization point. A replica frozen (SIGSTOP, a VM stall) in the middle of a pipelined
transaction, its statements sent and the Sync not yet, keeps its session ``active``, waiting on
``ClientRead``, with every row lock the transaction took; one frozen right after a pipelined COMMIT
sits ``idle`` on ``ClientRead``, holding the leader lock. Neither ever times out.

So every replica looks every ``stall_check_seconds`` for scheduler sessions waiting on their client
and ends them (``pg_terminate_backend``: the transaction aborts, nothing of it commits):

- inside a transaction that another session waits on (a row lock a submit or a dispatch needs),
  once stalled ``lock_stall_seconds``: a frozen replica holds a live replica's submits about that
  long at most;
- inside a transaction, once stalled ``idle_transaction_seconds`` (the bound the server applies to
  an idle transaction, applied mid-pipeline too);
- the leader's lock session in any state, once stalled a lease (a live leader touches it every
  third of the lease), so the lock is free for a follower's next try.

A live client sends a pipeline's messages back to back, so a session of a live replica is inside a
transaction and waiting on its client for microseconds, or for the Python work between two round
trips. An idle pool connection is never ended: idling in the pool is normal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import psycopg

from conveyor_scheduler.settings import SchedulerSettings, to_libpq_url

logger = logging.getLogger(__name__)

STALLED_SQL = (
    "WITH blockers AS (SELECT DISTINCT unnest(pg_blocking_pids(pid)) AS pid"
    " FROM pg_stat_activity WHERE wait_event_type = 'Lock')"
    " SELECT a.pid, pg_terminate_backend(a.pid) FROM pg_stat_activity a"
    " WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()"
    " AND a.application_name LIKE 'conveyor-scheduler%%' AND a.wait_event_type = 'Client'"
    " AND ((a.state <> 'idle' AND a.wait_event = 'ClientRead'"
    "       AND a.state_change < now() - make_interval(secs => CASE"
    "         WHEN a.pid IN (SELECT pid FROM blockers) THEN %(blocking)s"
    "         ELSE %(transaction)s END))"
    "   OR ((a.state <> 'idle' OR a.application_name LIKE 'conveyor-scheduler-leader:%%')"
    "       AND a.wait_event IN ('ClientRead', 'ClientWrite')"
    "       AND a.state_change < now() - make_interval(secs => %(lease)s)))"
)
"""Ends the stalled scheduler sessions, returning (pid, ended) rows (psycopg placeholders)."""


class StallWatch:
    """Every replica's watch, on its own autocommit connection (named ``conveyor-watch:``: never a
    target itself), the statement prepared: a check costs about 0.1 ms of client CPU and one round
    trip, against 0.7 ms and two through the pool and a transaction."""

    def __init__(self, url: str, settings: SchedulerSettings, instance_id: str) -> None:
        self.conninfo = to_libpq_url(url)
        self.settings = settings
        self.application_name = f"conveyor-watch:{instance_id}"[:63]
        self.params: dict[str, Any] = {
            "blocking": settings.lock_stall_seconds,
            "transaction": settings.idle_transaction_seconds,
            "lease": settings.leader_lease_seconds,
        }
        self._conn: psycopg.AsyncConnection[Any] | None = None

    async def check(self) -> list[int]:
        """End the scheduler sessions stalled on their client now (see the module docstring);
        returns their backend pids."""
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(
                self.conninfo, autocommit=True, application_name=self.application_name
            )
        try:
            cur = await self._conn.execute(STALLED_SQL, self.params, prepare=True)
            rows = await cur.fetchall()
        except Exception:
            await self.close()
            raise
        ended = [int(pid) for pid, ok in rows if ok]
        if ended:
            logger.warning(
                "ended scheduler sessions stalled on their client",
                extra={"action": "stalled_sessions_ended", "pids": ended},
            )
        return ended

    async def run(self, stopping: asyncio.Event) -> None:
        """Check every ``stall_check_seconds`` until ``stopping`` is set."""
        try:
            while not stopping.is_set():
                try:
                    await self.check()
                except Exception:
                    logger.warning(
                        "stalled session check failed",
                        extra={"action": "stalled_check_failed"},
                        exc_info=True,
                    )
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.settings.stall_check_seconds):
                        await stopping.wait()
        finally:
            await self.close()

    async def close(self) -> None:
        """Close the watch's connection (a later check opens a new one)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()
