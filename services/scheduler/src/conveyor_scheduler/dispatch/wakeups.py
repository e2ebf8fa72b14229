"""Wake-ups: in-process events, coalesced NOTIFYs between replicas, and the LISTEN side.

A commit that may let the leader do something (a submit, a freed slot, a resume, a throttle's end, a
new outbox row) calls :meth:`Wakeups.poke`. On the leader's own replica that sets in-process events;
on the others it asks the :class:`WorkAnnouncer` to send one ``pg_notify`` after the commit (at once
after a quiet period, else coalesced over a window), in a transaction of its own.

The busiest writers on a follower (provider results, BeginSubmit, CompleteSubmit) send their
``pg_notify`` inside their own transaction instead (:meth:`Wakeups.to_announce`,
:func:`notify_within`), and so does a submit group commit when the announcer would send its NOTIFY
at once anyway (quiet, :meth:`Wakeups.work_to_announce`; a burst of submits stays coalesced by the
announcer): it travels with the commit's round trip and reaches the leader at the commit,
where a separate NOTIFY cost a transaction and three round trips after it (0.8 of PostgreSQL's 4.7
transactions per task, counted). A NOTIFY takes a cluster-wide lock from its commit's start to its
end, so the commits that carry one are serialized among themselves; the announcer's commits took the
same lock, and the leader's own transactions never carry one. NOTIFY is only a latency hint: the
loops also poll, so a lost notification costs at most one poll interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from typing import Any

import psycopg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

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
        self.window_changed = True
        """Set when the dispatch window may have room again (commands taken up by an adapter)."""

    def wake_local(self, *, relay: bool = True) -> None:
        """Wake this replica's leader loops (the relay unless ``relay`` is False: no outbox rows)."""
        self.dispatch.set()
        if relay:
            self.relay.set()

    def poke(
        self,
        *,
        new_work: bool = True,
        frees: bool = True,
        window: bool | None = None,
        outbox: bool = True,
        announced: bool = False,
    ) -> None:
        """Something changed: wake the leader, wherever it runs.

        ``new_work`` says queued tasks may have appeared (submit, retry, redrive, resume);
        ``frees`` says capacity may have grown (a slot freed, a limit raised, a model resumed);
        ``window`` says the dispatch window may have room (commands taken up, or ended before an
        adapter took them; by default whenever ``frees``). A plain submit is new work only: a
        leader whose global limit is full need not run a cycle for it; a finished running task
        frees a slot but no window room. ``outbox``: the commit wrote outbox rows; without them
        (a BeginSubmit) the relay is not woken, so it runs no empty pass. ``announced``: the
        committed transaction carried the NOTIFY (:meth:`to_announce`), so none is sent after it.
        """
        window = frees if window is None else window
        if new_work:
            self.candidates_stale = True
        if frees:
            self.capacity_changed = True
        if window:
            self.window_changed = True
        if self.local_leader:
            self.wake_local(relay=outbox)
        elif self.announcer is not None and not announced:
            self.announcer.request(new_work=new_work, frees=frees, window=window, outbox=outbox)

    def poke_relay(self, *, announced: bool = False) -> None:
        """New outbox rows and nothing for the dispatcher (a STARTED or PROGRESS event): wake only
        the leader's relay, wherever it runs, so the event is not left for its poll."""
        if self.local_leader:
            self.relay.set()
        elif self.announcer is not None and not announced:
            self.announcer.request(new_work=False, frees=False, relay_only=True)

    def to_announce(
        self,
        *,
        new_work: bool,
        frees: bool,
        window: bool,
        relay_only: bool = False,
        outbox: bool = True,
    ) -> str | None:
        """The NOTIFY payload a transaction about to commit should carry (:func:`notify_within`):
        None on the leader's replica (its loops are woken in process after the commit) and on a
        replica without an announcer (tests)."""
        if self.local_leader or self.announcer is None:
            return None
        return payload_of(
            new_work=new_work, frees=frees, window=window, relay_only=relay_only, outbox=outbox
        )

    def work_to_announce(self) -> str | None:
        """The NOTIFY payload a submit transaction about to commit should carry: only on a follower
        whose announcer would send a new-work NOTIFY at once (quiet for ``work_coalesce``, nothing
        pending). Under a stream of submits the announcer's coalesced NOTIFY stays the one sent."""
        if self.local_leader or self.announcer is None or not self.announcer.quiet_for_work():
            return None
        return payload_of(new_work=True, frees=False)

    def notified(self, payload: str) -> None:
        """A NOTIFY from another replica reached the local leader: set what it says and wake."""
        if payload == "outbox":
            self.relay.set()
            return
        tokens = set(payload.split("+"))
        if not tokens <= _TOKENS:
            tokens = {"work", "slots", "window"}  # unknown (a newer replica): everything
        if "slot" in tokens:  # an older replica's freed capacity: slots and window
            tokens |= {"slots", "window"}
        if "work" in tokens:
            self.candidates_stale = True
        if "slots" in tokens:
            self.capacity_changed = True
        if "window" in tokens:
            self.window_changed = True
        self.wake_local(relay=NO_OUTBOX not in tokens)


NO_OUTBOX = "nooutbox"
"""The token of a payload whose commit wrote no outbox rows: the relay is not woken."""
_TOKENS = frozenset({"work", "slot", "slots", "window", NO_OUTBOX})


def payload_of(
    *,
    new_work: bool,
    frees: bool,
    window: bool | None = None,
    relay_only: bool = False,
    outbox: bool = True,
) -> str:
    """The NOTIFY payload: ``outbox`` (only new outbox rows), else the ``+``-joined changes among
    ``work`` (queued tasks may have appeared), ``slots`` (capacity may have grown) and ``window``
    (the dispatch window may have room; by default with ``slots``), with ``nooutbox`` when the
    commits it announces wrote no outbox rows (``outbox`` False; the relay stays asleep). A
    listener treats anything it does not know as every change (an older replica wakes its relay
    too), and ``slot`` (older replicas) as ``slots+window``."""
    window = frees if window is None else window
    if relay_only and not (new_work or frees or window):
        return "outbox"
    tokens = [name for name, on in (("work", new_work), ("slots", frees), ("window", window)) if on]
    if not tokens:
        return "work+slots+window"
    if not outbox and not relay_only:
        tokens.append(NO_OUTBOX)
    return "+".join(tokens)


async def notify_within(conn: AsyncConnection, payload: str) -> None:
    """``pg_notify`` inside the transaction open on ``conn``: delivered at its commit, never if it
    rolls back. Sent on the psycopg connection, so in pipeline mode (``store.bulk.pipelined``) it
    travels with the commit's round trip."""
    driver: Any = (await conn.get_raw_connection()).driver_connection
    await driver.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))


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
        self._window = False
        self._relay_only = True
        """Every request since the last NOTIFY was relay-only (``poke_relay``)."""
        self._outbox = False
        """A request since the last NOTIFY came from a commit that wrote outbox rows."""
        self._task: asyncio.Task[None] | None = None
        self._last_sent = -math.inf

    def request(
        self,
        *,
        new_work: bool = True,
        frees: bool = True,
        window: bool | None = None,
        relay_only: bool = False,
        outbox: bool = True,
    ) -> None:
        """Ask for one NOTIFY soon (freed capacity or new outbox rows: within ``coalesce``)."""
        window = frees if window is None else window
        self._outbox = self._outbox or outbox or relay_only
        self._new_work = self._new_work or new_work
        self._frees = self._frees or frees
        self._window = self._window or window
        self._relay_only = self._relay_only and relay_only
        self._pending.set()
        if frees or window or relay_only:
            self._urgent.set()

    def quiet_for_work(self) -> bool:
        """Whether a new-work request now would be sent at once (nothing pending, none sent within
        ``work_coalesce``)."""
        return (
            not self._pending.is_set() and time.monotonic() - self._last_sent >= self.work_coalesce
        )

    def carried(self) -> None:
        """A committed transaction carried a new-work NOTIFY (``Wakeups.work_to_announce``): the
        coalescing counts from it as from one of ours."""
        self._last_sent = time.monotonic()

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
            # Freed capacity and new outbox rows are announced at once after a quiet period, and
            # at most once per `coalesce` while they keep coming. New work alone is announced at
            # once after a quiet period too (a lone submit reaches the leader without a fixed
            # wait), and at most once per `work_coalesce` while submits keep coming: submits to a
            # non-leader arrive continuously, and a NOTIFY per few milliseconds would cost a
            # transaction each.
            quiet = time.monotonic() - self._last_sent
            if not self._urgent.is_set() and quiet < self.work_coalesce:
                with contextlib.suppress(TimeoutError):  # asyncio.timeout: see GroupCore._run
                    async with asyncio.timeout(self.work_coalesce - quiet):
                        await self._urgent.wait()
            quiet = time.monotonic() - self._last_sent
            if quiet < self.coalesce:
                await asyncio.sleep(self.coalesce - quiet)
            self._pending.clear()
            self._urgent.clear()
            payload = payload_of(
                new_work=self._new_work,
                frees=self._frees,
                window=self._window,
                relay_only=self._relay_only,
                outbox=self._outbox,
            )
            self._new_work = self._frees = self._window = self._outbox = False
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
                        if self.wakeups.local_leader:
                            self.wakeups.notified(note.payload)
                finally:
                    await conn.close()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("listener failed", extra={"action": "listen_failed"}, exc_info=True)
                await asyncio.sleep(1.0)
