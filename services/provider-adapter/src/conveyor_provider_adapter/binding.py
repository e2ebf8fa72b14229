"""Binding a webhook delivery's prediction to the (task, attempt) its URL claims.

A delivery is signed by Replicate (Standard Webhooks) and its URL carries our HMAC token of
``task:attempt``, but neither ties the *prediction in the body* to that attempt: a tenant holding a
genuine delivery of its own task T4 can post it, original or re-signed by Replicate under a fresh
webhook-id, to the URL of task T2. Nothing may act on such a delivery (no adoption, no result, no
cancel). So before anything acts on a delivery its prediction id is checked against the submit the
scheduler recorded for the attempt:

* the attempt's recorded prediction id (known locally from our own create, an earlier binding or a
  cancel; otherwise from the scheduler's ``ListInFlight``) must equal the delivery's;
* an attempt whose create outcome is unknown (``SUBMITTING``/``UNKNOWN``, no prediction id yet) may
  adopt a prediction only when no other in-flight attempt recorded it, it was created after the
  intent was recorded (minus a clock skew), and, when this replica holds the dispatch, its input and
  model match the dispatch;
* an attempt that is not in flight (finished, stale, unknown) binds nothing.

Anything else is *unbound*: dropped, logged and counted by reason
(``conveyor_adapter_webhooks_unbound_total``); the prediction is never canceled on a delivery's
word. The scheduler's records are read with ``ListInFlight`` (the only read RPC of the submit
protocol), cached and refreshed at most every ``min_refresh_s`` with concurrent misses sharing one
scan. A per-attempt read RPC at the scheduler would make the miss O(1) (see the README).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from conveyor.scheduler.v1 import provider_coordination_service_pb2 as provider_pb2
from conveyor_provider_adapter.coordination import Coordinator
from conveyor_provider_adapter.matching import matches
from conveyor_provider_adapter.metrics import AdapterMetrics
from conveyor_provider_adapter.replicate import Prediction
from conveyor_provider_adapter.state import LocalState

logger = logging.getLogger(__name__)

S = provider_pb2.SubmitState
UNBOUND_REASONS = (
    "other_prediction",
    "recorded_elsewhere",
    "not_in_flight",
    "not_submitted",
    "mismatch",
)


@dataclass(frozen=True)
class Record:
    """The scheduler's submit record of one in-flight attempt."""

    task_id: str
    attempt: int
    prediction_id: str
    state: int
    submit_started_at: datetime | None


class SubmitRecords:
    """A cache of the scheduler's in-flight submit records (refreshed by ``ListInFlight``)."""

    def __init__(self, coordinator: Coordinator, *, min_refresh_s: float = 0.5) -> None:
        self.coordinator = coordinator
        self.min_refresh_s = min_refresh_s
        self._by_attempt: dict[tuple[str, int], Record] = {}
        self._by_prediction: dict[str, tuple[str, int]] = {}
        self._scanned_at = float("-inf")
        self._lock = asyncio.Lock()

    def cached(self, task_id: str, attempt: int) -> Record | None:
        """The record from the last scan, if any."""
        return self._by_attempt.get((task_id, attempt))

    def owner(self, prediction_id: str) -> tuple[str, int] | None:
        """The in-flight attempt that recorded ``prediction_id`` (last scan)."""
        return self._by_prediction.get(prediction_id)

    async def refresh(self) -> None:
        """Rescan unless a scan started after this call was made (misses share one scan)."""
        asked = time.monotonic()
        async with self._lock:
            if self._scanned_at >= asked:
                return
            wait = self._scanned_at + self.min_refresh_s - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            started = time.monotonic()
            by_attempt: dict[tuple[str, int], Record] = {}
            by_prediction: dict[str, tuple[str, int]] = {}
            async for a in self.coordinator.in_flight():
                started_at = (
                    a.submit_started_at.ToDatetime(tzinfo=UTC)
                    if a.HasField("submit_started_at")
                    else None
                )
                key = (a.task_id, a.attempt)
                by_attempt[key] = Record(a.task_id, a.attempt, a.prediction_id, a.state, started_at)
                if a.prediction_id:
                    by_prediction[a.prediction_id] = key
            self._by_attempt, self._by_prediction = by_attempt, by_prediction
            self._scanned_at = started


class Binder:
    """Decides whether a delivery's prediction belongs to the attempt named in its URL."""

    def __init__(
        self,
        *,
        state: LocalState,
        records: SubmitRecords,
        metrics: AdapterMetrics,
        skew_s: float = 60.0,
        create_wait_s: float = 10.0,
    ) -> None:
        self.state = state
        self.records = records
        self.metrics = metrics
        self.skew_s = skew_s
        self.create_wait_s = create_wait_s

    def _unbound(self, reason: str, task_id: str, attempt: int, prediction: Prediction) -> bool:
        self.metrics.webhooks_unbound.labels(reason).inc()
        logger.warning(
            "webhook prediction not bound to the attempt of its URL; ignored",
            extra={
                "action": "webhook_unbound",
                "reason": reason,
                "task_id": task_id,
                "attempt": attempt,
                "prediction_id": prediction.id,
            },
        )
        return False

    async def bind(self, task_id: str, attempt: int, prediction: Prediction) -> bool:
        """True when ``prediction`` is (or may be adopted as) the prediction of the attempt."""
        pid = prediction.id
        info = self.state.peek(task_id, attempt)
        if info is not None and info.creating and not info.prediction_id:
            # This replica's create of the attempt is in flight and the prediction's first webhook
            # beat its answer (an instant prediction): the answer names the prediction, so wait
            # for it rather than rescan the scheduler's in-flight attempts (a ListInFlight call,
            # at most one per ``min_refresh_s``, that every such delivery waited for).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.create_wait_s):
                    await info.create_answered.wait()
        if info is not None:
            if pid in info.rejected:
                return self._unbound("other_prediction", task_id, attempt, prediction)
            if info.prediction_id:
                if info.prediction_id == pid:
                    return True
                return self._unbound("other_prediction", task_id, attempt, prediction)
        record = self.records.cached(task_id, attempt)
        if record is None or not record.prediction_id or record.prediction_id != pid:
            await self.records.refresh()
            record = self.records.cached(task_id, attempt)
        if record is None:
            return self._unbound("not_in_flight", task_id, attempt, prediction)
        if record.prediction_id:
            if record.prediction_id != pid:
                return self._unbound("other_prediction", task_id, attempt, prediction)
            info = self.state.attempt(task_id, attempt)
            info.prediction_id = pid
            return True
        # No prediction recorded yet: only an attempt whose create was sent may adopt one.
        if record.state not in (S.SUBMIT_STATE_SUBMITTING, S.SUBMIT_STATE_UNKNOWN):
            return self._unbound("not_submitted", task_id, attempt, prediction)
        owner = self.records.owner(pid)
        if owner is not None and owner != (task_id, attempt):
            return self._unbound("recorded_elsewhere", task_id, attempt, prediction)
        since = (record.submit_started_at or datetime.now(UTC)) - timedelta(seconds=self.skew_s)
        if prediction.created_at is not None and prediction.created_at < since:
            return self._unbound("mismatch", task_id, attempt, prediction)
        if info is not None and info.input is not None and not matches(prediction, info, since):
            return self._unbound("mismatch", task_id, attempt, prediction)
        return True
