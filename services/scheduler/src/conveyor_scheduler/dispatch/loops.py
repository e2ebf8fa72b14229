"""The leader's loops: election, the event-driven dispatch loop with its polling backstop, and the
sweeps (fast: expiry and dispatch rescue; slow: gauges, retention, counter reconcile); and on
every replica the stall watch (:mod:`.stalls`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor_scheduler.clock import utcnow
from conveyor_scheduler.dispatch.cycle import Dispatcher
from conveyor_scheduler.dispatch.leadership import Leader
from conveyor_scheduler.dispatch.policy import Policy
from conveyor_scheduler.dispatch.stalls import StallWatch
from conveyor_scheduler.dispatch.wakeups import Wakeups
from conveyor_scheduler.metrics import SchedulerMetrics
from conveyor_scheduler.settings import SchedulerSettings
from conveyor_scheduler.sweeps import maintenance
from conveyor_scheduler.sweeps.expiry import expire_due, rescue_dispatches

logger = logging.getLogger(__name__)


class LeaderLoops:
    """Election, the dispatch loop and the leader's sweeps (one instance per replica)."""

    def __init__(
        self,
        settings: SchedulerSettings,
        policy: Policy,
        engine: AsyncEngine,
        leader: Leader,
        wakeups: Wakeups,
        metrics: SchedulerMetrics | None = None,
        stalls: StallWatch | None = None,
    ) -> None:
        self.settings = settings
        self.stalls = stalls
        self.policy = policy
        self.engine = engine
        self.leader = leader
        self.wakeups = wakeups
        self.metrics = metrics
        self.dispatcher = Dispatcher(settings, policy, leader, wakeups, metrics)
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._touched = time.monotonic()
        """When the leader's lock session last made a round trip (a cycle, a heartbeat)."""
        self.on_sweep: list[Any] = []

    def start(self) -> None:
        """Start the election/dispatch loop and the sweep loop."""
        self._tasks = [
            asyncio.create_task(self._dispatch_loop(), name="dispatch-loop"),
            asyncio.create_task(self._sweep_loop(), name="sweep-loop"),
        ]
        if self.stalls is not None:
            self._tasks.append(
                asyncio.create_task(self.stalls.run(self._stopping), name="stall-watch")
            )

    async def stop(self) -> None:
        """Stop the loops and release the lock."""
        self._stopping.set()
        self.wakeups.dispatch.set()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks = []
        self.wakeups.local_leader = False
        if self.metrics is not None:
            self.metrics.leader.set(0)
        await self.leader.lose()

    async def _dispatch_loop(self) -> None:
        s = self.settings
        while not self._stopping.is_set():
            if not self.leader.is_leader:
                try:
                    became = await self.leader.try_acquire()
                except Exception:
                    logger.warning(
                        "election failed", extra={"action": "election_failed"}, exc_info=True
                    )
                    became = False
                if not became:
                    await asyncio.sleep(s.leader_retry_seconds)
                    continue
                self.wakeups.local_leader = True
                self._touched = time.monotonic()
                self.wakeups.capacity_changed = self.wakeups.window_changed = True
                self.wakeups.candidates_stale = True  # a cache from an earlier term is not valid
                if self.metrics is not None:
                    self.metrics.leader.set(1)
                self.wakeups.wake_local()
            try:
                if self.dispatcher.room.saturated and not self._room_may_have_grown():
                    # What was full at the last read (the global limit, the dispatch window, or
                    # both) has not changed since (only new work arrived, or a slot freed while
                    # the window is what is full): a cycle could not dispatch anything.
                    n = 0
                elif self.dispatcher.nothing_queued():
                    # The last cycle left no queued task anywhere and no new work was announced
                    # since: a freed slot or window room (with limits not full) has nothing to take.
                    n = 0
                else:
                    self.wakeups.capacity_changed = self.wakeups.window_changed = False
                    n = await self.dispatcher.cycle()
                    self._touched = time.monotonic()
                if not n and time.monotonic() - self._touched >= self._heartbeat_seconds():
                    # Woken often with nothing to dispatch (an idle leader's submits dispatch
                    # their own tasks, on pool connections; freed slots nothing can take), the
                    # wait below never times out: touch the session here, or PostgreSQL
                    # (idle_session_timeout) and the stall watch take it for a frozen leader's.
                    await self._heartbeat()
            except Exception:
                self.wakeups.candidates_stale = True  # the cache may have lost uncommitted picks
                logger.warning(
                    "dispatch cycle failed", extra={"action": "dispatch_failed"}, exc_info=True
                )
                if not await self.leader.check():
                    self.wakeups.local_leader = False
                    if self.metrics is not None:
                        self.metrics.leader.set(0)
                await asyncio.sleep(0.2)
                continue
            if n > 0:
                continue  # more may be dispatchable right away (the next cycle tells)
            # At least every third of the lease the leader's session is touched (the heartbeat
            # above and below), or PostgreSQL takes it for a frozen leader and ends it.
            timeout = min(s.dispatch_poll_seconds, self._heartbeat_seconds())
            if self.dispatcher.next_wake is not None:
                timeout = min(timeout, max(0.001, self.dispatcher.next_wake - time.monotonic()))
            try:  # asyncio.timeout, not wait_for: a cancel racing a set event is not swallowed
                async with asyncio.timeout(timeout):
                    await self.wakeups.dispatch.wait()
            except TimeoutError:
                # The polling backstop: a NOTIFY may have been lost, so re-read everything.
                self.wakeups.candidates_stale = True
                self.wakeups.capacity_changed = self.wakeups.window_changed = True
                await self._heartbeat()
            self.wakeups.dispatch.clear()

    def _heartbeat_seconds(self) -> float:
        return self.settings.leader_lease_seconds / 3

    async def _heartbeat(self) -> None:
        """A round trip on the leader's lock session; follows a lost lock."""
        self._touched = time.monotonic()
        if not await self.leader.check():
            self.wakeups.local_leader = False
            if self.metrics is not None:
                self.metrics.leader.set(0)

    def _room_may_have_grown(self) -> bool:
        """Whether everything that was full when the dispatcher saturated changed since."""
        full = self.dispatcher.room.full
        return ("slots" not in full or self.wakeups.capacity_changed) and (
            "window" not in full or self.wakeups.window_changed
        )

    async def _sweep_loop(self) -> None:
        s = self.settings
        last_slow = 0.0
        while not self._stopping.is_set():
            await asyncio.sleep(s.maintenance_seconds)
            if not self.leader.is_leader:
                continue
            try:
                await self.sweep()
                if time.monotonic() - last_slow >= 10.0:
                    last_slow = time.monotonic()
                    await self.slow_sweep()
            except Exception:
                logger.warning("sweep failed", extra={"action": "sweep_failed"}, exc_info=True)

    async def sweep(self) -> None:
        """Expire overdue queued tasks and rescue unconfirmed dispatches."""
        now = utcnow()
        async with self.engine.begin() as conn:
            await self.leader.fence_any(conn)
            expired = await expire_due(conn, now)
        async with self.engine.begin() as conn:
            await self.leader.fence_any(conn)
            rescued = await rescue_dispatches(
                conn,
                now,
                self.settings.submit_lease_seconds,
                self.settings.provider_name,
                self.policy,
            )
        if expired.events or rescued.outbox:
            self.wakeups.capacity_changed = self.wakeups.window_changed = True
            self.wakeups.wake_local()
        if self.metrics is not None:
            self.metrics.expired.inc(len(expired.events))
            self.metrics.rescued.inc(len(rescued.outbox))
        for hook in self.on_sweep:
            await hook()

    async def slow_sweep(self) -> None:
        """Gauges, retention and the counter reconcile (less often)."""

        await maintenance.refresh_gauges(self.engine, self.policy, self.metrics)
        await maintenance.retention(self.engine, self.settings)
        await maintenance.maybe_reconcile(self.engine, self.settings)
