"""Client webhook delivery workers: lease due deliveries from the scheduler, POST them, report.

The scheduler owns the durable state (deliveries, attempts, endpoint health). A worker:

1. ``ClaimDeliveries``: leases due deliveries, at most the lowest-sequence pending one per
   (endpoint, task), so a task's events reach an endpoint in order;
2. signs each body the Standard Webhooks way (``webhook-id`` = the delivery id, stable across
   retries; one ``v1,`` signature per secret in force) and POSTs it through the pinned client;
3. ``ReportDeliveries`` with the outcome: delivered, or a retry time (exponential backoff with
   jitter while the retry period lasts), or failed for good; an endpoint that has kept failing long
   enough is disabled in the same report, with an operations alert.

A crash between the POST and the report lets the lease expire and the delivery is sent again with
the same ``webhook-id``: at least once, receivers deduplicate on the id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc
from google.protobuf import timestamp_pb2

from conveyor.scheduler.v1 import delivery_coordination_service_pb2 as delivery_pb2
from conveyor.scheduler.v1 import delivery_coordination_service_pb2_grpc as delivery_grpc
from conveyor_common.standard_webhooks import sign_headers
from conveyor_notifier.alerts import OpsAlerter
from conveyor_notifier.egress import SendResult, WebhookSender
from conveyor_notifier.metrics import NotifierMetrics
from conveyor_notifier.payload import render, render_group

logger = logging.getLogger(__name__)

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    """Aware UTC now."""
    return datetime.now(UTC)


def _ts(moment: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def _dt(stamp: timestamp_pb2.Timestamp) -> datetime:
    return stamp.ToDatetime(tzinfo=UTC)


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff, retry period and when an endpoint is disabled."""

    base_seconds: float = 5.0
    max_seconds: float = 3600.0
    period_seconds: float = 86_400.0
    disable_after_failures: int = 20
    disable_after_seconds: float = 86_400.0

    def backoff(self, attempts: int, rng: Callable[[], float] = random.random) -> float:
        """Delay before attempt ``attempts + 1``: capped doubling with jitter in [50 %, 100 %]."""
        exponent = min(max(attempts - 1, 0), 60)
        delay = min(self.max_seconds, self.base_seconds * (2.0**exponent))
        return delay * (0.5 + 0.5 * rng())

    def outcome(
        self,
        delivery: delivery_pb2.LeasedDelivery,
        result: SendResult,
        now: datetime,
        rng: Callable[[], float] = random.random,
    ) -> delivery_pb2.DeliveryOutcome:
        """The report of one attempt."""
        outcome = delivery_pb2.DeliveryOutcome(
            delivery_id=delivery.delivery_id,
            delivered=result.delivered,
            status_code=result.status_code,
            error=result.error,
            duration_ms=int(result.duration_s * 1000),
        )
        if result.delivered:
            return outcome
        failures = delivery.endpoint_consecutive_failures + 1
        since = (
            _dt(delivery.endpoint_failing_since)
            if delivery.HasField("endpoint_failing_since")
            else now
        )
        if (
            failures >= self.disable_after_failures
            and (now - since).total_seconds() >= self.disable_after_seconds
        ):
            outcome.disable_endpoint = True
            outcome.disabled_reason = (
                f"{failures} consecutive failed deliveries since {since.isoformat()}; "
                f"last: {result.error or 'no response'}"
            )[:500]
            return outcome
        retry_at = now + timedelta(seconds=self.backoff(delivery.attempts + 1, rng))
        created = _dt(delivery.created_at) if delivery.HasField("created_at") else now
        if retry_at <= created + timedelta(seconds=self.period_seconds):
            outcome.retry_at.CopyFrom(_ts(retry_at))
        return outcome


RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)


class DeliveryWorker:
    """Claims, sends and reports deliveries, with at most ``max_in_flight`` sends at once."""

    def __init__(
        self,
        stub: delivery_grpc.DeliveryCoordinationServiceAsyncStub,
        sender: WebhookSender,
        policy: RetryPolicy,
        metrics: NotifierMetrics,
        alerter: OpsAlerter,
        *,
        worker_id: str,
        max_in_flight: int = 32,
        claim_batch: int = 16,
        lease_seconds: int = 60,
        poll_seconds: float = 1.0,
        rpc_timeout_seconds: float = 10.0,
        clock: Clock = utcnow,
    ) -> None:
        self.stub = stub
        self.sender = sender
        self.policy = policy
        self.metrics = metrics
        self.alerter = alerter
        self.worker_id = worker_id
        self.max_in_flight = max_in_flight
        self.claim_batch = claim_batch
        self.lease_seconds = lease_seconds
        self.poll_seconds = poll_seconds
        self.rpc_timeout_seconds = rpc_timeout_seconds
        self.clock = clock
        self._in_flight: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        """Claim now: deliveries may be due (an event's webhook hint)."""
        self._wake.set()

    def start(self) -> None:
        """Start the claim loop."""
        self._task = asyncio.create_task(self._run(), name="webhook-delivery")

    async def stop(self, grace_seconds: float = 20.0) -> None:
        """Stop claiming; let in-flight attempts finish and report within the grace period."""
        self._stopping.set()
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None
        if self._in_flight:
            _, pending = await asyncio.wait(self._in_flight, timeout=grace_seconds)
            for task in pending:  # their leases expire; another replica resends them
                task.cancel()
            if pending:
                await asyncio.wait(pending)

    async def _run(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            free = self.max_in_flight - len(self._in_flight)
            if free <= 0:
                await self._sleep(self.poll_seconds)
                continue
            try:
                response = await self.stub.ClaimDeliveries(
                    delivery_pb2.ClaimDeliveriesRequest(
                        worker_id=self.worker_id,
                        max_deliveries=min(free, self.claim_batch),
                        lease_seconds=self.lease_seconds,
                    ),
                    timeout=self.rpc_timeout_seconds,
                )
                failures = 0
            except grpc.aio.AioRpcError as exc:
                failures += 1
                logger.warning(
                    "claiming deliveries failed",
                    extra={"action": "delivery_claim_failed", "grpc_code": exc.code().name},
                )
                await self._sleep(min(30.0, self.poll_seconds * 2 ** min(failures, 5)))
                continue
            for delivery in response.deliveries:
                task = asyncio.create_task(self._deliver(delivery))
                self._in_flight.add(task)
                task.add_done_callback(self._done)
            if not response.deliveries:
                await self._sleep(self.poll_seconds)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._wake.set()  # a finished delivery may unblock the next event of its task

    async def _sleep(self, seconds: float) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)

    async def _deliver(self, delivery: delivery_pb2.LeasedDelivery) -> None:
        group = delivery.HasField("group_event")
        event = delivery.group_event if group else delivery.event
        body = render_group(delivery.group_event) if group else render(delivery.event)
        headers = sign_headers(list(delivery.signing_secrets), body, msg_id=delivery.delivery_id)
        result = await self.sender.post(delivery.url, body, headers)
        now = self.clock()
        outcome = self.policy.outcome(delivery, result, now)
        self.metrics.delivery_seconds.observe(result.duration_s)
        applied = await self._report(outcome)
        if not applied:
            self.metrics.deliveries.labels("stale").inc()
            return
        if result.delivered:
            label = "delivered"
            if event.HasField("occurred_at"):
                lag = (now - _dt(event.occurred_at)).total_seconds()
                self.metrics.delivery_lag_seconds.observe(max(0.0, lag))
        elif result.refused:
            label = "refused"
        elif outcome.HasField("retry_at"):
            label = "retry"
        else:
            label = "failed"
        self.metrics.deliveries.labels(label).inc()
        log = logger.info if result.delivered else logger.warning
        log(
            "webhook delivered" if result.delivered else "webhook attempt failed",
            extra={
                "action": "webhook_" + label,
                "delivery_id": delivery.delivery_id,
                "endpoint_id": delivery.endpoint_id,
                "tenant_id": delivery.tenant_id,
                ("group_id" if group else "task_id"): (
                    delivery.group_event.group_id if group else delivery.event.task_id
                ),
                "sequence": event.sequence,
                "attempt": delivery.attempts + 1,
                "status_code": result.status_code,
                "error": result.error,
            },
        )
        if outcome.disable_endpoint:
            self.metrics.endpoints_disabled.inc()
            logger.warning(
                "webhook endpoint disabled",
                extra={
                    "action": "webhook_endpoint_disabled",
                    "endpoint_id": delivery.endpoint_id,
                    "tenant_id": delivery.tenant_id,
                    "reason": outcome.disabled_reason,
                },
            )
            await self.alerter.alert(
                "endpoint_disabled",
                f"Webhook endpoint {delivery.endpoint_id} of tenant {delivery.tenant_id} "
                f"was disabled: {outcome.disabled_reason}",
            )

    async def _report(self, outcome: delivery_pb2.DeliveryOutcome) -> bool:
        """Report one outcome, retrying transient errors for a while; False when stale/undelivered."""
        request = delivery_pb2.ReportDeliveriesRequest(worker_id=self.worker_id, outcomes=[outcome])
        for attempt in range(8):
            try:
                response = await self.stub.ReportDeliveries(
                    request, timeout=self.rpc_timeout_seconds
                )
                return bool(response.applied > 0)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE_CODES or attempt == 7:
                    logger.error(
                        "reporting a delivery failed; its lease will expire and it is resent",
                        extra={
                            "action": "delivery_report_failed",
                            "delivery_id": outcome.delivery_id,
                            "grpc_code": exc.code().name,
                        },
                    )
                    return False
                await asyncio.sleep(min(5.0, 0.2 * 2**attempt))
        return False


class BacklogPoller:
    """Polls the scheduler for the backlog gauges."""

    def __init__(
        self,
        stub: delivery_grpc.DeliveryCoordinationServiceAsyncStub,
        metrics: NotifierMetrics,
        *,
        period_seconds: float,
        clock: Clock = utcnow,
    ) -> None:
        self.stub = stub
        self.metrics = metrics
        self.period_seconds = period_seconds
        self.clock = clock
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start polling."""
        self._task = asyncio.create_task(self._run(), name="delivery-backlog")

    async def poll_once(self) -> None:
        """Update the gauges once."""
        response = await self.stub.GetDeliveryBacklog(
            delivery_pb2.GetDeliveryBacklogRequest(), timeout=10
        )
        self.metrics.backlog.labels("pending").set(response.pending)
        self.metrics.backlog.labels("due").set(response.due)
        self.metrics.disabled_endpoints.set(response.disabled_endpoints)
        oldest = (
            (self.clock() - _dt(response.oldest_due_at)).total_seconds()
            if response.HasField("oldest_due_at")
            else 0.0
        )
        self.metrics.oldest_due_seconds.set(max(0.0, oldest))

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.poll_once()
            except grpc.aio.AioRpcError as exc:
                logger.warning(
                    "backlog poll failed",
                    extra={"action": "delivery_backlog_failed", "grpc_code": exc.code().name},
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=self.period_seconds)

    async def stop(self) -> None:
        """Stop polling."""
        self._stopping.set()
        if self._task is not None:
            await self._task
            self._task = None
