"""Priority, aging, fair-share weights, slot costs and limits, derived from the settings.

Effective priority of a waiting task, in "class steps":

    effective(now) = class_score + tier_boost + aging_rate * (now - enqueued_at)

Aging is linear in ``enqueued_at`` with one rate for every task, so

    rank = class_score + tier_boost - aging_rate * (enqueued_at - EPOCH)

differs from the effective priority by ``aging_rate * (now - EPOCH)``, a term common to all tasks at
any instant: ordering by ``rank DESC`` is ordering by effective priority, and ``rank`` never changes
while a task waits, so it is stored and indexed. A retry keeps ``enqueued_at`` and so its rank (its
place in line). Changing ``aging_rate_per_minute`` or the tier boosts re-ranks only tasks enqueued
afterwards; ``python -m conveyor_scheduler rerank`` recomputes the stored ranks of waiting tasks
with the settings in force (:meth:`Policy.rank_sql`).

Fair share: effective priorities are quantized into bands of ``priority_band_width``; inside the top
band the dispatcher serves tenants by weighted fair queueing (start-time fair queueing on a virtual
time advanced by ``slot_cost / weight`` per dispatch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime

from conveyor_common.vocabulary import CLASS_SCORE, KIND_NAME, TIER_NAME
from conveyor_scheduler.settings import SchedulerSettings

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
"""Origin of the rank's time term (keeps the numbers small; any fixed instant works)."""


@dataclass(frozen=True)
class Policy:
    """Everything the scheduler derives from settings to rank, admit and dispatch."""

    aging_per_second: float
    band_width: float
    tier_boost: dict[int, float]
    tier_concurrency: dict[int, int]
    tier_weight: dict[int, int]
    kind_cost: dict[int, int]
    kind_limits: dict[int, int]
    model_limits: dict[str, int]
    default_model_limit: int
    global_concurrency: int

    @classmethod
    def from_settings(cls, s: SchedulerSettings) -> Policy:
        """Build from settings."""
        by_kind = {v: k for k, v in KIND_NAME.items()}
        by_tier = {v: k for k, v in TIER_NAME.items()}
        return cls(
            aging_per_second=s.aging_rate_per_minute / 60.0,
            band_width=s.priority_band_width,
            tier_boost={by_tier[k]: float(v) for k, v in s.tier_boost.items() if k in by_tier},
            tier_concurrency={by_tier[k]: v for k, v in s.tier_concurrency.items() if k in by_tier},
            tier_weight={by_tier[k]: v for k, v in s.tier_weight.items() if k in by_tier},
            kind_cost={kind: s.kind_cost.get(name, 1) for name, kind in by_kind.items()},
            kind_limits={by_kind[k]: v for k, v in s.kind_limits.items()},
            model_limits=dict(s.model_limits),
            default_model_limit=s.default_model_limit,
            global_concurrency=s.global_concurrency,
        )

    def base_score(self, priority: int, tier: int) -> float:
        """Class score plus tier boost."""
        return CLASS_SCORE.get(priority, 1.0) + self.tier_boost.get(tier, 0.0)

    def rank(self, priority: int, tier: int, enqueued_at: datetime) -> float:
        """The stored, time-invariant sort key (descending)."""
        waited_origin = (enqueued_at - EPOCH).total_seconds()
        return self.base_score(priority, tier) - self.aging_per_second * waited_origin

    def rank_sql(self) -> str:
        """SQL expression of :meth:`rank` over a ``tasks`` row (for the rerank command)."""
        classes = " ".join(f"WHEN {p} THEN {score!r}" for p, score in CLASS_SCORE.items())
        boosts = " ".join(f"WHEN {t} THEN {b!r}" for t, b in self.tier_boost.items())
        epoch = EPOCH.isoformat()
        return (
            f"(CASE priority {classes} ELSE 1.0 END) + (CASE tier {boosts} ELSE 0.0 END)"
            f" - {self.aging_per_second!r} * EXTRACT(EPOCH FROM (enqueued_at - '{epoch}'::timestamptz))"
        )

    def effective(self, rank: float, now: datetime) -> float:
        """Effective priority at ``now`` of a task with ``rank``."""
        return rank + self.aging_per_second * (now - EPOCH).total_seconds()

    def band(self, rank: float, now: datetime) -> int:
        """Quantized effective priority (fair share applies inside a band)."""
        return math.floor(self.effective(rank, now) / self.band_width)

    def tenant_limit(self, tier: int, explicit: int | None) -> int:
        """Slots a tenant may hold."""
        return explicit if explicit else self.tier_concurrency.get(tier, 1)

    def tenant_weight(self, tier: int, explicit: int | None) -> int:
        """Fair-share weight of a tenant."""
        return explicit if explicit else self.tier_weight.get(tier, 1)

    def cost(self, kind: int) -> int:
        """Slots one task of ``kind`` costs."""
        return self.kind_cost.get(kind, 1)

    def model_limit(self, model: str) -> int:
        """Slots all tasks of ``model`` may hold (0 = no limit)."""
        return self.model_limits.get(model, self.default_model_limit)

    def effective_cost(
        self, cost: int, kind: int, model: str | None = None, tenant_limit: int | None = None
    ) -> int:
        """Slots a task actually takes when dispatched: its cost clamped to every limit over it.

        A task whose nominal cost (``slot_cost``, e.g. video 2) exceeds the smallest limit that
        applies to it (its tenant's concurrency, the global concurrency, its kind's or its model's
        limit) could never fit and would block its tenant's queue for good; clamped, it can always
        run alone (it then holds the whole of that limit). The clamp happens at dispatch with the
        limits in force then, so lowering a tenant's limit below a queued task's cost later is
        covered too; the slot row records the clamped cost.
        """
        limits = [cost, self.global_concurrency]
        if tenant_limit:
            limits.append(tenant_limit)
        if self.kind_limits.get(kind):
            limits.append(self.kind_limits[kind])
        if model is not None and self.model_limit(model):
            limits.append(self.model_limit(model))
        return max(1, min(limits))
