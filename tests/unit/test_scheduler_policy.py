"""Scheduler logic that needs no database: rank/aging, bands, backoff, fair assignment, result
transitions on rows, request validation and settings."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from conveyor.tasks.v1 import task_pb2
from conveyor_scheduler import testing as kit
from conveyor_scheduler.admission.submit import new_task_row
from conveyor_scheduler.admission.validation import validate_item
from conveyor_scheduler.dispatch.cycle import Candidate, Capacity, Dispatcher
from conveyor_scheduler.dispatch.leadership import Leader
from conveyor_scheduler.dispatch.policy import Policy
from conveyor_scheduler.dispatch.wakeups import Wakeups
from conveyor_scheduler.lifecycle import Backoff
from conveyor_scheduler.results.apply import apply_result
from conveyor_scheduler.settings import SchedulerSettings, to_sqlalchemy_url
from conveyor_scheduler.store import models as m
from conveyor_scheduler.store.changes import Changes

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


def test_backoff_grows_with_cap_and_jitter() -> None:
    b = Backoff(base=1.0, cap=10.0, jitter=0.0)
    assert [b.delay(n) for n in (1, 2, 3, 4, 5, 6)] == [1, 2, 4, 8, 10, 10]
    j = Backoff(base=1.0, cap=100.0, jitter=0.5)
    delays = {round(j.delay(3), 3) for _ in range(50)}
    assert len(delays) > 1
    assert all(2.0 <= d <= 6.0 for d in delays)


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


def _row(**overrides: Any) -> dict[str, Any]:
    settings = kit.make_settings(URL)
    row = new_task_row(
        uuid.uuid4(), "t", kit.item(), 1, Policy.from_settings(settings), settings, NOW
    )
    row.update(status=m.DISPATCHED, attempt=1, submit_state=1, dispatched_at=NOW)
    row.update(overrides)
    return row


def test_results_are_fenced_and_forward_only() -> None:
    backoff = Backoff(1, 10, 0)
    row = _row()
    changes = Changes(now=NOW)
    apply_result(row, kit.result(row["id"], 2, "succeeded"), changes, backoff)  # stale attempt
    assert row["status"] == m.DISPATCHED
    assert not changes.events
    apply_result(row, kit.result(row["id"], 1, "progress", percent=150), changes, backoff)
    assert (row["status"], row["progress"]) == (m.RUNNING, 99)
    apply_result(row, kit.result(row["id"], 1, "progress", percent=10), changes, backoff)
    assert row["progress"] == 99  # never backwards
    apply_result(row, kit.result(row["id"], 1, "failed", retryable=True), changes, backoff)
    assert row["status"] == m.QUEUED
    assert row["not_before"] == NOW + timedelta(seconds=1)
    assert changes.waiting["t"] == 1
    assert changes.free_slots == [row["id"]]
    apply_result(row, kit.result(row["id"], 1, "succeeded"), changes, backoff)  # after re-queue
    assert row["status"] == m.QUEUED
    assert [e["type"] for e in changes.events] == [3, 4, 7]  # started, progress, retry
    assert [e["sequence"] for e in changes.events] == [1, 2, 3]


def test_terminal_outcomes() -> None:
    backoff = Backoff(1, 10, 0)
    cases: list[tuple[str, dict[str, Any], dict[str, Any], int]] = [
        ("failed", {"retryable": False}, {}, m.FAILED),
        ("canceled", {"deadline_exceeded": True}, {}, m.FAILED),
        ("canceled", {}, {"cancel_requested": True}, m.CANCELED),
        ("aborted", {}, {"cancel_requested": True}, m.CANCELED),
        ("failed", {"retryable": True}, {"attempt": 3, "max_attempts": 3}, m.DEAD_LETTERED),
        ("succeeded", {}, {"cancel_requested": True}, m.SUCCEEDED),
    ]
    for outcome, fields, overrides, expected in cases:
        row = _row(**overrides)
        changes = Changes(now=NOW)
        apply_result(
            row, kit.result(row["id"], row["attempt"], outcome, **fields), changes, backoff
        )
        assert row["status"] == expected, (outcome, fields, overrides)
        assert row["finished_at"] == NOW
        assert row["submit_state"] is None
        assert changes.free_slots == [row["id"]]
        dead = [o for o in changes.outbox if o["topic"] == "conveyor.tasks.v1.dead-letter"]
        assert len(dead) == (1 if expected == m.DEAD_LETTERED else 0)


def test_validation_names_the_bad_fields() -> None:
    good = kit.spec()
    assert validate_item("", "r1", good, 10) == []
    bad = task_pb2.TaskSpec(kind=9, model="noslash", max_attempts=50)  # type: ignore[arg-type]
    fields = {v.field for v in validate_item("x.", "", bad, 10)}
    assert fields == {"x.request_id", "x.spec.kind", "x.spec.target", "x.spec.max_attempts"}


def test_settings_require_database_url_and_validate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SCHEDULER_DATABASE_URL", raising=False)
    with pytest.raises(ValidationError):
        SchedulerSettings()  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        kit.make_settings(URL, tier_concurrency={"free": 1})
    with pytest.raises(ValidationError):
        kit.make_settings(URL, kind_cost={"hologram": 3})
    monkeypatch.setenv("SCHEDULER_DATABASE_URL", URL)
    monkeypatch.setenv("SCHEDULER_GLOBAL_CONCURRENCY", "7")
    monkeypatch.setenv("SCHEDULER_KIND_LIMITS", '{"video": 4}')
    s = SchedulerSettings()  # type: ignore[call-arg]
    assert s.global_concurrency == 7
    assert s.kind_limits == {"video": 4}
    assert s.sqlalchemy_url == "postgresql+psycopg://u@127.0.0.1:1/db"
    assert to_sqlalchemy_url("postgresql+asyncpg://h/d") == "postgresql+psycopg://h/d"
    with pytest.raises(ValueError, match="postgresql"):
        to_sqlalchemy_url("mysql://h/d")
