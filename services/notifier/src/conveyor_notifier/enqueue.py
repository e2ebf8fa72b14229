"""Turns task events into durable webhook deliveries (consumer group ``notifier-webhooks``).

Every replica joins the shared group, so each event is handled by one replica (at least once):
``EnqueueDeliveries`` in the scheduler creates one delivery per (endpoint, event id) and ignores
repeats. A fetched batch of events goes in one call (not one call per event). Events of a task arrive in order on their partition and are enqueued in that order.
While the scheduler is unreachable the handler keeps retrying (the partition waits) instead of
dead-lettering good events.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import grpc

from conveyor.events.v1 import events_pb2
from conveyor.scheduler.v1 import delivery_coordination_service_pb2 as delivery_pb2
from conveyor.scheduler.v1 import delivery_coordination_service_pb2_grpc as delivery_grpc
from conveyor.tasks.v1 import task_pb2
from conveyor_common.kafka import Envelope, PermanentError
from conveyor_notifier.delivery import RETRYABLE_CODES
from conveyor_notifier.metrics import NotifierMetrics

logger = logging.getLogger(__name__)

BATCH_EVENTS = 500
"""Most events per EnqueueDeliveries call (the scheduler's own bound)."""


class DeliveryEnqueuer:
    """Handler of the task-event topic in the shared webhook group."""

    def __init__(
        self,
        stub: delivery_grpc.DeliveryCoordinationServiceAsyncStub,
        metrics: NotifierMetrics,
        *,
        rpc_timeout_seconds: float = 10.0,
        max_backoff_seconds: float = 5.0,
    ) -> None:
        self.stub = stub
        self.metrics = metrics
        self.rpc_timeout_seconds = rpc_timeout_seconds
        self.max_backoff_seconds = max_backoff_seconds

    async def handle(self, envelope: Envelope) -> None:
        """Enqueue the deliveries of one event; retries while the scheduler is unavailable."""
        event = self._event_of(envelope)
        if event is not None:
            await self._enqueue([event])

    async def handle_batch(self, envelopes: Sequence[Envelope]) -> None:
        """Enqueue the deliveries of a fetched batch in as few calls as the scheduler allows
        (a call per :data:`BATCH_EVENTS`), in order; a bad event fails the batch, which the
        consumer then handles record by record."""
        events = [e for e in map(self._event_of, envelopes) if e is not None]
        for start in range(0, len(events), BATCH_EVENTS):
            await self._enqueue(events[start : start + BATCH_EVENTS])

    @staticmethod
    def _event_of(envelope: Envelope) -> task_pb2.TaskEvent | None:
        message = envelope.message
        if not isinstance(message, events_pb2.TaskStateChanged) or not message.HasField("event"):
            return None
        event = message.event
        if not event.event_id:
            event.event_id = envelope.id
        if not event.task_id or not event.tenant_id:
            raise PermanentError("task event without task or tenant id")
        return event

    async def _enqueue(self, events: list[task_pb2.TaskEvent]) -> None:
        request = delivery_pb2.EnqueueDeliveriesRequest(events=events)
        attempt = 0
        response: delivery_pb2.EnqueueDeliveriesResponse | None = None
        while response is None:
            try:
                response = await self.stub.EnqueueDeliveries(
                    request, timeout=self.rpc_timeout_seconds
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise PermanentError(f"scheduler refused the event: {exc.details()}") from exc
                if exc.code() not in RETRYABLE_CODES:
                    raise
                attempt += 1
                if attempt in (1, 10) or attempt % 50 == 0:
                    logger.warning(
                        "enqueueing deliveries failed, retrying",
                        extra={
                            "action": "delivery_enqueue_retry",
                            "grpc_code": exc.code().name,
                            "attempt": attempt,
                        },
                    )
                await asyncio.sleep(min(self.max_backoff_seconds, 0.1 * 2 ** min(attempt, 10)))
        if response.created:
            self.metrics.enqueued.inc(response.created)
