"""Commands from ``conveyor.provider.v1.commands``: the submit protocol and cancels.

For each DispatchTask (at least once, manual commit after handling):

1. ``BeginSubmit(task, attempt)``: the scheduler records the intent *before* the create call and
   fences by attempt. ``STOP``: stale or duplicate, do nothing. ``ALREADY_SUBMITTED``: the prediction
   exists, do nothing (its webhooks and the reconciler carry the results). ``RECONCILE``: an earlier
   create of this attempt has an unknown outcome (or a replica died mid-create): look for it in the
   list endpoint, never create. ``PROCEED``: create now.
2. Create (after a token from the bucket). A definite answer -> a ``started`` result naming the
   prediction (ADR 0003: the scheduler records it from the attempt's first result; a stale
   attempt's prediction is canceled by the CancelTask the scheduler answers with). A 4xx -> a non-retryable
   ``failed`` result. A 429 -> the bucket pauses every create until ``retry_after``, a ``throttled``
   result tells the scheduler to pause dispatch, and the create is retried (the task keeps its
   slot) for up to ``throttle_max_wait_s``. An ambiguous outcome (timeout after sending, reset, 5xx)
   -> ``MarkSubmitUnknown`` and **no resubmission**: the ``start`` webhook (always sent) adopts the
   prediction through its URL's task/attempt, or the reconciler finds it in the list endpoint.

So a dispatch redelivered many times, two replicas racing, or a kill -9 between the create call and
its recording produce one prediction, unless an ambiguous create *and* the loss of its start
webhook *and* a failed list match coincide.

Run deadlines go to Replicate as ``Cancel-After``, which Replicate refuses below 5 s. A deadline
closer than that at create time is sent as ``Cancel-After: 5s`` (the backstop that holds across an
adapter restart) and enforced by a timer here that cancels the prediction at the deadline itself
(the outcome is ``canceled`` with ``deadline_exceeded``).

CancelTask goes to Replicate's cancel endpoint; when the prediction id is not known yet the cancel
is remembered and applied as soon as the id appears (and the reconciler applies the scheduler's
``cancel_requested`` flag as a backstop).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import json_format

from conveyor.events.v1 import events_pb2
from conveyor.scheduler.v1 import provider_coordination_service_pb2 as provider_pb2
from conveyor_common import tracing
from conveyor_common.context import current_traceparent
from conveyor_common.kafka import Envelope, PermanentError
from conveyor_common.ratelimit import AsyncTokenBucket
from conveyor_common.vocabulary import STALE_CREATE
from conveyor_provider_adapter.classify import classify_status
from conveyor_provider_adapter.coordination import Coordinator
from conveyor_provider_adapter.matching import find_match, normalize_input
from conveyor_provider_adapter.metrics import AdapterMetrics
from conveyor_provider_adapter.publishing import ResultPublisher, new_result
from conveyor_provider_adapter.replicate import (
    CANCEL_AFTER_MIN_S,
    Ambiguous,
    ClientError,
    CreateRequest,
    Prediction,
    RateLimited,
    ReplicateClient,
    ReplicateError,
    Unreachable,
    cancel_after_seconds,
    parse_target,
)
from conveyor_provider_adapter.results import Observer
from conveyor_provider_adapter.state import AttemptInfo, LocalState
from conveyor_provider_adapter.webhook_token import webhook_url

logger = logging.getLogger(__name__)

D = provider_pb2.SubmitDecision
CREATE = events_pb2.RESULT_SOURCE_CREATE
POLL = events_pb2.RESULT_SOURCE_POLL


class CommandHandler:
    """Handles DispatchTask and CancelTask envelopes."""

    def __init__(
        self,
        *,
        coordinator: Coordinator,
        replicate: ReplicateClient,
        bucket: AsyncTokenBucket,
        observer: Observer,
        publisher: ResultPublisher,
        state: LocalState,
        metrics: AdapterMetrics,
        webhook_base_url: str,
        webhook_key: bytes,
        provider: str = "replicate",
        throttle_max_wait_s: float = 120.0,
        reconcile_skew_s: float = 60.0,
        unreachable_attempts: int = 3,
    ) -> None:
        self.coordinator = coordinator
        self.replicate = replicate
        self.bucket = bucket
        self.observer = observer
        self.publisher = publisher
        self.state = state
        self.metrics = metrics
        self.webhook_base_url = webhook_base_url
        self.webhook_key = webhook_key
        self.provider = provider
        self.throttle_max_wait_s = throttle_max_wait_s
        self.reconcile_skew_s = reconcile_skew_s
        self.unreachable_attempts = unreachable_attempts
        self._deadline_timers: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        """Stop the deadline timers (Cancel-After, at most 5 s later, is their backstop)."""
        timers, self._deadline_timers = self._deadline_timers, set()
        for timer in timers:
            timer.cancel()
        for timer in timers:
            with contextlib.suppress(asyncio.CancelledError):
                await timer

    async def handle(self, envelope: Envelope) -> None:
        """The consumer's handler."""
        message = envelope.message
        if isinstance(message, events_pb2.DispatchTask):
            await self.dispatch(message)
        elif isinstance(message, events_pb2.CancelTask):
            await self.cancel(message)
        else:
            logger.info(
                "ignored command", extra={"action": "command_ignored", "type": envelope.type}
            )

    # ---- dispatch ----

    async def dispatch(self, d: events_pb2.DispatchTask) -> None:
        """Run the submit protocol for one DispatchTask."""
        if not d.task_id or d.attempt < 1:
            raise PermanentError(f"dispatch without task id or attempt: {d.task_id!r}/{d.attempt}")
        decision = await self.coordinator.begin_submit(d.task_id, d.attempt)
        name = provider_pb2.SubmitDecision.Name(decision.decision).removeprefix("SUBMIT_DECISION_")
        self.metrics.submit_decisions.labels(name.lower()).inc()
        logger.info(
            "submit decision",
            extra={
                "action": "submit_decision",
                "task_id": d.task_id,
                "attempt": d.attempt,
                "decision": name,
            },
        )
        info = self.state.attempt(d.task_id, d.attempt, d.tenant_id)
        if decision.decision == D.SUBMIT_DECISION_PROCEED:
            await self._submit(d, info)
        elif decision.decision == D.SUBMIT_DECISION_ALREADY_SUBMITTED:
            if decision.prediction_id and not info.prediction_id:
                info.prediction_id = decision.prediction_id
            if info.cancel_requested and info.prediction_id:
                await self._cancel_prediction(info, info.prediction_id)
        elif decision.decision == D.SUBMIT_DECISION_RECONCILE:
            started = (
                decision.submit_started_at.ToDatetime(tzinfo=UTC)
                if decision.HasField("submit_started_at")
                else datetime.now(UTC)
            )
            await self._reconcile(d, info, started)
        # STOP (and anything unknown): nothing to do.

    def _remember_dispatch(self, d: events_pb2.DispatchTask, info: AttemptInfo) -> dict[str, Any]:
        raw = normalize_input(json_format.MessageToDict(d.input))
        inp: dict[str, Any] = raw if isinstance(raw, dict) else {}
        info.input = inp
        info.model = d.model if d.WhichOneof("target") == "model" else ""
        info.deployment = d.deployment if d.WhichOneof("target") == "deployment" else ""
        return inp

    async def _fail(
        self, d: events_pb2.DispatchTask, what: str, code: str, message: str, retryable: bool
    ) -> None:
        result = new_result(
            f"create:{d.task_id}:{d.attempt}:{what}",
            d.task_id,
            d.attempt,
            tenant_id=d.tenant_id,
            prediction_id="",
            source=CREATE,
        )
        result.failed.code = code
        result.failed.message = message[:1000]
        result.failed.retryable = retryable
        await self.publisher.publish(result, required=True)

    async def _submit(self, d: events_pb2.DispatchTask, info: AttemptInfo) -> None:
        inp = self._remember_dispatch(d, info)
        try:
            target = parse_target(info.model or None, info.deployment or None)
        except ValueError as exc:
            await self._fail(d, "invalid_target", "invalid_input", str(exc), False)
            return
        deadline = d.run_deadline.ToDatetime(tzinfo=UTC) if d.HasField("run_deadline") else None
        if deadline is not None and deadline <= datetime.now(UTC):
            result = new_result(
                f"create:{d.task_id}:{d.attempt}:deadline",
                d.task_id,
                d.attempt,
                tenant_id=d.tenant_id,
                prediction_id="",
                source=CREATE,
            )
            result.aborted.message = "run deadline passed before the prediction was created"
            await self.publisher.publish(result, required=True)
            return
        request = CreateRequest(
            target=target,
            input=inp,
            webhook=webhook_url(
                self.webhook_base_url,
                self.webhook_key,
                d.task_id,
                d.attempt,
                current_traceparent() if tracing.enabled() else "",
            ),
            deadline=deadline,
        )
        first_throttle: float | None = None
        throttles = 0
        unreachable = 0
        while True:
            waited = await self.bucket.acquire()
            self.metrics.throttle_wait_seconds.inc(waited)
            started = time.perf_counter()
            info.creating = True
            info.create_answered.clear()
            try:
                prediction = await self.replicate.create(request)
            except RateLimited as exc:
                self.metrics.creates.labels("rate_limited").inc()
                self.metrics.rate_limited.labels("create").inc()
                now = time.monotonic()
                first_throttle = first_throttle or now
                self.bucket.pause_for(exc.retry_after)
                throttles += 1
                retry_at = datetime.now(UTC) + timedelta(seconds=exc.retry_after)
                await self._report_throttled(d, throttles, retry_at)
                if now - first_throttle + exc.retry_after > self.throttle_max_wait_s:
                    await self._fail(
                        d,
                        "rate_limited",
                        "rate_limited",
                        f"provider kept throttling creates for {self.throttle_max_wait_s:.0f}s",
                        True,
                    )
                    return
                continue
            except ClientError as exc:
                self.metrics.creates.labels("client_error").inc()
                code, retryable = classify_status(exc.status)
                detail = exc.detail or exc.title or str(exc)
                if exc.invalid_fields:
                    detail += " " + "; ".join(
                        f"{f.get('field')}: {f.get('description')}" for f in exc.invalid_fields[:5]
                    )
                await self._fail(d, "rejected", code, f"{exc.status}: {detail}", retryable)
                return
            except Unreachable as exc:
                self.metrics.creates.labels("unreachable").inc()
                unreachable += 1
                if unreachable < self.unreachable_attempts:
                    await asyncio.sleep(0.5 * 2 ** (unreachable - 1))
                    continue
                await self._fail(d, "unreachable", "provider_unreachable", str(exc), True)
                return
            except Ambiguous as exc:
                self.metrics.creates.labels("ambiguous").inc()
                await self._ambiguous(d, info, str(exc))
                return
            finally:
                # A webhook that beat this answer waits for it (binding.py); prediction_id is set
                # by _record before anything else runs.
                info.creating = False
                info.create_answered.set()
                self.metrics.create_seconds.labels(target.form).observe(
                    time.perf_counter() - started
                )
            break
        self.metrics.creates.labels("created").inc()
        await self._record(d, info, prediction)

    async def _report_throttled(
        self, d: events_pb2.DispatchTask, n: int, retry_at: datetime
    ) -> None:
        result = new_result(
            f"throttle:{d.task_id}:{d.attempt}:{n}",
            d.task_id,
            d.attempt,
            tenant_id=d.tenant_id,
            prediction_id="",
            source=CREATE,
        )
        result.throttled.provider = self.provider
        result.throttled.retry_at.FromDatetime(retry_at)
        logger.warning(
            "provider throttled creates",
            extra={
                "action": "create_throttled",
                "task_id": d.task_id,
                "retry_at": retry_at.isoformat(),
            },
        )
        await self.publisher.publish(result)

    async def _record(
        self, d: events_pb2.DispatchTask, info: AttemptInfo, prediction: Prediction
    ) -> None:
        """The create answered: the prediction is the attempt's. The scheduler records it from
        the ``started`` result (``Observer.report_created``, or the first result that supersedes
        it), which the dispatch's offset commit follows; a stale attempt's prediction is canceled
        by the CancelTask the scheduler answers it with. Lost with a kill before it went out (the
        dispatch's offset may be committed meanwhile), the attempt stays SUBMITTING and the
        prediction's webhooks adopt it (ADR 0003); never a second create for the attempt."""
        info.prediction_id = prediction.id
        logger.info(
            "prediction created",
            extra={
                "action": "prediction_created",
                "task_id": d.task_id,
                "attempt": d.attempt,
                "prediction_id": prediction.id,
            },
        )
        started = new_result(
            f"create:{d.task_id}:{d.attempt}:started",
            d.task_id,
            d.attempt,
            tenant_id=d.tenant_id,
            prediction_id=prediction.id,
            source=CREATE,
        )
        started.started.SetInParent()
        await self.observer.report_created(info, started)
        if info.cancel_requested:
            await self._cancel_prediction(info, prediction.id)
            return
        if d.HasField("run_deadline") and not prediction.terminal:
            self._arm_deadline(info, prediction.id, d.run_deadline.ToDatetime(tzinfo=UTC))

    def _arm_deadline(self, info: AttemptInfo, prediction_id: str, deadline: datetime) -> None:
        """Cancel at ``deadline`` a prediction whose Cancel-After had to be raised to 5 s."""
        if cancel_after_seconds(deadline) >= CANCEL_AFTER_MIN_S:
            return  # Replicate's Cancel-After enforces it

        async def fire() -> None:
            delay = cancel_after_seconds(deadline)
            if delay > 0:
                await asyncio.sleep(delay)
            if prediction_id in info.canceled or info.terminal_reported:
                return
            info.deadline_canceled = True
            self.metrics.cancels.labels("deadline_timer").inc()
            logger.info(
                "run deadline under Cancel-After's minimum reached; canceling",
                extra={
                    "action": "deadline_timer_cancel",
                    "task_id": info.task_id,
                    "attempt": info.attempt,
                    "prediction_id": prediction_id,
                },
            )
            prediction = await self.observer.cancel_once(info, prediction_id)
            if prediction is not None and prediction.terminal:
                await self.observer.observe(
                    prediction, info.task_id, info.attempt, source=POLL, deadline_cancel=True
                )

        timer = asyncio.create_task(fire(), name=f"deadline-{info.task_id}-{info.attempt}")
        self._deadline_timers.add(timer)
        timer.add_done_callback(self._deadline_timers.discard)

    async def _ambiguous(self, d: events_pb2.DispatchTask, info: AttemptInfo, reason: str) -> None:
        info.unknown_since = datetime.now(UTC)
        logger.warning(
            "create outcome unknown; not resubmitting",
            extra={"action": "create_ambiguous", "task_id": d.task_id, "reason": reason[:300]},
        )
        try:
            await self.coordinator.mark_unknown(d.task_id, d.attempt, reason)
        except Exception:
            logger.exception(
                "MarkSubmitUnknown failed (the attempt stays SUBMITTING; the reconciler handles it)",
                extra={"action": "mark_unknown_failed"},
            )

    async def _reconcile(
        self, d: events_pb2.DispatchTask, info: AttemptInfo, submit_started_at: datetime
    ) -> None:
        self._remember_dispatch(d, info)
        info.unknown_since = info.unknown_since or submit_started_at
        try:
            match = await find_match(
                self.replicate,
                info,
                created_after=submit_started_at - timedelta(seconds=self.reconcile_skew_s),
            )
        except ReplicateError as exc:
            logger.warning(
                "reconcile list failed",
                extra={"action": "reconcile_list_failed", "error": str(exc)},
            )
            match = None
        if match is not None:
            await self.observer.observe(match, d.task_id, d.attempt, source=POLL)
            return
        self.metrics.reconcile_actions.labels("no_match").inc()
        logger.info(
            "no prediction found for the attempt yet; waiting for its start webhook",
            extra={"action": "reconcile_no_match", "task_id": d.task_id, "attempt": d.attempt},
        )
        try:
            await self.coordinator.mark_unknown(
                d.task_id, d.attempt, "dispatch redelivered while the submit outcome was unknown"
            )
        except Exception:
            logger.warning("MarkSubmitUnknown failed", extra={"action": "mark_unknown_failed"})

    # ---- cancel ----

    async def cancel(self, c: events_pb2.CancelTask) -> None:
        """Cancel the prediction of (task, attempt), now or as soon as its id is known."""
        info = self.state.attempt(c.task_id, c.attempt, c.tenant_id)
        info.cancel_requested = True
        info.cancel_reason = c.reason
        if c.reason == STALE_CREATE:
            self.metrics.creates.labels("stale").inc()  # the scheduler refused its prediction
        prediction_id = c.prediction_id or info.prediction_id
        if not prediction_id:
            self.metrics.cancels.labels("deferred").inc()
            logger.info(
                "cancel deferred until the prediction id is known",
                extra={"action": "cancel_deferred", "task_id": c.task_id, "attempt": c.attempt},
            )
            return
        if not info.prediction_id:
            info.prediction_id = prediction_id
        await self._cancel_prediction(info, prediction_id)

    async def _cancel_prediction(self, info: AttemptInfo, prediction_id: str) -> None:
        prediction = await self.observer.cancel_once(info, prediction_id)
        if prediction is not None and prediction.terminal:
            await self.observer.observe(prediction, info.task_id, info.attempt, source=POLL)
