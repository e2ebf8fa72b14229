"""A submit that dispatches its own tasks, on an idle leader, in its own transaction.

When the leader's last cycle left nothing queued anywhere (:meth:`Dispatcher.nothing_queued`: no
new work announced since, the candidate cache valid), no dispatching transaction is open and the
room is not full, the tasks a submit group on the leader's own replica just admitted are the only
queued work it knows of. Their transaction then does, before its commit, what the cycle it would
wake does next: the fenced capacity read (from this connection: the leader's session still holds
the lock), the same fair assignment within every limit, the DISPATCH update, the slots, the
DISPATCHED events and the DispatchTask commands. It saves a transaction, a wake-up and a relay
pass per submit, and the SUBMITTED event, the DISPATCHED event and the command leave in one relay
pass. Whatever does not fit (a limit, a paused tenant or model, a delayed task, a group's member)
stays queued and the submit wakes the cycle as before; so does a group with more submits waiting
for the flusher (``admission/batcher.py``): under a stream of submits the dispatch's round trips
would delay their transaction, where a cycle dispatches beside it.

A submit on another replica that commits meanwhile is seen by the next cycle, as if a cycle had
started a moment before it. Every dispatching transaction of the leader holds
:attr:`Dispatcher.lock` until it ends, so capacity reads never overlap and limits stay exact.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncConnection

from conveyor_scheduler.dispatch.candidates import Candidate
from conveyor_scheduler.dispatch.cycle import Dispatcher
from conveyor_scheduler.dispatch.leadership import LostLeadership
from conveyor_scheduler.store import models as m
from conveyor_scheduler.store.bulk import Outer
from conveyor_scheduler.store.convert import TaskRow


@dataclass
class SubmitDispatch:
    """Tasks a submit's transaction dispatched; it holds the dispatcher's lock until
    :meth:`committed` or :meth:`abandoned` is called."""

    dispatcher: Dispatcher
    dispatched: int
    all_taken: bool
    """Every task the submit created was dispatched: nothing new is left queued."""
    started: float

    def committed(self) -> None:
        """The transaction committed: count the dispatches as a cycle's, release the lock."""
        d = self.dispatcher
        try:
            d.window.dispatched(self.dispatched)
            d.room.filled(self.dispatched)
            if d.metrics is not None:
                d.metrics.dispatch_latency.observe(time.perf_counter() - self.started)
                d.metrics.submit_dispatched.inc(self.dispatched)
            d.wakeups.relay.set()
            for hook in d.on_commit:
                hook(self.dispatched)
        finally:
            d.lock.release()

    def abandoned(self) -> None:
        """The transaction failed: its tasks are queued (or the submit was not written); the next
        cycle re-reads the candidates."""
        self.dispatcher.wakeups.candidates_stale = True
        self.dispatcher.lock.release()


def may_dispatch(dispatcher: Dispatcher) -> bool:
    """Whether a submit on this replica may dispatch its own tasks now."""
    d = dispatcher
    return (
        d.settings.submit_dispatch
        and d.wakeups.local_leader
        and d.leader.is_leader
        and not d.lock.locked()
        and not d.room.saturated
        and d.nothing_queued()
    )


async def dispatch_submitted(
    dispatcher: Dispatcher,
    conn: AsyncConnection,
    created: Sequence[TaskRow],
    now: datetime,
    outer: Outer = None,
) -> SubmitDispatch | None:
    """Dispatch what fits of the tasks a submit just wrote on ``conn`` (its transaction is open and
    not committed), when :func:`may_dispatch`; None when nothing was dispatched (the lock is then
    not held). The caller calls :meth:`SubmitDispatch.committed` or ``abandoned``. ``outer``: the
    submit's ``pipelined`` transaction, whose commit carries the dispatch's writes (one round trip
    fewer than a synchronization of their own)."""
    d = dispatcher
    if not created or not may_dispatch(d):
        return None
    # A delayed task waits for its time; a group's member is left to the cycle (its dispatch
    # updates the group's aggregate with SQLAlchemy, outside psycopg's pipeline mode).
    queued = [
        t
        for t in created
        if (t["not_before"] is None or t["not_before"] <= now) and t.get("group_id") is None
    ]
    if not queued:
        return None
    await d.lock.acquire()  # free (checked above, nothing awaited since): taken at once
    started = time.perf_counter()
    try:
        try:
            cap = await d._capacity(conn, now, tenants=sorted({t["tenant_id"] for t in queued}))
        except LostLeadership:
            cap = None  # the cycle finds out; this submit commits as a plain one
        if cap is None:
            d.lock.release()
            return None
        per_tenant: dict[str, list[Candidate]] = {}
        for t in sorted(queued, key=lambda t: (-t["rank"], t["enqueued_at"])):
            tenant = t["tenant_id"]
            if (
                tenant in cap.paused_tenants
                or tenant not in cap.tenant_info
                or t["model"] in cap.blocked_models
                or t["kind"] in cap.blocked_kinds
                or t["status"] != m.QUEUED
            ):
                continue
            cost, rank = t["slot_cost"], t["rank"]
            candidate = Candidate(
                t["id"], tenant, t["kind"], t["model"], rank, cost, t["enqueued_at"]
            )
            per_tenant.setdefault(tenant, []).append(candidate)
        free = d._tenant_free(cap, cap.tenant_info)
        per_tenant = {t: c for t, c in per_tenant.items() if free[t] > 0}
        chosen = d._assign(per_tenant, cap, now) if per_tenant else []
        n = await d._commit(conn, chosen, now, outer=outer) if chosen else 0
    except BaseException:
        d.wakeups.candidates_stale = True
        d.lock.release()
        raise
    if not n:
        d.lock.release()
        return None
    return SubmitDispatch(d, n, n == len(created), started)
