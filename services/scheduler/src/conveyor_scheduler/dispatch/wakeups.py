"""Wake-ups: in-process events, coalesced NOTIFYs between replicas, and the LISTEN side.

A commit that may let the leader do something (a submit, a freed slot, a resume, a throttle's end, a
new outbox row) calls :meth:`Wakeups.poke`. On the leader's own replica that sets in-process events;
on the others it asks the :class:`WorkAnnouncer` to send one ``pg_notify`` after the commit (at once
after a quiet period, else coalesced over a window) and never inside the hot transaction (a pending NOTIFY takes a global lock at
commit). NOTIFY is only a latency hint: the loops also poll, so a lost notification costs at most one
poll interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time

import psycopg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor_scheduler.settings import to_libpq_url

logger = logging.getLogger(__name__)

CHANNEL = "conveyor_scheduler"


class Wakeups:
    """In-process wake-up events of the leader loops."""

    def __init__(self) -> None:
        self.dispatch = asyncio.Event()
        self.relay = asyncio.Event()
        self.local_leader = False
        self.announcer: WorkAnnouncer | None = None
        self.candidates_stale = True
        """Set when queued tasks may have appeared (the dispatcher's candidate cache is stale)."""
        self.capacity_changed = True
        """Set when capacity may have grown since the last cycle read it (a slot freed...)."""

    def wake_local(self) -> None:
        """Wake this replica's leader loops."""
        self.dispatch.set()
        self.relay.set()

    def poke(self, *, new_work: bool = True, frees: bool = True) -> None:
        """Something changed: wake the leader, wherever it runs.

        ``new_work`` says queued tasks may have appeared (submit, retry, redrive, resume);
        ``frees`` says capacity may have grown (a slot freed, a limit raised, a model resumed). A
        plain submit is new work only: a leader whose global limit is full need not run a cycle
        for it.
        """
        if new_work:
            self.candidates_stale = True
        if frees:
            self.capacity_changed = True
        if self.local_leader:
            self.wake_local()
        elif self.announcer is not None:
            self.announcer.request(new_work=new_work, frees=frees)

    def poke_relay(self) -> None:
        """New outbox rows and nothing for the dispatcher (a STARTED or PROGRESS event): wake only
        the leader's relay, wherever it runs, so the event is not left for its poll."""
        if self.local_leader:
            self.relay.set()
        elif self.announcer is not None:
            self.announcer.request(new_work=False, frees=False, relay_only=True)


def payload_of(*, new_work: bool, frees: bool, relay_only: bool = False) -> str:
    """The NOTIFY payload: ``work`` (queued tasks may have appeared), ``slot`` (capacity may have
    grown), ``work+slot``, or ``outbox`` (only new outbox rows); a listener treats anything else as
    ``work+slot``."""
    if relay_only and not (new_work or frees):
        return "outbox"
    if new_work and not frees:
        return "work"
    if frees and not new_work:
        return "slot"
    return "work+slot"


class WorkAnnouncer:
    """Sends coalesced ``pg_notify`` from a pool connection, outside any hot transaction."""

    def __init__(
        self, engine: AsyncEngine, coalesce_seconds: float, work_coalesce_seconds: float = 0.05
    ) -> None:
        self.engine = engine
        self.coalesce = coalesce_seconds
        self.work_coalesce = max(coalesce_seconds, work_coalesce_seconds)
        self._pending = asyncio.Event()
        self._urgent = asyncio.Event()
        self._new_work = False
        self._frees = False
        self._relay_only = True
        """Every request since the last NOTIFY was relay-only (``poke_relay``)."""
        self._task: asyncio.Task[None] | None = None
        self._last_sent = -math.inf

    def request(
        self, *, new_work: bool = True, frees: bool = True, relay_only: bool = False
    ) -> None:
        """Ask for one NOTIFY soon (a freed slot or new outbox rows: within ``coalesce``)."""
        self._new_work = self._new_work or new_work
        self._frees = self._frees or frees
        self._relay_only = self._relay_only and relay_only
        self._pending.set()
        if frees or relay_only:
            self._urgent.set()

    def start(self) -> None:
        """Start the sender task."""
        self._task = asyncio.create_task(self._run(), name="work-announcer")

    async def stop(self) -> None:
        """Stop the sender task."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await self._pending.wait()
            # Freed capacity is announced within `coalesce`. New work alone is announced at once
            # after a quiet period (a lone submit reaches the leader without a fixed wait), and at
            # most once per `work_coalesce` while submits keep coming: submits to a non-leader
            # arrive continuously, and a NOTIFY per few milliseconds would cost a transaction each.
            quiet = time.monotonic() - self._last_sent
            if not self._urgent.is_set() and quiet < self.work_coalesce:
                with contextlib.suppress(TimeoutError):  # asyncio.timeout: see GroupCore._run
                    async with asyncio.timeout(self.work_coalesce - quiet):
                        await self._urgent.wait()
            await asyncio.sleep(self.coalesce)
            self._pending.clear()
            self._urgent.clear()
            payload = payload_of(
                new_work=self._new_work, frees=self._frees, relay_only=self._relay_only
            )
            self._new_work = self._frees = False
            self._relay_only = True
            try:
                async with self.engine.begin() as conn:
                    await conn.execute(
                        text("SELECT pg_notify(:c, :p)"), {"c": CHANNEL, "p": payload}
                    )
                self._last_sent = time.monotonic()
            except Exception:
                logger.warning("notify failed", extra={"action": "notify_failed"}, exc_info=True)
                await asyncio.sleep(0.5)


class WorkListener:
    """LISTENs on the channel (raw psycopg connection) and wakes the local loops."""

    def __init__(self, url: str, wakeups: Wakeups) -> None:
        self.url = to_libpq_url(url)
        self.wakeups = wakeups
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start listening (reconnects on failure)."""
        self._task = asyncio.create_task(self._run(), name="listener")

    async def stop(self) -> None:
        """Stop listening."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True)
                try:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    async for note in conn.notifies():
                        if self.wakeups.local_leader and note.payload == "outbox":
                            self.wakeups.relay.set()
                        elif self.wakeups.local_leader:
                            if note.payload != "slot":
                                self.wakeups.candidates_stale = True
                            if note.payload != "work":
                                self.wakeups.capacity_changed = True
                            self.wakeups.wake_local()
                finally:
                    await conn.close()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("listener failed", extra={"action": "listen_failed"}, exc_info=True)
                await asyncio.sleep(1.0)
