"""The task state machine's shared moves: finishing a task, cancel completion, retry or dead-letter.

Used by the results path, the submit protocol, cancellation and the sweeps. Each function works on a
task row locked by the caller's transaction and records its effects in a
:class:`~conveyor_scheduler.store.changes.Changes`. Retries back off exponentially with jitter and a
cap (:class:`Backoff`), or by the task's own retry policy. See ``docs/task-state-machine.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from conveyor_common.randomness import rng
from conveyor_common.vocabulary import EV_CANCELED, EV_DEAD_LETTERED, EV_RETRY
from conveyor_scheduler.groups.delays import retry_delay
from conveyor_scheduler.settings import SchedulerSettings
from conveyor_scheduler.store import models as m
from conveyor_scheduler.store.changes import Changes
from conveyor_scheduler.store.convert import TaskRow


@dataclass(frozen=True)
class Backoff:
    """Exponential retry backoff with jitter and a cap."""

    base: float
    cap: float
    jitter: float

    @classmethod
    def from_settings(cls, s: SchedulerSettings) -> Backoff:
        """From settings."""
        return cls(s.retry_base_seconds, s.retry_max_seconds, s.retry_jitter)

    def delay(self, attempt_in_generation: int) -> float:
        """Seconds before retry number ``attempt_in_generation`` (1 = after the first failure)."""
        raw = min(self.cap, self.base * (2 ** max(0, attempt_in_generation - 1)))
        return float(max(0.0, raw * (1 + self.jitter * (2 * rng.random() - 1))))


def finish(row: TaskRow, status: int, now: datetime) -> None:
    row["status"] = status
    row["finished_at"] = now
    row["submit_state"] = None
    row["not_before"] = None


def mark_canceled(row: TaskRow, changes: Changes, previous: int) -> None:
    finish(row, m.CANCELED, changes.now)
    changes.event(row, EV_CANCELED, previous)


def retry_or_dead_letter(row: TaskRow, changes: Changes, previous: int, backoff: Backoff) -> None:
    used = row["attempt"] - row["attempt_base"]
    if used < row["max_attempts"]:
        row.update(
            status=m.QUEUED,
            submit_state=None,
            submit_started_at=None,
            prediction_id=None,
            progress=0,
            started_at=None,
            not_before=changes.now + timedelta(seconds=retry_delay(row, backoff, used)),
        )
        changes.waiting[row["tenant_id"]] += 1
        changes.event(row, EV_RETRY, previous)
    else:
        finish(row, m.DEAD_LETTERED, changes.now)
        changes.event(row, EV_DEAD_LETTERED, previous)
