"""The dispatch cycle: free capacity, candidates by rank, a fair merge, one dispatch transaction.

Runs on the leader only, on the leader's own connection (see :mod:`.leadership`), woken by NOTIFY and
in-process events with a polling backstop (an idle leader's submit may dispatch its own tasks
instead: :mod:`.inline`):

1. free capacity from ``active_slots`` aggregates (global, per tenant, model and kind), the provider
   token bucket (in memory), ``model_controls`` and ``provider_controls``;
2. one query with ``LATERAL`` per eligible tenant (waiting tasks and free slots) takes its top-k
   queued dispatchable tasks by rank, so a saturated or flooding tenant's backlog is never scanned
   (kept in a cache; re-read after a submit in step 1's round trip: :mod:`.candidates`);
3. merge in memory: highest priority band first, then the lowest tenant virtual time (weighted fair
   queueing), then rank; assign greedily within every limit, each task at its cost clamped to the
   smallest limit over it (``Policy.effective_cost``: a task costlier than its tenant's limit runs
   alone instead of blocking the tenant's queue forever);
4. one transaction: ``UPDATE tasks ... WHERE id = ANY(:ids) AND status = 1 RETURNING *``, the slots,
   DISPATCHED events, outbox records (DispatchTask + TaskStateChanged) and waiting counters.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import TextClause
from sqlalchemy.ext.asyncio import AsyncConnection

from conveyor_common.ratelimit import TokenBucket
from conveyor_common.vocabulary import EV_DISPATCHED
from conveyor_scheduler.clock import utcnow
from conveyor_scheduler.dispatch.candidates import (
    SPECULATIVE_CANDIDATES_SQL,
    Candidate,
    Capacity,
    SpeculativeRead,
    read_candidates,
    speculative_params,
)
from conveyor_scheduler.dispatch.command import dispatch_command
from conveyor_scheduler.dispatch.leadership import Leader, LostLeadership
from conveyor_scheduler.dispatch.policy import Policy
from conveyor_scheduler.dispatch.statements import (
    BACKOFF_SQL,
    CONTROLS_SQL,
    DISPATCH_SQL,
    TENANT_INFO_SQL,
    TENANTS_SQL,
    USAGE_SQL,
)
from conveyor_scheduler.dispatch.wakeups import Wakeups
from conveyor_scheduler.dispatch.window import AWAITING_ADAPTER_SQL, DispatchWindow, Room
from conveyor_scheduler.metrics import SchedulerMetrics
from conveyor_scheduler.settings import SchedulerSettings
from conveyor_scheduler.store import models as m
from conveyor_scheduler.store.bulk import (
    Outer,
    commit_raw,
    insert_rows,
    pipeline_within,
    plans_within,
    raw_cursor,
    raw_mappings,
)
from conveyor_scheduler.store.changes import Changes

logger = logging.getLogger(__name__)


class Dispatcher:
    """The dispatch cycle (runs on the leader's connection only)."""

    def __init__(
        self,
        settings: SchedulerSettings,
        policy: Policy,
        leader: Leader,
        wakeups: Wakeups,
        metrics: SchedulerMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.policy = policy
        self.leader = leader
        self.wakeups = wakeups
        self.metrics = metrics
        self.bucket = TokenBucket(settings.provider_rate_per_second, settings.provider_burst)
        self.vtime: dict[str, float] = {}
        self.system_vtime = 0.0
        self.next_wake: float | None = None
        self.max_observed_global = 0
        self.room = Room()
        """What was full when capacity was last read, or what the last cycle filled."""
        self._cache: dict[str, list[Candidate]] = {}
        self._more: set[str] = set()
        self._tenant_info: dict[str, tuple[int, int | None, int | None]] = {}
        self._cache_until = float("-inf")
        self._cache_blocked: tuple[set[str], set[int]] = (set(), set())
        self._prefetched: tuple[list[Any], datetime | None, SpeculativeRead] | None = None
        """Tenants, earliest backoff, candidates: read with the capacity when the cache was stale."""
        self.drained = False
        """The last cycle's read left nothing queued anywhere (no cached candidate, no tenant that
        may have more, no model or kind full at the read): until new work or the cache's expiry,
        more room cannot be used."""
        self.last_dispatched: list[tuple[uuid.UUID, int]] = []
        """(task id, attempt) of the last cycle's dispatches (benchmarks, tests)."""
        self.on_commit: list[Callable[[int], None]] = []
        """Called after each dispatch commit with the number dispatched."""
        self.window = DispatchWindow(
            settings.dispatch_window, settings.dispatch_window_min, settings.dispatch_window_seconds
        )
        self.lock = asyncio.Lock()
        """Held by each dispatching transaction (a cycle, a submit's: :mod:`.inline`) to its end."""

    async def cycle(self) -> int:
        """One dispatch cycle; returns the number of tasks dispatched."""
        conn = self.leader.conn
        if conn is None:
            return 0
        started = time.perf_counter()
        now = utcnow()
        self.next_wake = None
        self.drained = False
        try:
            async with self.lock, conn.begin():
                n = await self._cycle(conn, now)
        finally:
            if self._prefetched is not None:  # read but not used: the next cycle reads again
                self._prefetched = None
                self.wakeups.candidates_stale = True
        if n and self.metrics is not None:
            self.metrics.dispatch_latency.observe(time.perf_counter() - started)
        if n:
            self.window.dispatched(n)
            self.wakeups.relay.set()
            for hook in self.on_commit:
                hook(n)
        return n

    async def _cycle(self, conn: AsyncConnection, now: datetime) -> int:
        """The transaction of :meth:`cycle` (committed by the last round trip when it dispatches)."""
        cap = await self._capacity(conn, now)  # fenced: raises unless still the leader
        if cap is None:
            return 0
        per_tenant = await self._candidates(conn, cap, now)
        if not per_tenant:
            self._note_drained()
            self._wake_at_cache_expiry()
            return 0
        chosen = self._assign(per_tenant, cap, now)
        if not chosen:
            self._wake_at_cache_expiry()
            return 0
        n = await self._commit(conn, chosen, now)
        # Filling the room saturates it: the next cycle waits for room (loops.py).
        self.room.filled(n)
        self._wake_at_cache_expiry()
        taken = {c.id for c in chosen}
        for tenant in {c.tenant_id for c in chosen}:
            self._cache[tenant] = [c for c in self._cache.get(tenant, []) if c.id not in taken]
        self._note_drained()
        return n

    def _note_drained(self) -> None:
        # A model or kind full at the read hid its tasks from it: room there may dispatch them.
        blocked_models, blocked_kinds = self._cache_blocked
        self.drained = (
            not blocked_models
            and not blocked_kinds
            and not self._more
            and not any(self._cache.values())
        )

    def nothing_queued(self) -> bool:
        """A cycle now would find nothing: :attr:`drained`, no new work since, cache valid."""
        return self.drained and not self._cache_stale()

    async def _candidates(
        self, conn: AsyncConnection, cap: Capacity, now: datetime
    ) -> dict[str, list[Candidate]]:
        """Top queued tasks per eligible tenant, from the candidate cache when it is valid.

        The cache holds each tenant's top-k (k = its free slots, capped) read by the last full
        LATERAL query. It stays valid while nothing but slot releases happened: a submit, redrive,
        resume, an unknown NOTIFY or an idle poll (a lost NOTIFY) marks it stale; it expires when the
        earliest retry backoff ends (retries go out on time) and at the latest after
        ``candidate_cache_seconds``. A tenant whose cached list ran out while more of its tasks may
        wait is re-read alone, so a refill after a completion costs no scan over every tenant.
        """
        prefetched, self._prefetched = self._prefetched, None
        speculative: SpeculativeRead | None = None
        fresh = prefetched is None and (
            not self._cache_stale()
            and not (self._cache_blocked[0] - set(cap.blocked_models))
            and not (self._cache_blocked[1] - set(cap.blocked_kinds))
        )
        if not fresh:
            if prefetched is None:
                self.wakeups.candidates_stale = False
                tenants = (await conn.execute(TENANTS_SQL)).all()
                backoff_end = await conn.scalar(BACKOFF_SQL, {"now": now})
            else:  # read with the capacity (the flag was cleared before that read)
                tenants, backoff_end, speculative = prefetched
            info = {t[0]: (t[1], t[2], t[3]) for t in tenants}
            self._tenant_info = info
            self._cache = {}
            self._more = set(info)
            self._cache_until = time.monotonic() + self.settings.candidate_cache_seconds
            if backoff_end is not None:
                # Wake (and re-read) when the earliest retry backoff ends: retries go out on time.
                self._cache_until = min(
                    self._cache_until, time.monotonic() + (backoff_end - now).total_seconds()
                )
            self._cache_blocked = (set(cap.blocked_models), set(cap.blocked_kinds))
        newly_models = set(cap.blocked_models) - self._cache_blocked[0]
        newly_kinds = set(cap.blocked_kinds) - self._cache_blocked[1]
        if newly_models or newly_kinds:
            # A model or kind filled up since the read: drop its cached tasks so they do not sit
            # at the tenants' heads; those tenants are re-read (their next tasks may be
            # dispatchable) and the cache is re-read once the model or kind has room again.
            for t, cached in self._cache.items():
                kept = [
                    c for c in cached if c.model not in newly_models and c.kind not in newly_kinds
                ]
                if len(kept) != len(cached):
                    self._cache[t] = kept
                    self._more.add(t)
            self._cache_blocked = (
                self._cache_blocked[0] | newly_models,
                self._cache_blocked[1] | newly_kinds,
            )
        free = self._tenant_free(cap)
        for tenant in cap.paused_tenants:  # paused since the cache was read
            free.pop(tenant, None)
            self._cache.pop(tenant, None)
        if speculative is not None and speculative.matches(cap):
            # What the probe below would read, already here: it reads only what this missed.
            read, read_ks = speculative.by_tenant()
            for t, read_k in read_ks.items():
                if t in free:
                    self._cache[t] = read.get(t, [])
                    if len(self._cache[t]) < read_k:
                        self._more.discard(t)
        probe = [t for t, f in free.items() if f > 0 and not self._cache.get(t) and t in self._more]
        if probe:
            ks = [min(free[t], self.settings.tenant_candidates_max) for t in probe]
            got = await read_candidates(conn, probe, ks, now, cap)
            for t, k in zip(probe, ks, strict=True):
                self._cache[t] = got.get(t, [])
                if len(self._cache[t]) < k:
                    self._more.discard(t)  # everything it has queued is in the cache now
        return {t: self._cache[t] for t, f in free.items() if f > 0 and self._cache.get(t)}

    def _cache_stale(self) -> bool:
        """Whether the candidate cache must be re-read whatever the capacity shows."""
        return self.wakeups.candidates_stale or time.monotonic() >= self._cache_until

    def _wake_at_cache_expiry(self) -> None:
        if self._cache_until != float("-inf") and self.next_wake is None:
            self.next_wake = self._cache_until

    def _tenant_free(self, cap: Capacity, info: dict[str, Any] | None = None) -> dict[str, int]:
        free: dict[str, int] = {}
        info = self._tenant_info if info is None else info
        for tenant, (tier, explicit, weight) in info.items():
            cap.tenant_limit[tenant] = self.policy.tenant_limit(tier, explicit)
            free[tenant] = cap.tenant_limit[tenant] - cap.tenant_used.get(tenant, 0)
            cap.tenant_weight[tenant] = self.policy.tenant_weight(tier, weight)
        cap.tenant_free = free
        return free

    async def _capacity(
        self, conn: AsyncConnection, now: datetime, *, tenants: list[str] | None = None
    ) -> Capacity | None:
        """Fence the transaction and read what limits it in one round trip: the leader lock, the
        controls, the slots in use, the commands awaiting an adapter. ``tenants``: from a pool
        connection (:mod:`.inline`), with those tenants' rows, nothing speculative."""
        fence, fence_params = self.leader.fence_statement(other=tenants is not None)
        statements: list[tuple[TextClause, dict[str, Any]]] = [
            (fence, fence_params),
            (CONTROLS_SQL, {"p": self.settings.provider_name, "now": now}),
            (USAGE_SQL, {}),
        ]
        if self.settings.dispatch_window:
            statements.append((AWAITING_ADAPTER_SQL, {}))
        if tenants is not None:
            statements.append((TENANT_INFO_SQL, {"ts": tenants}))
        speculative: dict[str, Any] | None = None
        if tenants is None and self._cache_stale():  # the candidate cache is re-read: in this trip
            self.wakeups.candidates_stale = False  # a poke from now on marks it stale again
            speculative = speculative_params(
                self.policy.tier_concurrency,
                self.settings.tenant_candidates_max,
                now,
                *self._cache_blocked,
            )
            statements += [(TENANTS_SQL, {}), (BACKOFF_SQL, {"now": now})]
        prefetch = speculative is not None
        # Generic plans for these small reads (a custom plan of each, every cycle, cost more
        # PostgreSQL CPU than running it); custom ones for the LATERAL candidate reads.
        async with pipeline_within(conn, generic_plans=True):
            cursors = [await raw_cursor(conn, sql, params) for sql, params in statements]
            if speculative is not None:
                await plans_within(conn, generic=False)
                cursors.append(await raw_cursor(conn, SPECULATIVE_CANDIDATES_SQL, speculative))
        results = [await c.fetchall() for c in cursors]
        if prefetch:
            self._prefetched = (
                results[-3],
                results[-2][0][0],
                SpeculativeRead(
                    results[-1],
                    frozenset(self._cache_blocked[0]),
                    frozenset(self._cache_blocked[1]),
                ),
            )
            del results[-3:]
        info = results.pop() if tenants is not None else []
        (held,), controls, usage, *window = results
        if not held[0]:
            raise LostLeadership("the leader lock is not held by this session")
        paused: list[str] = []
        paused_tenants: list[str] = []
        for k, name, until in controls:
            if k == "p":
                self.next_wake = time.monotonic() + (until - now).total_seconds()
                return None
            (paused_tenants if k == "t" else paused).append(name)
        tokens = int(self.bucket.available())
        if tokens < 1:
            self.next_wake = time.monotonic() + self.bucket.seconds_until(1)
            return None
        tenant_used: dict[str, int] = {}
        model_used: dict[str, int] = {}
        kind_used: dict[int, int] = {}
        total = 0
        for tenant_id, model, kind, used in usage:
            if tenant_id is not None:
                tenant_used[tenant_id] = used
            elif model is not None:
                model_used[model] = used
            elif kind is not None:
                kind_used[kind] = used
            else:
                total = used or 0
        self.max_observed_global = max(self.max_observed_global, total)
        global_free = limit_room = self.policy.global_concurrency - total
        window_room = limit_room
        if window:
            # Dispatch never outruns the adapters: only a window of commands waits in Kafka, so
            # an urgent task queues behind that many at most, not behind the backlog.
            window_room = self.window.room(int(window[0][0][0] or 0), time.monotonic())
            global_free = min(global_free, window_room)
        self.room.read(limit_room, window_room if self.settings.dispatch_window else None)
        if self.room.saturated:
            return None
        min_cost = 1
        blocked_models = list(paused)
        for model, used in model_used.items():
            limit = self.policy.model_limit(model)
            if limit and limit - used < min_cost:
                blocked_models.append(model)
        blocked_kinds = [
            kind
            for kind, limit in self.policy.kind_limits.items()
            if limit - kind_used.get(kind, 0)
            < self.policy.effective_cost(self.policy.cost(kind), kind)
        ]
        return Capacity(
            global_free=global_free,
            tenant_free={},
            tenant_weight={},
            tenant_used=tenant_used,
            model_used=model_used,
            kind_used=kind_used,
            blocked_models=blocked_models,
            blocked_kinds=blocked_kinds,
            paused_tenants=paused_tenants,
            tenant_info={t[0]: (t[1], t[2], t[3]) for t in info},
        )

    def _assign(
        self, per_tenant: dict[str, list[Candidate]], cap: Capacity, now: datetime
    ) -> list[Candidate]:
        """Greedy weighted-fair assignment within every limit."""
        policy = self.policy
        budget = min(cap.global_free, self.settings.dispatch_batch_max)
        tokens = int(self.bucket.available())
        global_free = cap.global_free
        tenant_free = dict(cap.tenant_free)
        model_used = dict(cap.model_used)
        kind_used = dict(cap.kind_used)
        heap: list[tuple[int, float, float, datetime, str]] = []
        cursor: dict[str, int] = {}
        for tenant, cands in per_tenant.items():
            vt = max(self.vtime.get(tenant, 0.0), self.system_vtime)
            self.vtime[tenant] = vt
            cursor[tenant] = 0
            head = cands[0]
            heapq.heappush(
                heap, (-policy.band(head.rank, now), vt, -head.rank, head.enqueued_at, tenant)
            )
        chosen: list[Candidate] = []
        while heap and len(chosen) < budget and tokens > 0 and global_free > 0:
            _, _, _, _, tenant = heapq.heappop(heap)
            cands = per_tenant[tenant]
            c = cands[cursor[tenant]]
            cursor[tenant] += 1
            # Clamped to every limit over it (with the tenant's limit in force now), so a task
            # costlier than a limit can still run alone and never blocks its tenant's queue.
            c.cost = policy.effective_cost(
                c.nominal_cost, c.kind, c.model, cap.tenant_limit.get(tenant)
            )
            fits = (
                c.cost <= tenant_free[tenant]
                and c.cost <= global_free
                and (
                    not policy.model_limit(c.model)
                    or model_used.get(c.model, 0) + c.cost <= policy.model_limit(c.model)
                )
                and (
                    c.kind not in policy.kind_limits
                    or kind_used.get(c.kind, 0) + c.cost <= policy.kind_limits[c.kind]
                )
            )
            if fits:
                chosen.append(c)
                tenant_free[tenant] -= c.cost
                global_free -= c.cost
                model_used[c.model] = model_used.get(c.model, 0) + c.cost
                kind_used[c.kind] = kind_used.get(c.kind, 0) + c.cost
                tokens -= 1
                self.system_vtime = max(self.system_vtime, self.vtime[tenant])
                self.vtime[tenant] += c.cost / cap.tenant_weight.get(tenant, 1)
            if tenant_free[tenant] <= 0 or cursor[tenant] >= len(cands):
                continue
            head = cands[cursor[tenant]]
            heapq.heappush(
                heap,
                (
                    -policy.band(head.rank, now),
                    self.vtime[tenant],
                    -head.rank,
                    head.enqueued_at,
                    tenant,
                ),
            )
        if len(self.vtime) > 10 * max(1, len(per_tenant)) + 10_000:
            self.vtime = {t: v for t, v in self.vtime.items() if v > self.system_vtime}
        return chosen

    async def _commit(
        self, conn: AsyncConnection, chosen: list[Candidate], now: datetime, *, outer: Outer = None
    ) -> int:
        """Dispatch ``chosen``, committing with the last round trip (``outer``: see inline.py)."""
        provider = self.settings.provider_name
        rows = await raw_mappings(
            conn, DISPATCH_SQL, {"ids": [c.id for c in chosen], "now": now}, generic_plans=True
        )
        self.last_dispatched = [(r["id"], r["attempt"]) for r in rows]
        if not rows:
            return 0
        changes = Changes(now=now)
        slots = []
        cost = {c.id: c.cost for c in chosen}
        for row in rows:
            slots.append(
                {
                    "task_id": row["id"],
                    "tenant_id": row["tenant_id"],
                    "model": row["model"],
                    "kind": row["kind"],
                    "cost": cost[row["id"]],
                    "provider": provider,
                    "attempt": row["attempt"],
                    "acquired_at": now,
                }
            )
            changes.waiting[row["tenant_id"]] -= 1
            changes.command(row, dispatch_command(row, provider, self.policy, now))
            row["last_sequence"] -= 1  # the UPDATE bumped it; event() bumps the copy again
            changes.event(row, EV_DISPATCHED, m.QUEUED)
        # Slots, events, outbox rows, counters, commit: one round trip (generic plans, see above).
        async with pipeline_within(conn, outer=outer) as leave:
            await insert_rows(conn, "active_slots", slots, raw=True)
            await changes.flush(conn, save=False, leave_pipeline=leave)
            if outer is None:
                await commit_raw(conn)
        self.bucket.spend(len(rows))
        if self.metrics is not None:
            for row in rows:
                kind = str(row["kind"])
                self.metrics.dispatched.labels(kind).inc()
                waited_from = max(row["enqueued_at"], row.get("not_before") or row["enqueued_at"])
                self.metrics.queue_wait.labels(kind).observe((now - waited_from).total_seconds())
        return len(rows)
