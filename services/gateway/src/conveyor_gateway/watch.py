"""WatchTask: a gap-free stream of one task's events, history first then live.

Algorithm (so no event is lost between the history read and the live stream):

1. Subscribe to a notifier's live stream for (tenant, task) and wait for its ``ready`` marker; live
   events received from then on are buffered.
2. Page the history from the scheduler's ``GetTaskEvents`` after the caller's ``after_sequence`` and
   emit it.
3. Emit buffered and live events whose sequence is greater than the last one emitted (duplicates are
   dropped). When a live event skips sequence numbers, fill the gap from ``GetTaskEvents`` first.
4. End after the terminal event (or when the scheduler reports the task terminal and caught up).

Without a notifier, or when the live stream cannot be opened or breaks, the watch polls
``GetTaskEvents`` every ``poll_interval`` seconds (and keeps trying to re-subscribe now and then), so it
still completes. While live, the history is also re-read every ``safety_poll_interval`` seconds of
silence, which bounds the delay of an event the live path missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc

from conveyor.notifier.v1 import notifier_service_pb2 as notifier_pb2
from conveyor.notifier.v1 import notifier_service_pb2_grpc as notifier_grpc
from conveyor.scheduler.v1 import scheduler_service_pb2 as sched_pb2
from conveyor.tasks.v1 import task_pb2
from conveyor_gateway.auth import Principal
from conveyor_gateway.downstream import SchedulerClient

logger = logging.getLogger(__name__)

TERMINAL_EVENTS = frozenset(
    {
        task_pb2.TASK_EVENT_TYPE_SUCCEEDED,
        task_pb2.TASK_EVENT_TYPE_FAILED,
        task_pb2.TASK_EVENT_TYPE_CANCELED,
        task_pb2.TASK_EVENT_TYPE_DEAD_LETTERED,
        task_pb2.TASK_EVENT_TYPE_EXPIRED,
    }
)

_BROKEN = object()

SEEN_TASKS = 4096
"""Tasks whose last sequence a tenant-wide watch remembers to drop duplicates."""


@dataclass
class WatchConfig:
    """Timing of watches."""

    poll_interval: float = 0.5
    safety_poll_interval: float = 10.0
    resubscribe_interval: float = 5.0
    ready_timeout: float = 5.0
    history_page: int = 500
    live_buffer: int = 10_000


class LiveSubscription:
    """One notifier Subscribe stream read into a queue by a background task."""

    def __init__(self, call: Any, queue: asyncio.Queue[Any], task: asyncio.Task[None]) -> None:
        self._call = call
        self.queue = queue
        self._task = task

    @classmethod
    async def open(
        cls,
        stub: notifier_grpc.WatchFanoutServiceStub,
        tenant_id: str,
        task_id: str,
        *,
        ready_timeout: float,
        buffer: int,
    ) -> LiveSubscription:
        """Subscribe and wait for the ``ready`` marker (raises on failure or timeout)."""
        call: Any = stub.Subscribe(
            notifier_pb2.SubscribeRequest(tenant_id=tenant_id, task_id=task_id)
        )
        try:
            first = await asyncio.wait_for(call.read(), timeout=ready_timeout)
        except BaseException:
            call.cancel()
            raise
        if first is grpc.aio.EOF or first.WhichOneof("item") != "ready":
            call.cancel()
            raise ConnectionError("notifier stream did not start with a ready marker")
        queue: asyncio.Queue[Any] = asyncio.Queue()

        async def pump() -> None:
            try:
                while True:
                    msg = await call.read()
                    if msg is grpc.aio.EOF:
                        break
                    if msg.WhichOneof("item") == "event":
                        if queue.qsize() >= buffer:
                            break
                        queue.put_nowait(msg.event)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.info(
                    "live stream broke: %s",
                    exc.code().name
                    if isinstance(exc, grpc.aio.AioRpcError)
                    else type(exc).__name__,
                    extra={"action": "watch_live_broken"},
                )
            queue.put_nowait(_BROKEN)

        return cls(call, queue, asyncio.create_task(pump()))

    async def close(self) -> None:
        """Stop reading and cancel the stream."""
        self._call.cancel()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task


class TaskWatcher:
    """Runs the watch algorithm for one request."""

    def __init__(
        self,
        scheduler: SchedulerClient,
        notifier: notifier_grpc.WatchFanoutServiceStub | None,
        config: WatchConfig,
    ) -> None:
        self.scheduler = scheduler
        self.notifier = notifier
        self.config = config

    async def _subscribe(self, principal: Principal, task_id: str) -> LiveSubscription | None:
        if self.notifier is None:
            return None
        try:
            return await LiveSubscription.open(
                self.notifier,
                principal.tenant_id,
                task_id,
                ready_timeout=self.config.ready_timeout,
                buffer=self.config.live_buffer,
            )
        except (grpc.aio.AioRpcError, TimeoutError, ConnectionError) as exc:
            logger.warning(
                "notifier unreachable, watch falls back to polling: %s",
                exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else type(exc).__name__,
                extra={"action": "watch_poll_fallback", "task_id": task_id},
            )
            return None

    async def _history(
        self,
        principal: Principal,
        task_id: str,
        after: int,
        context: grpc.aio.ServicerContext[Any, Any] | None,
    ) -> tuple[list[task_pb2.TaskEvent], bool]:
        """Every event after ``after`` now stored, and whether the task is terminal."""
        events: list[task_pb2.TaskEvent] = []
        while True:
            req = sched_pb2.GetTaskEventsRequest(
                principal=principal.to_proto(),
                task_id=task_id,
                after_sequence=after,
                limit=self.config.history_page,
            )
            resp: sched_pb2.GetTaskEventsResponse = await self.scheduler.call(
                lambda s: s.GetTaskEvents,
                req,
                context,
                budget_seconds=min(
                    self.scheduler.default_timeout,
                    _remaining(context, self.scheduler.default_timeout),
                ),
            )
            events.extend(e for e in resp.events if e.sequence > after)
            if resp.events:
                after = max(after, resp.events[-1].sequence)
            if not resp.events or after >= resp.last_sequence:
                return events, resp.terminal

    async def watch(
        self,
        principal: Principal,
        task_id: str,
        after_sequence: int,
        context: grpc.aio.ServicerContext[Any, Any] | None = None,
    ) -> AsyncIterator[task_pb2.TaskEvent]:
        """The task's events after ``after_sequence``, ending after the terminal one."""
        last = after_sequence
        live = await self._subscribe(principal, task_id)
        last_subscribe_try = time.monotonic()
        try:
            history, terminal = await self._history(principal, task_id, last, context)
            for event in history:
                yield event
                last = event.sequence
                if event.type in TERMINAL_EVENTS:
                    return
            if terminal:
                return
            while True:
                if live is not None:
                    try:
                        item = await asyncio.wait_for(
                            live.queue.get(), timeout=self.config.safety_poll_interval
                        )
                    except TimeoutError:
                        item = None  # silence: re-read the history as a safety net
                    if item is _BROKEN:
                        logger.warning(
                            "live stream ended, watch falls back to polling",
                            extra={"action": "watch_poll_fallback", "task_id": task_id},
                        )
                        await live.close()
                        live = None
                        last_subscribe_try = time.monotonic()
                        item = None
                    if isinstance(item, task_pb2.TaskEvent):
                        if item.sequence <= last:
                            continue
                        if item.sequence == last + 1:
                            yield item
                            last = item.sequence
                            if item.type in TERMINAL_EVENTS:
                                return
                            continue
                        # A gap: the history has everything up to (at least) this event.
                        logger.debug(
                            "live gap %d..%d, filling from history",
                            last + 1,
                            item.sequence - 1,
                            extra={"action": "watch_gap_fill", "task_id": task_id},
                        )
                else:
                    await asyncio.sleep(self.config.poll_interval)
                    if (
                        self.notifier is not None
                        and time.monotonic() - last_subscribe_try
                        >= self.config.resubscribe_interval
                    ):
                        last_subscribe_try = time.monotonic()
                        live = await self._subscribe(principal, task_id)
                history, terminal = await self._history(principal, task_id, last, context)
                for event in history:
                    yield event
                    last = event.sequence
                    if event.type in TERMINAL_EVENTS:
                        return
                if terminal:
                    return
        finally:
            if live is not None:
                await live.close()


def _remaining(context: grpc.aio.ServicerContext[Any, Any] | None, default: float) -> float:
    if context is None:
        return default
    remaining: Any = context.time_remaining()
    if remaining is None:
        return default
    return max(0.0, float(remaining))


async def watch_tenant(
    notifier: notifier_grpc.WatchFanoutServiceStub,
    principal: Principal,
    types: set[int],
    ready_timeout: float,
) -> AsyncIterator[task_pb2.TaskEvent]:
    """Live events of every task of the caller's tenant (no history).

    The notifier filters by type before it buffers; the filter and a per-task sequence high-water
    mark are applied here again, so one stream never shows an event twice (or one not asked for)
    whatever the notifier does.
    """
    call: Any = notifier.Subscribe(
        notifier_pb2.SubscribeRequest(
            tenant_id=principal.tenant_id,
            types=[task_pb2.TaskEventType.ValueType(t) for t in sorted(types)],
        )
    )
    seen: OrderedDict[str, int] = OrderedDict()
    try:
        first = await asyncio.wait_for(call.read(), timeout=ready_timeout)
        if first is grpc.aio.EOF or first.WhichOneof("item") != "ready":
            raise ConnectionError("notifier stream did not start with a ready marker")
        while True:
            msg = await call.read()
            if msg is grpc.aio.EOF:
                return
            if msg.WhichOneof("item") != "event":
                continue
            if msg.event.tenant_id and msg.event.tenant_id != principal.tenant_id:
                continue  # defence in depth: never leak another tenant's event
            if types and msg.event.type not in types:
                continue
            last = seen.get(msg.event.task_id)
            if last is not None and msg.event.sequence <= last:
                continue  # a duplicate delivery of the at-least-once event topic
            seen[msg.event.task_id] = msg.event.sequence
            seen.move_to_end(msg.event.task_id)
            if len(seen) > SEEN_TASKS:
                seen.popitem(last=False)
            yield msg.event
    finally:
        call.cancel()
