"""Provider observations -> ProviderResult records on ``conveyor.provider.v1.results``.

Result ids are deterministic so that the scheduler's inbox applies each observation once, whichever
replica or path saw it:

* a webhook delivery: ``wh:<webhook-id>`` (plus ``wh:<webhook-id>:progress`` when one delivery is
  both the first ``started`` this replica reports and a progress update);
* a poll or reconcile: ``poll:<prediction>:started``, ``poll:<prediction>:progress:<pct>``,
  ``poll:<prediction>:<terminal status>``;
* the adapter's own create: ``create:<task>:<attempt>:<what>``; throttling:
  ``throttle:<task>:<attempt>:<n>``; an unknown submit given up: ``unknown:<task>:<attempt>``.

Before publishing about a prediction this replica did not create, the observer *adopts* it:
``CompleteSubmit(task, attempt, prediction)``. That is how the ``start`` webhook of an ambiguous
create records the prediction id; a refusal (stale attempt, or another prediction already recorded
for the attempt) means the prediction is not the task's: it is canceled and nothing is published.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from conveyor.events.v1 import events_pb2
from conveyor.tasks.v1 import task_pb2
from conveyor_provider_adapter.classify import classify_error, parse_progress
from conveyor_provider_adapter.coordination import Coordinator
from conveyor_provider_adapter.matching import matches
from conveyor_provider_adapter.metrics import AdapterMetrics
from conveyor_provider_adapter.progress import (
    CallLater,
    Cancelable,
    HeldProgress,
    ProgressCoalescer,
    loop_call_later,
)
from conveyor_provider_adapter.publishing import ResultPublisher, Source, new_result, to_value
from conveyor_provider_adapter.replicate import Prediction, ReplicateClient, ReplicateError
from conveyor_provider_adapter.state import AttemptInfo, LocalState
from conveyor_provider_adapter.storage import CopiedFile, OutputCopier

logger = logging.getLogger(__name__)

POLL_SOURCE = events_pb2.RESULT_SOURCE_POLL
WEBHOOK_SOURCE = events_pb2.RESULT_SOURCE_WEBHOOK
TERMINAL_OUTCOMES = frozenset({"succeeded", "failed", "canceled", "aborted"})


class Observer:
    """Turns what a prediction shows into results, adopting it first when needed."""

    def __init__(
        self,
        *,
        state: LocalState,
        coordinator: Coordinator,
        replicate: ReplicateClient,
        copier: OutputCopier,
        publisher: ResultPublisher,
        metrics: AdapterMetrics,
        started_hold_s: float = 0.0,
        progress: ProgressCoalescer | None = None,
        call_later: CallLater = loop_call_later,
    ) -> None:
        self.state = state
        self.coordinator = coordinator
        self.replicate = replicate
        self.copier = copier
        self.publisher = publisher
        self.metrics = metrics
        self.progress = progress or ProgressCoalescer(
            0.0, on_coalesced=metrics.progress_coalesced.inc
        )
        """Which progress updates are published (every change unless an interval is set)."""
        self.held = HeldProgress(self.progress, self._publish_held, call_later)
        """Progress results held back (progress.py) until their timer fires."""
        self.call_later = call_later
        self.started_hold_s = started_hold_s
        self._started: dict[
            tuple[str, int], tuple[AttemptInfo, events_pb2.ProviderResult, Cancelable]
        ] = {}
        """``started`` results of this replica's creates, held (:meth:`report_created`)."""
        self._terminal_queued: Counter[tuple[str, int, str]] = Counter()
        """Terminal deliveries waiting in the webhook pipeline, by task, attempt and prediction
        (:meth:`terminal_queued`)."""
        self._started_due: set[tuple[str, int]] = set()
        """Held ``started`` results whose hold ended while a terminal delivery of their prediction
        waited: that delivery's result goes out instead, or they do once it was handled."""
        self._releases: set[asyncio.Task[None]] = set()
        self._copies: dict[tuple[str, int, str], asyncio.Task[list[CopiedFile]]] = {}
        """Output copies started ahead (:meth:`copy_ahead`), by task, attempt and prediction."""

    async def _publish_held(self, result: events_pb2.ProviderResult) -> bool:
        self._supersede_started(result)
        return await self.publisher.publish(result)

    # ---- this replica's creates ----

    async def report_created(self, info: AttemptInfo, started: events_pb2.ProviderResult) -> None:
        """Tell the scheduler the prediction this replica created for the attempt: ``started``
        names it, and the scheduler records it (and starts the task) with the attempt's fencing,
        or, when the attempt went stale meanwhile, has it canceled (ADR 0003). It is held
        ``started_hold_s``: a progress or terminal result of the prediction published sooner
        names it as well and goes alone (a prediction that ends within the hold costs one result,
        not two). A webhook's ``start`` adds nothing to it."""
        info.started_reported = True
        if self.started_hold_s <= 0:
            await self._publish_started(info, started)
            return
        key = (info.task_id, info.attempt)
        handle = self.call_later(self.started_hold_s, lambda: self._release_started(key))
        self._started[key] = (info, started, handle)

    def _supersede_started(self, result: events_pb2.ProviderResult) -> None:
        """Drop the held ``started`` of ``result``'s prediction: ``result`` goes out first and
        records the prediction just as well."""
        key = (result.task_id, result.attempt)
        held = self._started.get(key)
        if held is not None and held[1].prediction_id == result.prediction_id:
            del self._started[key]
            self._started_due.discard(key)
            held[2].cancel()

    def terminal_queued(self, task_id: str, attempt: int, prediction_id: str) -> None:
        """A terminal delivery of the prediction waits in the webhook pipeline: a ``started`` of it
        held here is not published when its hold ends but waits for that delivery, whose result
        supersedes it (an adapter behind on its deliveries costs no ``started`` result and no
        RUNNING event for predictions that have already ended)."""
        self._terminal_queued[(task_id, attempt, prediction_id)] += 1

    def terminal_handled(self, task_id: str, attempt: int, prediction_id: str) -> None:
        """The delivery :meth:`terminal_queued` announced was handled (published, refused or
        failed): a ``started`` still held past its hold goes out now."""
        k = (task_id, attempt, prediction_id)
        self._terminal_queued[k] -= 1
        if self._terminal_queued[k] > 0:
            return
        del self._terminal_queued[k]
        if (task_id, attempt) in self._started_due:
            self._release_started((task_id, attempt))

    def _release_started(self, key: tuple[str, int], *, now: bool = False) -> None:
        held = self._started.get(key)
        if held is None:
            return
        info, started, _ = held
        if not now and (key[0], key[1], started.prediction_id) in self._terminal_queued:
            self._started_due.add(key)  # terminal_handled releases it, if still held then
            return
        del self._started[key]
        self._started_due.discard(key)
        if info.terminal_reported or info.terminal_publishing:
            return
        task = asyncio.create_task(self._publish_started(info, started))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _publish_started(self, info: AttemptInfo, started: events_pb2.ProviderResult) -> None:
        if not await self.publisher.publish(started):
            info.started_reported = False  # a later delivery or poll reports it

    async def flush_started(self) -> None:
        """Publish every held ``started`` now and wait for the publishes (graceful shutdown)."""
        for key, (_, _, handle) in list(self._started.items()):
            handle.cancel()
            self._release_started(key, now=True)
        if self._releases:
            await asyncio.gather(*self._releases, return_exceptions=True)

    # ---- adoption ----

    async def ensure_recorded(
        self, info: AttemptInfo, prediction: Prediction, *, source: Source = POLL_SOURCE
    ) -> bool:
        """Whether results about ``prediction`` may be published for this attempt.

        A prediction the scheduler refuses is canceled only when it is known to be this attempt's
        (found by the reconciler's input match or by a poll of the recorded id); a webhook delivery's
        word is never enough (binding.py): a refused delivery changes nothing."""
        if prediction.id in info.rejected:
            return False
        if info.prediction_id == prediction.id:
            # This replica's create (its results name it: the scheduler records it from the first
            # one), an adoption, or the id the scheduler answered.
            return prediction.id not in info.rejected
        try:
            accepted = await self.coordinator.complete_submit(
                info.task_id, info.attempt, prediction.id
            )
        except Exception:
            # The scheduler is away: publish anyway (results carry the prediction id and
            # are fenced by attempt there); a later delivery or the reconciler adopts it.
            logger.warning(
                "adoption failed, publishing without it",
                extra={"action": "adopt_failed", "prediction_id": prediction.id},
                exc_info=True,
            )
            return True
        if not accepted:
            info.rejected.add(prediction.id)
            logger.warning(
                "scheduler refused the prediction for this attempt, canceling it",
                extra={
                    "action": "prediction_refused",
                    "task_id": info.task_id,
                    "attempt": info.attempt,
                    "prediction_id": prediction.id,
                },
            )
            if prediction.terminal:
                return False
            own = source != WEBHOOK_SOURCE or (
                info.input is not None
                and matches(
                    prediction,
                    info,
                    (info.unknown_since or datetime.now(UTC)) - timedelta(seconds=60),
                )
            )
            if own:
                self.metrics.cancels.labels("stale_prediction").inc()
                await self.cancel_quietly(prediction.id)
            return False
        self.metrics.reconcile_actions.labels("adopt").inc()
        logger.info(
            "prediction adopted",
            extra={
                "action": "prediction_adopted",
                "task_id": info.task_id,
                "attempt": info.attempt,
                "prediction_id": prediction.id,
            },
        )
        info.prediction_id = prediction.id
        info.started_reported = True  # the accepted CompleteSubmit started the task
        info.unknown_since = None
        if info.cancel_requested and not prediction.terminal:
            await self.cancel_once(info, prediction.id)
        return True

    async def cancel_once(self, info: AttemptInfo, prediction_id: str) -> Prediction | None:
        """Cancel ``prediction_id`` of the attempt unless a cancel of it is under way or was
        accepted: the command handler (after the create), the observer (when it learns the id) and
        the reconciler can each notice a requested cancel at about the same time."""
        if prediction_id in info.cancels_in_flight or prediction_id in info.canceled:
            return None
        info.cancels_in_flight.add(prediction_id)
        try:
            prediction = await self.cancel_quietly(prediction_id)
        finally:
            info.cancels_in_flight.discard(prediction_id)
        if prediction is not None:
            info.canceled.add(prediction_id)
        return prediction

    async def cancel_quietly(self, prediction_id: str) -> Prediction | None:
        """Cancel at the provider; errors are logged, never raised."""
        try:
            prediction = await self.replicate.cancel(prediction_id)
        except ReplicateError as exc:
            self.metrics.cancels.labels("failed").inc()
            logger.warning(
                "cancel failed",
                extra={
                    "action": "cancel_failed",
                    "prediction_id": prediction_id,
                    "status": exc.status,
                    "error": str(exc)[:300],
                },
            )
            return None
        self.metrics.cancels.labels("canceled").inc()
        logger.info(
            "prediction canceled at the provider",
            extra={
                "action": "prediction_canceled",
                "prediction_id": prediction_id,
                "status": prediction.status,
            },
        )
        return prediction

    # ---- observations ----

    async def observe(
        self,
        prediction: Prediction,
        task_id: str,
        attempt: int,
        *,
        source: Source,
        webhook_id: str | None = None,
        deadline_cancel: bool = False,
    ) -> list[events_pb2.ProviderResult]:
        """Publish what ``prediction`` shows about (task, attempt); returns what was published."""
        info = self.state.attempt(task_id, attempt)
        copying = (
            self._copies.pop((task_id, attempt, prediction.id), None)
            if prediction.terminal
            else None
        )
        try:
            if not await self.ensure_recorded(info, prediction, source=source):
                return []
            results = await self.results_for(
                info,
                prediction,
                source=source,
                webhook_id=webhook_id,
                deadline_cancel=deadline_cancel,
                copying=copying,
            )
        finally:
            if copying is not None and not copying.done():
                copying.cancel()  # not used (not recorded, or reported meanwhile)
        published: list[events_pb2.ProviderResult] = []
        for r in results:
            kind = r.WhichOneof("outcome")
            terminal = kind in TERMINAL_OUTCOMES
            if not terminal and (info.terminal_reported or info.terminal_publishing):
                break  # another path is publishing the terminal result: nothing goes after it
            info.terminal_publishing |= terminal
            self._supersede_started(r)
            try:
                ok = await self.publisher.publish(r)
            finally:
                if terminal:
                    info.terminal_publishing = False
            if not ok:
                continue
            published.append(r)
            if kind == "started":
                info.started_reported = True
            elif terminal:
                info.terminal_reported = True
        return published

    def copy_ahead(self, task_id: str, attempt: int, prediction: Prediction) -> None:
        """Start copying the outputs of a succeeded prediction when its delivery is queued, if it is
        this replica's own create of the attempt (bound by that alone, binding.py) and its result
        is not reported yet. The delivery waits behind the attempt's earlier ones; the copy runs
        meanwhile instead of after. ``observe`` takes it over; :meth:`drop_copy` ends one nobody
        took (the delivery was not processed)."""
        info = self.state.peek(task_id, attempt)
        key = (task_id, attempt, prediction.id)
        if (
            info is None
            or prediction.status != "succeeded"
            or info.prediction_id != prediction.id
            or prediction.id in info.rejected
            or info.terminal_reported
            or key in self._copies
        ):
            return
        self._copies[key] = asyncio.create_task(
            self.copier.copy_all(prediction.output, task_id, attempt), name=f"copy-{task_id}"
        )

    def drop_copy(self, task_id: str, attempt: int, prediction: Prediction) -> None:
        """Cancel a copy started by :meth:`copy_ahead` that ``observe`` did not take over."""
        copying = self._copies.pop((task_id, attempt, prediction.id), None)
        if copying is not None:
            copying.cancel()

    def drop_copies(self) -> None:
        """Cancel every copy started ahead that nobody took over (shutdown)."""
        for copying in self._copies.values():
            copying.cancel()
        self._copies.clear()

    async def results_for(
        self,
        info: AttemptInfo,
        prediction: Prediction,
        *,
        source: Source,
        webhook_id: str | None,
        deadline_cancel: bool = False,
        copying: asyncio.Task[list[CopiedFile]] | None = None,
    ) -> Sequence[events_pb2.ProviderResult]:
        """The results an observation implies (terminal, or started and/or progress);
        ``copying``: the output copy already under way (:meth:`copy_ahead`)."""
        pid = prediction.id

        def make(result_id: str) -> events_pb2.ProviderResult:
            return new_result(
                result_id,
                info.task_id,
                info.attempt,
                tenant_id=info.tenant_id,
                prediction_id=pid,
                source=source,
            )

        if prediction.terminal:
            self.held.drop(info)  # the terminal result supersedes a held progress update
            if info.terminal_reported:
                return []  # already published (outputs are not copied twice)
            rid = f"wh:{webhook_id}" if webhook_id else f"poll:{pid}:{prediction.status}"
            result = make(rid)
            await self._fill_terminal(
                result, info, prediction, deadline_cancel=deadline_cancel, copying=copying
            )
            return [result]
        if prediction.status not in ("starting", "processing"):
            logger.info(
                "unknown non-terminal status tolerated",
                extra={
                    "action": "unknown_status",
                    "status": prediction.status,
                    "prediction_id": pid,
                },
            )
        if info.terminal_reported:
            return []
        out: list[events_pb2.ProviderResult] = []
        primary_used = False
        if not info.started_reported:
            rid = f"wh:{webhook_id}" if webhook_id else f"poll:{pid}:started"
            started = make(rid)
            started.started.SetInParent()
            out.append(started)
            primary_used = True
        # Coalesced per attempt (progress.py): only a raised percentage, held for a while, at most
        # once per interval.
        percent = parse_progress(prediction.logs)
        delay = self.progress.admit(info, percent)
        if delay is not None and percent is not None:
            if webhook_id:
                rid = f"wh:{webhook_id}:progress" if primary_used else f"wh:{webhook_id}"
            else:
                rid = f"poll:{pid}:progress:{percent}"
            progress = make(rid)
            progress.progress.percent = percent
            if delay > 0 or self.held.holds(info):
                self.held.hold(info, progress, delay)
            else:
                out.append(progress)
        return out

    async def _fill_terminal(
        self,
        result: events_pb2.ProviderResult,
        info: AttemptInfo,
        prediction: Prediction,
        *,
        deadline_cancel: bool,
        copying: asyncio.Task[list[CopiedFile]] | None = None,
    ) -> None:
        status = prediction.status
        if status == "succeeded":
            files = await (
                copying or self.copier.copy_all(prediction.output, info.task_id, info.attempt)
            )
            result.succeeded.SetInParent()
            for f in files:
                result.succeeded.files.append(
                    task_pb2.OutputFile(
                        url=f.url,
                        source_url=f.source_url,
                        size_bytes=f.size_bytes,
                        content_type=f.content_type,
                    )
                )
            if prediction.output is not None:
                result.succeeded.output.CopyFrom(to_value(prediction.output))
            predict_time = prediction.metrics.get("predict_time")
            if isinstance(predict_time, int | float) and predict_time >= 0:
                result.succeeded.predict_time.FromTimedelta(timedelta(seconds=float(predict_time)))
        elif status == "failed":
            code, retryable = classify_error(prediction.error)
            result.failed.code = code
            result.failed.message = (prediction.error or "prediction failed")[:1000]
            result.failed.retryable = retryable
        elif status == "canceled":
            by_deadline = deadline_cancel or info.deadline_canceled
            if not by_deadline and prediction.deadline is not None:
                end = prediction.completed_at or datetime.now(UTC)
                by_deadline = end >= prediction.deadline - timedelta(seconds=1)
            result.canceled.deadline_exceeded = by_deadline
        else:  # aborted
            result.aborted.message = (prediction.error or "aborted before start (deadline)")[:1000]
