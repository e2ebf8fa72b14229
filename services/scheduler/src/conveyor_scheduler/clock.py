"""The leader: election, the dispatch cycle, and the leader's sweeps.

**Election, lease and fencing.** A replica becomes leader by taking a session-level
``pg_try_advisory_lock`` on ONE dedicated connection (its own engine, no pool), and every dispatch
transaction runs on that same connection. Only the leader inserts ``active_slots`` rows, so concurrent
changes seen by a dispatch can only free capacity; a leader that lost its session lost the lock with
it and cannot commit anything any more. Followers retry every ``leader_retry_seconds``.

The lock is a lease: the leader's session is opened with ``idle_session_timeout`` and
``idle_in_transaction_session_timeout`` at ``leader_lease_seconds``, and a live leader touches it at
least every third of that (dispatch cycles, else a heartbeat). A leader that is frozen (SIGSTOP, a
long GC pause, a VM stall) or cut off keeps its TCP session but goes silent, so PostgreSQL ends the
session, the lock is free and a follower takes over within the lease plus one retry. Writes the
leader makes on other connections (the sweeps) are fenced the same way: they check in their own
transaction that the lock is still held by the leader's backend (``fence_any``), and every scheduler
transaction idle for a lease is aborted by the server, so a zombie that resumes commits nothing.

**Dispatch cycle** (event-driven: NOTIFY and in-process wake-ups, with a polling backstop):

1. free capacity from ``active_slots`` aggregates (one GROUPING SETS query: global, per tenant, per
   model, per kind), the provider token bucket (in memory), ``model_controls`` and
   ``provider_controls``;
2. one query with ``LATERAL`` per eligible tenant (has waiting tasks and free slots) takes its top-k
   queued dispatchable tasks by rank, so a saturated or flooding tenant's backlog is never scanned;
3. merge in memory: highest priority band first, then the lowest tenant virtual time (weighted fair
   queueing), then rank; assign greedily within every limit, each task at its cost clamped to the
   smallest limit over it (``Policy.effective_cost``: a task costlier than its tenant's limit runs
   alone instead of blocking the tenant's queue forever);
4. one transaction: ``UPDATE tasks ... WHERE id = ANY(:ids) AND status = 1 RETURNING *``, insert the
   slots, the DISPATCHED events and the outbox records (DispatchTask + TaskStateChanged) in batches,
   decrement the waiting counters.
"""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    """The scheduler clock."""
    return datetime.now(UTC)
