"""Leader election, lease and fencing.

A replica becomes leader by taking a session-level ``pg_try_advisory_lock`` on ONE dedicated
connection (its own engine, no pool), and every dispatch transaction runs on that same connection.
Only the leader inserts ``active_slots`` rows, so concurrent changes seen by a dispatch can only free
capacity; a leader that lost its session lost the lock with it and cannot commit anything any more.
Followers retry every ``leader_retry_seconds``.

The lock is a lease: the leader's session is opened with ``idle_session_timeout`` and
``idle_in_transaction_session_timeout`` at ``leader_lease_seconds``, and a live leader touches it at
least every third of that (dispatch cycles, else a heartbeat). A leader that is frozen (SIGSTOP, a
long GC pause, a VM stall) or cut off keeps its TCP session but goes silent, so PostgreSQL ends the
session, the lock is free and a follower takes over within the lease plus one retry. Writes the
leader makes on other connections (the sweeps) are fenced the same way: they check in their own
transaction that the lock is still held by the leader's backend (``fence_any``), and every scheduler
transaction left idle (``idle_transaction_seconds``) is aborted by the server, so a zombie that
resumes commits nothing.

Those server timeouts are armed only at a protocol synchronization point: a leader frozen in the
middle of a pipelined transaction, or right after its pipelined COMMIT, keeps its session and the
lock for as long as it is frozen. Every replica's stall watch (:mod:`.stalls`) ends such a session
after a lease; the lock is then free for a follower's next try.
"""

from __future__ import annotations

import contextlib
import logging

from sqlalchemy import TextClause, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import NullPool

from conveyor_scheduler.settings import SchedulerSettings
from conveyor_scheduler.store.db import PG_OPTIONS, async_engine, lease_options

logger = logging.getLogger(__name__)

_HOLDS_LOCK_SQL = text(
    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted"
    " AND pid = pg_backend_pid() AND objsubid = 1 AND classid = :hi AND objid = :lo)"
)


_PID_HOLDS_LOCK_SQL = text(
    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted"
    " AND pid = :pid AND objsubid = 1 AND classid = :hi AND objid = :lo)"
)


class LostLeadership(RuntimeError):
    """The session no longer holds the leader lock."""


class Leader:
    """Holds (or tries to take) the leader lock on a dedicated connection.

    SQLAlchemy transparently replaces the DBAPI connection of an ``AsyncConnection`` after a
    disconnect, and a new session does not hold the old session's lock. So "still connected" proves
    nothing: :meth:`fence` checks, inside each dispatch transaction, that THIS session holds the lock
    (``pg_locks``), and the transaction aborts otherwise.
    """

    def __init__(self, settings: SchedulerSettings, url: str, instance_id: str) -> None:
        self.settings = settings
        self.instance_id = instance_id
        self.backend_pid: int | None = None
        self.engine: AsyncEngine = async_engine(
            url,
            options=PG_OPTIONS
            + lease_options(settings.idle_transaction_seconds, settings.leader_lease_seconds),
            application_name=f"conveyor-scheduler-leader:{instance_id}"[:63],
            poolclass=NullPool,
        )
        self.conn: AsyncConnection | None = None
        self._standby: AsyncConnection | None = None

    @property
    def _key_parts(self) -> dict[str, int]:
        key = self.settings.leader_lock_key & 0xFFFFFFFFFFFFFFFF
        return {"hi": key >> 32, "lo": key & 0xFFFFFFFF}

    def fence_statement(self, *, other: bool = False) -> tuple[TextClause, dict[str, int]]:
        """The fence of a transaction on the leader's own connection: one row, whether this session
        holds the lock (the dispatch cycle sends it with its first reads and raises LostLeadership
        unless it does). With ``other``, the fence of a transaction on another connection: whether
        the leader's session holds it (no leader session known: a pid no backend has)."""
        if other:
            return _PID_HOLDS_LOCK_SQL, {**self._key_parts, "pid": self.backend_pid or 0}
        return _HOLDS_LOCK_SQL, self._key_parts

    async def fence_any(self, conn: AsyncConnection) -> None:
        """Raise LostLeadership unless the leader's own session still holds the lock, checked from
        any connection inside its transaction (the sweeps' writes on pool connections)."""
        pid = self.backend_pid
        if self.conn is None or pid is None:
            raise LostLeadership("not the leader")
        if not await conn.scalar(_PID_HOLDS_LOCK_SQL, {**self._key_parts, "pid": pid}):
            raise LostLeadership("the leader lock is not held by the leader's session")

    @property
    def is_leader(self) -> bool:
        """Whether this replica holds the lock (as far as it knows)."""
        return self.conn is not None

    async def try_acquire(self) -> bool:
        """Try to take the lock; True when this replica is the leader now.

        A follower keeps its dedicated connection between tries (no new session every second).
        """
        if self.conn is not None:
            return True
        conn, self._standby = self._standby, None
        got, pid = False, 0
        if conn is not None:
            try:
                got, pid = await self._try_lock(conn)
            except Exception:
                # The standby session may have been ended as idle (longer retry than the lease).
                with contextlib.suppress(Exception):
                    await conn.close()
                conn = None
        if conn is None:
            conn = await self.engine.connect()
            try:
                got, pid = await self._try_lock(conn)
            except Exception:
                await conn.close()
                raise
        if not got:
            self._standby = conn
            return False
        self.conn = conn
        self.backend_pid = pid
        logger.info(
            "became leader", extra={"action": "leader_acquired", "instance": self.instance_id}
        )
        return True

    async def _try_lock(self, conn: AsyncConnection) -> tuple[bool, int]:
        row = (
            await conn.execute(
                text("SELECT pg_try_advisory_lock(:k), pg_backend_pid()"),
                {"k": self.settings.leader_lock_key},
            )
        ).one()
        await conn.commit()
        return bool(row[0]), int(row[1])

    async def lose(self) -> None:
        """Drop the connection (and with it the lock): after an error or at shutdown."""
        conn, self.conn = self.conn, None
        self.backend_pid = None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()
            logger.info(
                "leadership released",
                extra={"action": "leader_released", "instance": self.instance_id},
            )

    async def check(self) -> bool:
        """Round-trip on the lock connection; loses leadership if the session is gone."""
        if self.conn is None:
            return False
        try:
            held = await self.conn.scalar(_HOLDS_LOCK_SQL, self._key_parts)
            await self.conn.commit()
            if held:
                return True
            logger.warning("leader lock lost", extra={"action": "leader_lost"})
            await self.lose()
            return False
        except Exception:
            logger.warning("leader connection lost", extra={"action": "leader_lost"}, exc_info=True)
            await self.lose()
            return False

    async def dispose(self) -> None:
        """Release and close the engine."""
        await self.lose()
        standby, self._standby = self._standby, None
        if standby is not None:
            with contextlib.suppress(Exception):
                await standby.close()
        await self.engine.dispose()
