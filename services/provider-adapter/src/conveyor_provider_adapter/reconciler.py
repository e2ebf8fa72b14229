"""The reconciler: lost webhooks, overrun deadlines, unknown submits and pending cancels.

Every ``interval_s`` it pages through the scheduler's ``ListInFlight`` and, per attempt:

* SUBMITTED with a cancel requested -> cancel at Replicate, publish what the cancel answers. A
  cancel this replica's commands did not bring waits one pass: the ``CancelTask`` command goes to
  one replica, and every other replica's reconciler would otherwise cancel the same prediction
  again while that replica's cancel is under way (the reconciler is the backstop, not the path);
* SUBMITTED past ``run_deadline + slack`` -> cancel at Replicate, publish ``canceled``
  (deadline exceeded): Replicate's own ``Cancel-After`` should have done it, this is the backstop;
* SUBMITTED with no provider update for ``overdue_s`` (a lost webhook) -> ``GET`` the prediction and
  publish what it shows (source POLL, deterministic result ids);
* UNKNOWN (or SUBMITTING older than a create could take) -> look for the prediction in the list
  endpoint (see :mod:`matching`) and adopt it; past ``grace_s`` with no match, publish a retryable
  ``failed`` (``submit_unknown``) so the scheduler retries with attempt + 1.

Every replica reconciles every attempt; result ids are deterministic, so duplicates are absorbed
by the scheduler's inbox (the cost is duplicate GETs, bounded by the interval).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

from conveyor.events.v1 import events_pb2
from conveyor.scheduler.v1 import provider_coordination_service_pb2 as provider_pb2
from conveyor_provider_adapter.coordination import Coordinator
from conveyor_provider_adapter.matching import find_match
from conveyor_provider_adapter.metrics import AdapterMetrics
from conveyor_provider_adapter.publishing import ResultPublisher, new_result
from conveyor_provider_adapter.replicate import (
    ClientError,
    Prediction,
    ReplicateClient,
    ReplicateError,
)
from conveyor_provider_adapter.results import Observer
from conveyor_provider_adapter.state import LocalState

logger = logging.getLogger(__name__)

S = provider_pb2.SubmitState
POLL = events_pb2.RESULT_SOURCE_POLL
_STATE_NAMES = {
    S.SUBMIT_STATE_DISPATCHED: "dispatched",
    S.SUBMIT_STATE_SUBMITTING: "submitting",
    S.SUBMIT_STATE_UNKNOWN: "unknown",
    S.SUBMIT_STATE_SUBMITTED: "submitted",
}


def _dt(ts: object, present: bool) -> datetime | None:
    if not present:
        return None
    return ts.ToDatetime(tzinfo=UTC)  # type: ignore[attr-defined,no-any-return]


class Reconciler:
    """Periodic reconciliation against the scheduler's view of in-flight attempts."""

    def __init__(
        self,
        *,
        coordinator: Coordinator,
        replicate: ReplicateClient,
        observer: Observer,
        publisher: ResultPublisher,
        state: LocalState,
        metrics: AdapterMetrics,
        interval_s: float = 30.0,
        overdue_s: float = 120.0,
        grace_s: float = 180.0,
        deadline_slack_s: float = 30.0,
        skew_s: float = 60.0,
        submitting_stale_s: float = 150.0,
    ) -> None:
        self.coordinator = coordinator
        self.replicate = replicate
        self.observer = observer
        self.publisher = publisher
        self.state = state
        self.metrics = metrics
        self.interval_s = interval_s
        self.overdue_s = overdue_s
        self.grace_s = grace_s
        self.deadline_slack_s = deadline_slack_s
        self.skew_s = skew_s
        self.submitting_stale_s = submitting_stale_s
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    def start(self) -> None:
        """Run passes in the background until :meth:`stop`."""
        self._stop.clear()
        self._task = asyncio.create_task(self._loop(), name="reconciler")

    async def stop(self) -> None:
        """Finish the current pass and stop."""
        self._stop.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout=10)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            self._task = None

    async def _loop(self) -> None:
        startup = True
        while not self._stop.is_set():
            try:
                # The first pass polls every submitted attempt: a predecessor killed with
                # accepted-but-unprocessed webhooks leaves tasks that no webhook will finish.
                await self.run_once(startup=startup)
                startup = False
            except Exception:
                logger.exception("reconcile pass failed", extra={"action": "reconcile_failed"})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=self.interval_s)

    async def run_once(self, now: datetime | None = None, *, startup: bool = False) -> Counter[str]:
        """One pass; returns the actions taken (also counted in metrics). ``startup`` polls every
        submitted attempt at once instead of only the overdue ones."""
        current = now or datetime.now(UTC)
        actions: Counter[str] = Counter()
        states: Counter[str] = Counter()
        async for attempt in self.coordinator.in_flight():
            states[_STATE_NAMES.get(attempt.state, "unspecified")] += 1
            if self._stop.is_set():
                break
            try:
                action = await self.reconcile(attempt, current, startup=startup)
            except Exception:
                logger.exception(
                    "reconcile of an attempt failed",
                    extra={"action": "reconcile_attempt_failed", "task_id": attempt.task_id},
                )
                action = "error"
            if action:
                actions[action] += 1
                self.metrics.reconcile_actions.labels(action).inc()
        for name in _STATE_NAMES.values():
            self.metrics.in_flight.labels(name).set(states.get(name, 0))
        return actions

    async def reconcile(
        self, a: provider_pb2.InFlightAttempt, now: datetime, *, startup: bool = False
    ) -> str | None:
        """Reconcile one attempt; returns the action taken, if any."""
        info = self.state.attempt(a.task_id, a.attempt, a.tenant_id)
        if a.model and not (info.model or info.deployment):
            info.model = a.model
        started_at = _dt(a.submit_started_at, a.HasField("submit_started_at"))
        last_update = _dt(a.last_provider_update_at, a.HasField("last_provider_update_at"))
        deadline = _dt(a.run_deadline, a.HasField("run_deadline"))
        if a.state == S.SUBMIT_STATE_SUBMITTED and a.prediction_id:
            if info.prediction_id != a.prediction_id:
                info.prediction_id = a.prediction_id
            if a.cancel_requested or info.cancel_requested:
                if not info.cancel_requested and not info.cancel_noticed:
                    info.cancel_noticed = True  # acted on from the next pass if still pending
                    return None
                if a.prediction_id in info.cancels_in_flight:
                    return "cancel"
                seen: Prediction | None
                if a.prediction_id in info.canceled:  # accepted before: see where it stands
                    seen = await self.replicate.get(a.prediction_id)
                else:
                    seen = await self.observer.cancel_once(info, a.prediction_id)
                if seen is not None:
                    await self.observer.observe(seen, a.task_id, a.attempt, source=POLL)
                return "cancel"
            if deadline is not None and now > deadline + timedelta(seconds=self.deadline_slack_s):
                prediction = await self.observer.cancel_quietly(a.prediction_id)
                if prediction is None:
                    prediction = await self.replicate.get(a.prediction_id)
                await self.observer.observe(
                    prediction, a.task_id, a.attempt, source=POLL, deadline_cancel=True
                )
                return "deadline_cancel"
            quiet_since = last_update or started_at
            overdue = quiet_since is None or now - quiet_since > timedelta(seconds=self.overdue_s)
            # A long run without progress stays quiet: poll it once per overdue period only.
            if startup or (overdue and time.monotonic() - info.last_polled >= self.overdue_s):
                info.last_polled = time.monotonic()
                try:
                    prediction = await self.replicate.get(a.prediction_id)
                except ClientError as exc:
                    logger.warning(
                        "in-flight prediction not readable",
                        extra={
                            "action": "poll_failed",
                            "prediction_id": a.prediction_id,
                            "status": exc.status,
                        },
                    )
                    return "poll_failed"
                await self.observer.observe(prediction, a.task_id, a.attempt, source=POLL)
                return "poll"
            return None
        if a.state in (S.SUBMIT_STATE_UNKNOWN, S.SUBMIT_STATE_SUBMITTING):
            if started_at is None:
                started_at = info.unknown_since or now
            age = (now - started_at).total_seconds()
            if a.state == S.SUBMIT_STATE_SUBMITTING and age < self.submitting_stale_s:
                return None  # a create is (probably) in progress somewhere
            return await self._reconcile_unknown(a, started_at, age)
        return None

    async def _reconcile_unknown(
        self, a: provider_pb2.InFlightAttempt, started_at: datetime, age: float
    ) -> str | None:
        info = self.state.attempt(a.task_id, a.attempt, a.tenant_id)
        try:
            match = await find_match(
                self.replicate, info, created_after=started_at - timedelta(seconds=self.skew_s)
            )
        except ReplicateError as exc:
            logger.warning(
                "reconcile list failed",
                extra={"action": "reconcile_list_failed", "error": str(exc)},
            )
            return "list_failed"
        if match is not None:
            await self.observer.observe(match, a.task_id, a.attempt, source=POLL)
            return "adopt_list"
        if age < self.grace_s:
            return None
        result = new_result(
            f"unknown:{a.task_id}:{a.attempt}",
            a.task_id,
            a.attempt,
            tenant_id=a.tenant_id,
            prediction_id="",
            source=POLL,
        )
        result.failed.code = "submit_unknown"
        result.failed.message = (
            f"create outcome unknown and no prediction found after {self.grace_s:.0f}s"
        )
        result.failed.retryable = True
        logger.warning(
            "unknown submit given up; a new attempt may be created",
            extra={"action": "unknown_submit_failed", "task_id": a.task_id, "attempt": a.attempt},
        )
        await self.publisher.publish(result)
        return "unknown_failed"
