"""conveyor_scheduler.results.apply on rows without a database: results fenced by attempt and forward-
only; terminal outcomes.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from conveyor_scheduler.admission.submit import new_task_row
from conveyor_scheduler.dispatch.policy import Policy
from conveyor_scheduler.lifecycle import Backoff
from conveyor_scheduler.results.apply import apply_result
from conveyor_scheduler.store import models as m
from conveyor_scheduler.store.changes import Changes
from conveyor_testkit import scheduler as kit

URL = "postgresql://u@127.0.0.1:1/db"
NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


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


def _row(**overrides: Any) -> dict[str, Any]:
    settings = kit.make_settings(URL)
    row = new_task_row(
        uuid.uuid4(), "t", kit.item(), 1, Policy.from_settings(settings), settings, NOW
    )
    row.update(status=m.DISPATCHED, attempt=1, submit_state=1, dispatched_at=NOW)
    row.update(overrides)
    return row
