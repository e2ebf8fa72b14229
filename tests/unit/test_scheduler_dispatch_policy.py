"""conveyor_scheduler.dispatch.policy and the cycle's assignment without a database: rank and aging,
bands, weighted fair assignment within limits.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from conveyor.tasks.v1 import task_pb2
from conveyor_scheduler.dispatch.candidates import Candidate, Capacity
from conveyor_scheduler.dispatch.cycle import Dispatcher
from conveyor_scheduler.dispatch.leadership import Leader
from conveyor_scheduler.dispatch.policy import Policy
from conveyor_scheduler.dispatch.wakeups import Wakeups
from conveyor_testkit import scheduler as kit

URL = "postgresql://u@127.0.0.1:1/db"
NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def _policy(**overrides: Any) -> Policy:
    return Policy.from_settings(kit.make_settings(URL, **overrides))


def test_rank_orders_by_class_tier_and_age() -> None:
    p = _policy(aging_rate_per_minute=0.2)  # one class per 5 minutes
    normal_now = p.rank(task_pb2.PRIORITY_NORMAL, task_pb2.TIER_FREE, NOW)
    high_now = p.rank(task_pb2.PRIORITY_HIGH, task_pb2.TIER_FREE, NOW)
    pro_normal = p.rank(task_pb2.PRIORITY_NORMAL, task_pb2.TIER_PRO, NOW)
    assert high_now > normal_now
    assert pro_normal - normal_now == pytest.approx(2.0)  # pro boost: two class steps
    low_old = p.rank(task_pb2.PRIORITY_LOW, task_pb2.TIER_FREE, NOW - timedelta(minutes=6))
    assert low_old > normal_now  # waited 6 min: +1.2 classes, beats a fresh normal task
    low_recent = p.rank(task_pb2.PRIORITY_LOW, task_pb2.TIER_FREE, NOW - timedelta(minutes=4))
    assert low_recent < normal_now
    # Effective priority at "now" = base score + waited * rate.
    assert p.effective(low_old, NOW) == pytest.approx(0 + 6 * 0.2)
    assert p.band(high_now, NOW) == 2
    assert p.band(normal_now, NOW) == 1


def test_rank_is_time_invariant_ordering() -> None:
    p = _policy(aging_rate_per_minute=1.0)
    a = p.rank(task_pb2.PRIORITY_LOW, 1, NOW - timedelta(minutes=10))
    b = p.rank(task_pb2.PRIORITY_URGENT, 1, NOW)
    later = NOW + timedelta(hours=1)
    assert (p.effective(a, NOW) > p.effective(b, NOW)) == (a > b)
    assert (p.effective(a, later) > p.effective(b, later)) == (a > b)


def _dispatcher(**overrides: Any) -> Dispatcher:
    settings = kit.make_settings(URL, **overrides)
    policy = Policy.from_settings(settings)
    return Dispatcher(settings, policy, Leader(settings, URL, "unit"), Wakeups())


def _cands(
    tenant: str, n: int, rank: float = 1.0, kind: int = 2, model: str = "a/b"
) -> list[Candidate]:
    return [
        Candidate(uuid.uuid4(), tenant, kind, model, rank - i * 1e-6, 2 if kind == 1 else 1, NOW)
        for i in range(n)
    ]


def _cap(
    global_free: int, tenants: dict[str, int], weights: dict[str, int] | None = None
) -> Capacity:
    return Capacity(
        global_free=global_free,
        tenant_free=dict(tenants),
        tenant_weight=weights or dict.fromkeys(tenants, 1),
        model_used={},
        kind_used={},
    )


def test_assign_is_weighted_fair_within_a_band() -> None:
    d = _dispatcher(aging_rate_per_minute=0.0)
    per = {"heavy": _cands("heavy", 30), "light": _cands("light", 30)}
    chosen = d._assign(per, _cap(12, {"heavy": 30, "light": 30}, {"heavy": 1, "light": 2}), NOW)
    counts = {t: sum(1 for c in chosen if c.tenant_id == t) for t in per}
    assert counts == {"heavy": 4, "light": 8}  # weights 1:2


def test_assign_higher_band_first_then_limits() -> None:
    d = _dispatcher(aging_rate_per_minute=0.0, kind_limits={"video": 2})
    per = {
        "a": _cands("a", 3, rank=1.0),
        "b": _cands("b", 3, rank=3.0),  # urgent band
        "v": _cands("v", 3, rank=5.0, kind=1),  # video, cost 2, kind limit 2
    }
    chosen = d._assign(per, _cap(5, {"a": 3, "b": 2, "v": 3}), NOW)
    ids = [c.tenant_id for c in chosen]
    assert ids[0] == "v"
    assert ids.count("v") == 1  # kind limit 2 = one video
    assert ids.count("b") == 2  # tenant limit 2
    assert ids.count("a") == 1  # what is left of the global 5 (2 + 2 + 1)
    assert sum(c.cost for c in chosen) <= 5
