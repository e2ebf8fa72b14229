"""Live watch fan-out: subscribers by (tenant, task) and by tenant, fed by the broadcast reader.

Every replica reads every partition of the task-event topic, so a gateway may subscribe at any
replica. ``Subscribe`` registers the subscriber **before** it sends the ``ready`` marker: an event
read after ``ready`` reaches the subscriber, and the gateway reads history from the scheduler after
``ready`` and deduplicates by sequence, so the merge has no gap.

Filtering and duplicates: a subscriber's event-type filter applies before its buffer (a burst of
events it did not ask for costs it nothing), and an event whose sequence is not above the last one
the subscriber was handed for that task (a duplicate delivery of the at-least-once topic) is
dropped, so one stream never repeats an event.

Back-pressure: each subscriber has a bounded buffer. One that falls further behind is never
silently skipped: its stream ends with RESOURCE_EXHAUSTED ("resume from your last sequence") and the
caller resumes through history. Shutdown ends every stream with UNAVAILABLE, also telling the caller
to resume (at another replica).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc

from conveyor.notifier.v1 import notifier_service_pb2, notifier_service_pb2_grpc
from conveyor.tasks.v1 import task_pb2
from conveyor_common.errors import (
    FieldViolation,
    InvalidArgument,
    QuotaViolation,
    ResourceExhausted,
    RpcError,
    Unavailable,
)
from conveyor_common.grpc_server import ServiceBinding
from conveyor_notifier.metrics import NotifierMetrics

logger = logging.getLogger(__name__)


SEEN_TASKS = 4096
"""Tasks whose last handed-over sequence a subscriber remembers (least recently seen forgotten)."""


class Subscriber:
    """One live subscription: an event-type filter, duplicate suppression and a bounded buffer."""

    def __init__(self, tenant_id: str, task_id: str, limit: int, types: Iterable[int] = ()) -> None:
        self.tenant_id = tenant_id
        self.task_id = task_id
        self.limit = limit
        self.types = frozenset(types)
        self._seen: OrderedDict[str, int] = OrderedDict()
        self._buffer: deque[task_pb2.TaskEvent] = deque()
        self._wake = asyncio.Event()
        self._end: RpcError | None = None

    @property
    def scope(self) -> str:
        """``task`` or ``tenant``."""
        return "task" if self.task_id else "tenant"

    @property
    def ended(self) -> bool:
        """Whether the notifier ended this subscription."""
        return self._end is not None

    def wants(self, event: task_pb2.TaskEvent) -> bool:
        """Whether ``event`` passes the type filter and is not a duplicate of one handed over."""
        if self.types and event.type not in self.types:
            return False
        last = self._seen.get(event.task_id)
        return last is None or event.sequence > last

    def offer(self, event: task_pb2.TaskEvent) -> bool:
        """Buffer ``event`` (call only when ``wants`` it); False (and the subscription ends) when
        the buffer is full."""
        if self._end is not None:
            return False
        if len(self._buffer) >= self.limit:
            self.end(
                ResourceExhausted(
                    [
                        QuotaViolation(
                            subject=f"watch:{self.tenant_id}/{self.task_id or '*'}",
                            description=f"subscriber fell more than {self.limit} events behind",
                        )
                    ],
                    retry_after_seconds=0,
                    message="watcher fell too far behind; resume from your last sequence",
                )
            )
            return False
        self._buffer.append(event)
        self._seen[event.task_id] = event.sequence
        self._seen.move_to_end(event.task_id)
        if len(self._seen) > SEEN_TASKS:
            self._seen.popitem(last=False)
        self._wake.set()
        return True

    def end(self, error: RpcError) -> None:
        """End the subscription with ``error`` (buffered events are dropped: the caller resumes)."""
        if self._end is None:
            self._end = error
            self._buffer.clear()
            self._wake.set()

    async def next(self) -> task_pb2.TaskEvent:
        """The next event; raises the ending error once the subscription was ended."""
        while True:
            if self._end is not None:
                raise self._end
            if self._buffer:
                return self._buffer.popleft()
            self._wake.clear()
            await self._wake.wait()


class WatchHub:
    """Subscribers indexed by (tenant, task) and by tenant."""

    def __init__(self, metrics: NotifierMetrics, buffer_events: int) -> None:
        self.metrics = metrics
        self.buffer_events = buffer_events
        self._by_task: dict[tuple[str, str], set[Subscriber]] = {}
        self._by_tenant: dict[str, set[Subscriber]] = {}
        self._closed = False

    @property
    def count(self) -> int:
        """Live subscribers."""
        return sum(len(s) for s in self._by_task.values()) + sum(
            len(s) for s in self._by_tenant.values()
        )

    def subscribe(self, tenant_id: str, task_id: str, types: Iterable[int] = ()) -> Subscriber:
        """Register a subscriber (task_id empty = every task of the tenant; types empty = all)."""
        sub = Subscriber(tenant_id, task_id, self.buffer_events, types)
        if self._closed:
            sub.end(_shutdown_error())
            return sub
        if task_id:
            self._by_task.setdefault((tenant_id, task_id), set()).add(sub)
        else:
            self._by_tenant.setdefault(tenant_id, set()).add(sub)
        self.metrics.watchers.labels(sub.scope).inc()
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        """Remove a subscriber (idempotent)."""
        if sub.task_id:
            key = (sub.tenant_id, sub.task_id)
            group = self._by_task.get(key)
            if group is None or sub not in group:
                return
            group.discard(sub)
            if not group:
                del self._by_task[key]
        else:
            tgroup = self._by_tenant.get(sub.tenant_id)
            if tgroup is None or sub not in tgroup:
                return
            tgroup.discard(sub)
            if not tgroup:
                del self._by_tenant[sub.tenant_id]
        self.metrics.watchers.labels(sub.scope).dec()

    def publish(self, event: task_pb2.TaskEvent) -> None:
        """Hand ``event`` to every matching subscriber (never blocks)."""
        targets: list[Subscriber] = []
        targets.extend(self._by_task.get((event.tenant_id, event.task_id), ()))
        targets.extend(self._by_tenant.get(event.tenant_id, ()))
        for sub in targets:
            if not sub.wants(event):
                continue
            if sub.offer(event):
                self.metrics.watch_events.labels("queued").inc()
            elif sub.ended:
                self.metrics.watch_events.labels("overflow").inc()
                self.metrics.watch_ended.labels("overflow").inc()
                logger.warning(
                    "watcher fell behind, told to resume",
                    extra={
                        "action": "watch_overflow",
                        "tenant_id": sub.tenant_id,
                        "task_id": sub.task_id,
                        "sequence": event.sequence,
                    },
                )
                self.unsubscribe(sub)

    def close(self) -> int:
        """End every subscription, telling watchers to resume elsewhere; returns how many."""
        self._closed = True
        subs = [s for g in self._by_task.values() for s in g]
        subs += [s for g in self._by_tenant.values() for s in g]
        for sub in subs:
            sub.end(_shutdown_error())
            self.unsubscribe(sub)
        if subs:
            self.metrics.watch_ended.labels("shutdown").inc(len(subs))
        return len(subs)


def _shutdown_error() -> Unavailable:
    return Unavailable("notifier shutting down; resume from your last sequence", 0)


class WatchFanoutServicer(notifier_service_pb2_grpc.WatchFanoutServiceServicer):
    """``WatchFanoutService.Subscribe``."""

    def __init__(self, hub: WatchHub) -> None:
        self.hub = hub

    async def Subscribe(
        self,
        request: notifier_service_pb2.SubscribeRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[notifier_service_pb2.SubscribeResponse]:
        """Ready marker, then live events of the task (or tenant) until the caller leaves."""
        violations = []
        if not request.tenant_id:
            violations.append(FieldViolation("tenant_id", "required"))
        if len(request.tenant_id) > 200:
            violations.append(FieldViolation("tenant_id", "at most 200 characters"))
        if len(request.task_id) > 200:
            violations.append(FieldViolation("task_id", "at most 200 characters"))
        if len(request.types) > len(task_pb2.TaskEventType.values()):
            violations.append(FieldViolation("types", "too many event types"))
        if violations:
            raise InvalidArgument(violations)
        sub = self.hub.subscribe(request.tenant_id, request.task_id, request.types)
        try:
            yield notifier_service_pb2.SubscribeResponse(ready=True)
            while True:
                event = await sub.next()
                yield notifier_service_pb2.SubscribeResponse(event=event)
        finally:
            self.hub.unsubscribe(sub)


def binding(hub: WatchHub) -> ServiceBinding:
    """The WatchFanoutService servicer, to mount on the notifier's gRPC server."""
    return ServiceBinding(
        add=notifier_service_pb2_grpc.add_WatchFanoutServiceServicer_to_server,
        servicer=WatchFanoutServicer(hub),
        full_name=notifier_service_pb2.DESCRIPTOR.services_by_name["WatchFanoutService"].full_name,
    )
