"""What the dispatch cycle reads and holds about queued work: the candidates (each eligible
tenant's top-k queued tasks by rank), the free capacity, and the speculative read of every
tenant's candidates that travels in the capacity round trip when the candidate cache is stale.

The speculative read computes each tenant's k (its free slots, capped) in SQL from the same tables
the cycle reads in Python (its limit: the explicit ``max_concurrency`` or its tier's; minus its
slots in ``active_slots``), and filters with the models and kinds that were blocked at the previous
read. The cycle takes it when the capacity read finds the same ones blocked, and otherwise reads
the candidates in a round trip of their own as before; so in the common case (a submit made the
cache stale, nothing filled up) a cycle costs one round trip fewer.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from conveyor_scheduler.dispatch.statements import CANDIDATES_SQL, TOP_QUEUED
from conveyor_scheduler.store.bulk import pipeline_within, plans_within, raw_cursor

SPECULATIVE_CANDIDATES_SQL = text(
    """
    SELECT e.tenant_id, e.k, c.id, c.kind, c.model, c.rank, c.slot_cost, c.enqueued_at
    FROM (
        SELECT w.tenant_id, LEAST(:kmax, GREATEST(0,
            COALESCE(NULLIF(w.max_concurrency, 0), l.lim, 1) - COALESCE(u.used, 0)))::int AS k
        FROM tenants w
        LEFT JOIN unnest(CAST(:tiers AS int[]), CAST(:limits AS int[])) AS l(tier, lim)
            ON l.tier = COALESCE(w.tier, w.claimed_tier, 1)
        LEFT JOIN (SELECT tenant_id, sum(cost) AS used FROM active_slots GROUP BY tenant_id) u
            ON u.tenant_id = w.tenant_id
        WHERE w.waiting > 0 AND NOT w.paused
    ) e
    LEFT JOIN LATERAL ("""
    + TOP_QUEUED
    + """) c ON true
    """
)
"""Every tenant's candidates as the probe (``CANDIDATES_SQL``) would read them, with its k; a
tenant without any has one row with a NULL id."""


@dataclass
class Candidate:
    """A queued task read by the candidate query."""

    id: uuid.UUID
    tenant_id: str
    kind: int
    model: str
    rank: float
    nominal_cost: int
    """``tasks.slot_cost`` (the kind's cost at submit)."""
    enqueued_at: datetime
    cost: int = 0
    """Slots it takes if dispatched now: :meth:`Policy.effective_cost` (set by the assignment)."""


@dataclass
class Capacity:
    """Free capacity computed at the start of a cycle."""

    global_free: int
    tenant_free: dict[str, int]
    tenant_weight: dict[str, int]
    model_used: dict[str, int]
    kind_used: dict[int, int]
    tenant_used: dict[str, int] = field(default_factory=dict)
    tenant_limit: dict[str, int] = field(default_factory=dict)
    blocked_models: list[str] = field(default_factory=list)
    blocked_kinds: list[int] = field(default_factory=list)
    paused_tenants: list[str] = field(default_factory=list)
    """Tenants an operator paused: none of their tasks is dispatched."""
    tenant_info: dict[str, tuple[int, int | None, int | None]] = field(default_factory=dict)
    """(tier, explicit limit, weight) of the tenants read with the capacity (:mod:`.inline`)."""


@dataclass(frozen=True)
class SpeculativeRead:
    """The rows of :data:`SPECULATIVE_CANDIDATES_SQL` and the blocked models and kinds it used."""

    rows: list[Any]
    blocked_models: frozenset[str]
    blocked_kinds: frozenset[int]

    def matches(self, cap: Capacity) -> bool:
        """Whether it filtered with what the capacity read found blocked (then it is what the
        probe would read)."""
        return self.blocked_models == frozenset(cap.blocked_models) and self.blocked_kinds == (
            frozenset(cap.blocked_kinds)
        )

    def by_tenant(self) -> tuple[dict[str, list[Candidate]], dict[str, int]]:
        """Each tenant's candidates in rank order, and the k it was read with."""
        got: dict[str, list[Candidate]] = defaultdict(list)
        ks: dict[str, int] = {}
        for tenant, k, task_id, kind, model, rank, cost, enqueued_at in self.rows:
            ks[tenant] = k
            if task_id is not None:
                got[tenant].append(Candidate(task_id, tenant, kind, model, rank, cost, enqueued_at))
        return got, ks


def speculative_params(
    tier_limits: Mapping[int, int],
    kmax: int,
    now: datetime,
    blocked_models: Iterable[str],
    blocked_kinds: Iterable[int],
) -> dict[str, Any]:
    """The parameters of :data:`SPECULATIVE_CANDIDATES_SQL`."""
    return {
        "tiers": list(tier_limits),
        "limits": list(tier_limits.values()),
        "kmax": kmax,
        "now": now,
        "blocked_models": sorted(blocked_models),
        "blocked_kinds": sorted(blocked_kinds),
    }


async def read_candidates(
    conn: AsyncConnection, tenants: list[str], ks: list[int], now: datetime, cap: Capacity
) -> dict[str, list[Candidate]]:
    """The top ``k`` candidates of each of ``tenants`` (:data:`CANDIDATES_SQL`), in one round trip
    with custom plans (its generic plan was measured 30-100x slower)."""
    async with pipeline_within(conn):
        await plans_within(conn, generic=False)
        cursor = await raw_cursor(
            conn,
            CANDIDATES_SQL,
            {
                "tenants": tenants,
                "ks": ks,
                "now": now,
                "blocked_models": cap.blocked_models,
                "blocked_kinds": cap.blocked_kinds,
            },
        )
    got: dict[str, list[Candidate]] = defaultdict(list)
    for r in await cursor.fetchall():  # id, tenant_id, kind, model, rank, slot_cost, enqueued_at
        got[r[1]].append(Candidate(*r))
    return got
