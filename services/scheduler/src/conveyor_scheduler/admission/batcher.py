"""The submit batcher: concurrent submits share one pipelined transaction (group commit).

SubmitTask calls that arrive together are decided in one ``submit_group`` transaction on one
connection, each item alone (its own admission answer), and every caller gets its own outcome. A
failed flush hands its error to each waiting caller, never to the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING

from sqlalchemy.ext.asyncio import AsyncConnection

from conveyor_common import tracing
from conveyor_common.errors import ResourceExhausted, Unavailable
from conveyor_common.faults import classify
from conveyor_scheduler.admission.group_submit import submit_group
from conveyor_scheduler.admission.submit import NewTask, SubmitRequest
from conveyor_scheduler.clock import utcnow
from conveyor_scheduler.dispatch.inline import SubmitDispatch, dispatch_submitted
from conveyor_scheduler.store.bulk import pipelined
from conveyor_scheduler.store.convert import TaskRow

if TYPE_CHECKING:
    from conveyor_scheduler.core import SchedulerCore


logger = logging.getLogger(__name__)


class SubmitBatcher:
    """Group commit of single submits: concurrent callers share one transaction.

    A call queues its request and waits for its own outcome. Up to ``submit_group_concurrency``
    flushes run at a time (1 by default); a request starts one if fewer run (after ``submit_group_linger_seconds``, 0 by
    default), else it joins the next group a running flusher takes, so under load a transaction
    carries the submits that arrived during the previous commit, and an idle submit is written at
    once.
    :func:`repository.submit_group` keeps the per-request semantics of a lone submit (admission and
    idempotency per request; a rejected request fails alone and writes nothing). A repeated
    ``(tenant, request_id)`` waits for the next group (it then deduplicates against the first, as
    it would against a concurrent lone submit). If the group transaction fails as a whole (a
    deadlock, a lost connection), each of its requests is retried alone in its own transaction
    (the idempotency keys make a retry of a committed request answer its task).
    """

    def __init__(self, core: SchedulerCore) -> None:
        self.core = core
        self.max_batch = core.settings.submit_group_max
        self.linger = core.settings.submit_group_linger_seconds
        self._pending: list[tuple[SubmitRequest, asyncio.Future[tuple[TaskRow, bool]]]] = []
        self.concurrency = core.settings.submit_group_concurrency
        self._flushers: set[asyncio.Task[None]] = set()
        self._running = 0
        self._next_now = utcnow()
        self.groups = 0
        """Group transactions committed (tests, benchmarks)."""

    async def submit(self, tenant_id: str, tier: int, item: NewTask) -> tuple[TaskRow, bool]:
        """Admit one task; returns once its transaction committed (raises its own rejection)."""
        [future] = self.enqueue([SubmitRequest(tenant_id, tier or 1, item)])
        return await future

    def enqueue(
        self, requests: Sequence[SubmitRequest]
    ) -> list[asyncio.Future[tuple[TaskRow, bool]]]:
        """Queue single submits (in order); each future gets its own outcome."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[tuple[TaskRow, bool]]] = []
        for request in requests:
            future: asyncio.Future[tuple[TaskRow, bool]] = loop.create_future()
            self._pending.append((request, future))
            futures.append(future)
        if futures and self._running < self.concurrency:
            # Counted here and uncounted in _run's finally, synchronously: a flusher that is about
            # to end has already seen the queue empty, so a request is never left without one.
            self._running += 1
            flusher = asyncio.create_task(self._run(), name="submit-group-commit")
            self._flushers.add(flusher)
            flusher.add_done_callback(self._flushers.discard)
        return futures

    async def _run(self) -> None:
        batch: list[tuple[SubmitRequest, asyncio.Future[tuple[TaskRow, bool]]]] = []
        try:
            await asyncio.sleep(self.linger)
            while self._pending:
                # One pooled connection for as long as groups keep coming (no checkout and
                # liveness ping per group); a group that failed gives it back.
                async with self.core.engine.connect() as conn:
                    while self._pending:
                        batch = self._take()
                        if not await self._flush(batch, conn):
                            break
        except BaseException as exc:  # cancelled at shutdown, or the database is gone
            pending, self._pending = [*batch, *self._pending], []
            for _, f in pending:
                if not f.done():
                    f.set_exception(exc if isinstance(exc, Exception) else RuntimeError("stopped"))
            if not isinstance(exc, Exception):
                raise
            # Every waiting caller got the error (an outage answers UNAVAILABLE at the RPC
            # boundary); the flusher itself ends quietly, its error is not lost in a task.
            logger.warning(
                "submit group flusher failed: %s",
                type(exc).__name__,
                extra={"action": "submit_group_flusher_failed", "callers": len(pending)},
            )
        finally:
            self._running -= 1

    def _take(self) -> list[tuple[SubmitRequest, asyncio.Future[tuple[TaskRow, bool]]]]:
        """The next group: up to max_batch pending requests, a repeated key left for later."""
        batch: list[tuple[SubmitRequest, asyncio.Future[tuple[TaskRow, bool]]]] = []
        later: list[tuple[SubmitRequest, asyncio.Future[tuple[TaskRow, bool]]]] = []
        keys: set[tuple[str, str]] = set()
        for entry in self._pending:
            key = (entry[0].tenant_id, entry[0].item.request_id)
            if len(batch) < self.max_batch and key not in keys:
                keys.add(key)
                batch.append(entry)
            else:
                later.append(entry)
        self._pending = later
        return batch

    async def _flush(
        self,
        batch: list[tuple[SubmitRequest, asyncio.Future[tuple[TaskRow, bool]]]],
        conn: AsyncConnection,
    ) -> bool:
        """Commit one group on ``conn``; False when it failed (its requests were then retried
        one by one and the connection should not be reused)."""
        core = self.core
        # Groups of this replica get increasing times (request i at now + i µs): FIFO holds
        # across groups too, even with concurrent flushers.
        now = max(utcnow(), self._next_now)
        self._next_now = now + timedelta(microseconds=len(batch))
        started = time.perf_counter()
        inline: SubmitDispatch | None = None
        try:
            # Three round trips for a common group: keys, admission, insert with COMMIT.
            with tracing.span(
                "db submit_group",
                tracing.SpanKind.CLIENT,
                parent="",
                attributes={"db.system": "postgresql", "conveyor.group_size": len(batch)},
                links=[r.item.traceparent for r, _ in batch],
            ):
                async with pipelined(conn) as leave:
                    outcomes = await submit_group(
                        conn,
                        [r for r, _ in batch],
                        policy=core.policy,
                        settings=core.settings,
                        now=now,
                        leave_pipeline=leave,
                    )
                    created = [o[0] for o in outcomes if not isinstance(o, Exception) and not o[1]]
                    announced = bool(created) and await core.announce_work_within(conn)
                    if created and core.dispatcher is not None and not self._pending:
                        # An idle leader's submit dispatches its own tasks (dispatch/inline.py);
                        # not while more submits wait for this flusher: the dispatch's round trips
                        # would delay them, where a cycle dispatches beside the next group.
                        inline = await dispatch_submitted(
                            core.dispatcher,
                            conn,
                            created,
                            max(utcnow(), now + timedelta(microseconds=len(batch))),
                            leave,
                        )
        except BaseException as exc:
            if inline is not None:
                inline.abandoned()
            if not isinstance(exc, Exception):
                raise
            if isinstance(classify(exc), Unavailable):
                # The database is unreachable or contended: one by one would fail the same way,
                # slowly. Every caller gets the error (UNAVAILABLE with RetryInfo at the RPC).
                logger.warning(
                    "submit group failed: %s",
                    type(exc).__name__,
                    extra={"action": "submit_group_unavailable", "size": len(batch)},
                )
                for _, f in batch:
                    if not f.done():
                        f.set_exception(exc)
                return False
            logger.warning(
                "submit group failed; retrying its requests one by one",
                extra={"action": "submit_group_failed", "size": len(batch)},
                exc_info=True,
            )
            for request, f in batch:
                try:
                    [out] = await core.submit(
                        request.tenant_id, request.claimed_tier, [request.item]
                    )
                except Exception as exc:
                    if not f.done():
                        f.set_exception(exc)
                else:
                    if not f.done():
                        f.set_result(out)
            return False
        if inline is not None:
            inline.committed()
        self.groups += 1
        if core.metrics is not None:
            core.metrics.submit_group_size.observe(len(batch))
            core.metrics.submit_group_seconds.observe(time.perf_counter() - started)
        created_n = 0
        for (_, f), outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, Exception):
                if isinstance(outcome, ResourceExhausted):
                    core._rejected(outcome)
                if not f.done():
                    f.set_exception(outcome)
            else:
                created_n += 0 if outcome[1] else 1
                if not f.done():
                    f.set_result(outcome)
        core._submitted(
            created_n, announced=announced, dispatched=inline is not None and inline.all_taken
        )
        return True
