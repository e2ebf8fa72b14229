"""The scheduler's use cases, each one unit of work (one transaction) on the engine.

The gRPC servicers, the results consumer, the tests and the benchmark all go through this class, so
they exercise the same code paths. After a commit that may let the leader act (a submit, a freed
slot, a cancel, a redrive, a resume), it pokes the leader (in process or by a coalesced NOTIFY).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, async_sessionmaker

from conveyor.events.v1 import events_pb2
from conveyor.tasks.v1 import task_pb2
from conveyor_common import tracing
from conveyor_common.errors import NotFound, ResourceExhausted
from conveyor_common.vocabulary import (
    EV_DEAD_LETTERED,
    EV_REDRIVEN,
    EV_RETRY,
    EV_SUBMITTED,
    PROCEED,
)
from conveyor_scheduler.admission.batcher import SubmitBatcher
from conveyor_scheduler.admission.submit import NewTask, SubmitRequest, submit
from conveyor_scheduler.clock import utcnow
from conveyor_scheduler.control.cancel import bulk_cancel, cancel_task, redrive, select_for_bulk
from conveyor_scheduler.control.tenants import (
    get_tenant,
    held_reason,
    list_paused,
    model_known,
    set_model_paused,
    set_tenant_paused,
    upsert_tenant,
)
from conveyor_scheduler.dispatch.cycle import Dispatcher
from conveyor_scheduler.dispatch.policy import Policy
from conveyor_scheduler.dispatch.wakeups import Wakeups, notify_within
from conveyor_scheduler.lifecycle import Backoff
from conveyor_scheduler.metrics import SchedulerMetrics
from conveyor_scheduler.results.apply import apply_results
from conveyor_scheduler.results.submit_protocol import (
    BeginOutcome,
    begin_at_once,
    begin_submits,
    complete_submits,
    list_in_flight,
    mark_submit_unknown,
)
from conveyor_scheduler.settings import SchedulerSettings
from conveyor_scheduler.store import models as m
from conveyor_scheduler.store import stats
from conveyor_scheduler.store.bulk import pipelined
from conveyor_scheduler.store.changes import Changes
from conveyor_scheduler.store.convert import TaskRow, task_proto
from conveyor_scheduler.store.reads import (
    events_after,
    list_tasks,
    load_task,
    queue_position,
    recent_run_time_p50,
)

logger = logging.getLogger(__name__)


@dataclass
class StatsCache:
    """GetQueueStats answers cached for a second (the query scans the tasks table), per
    (kind, model, tenant) asked; the least recently computed ones are dropped past ``limit``."""

    limit: int = 1024
    entries: dict[tuple[int, str, str | None], tuple[float, list[dict[str, Any]]]] = field(
        default_factory=dict
    )


class Wake(NamedTuple):
    """What a commit tells the leader (``Wakeups.poke`` / ``Wakeups.poke_relay``)."""

    new_work: bool
    frees: bool
    window: bool
    relay_only: bool
    outbox: bool = True
    """The commit wrote outbox rows (the relay has something to publish)."""


RELAY_ONLY = Wake(new_work=False, frees=False, window=False, relay_only=True)
"""New outbox rows and nothing for the dispatcher."""
WINDOW_ROOM = Wake(new_work=False, frees=False, window=True, relay_only=False, outbox=False)
"""Commands left the dispatch window (BeginSubmit): no event written, the relay stays asleep."""


def _wake_of(changes: Changes | None, frees: bool = True) -> Wake:
    """The wake-up after a commit of ``changes`` (None: anything may have changed)."""
    new_work = changes is None or any(
        t in (EV_SUBMITTED, EV_RETRY, EV_REDRIVEN) for t in changes.new_event_types
    )
    window = frees
    if changes is not None:
        frees = frees and bool(changes.free_slots)
        window = frees and changes.frees_window
    outbox = changes is None or bool(changes.outbox)
    return Wake(new_work=new_work, frees=frees, window=window, relay_only=False, outbox=outbox)


class SchedulerCore:
    """Use cases of the scheduler."""

    def __init__(
        self,
        engine: AsyncEngine,
        settings: SchedulerSettings,
        *,
        wakeups: Wakeups | None = None,
        metrics: SchedulerMetrics | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.policy = Policy.from_settings(settings)
        self.backoff = Backoff.from_settings(settings)
        self.wakeups = wakeups or Wakeups()
        self.metrics = metrics
        self.sessionmaker = async_sessionmaker(engine, expire_on_commit=False)
        self._stats = StatsCache()
        self._submits: SubmitBatcher | None = None
        self.dispatcher: Dispatcher | None = None
        """The leader loops' dispatcher on a replica that runs them: an idle leader's submits
        dispatch their own tasks (:mod:`.dispatch.inline`)."""

    def _after(
        self, changes: Changes | None = None, *, poke: bool = True, frees: bool = True
    ) -> None:
        self._woken(_wake_of(changes, frees) if poke else None, announced=False)
        self._count(changes)

    async def _announce_within(self, conn: AsyncConnection, wake: Wake | None) -> bool:
        """On a follower, the NOTIFY of ``wake`` inside the transaction open on ``conn`` (it goes
        out with the commit); True when sent."""
        payload = None if wake is None else self.wakeups.to_announce(**wake._asdict())
        if payload is None:
            return False
        await notify_within(conn, payload)
        return True

    def _woken(self, wake: Wake | None, *, announced: bool) -> None:
        """After the commit: wake the local leader loops, or have the announcer NOTIFY the leader
        (unless the transaction carried the NOTIFY)."""
        if wake is None:
            return
        if wake.relay_only:
            self.wakeups.poke_relay(announced=announced)
        else:
            self.wakeups.poke(
                new_work=wake.new_work,
                frees=wake.frees,
                window=wake.window,
                outbox=wake.outbox,
                announced=announced,
            )

    def _count(self, changes: Changes | None) -> None:
        if changes is None or self.metrics is None:
            return
        for t in changes.new_event_types:
            if t == EV_RETRY:
                self.metrics.retries.inc()
            elif t == EV_DEAD_LETTERED:
                self.metrics.dead_lettered.inc()

    # ---------------------------------------------------------------- tasks

    async def submit_one(self, tenant_id: str, tier: int, item: NewTask) -> tuple[TaskRow, bool]:
        """Admit one task: (task, deduplicated); through the group commit when enabled.

        Same outcome as ``submit(tenant_id, tier, [item])``; concurrent calls share a transaction
        (:class:`SubmitBatcher`).
        """
        if not self.settings.submit_group_commit:
            [out] = await self.submit(tenant_id, tier, [item])
            return out
        if self._submits is None:
            self._submits = SubmitBatcher(self)
        return await self._submits.submit(tenant_id, tier, item)

    def submit_many(
        self, requests: Sequence[SubmitRequest]
    ) -> list[asyncio.Future[tuple[TaskRow, bool]]]:
        """Single submits of several callers, each with its own outcome (a future), in order:
        what ``submit_one`` does for each, without a task per request."""
        if not self.settings.submit_group_commit:
            loop = asyncio.get_running_loop()
            return [
                loop.create_task(self.submit_one(r.tenant_id, r.claimed_tier, r.item))
                for r in requests
            ]
        if self._submits is None:
            self._submits = SubmitBatcher(self)
        return self._submits.enqueue(requests)

    def _rejected(self, exc: ResourceExhausted) -> None:
        if self.metrics is not None:
            for v in exc.violations:
                self.metrics.admission_rejected.labels(
                    v.subject.rsplit("/", 1)[-1].split(":")[0]
                ).inc()

    async def announce_work_within(self, conn: AsyncConnection) -> bool:
        """A submit transaction open on ``conn`` carries the leader's new-work NOTIFY when this is
        a follower whose announcer would send one at once (``Wakeups.work_to_announce``): it goes
        out with the commit instead of in a transaction of its own after it. True when sent."""
        payload = self.wakeups.work_to_announce()
        if payload is None:
            return False
        await notify_within(conn, payload)
        return True

    def _submitted(
        self, created: int, *, announced: bool = False, dispatched: bool = False
    ) -> None:
        if created:
            if self.metrics is not None:
                self.metrics.submitted.inc(created)
            if dispatched:  # the submit dispatched every task it created: nothing new is queued
                self.wakeups.poke_relay()
                return
            # New work only: no capacity appeared.
            self._woken(_wake_of(None, frees=False), announced=announced)
            if announced and self.wakeups.announcer is not None:
                self.wakeups.announcer.carried()

    async def submit(
        self, tenant_id: str, tier: int, items: Sequence[NewTask], now: datetime | None = None
    ) -> list[tuple[TaskRow, bool]]:
        """Admit tasks (all or none); (task, deduplicated) per item."""
        try:
            async with self.engine.connect() as conn, pipelined(conn) as leave:
                out = await submit(
                    conn,
                    tenant_id=tenant_id,
                    claimed_tier=tier or 1,
                    items=items,
                    policy=self.policy,
                    settings=self.settings,
                    now=now or utcnow(),
                    leave_pipeline=leave,
                )
        except ResourceExhausted as exc:
            self._rejected(exc)
            raise
        self._submitted(sum(1 for _, dedup in out if not dedup))
        return out

    async def get_task(self, tenant_id: str | None, task_id: str) -> task_pb2.Task:
        """A task with its position in line and ETA while queued."""
        async with self.engine.connect() as conn:
            row = await load_task(conn, task_id, tenant_id)
            task = task_proto(row)
            if row["status"] == m.QUEUED:
                task.held_reason = await held_reason(conn, row["tenant_id"], row["model"])
                position = await queue_position(conn, row)
                task.queue_position = position
                p50 = await recent_run_time_p50(conn, row["kind"])
                if p50 > 0:
                    slots = self.policy.kind_limits.get(row["kind"], self.policy.global_concurrency)
                    parallel = max(
                        1, min(slots, self.policy.global_concurrency) // row["slot_cost"]
                    )
                    waves = (position - 1) // parallel + 1
                    start = utcnow() + timedelta(seconds=waves * p50)
                    if row["not_before"] is not None and row["not_before"] > start:
                        start = row["not_before"]
                    task.estimated_start_at.FromDatetime(start)
        return task

    async def list_tasks(
        self, tenant_id: str | None, **kwargs: object
    ) -> tuple[list[TaskRow], str]:
        """Tasks newest first (see store.reads.list_tasks)."""
        async with self.engine.connect() as conn:
            return await list_tasks(conn, tenant_id, **kwargs)  # type: ignore[arg-type]

    async def cancel(self, tenant_id: str | None, task_id: str, reason: str) -> TaskRow:
        """Cancel a task (queued at once; running through the provider)."""
        async with self.engine.begin() as conn:
            row, changes = await cancel_task(conn, tenant_id, task_id, reason, utcnow())
        self._after(changes, poke=bool(changes.free_slots or changes.outbox))
        return row

    async def task_events(
        self, tenant_id: str, task_id: str, after: int, limit: int
    ) -> tuple[list[task_pb2.TaskEvent], bool, int]:
        """Events after a sequence, whether the task is terminal, and its last sequence."""
        async with self.engine.connect() as conn:
            row = await load_task(conn, task_id, tenant_id)
            payloads = await events_after(conn, row["id"], after, limit)
        events = []
        for p in payloads:
            ev = task_pb2.TaskEvent()
            ev.ParseFromString(p)
            events.append(ev)
        return events, row["status"] in m.TERMINAL_STATUSES, row["last_sequence"]

    async def queue_stats(
        self, kind: int, model: str, tenant_id: str | None
    ) -> list[dict[str, Any]]:
        """Per (kind, model) and per kind totals of a tenant's tasks (every tenant's for None);
        cached ``stats_cache_seconds``."""
        key = (kind, model, tenant_id)
        cached = self._stats.entries.get(key)
        if cached is not None and time.monotonic() - cached[0] < self.settings.stats_cache_seconds:
            return cached[1]

        async with self.engine.connect() as conn:
            value = await stats.queue_stats(conn, kind, model, utcnow(), tenant_id)
        entries = self._stats.entries
        entries.pop(key, None)
        entries[key] = (time.monotonic(), value)
        while len(entries) > self._stats.limit:
            del entries[next(iter(entries))]
        return value

    # ---------------------------------------------------------------- results and protocol

    async def apply_results(self, results: Sequence[events_pb2.ProviderResult]) -> Changes:
        """Apply provider results in one transaction (the consumer's path)."""
        with tracing.span(
            "db apply_results",
            tracing.SpanKind.CLIENT,
            attributes={"db.system": "postgresql", "conveyor.results": len(results)},
        ):
            async with self.engine.connect() as conn, pipelined(conn) as leave:
                changes = await apply_results(
                    conn,
                    results,
                    backoff=self.backoff,
                    provider=self.settings.provider_name,
                    now=utcnow(),
                    leave_pipeline=leave,
                )
                wake: Wake | None = None
                if changes.free_slots or any(
                    r.WhichOneof("outcome") == "throttled" for r in results
                ):
                    wake = _wake_of(changes)
                else:  # STARTED/PROGRESS events: nothing for the dispatcher
                    wake = RELAY_ONLY if changes.outbox else None
                announced = await self._announce_within(conn, wake)
        self._woken(wake, announced=announced)
        self._count(changes)
        if self.metrics is not None:
            for r in results:
                self.metrics.results_applied.labels(r.WhichOneof("outcome") or "none").inc()
            for t in changes.new_event_types:
                name = {5: "succeeded", 6: "failed", 9: "canceled", 10: "dead_lettered"}.get(t)
                if name:
                    self.metrics.terminal.labels(name).inc()
        return changes

    async def begin_submits(self, items: Sequence[tuple[str, int]]) -> list[BeginOutcome]:
        """BeginSubmit of (task, attempt) items: the common case in one round trip
        (``begin_at_once``), any other item decided in order in a transaction of its own."""
        wake = WINDOW_ROOM if self.settings.dispatch_window else None
        payload = None if wake is None else self.wakeups.to_announce(**wake._asdict())
        async with self.engine.connect() as conn:
            outcomes = await begin_at_once(conn, items, utcnow(), payload)
        if any(o is not None for o in outcomes):  # commands left the dispatch window
            self._woken(wake, announced=payload is not None)
        if rest := [i for i, o in enumerate(outcomes) if o is None]:
            later = await self._begin_in_order([items[i] for i in rest])
            for i, o in zip(rest, later, strict=True):
                outcomes[i] = o
        return [o for o in outcomes if o is not None]

    async def _begin_in_order(self, items: Sequence[tuple[str, int]]) -> list[BeginOutcome]:
        async with self.engine.connect() as conn, pipelined(conn) as leave:
            outcomes, changes = await begin_submits(conn, items, utcnow(), leave)
            wake = _wake_of(changes) if changes.free_slots else None
            if not changes.free_slots and any(o.decision == PROCEED for o in outcomes):
                wake = WINDOW_ROOM if self.settings.dispatch_window else None
            announced = await self._announce_within(conn, wake)
        self._woken(wake, announced=announced)
        self._count(changes)
        return outcomes

    async def begin_submit(self, task_id: str, attempt: int) -> BeginOutcome:
        """BeginSubmit."""
        return (await self.begin_submits([(task_id, attempt)]))[0]

    async def complete_submits(self, items: Sequence[tuple[str, int, str]]) -> list[bool]:
        """CompleteSubmit of (task, attempt, prediction id) items, in one transaction."""
        async with self.engine.connect() as conn, pipelined(conn) as leave:
            accepted, changes = await complete_submits(conn, items, utcnow(), leave)
            # STARTED events; no capacity or work for the dispatcher
            wake = RELAY_ONLY if changes.outbox else None
            announced = await self._announce_within(conn, wake)
        self._woken(wake, announced=announced)
        return accepted

    async def complete_submit(self, task_id: str, attempt: int, prediction_id: str) -> bool:
        """CompleteSubmit."""
        return (await self.complete_submits([(task_id, attempt, prediction_id)]))[0]

    async def mark_submit_unknown(self, task_id: str, attempt: int) -> bool:
        """MarkSubmitUnknown."""
        async with self.engine.begin() as conn:
            return await mark_submit_unknown(conn, task_id, attempt, utcnow())

    async def list_in_flight(
        self, quiet_since: datetime | None, page_size: int, page_token: str
    ) -> tuple[list[TaskRow], str]:
        """ListInFlight."""
        async with self.engine.connect() as conn:
            return await list_in_flight(conn, quiet_since, page_size, page_token)

    # ---------------------------------------------------------------- admin

    async def get_tenant(self, tenant_id: str) -> dict[str, object] | None:
        """A tenant row."""
        async with self.engine.connect() as conn:
            return await get_tenant(conn, tenant_id)

    async def upsert_tenant(
        self, tenant_id: str, tier: int, limits: task_pb2.TenantLimits
    ) -> dict[str, object]:
        """Create or update a tenant."""
        async with self.engine.begin() as conn:
            row = await upsert_tenant(conn, tenant_id, tier, limits)
        self._after()
        return row

    async def set_model_paused(
        self, model: str, paused: bool, reason: str | None, *, allow_unknown: bool = True
    ) -> bool:
        """Pause or resume a model (NOT_FOUND pausing a model never seen, unless allowed)."""
        async with self.engine.begin() as conn:
            if paused and not allow_unknown and not await model_known(conn, model):
                raise NotFound(
                    "model",
                    model,
                    "no task has used it; set allow_unknown to pause it ahead of first use",
                )
            out = await set_model_paused(conn, model, paused, reason)
        self._after(poke=not paused)
        return out

    async def set_tenant_paused(self, tenant_id: str, paused: bool, reason: str | None) -> bool:
        """Pause or resume a tenant's dispatch (NOT_FOUND for a tenant never seen)."""
        async with self.engine.begin() as conn:
            out = await set_tenant_paused(conn, tenant_id, paused, reason)
        if out is None:
            raise NotFound("tenant", tenant_id)
        self._after(poke=not paused)
        return out

    async def list_paused(self) -> list[dict[str, Any]]:
        """The paused models and tenants."""
        async with self.engine.connect() as conn:
            return await list_paused(conn)

    async def bulk(
        self,
        op: str,
        *,
        task_ids: Sequence[str],
        tenant_id: str,
        model: str,
        statuses: Sequence[int],
        created_before: datetime | None,
        limit: int,
        reason: str = "",
    ) -> list[uuid.UUID]:
        """Bulk cancel (``op="cancel"``) or redrive (``op="redrive"``)."""
        async with self.engine.begin() as conn:
            rows = await select_for_bulk(
                conn,
                task_ids=task_ids,
                tenant_id=tenant_id,
                model=model,
                statuses=statuses,
                created_before=created_before,
                limit=limit,
            )
            if op == "cancel":
                done, changes = await bulk_cancel(conn, rows, reason, utcnow())
            else:
                done, changes = await redrive(conn, rows, self.policy, utcnow())
        self._after(changes)
        return done
