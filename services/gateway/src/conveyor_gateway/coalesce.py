"""Coalescing of concurrent single submits into SubmitTaskGroup calls to the scheduler.

Every SubmitTask the gateway accepts would otherwise be one downstream RPC, and on a small machine the
per-RPC cost of gRPC (both ends) dominates a submit. :class:`SubmitCoalescer` queues each validated,
principal-wrapped submit and keeps at most ``concurrency`` SubmitTaskGroup calls in flight: a submit
that finds a free flight slot is sent at once (an idle gateway adds no delay), the others ride the next
call, so under load one call carries every submit that arrived while the previous ones were in flight.

The scheduler decides each item alone (its own validation, idempotency key and admission) and answers
one outcome per item; a refused item gets exactly the status and rich details a lone SubmitTask would
have got. A failure of the whole call (UNAVAILABLE after the client's retries, DEADLINE_EXCEEDED) fails
each of its items with that status; retries are safe because every item carries its request_id. A caller
whose own deadline passes is cancelled (by grpc) without disturbing the others; the group call may run
until the latest deadline among its items.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import status_pb2
from prometheus_client import CollectorRegistry, Histogram

from conveyor.scheduler.v1 import scheduler_service_pb2 as s
from conveyor.tasks.v1 import task_service_pb2 as svc_pb2
from conveyor_common.errors import FieldViolation, InvalidArgument, RpcError
from conveyor_gateway.downstream import DETAILS_KEY, DownstreamError, SchedulerClient, budget

logger = logging.getLogger(__name__)

_CODES = {code.value[0]: code for code in grpc.StatusCode}


def outcome_error(status_bytes: bytes) -> DownstreamError:
    """The caller's error from a refused item's serialized google.rpc.Status (details kept)."""
    try:
        status = status_pb2.Status.FromString(status_bytes)
    except Exception:  # a broken reply must not become UNKNOWN
        return DownstreamError(grpc.StatusCode.INTERNAL, "internal error")
    code = _CODES.get(status.code)
    if code is None or code in (grpc.StatusCode.OK, grpc.StatusCode.UNKNOWN):
        return DownstreamError(grpc.StatusCode.INTERNAL, "internal error")
    return DownstreamError(
        code, status.message or code.name.lower(), ((DETAILS_KEY, status_bytes),)
    )


@dataclass
class _Pending:
    request: s.SchedulerServiceSubmitTaskRequest
    deadline: float
    future: asyncio.Future[svc_pb2.SubmitTaskResponse]


class SubmitCoalescer:
    """Groups concurrent single submits into SubmitTaskGroup calls (see the module docstring)."""

    def __init__(
        self,
        scheduler: SchedulerClient,
        *,
        max_group: int = 256,
        concurrency: int = 2,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.max_group = max_group
        self.concurrency = concurrency
        self._pending: list[_Pending] = []
        self._running = 0
        self._flushers: set[asyncio.Task[None]] = set()
        self.calls = 0
        """SubmitTaskGroup calls made (tests, benchmarks)."""
        self.group_size: Histogram | None = None
        if registry is not None:
            self.group_size = Histogram(
                "conveyor_gateway_submit_group_size",
                "Single submits carried by one SubmitTaskGroup call to the scheduler.",
                buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
                registry=registry,
            )

    async def submit(
        self,
        request: s.SchedulerServiceSubmitTaskRequest,
        context: grpc.aio.ServicerContext[Any, Any] | None,
    ) -> svc_pb2.SubmitTaskResponse:
        """Submit one wrapped request; returns its response or raises its own refusal."""
        loop = asyncio.get_running_loop()
        seconds = budget(context, self.scheduler.default_timeout)
        future: asyncio.Future[svc_pb2.SubmitTaskResponse] = loop.create_future()
        self._pending.append(_Pending(request, time.monotonic() + seconds, future))
        if self._running < self.concurrency:
            # Counted here and uncounted in _run's finally, synchronously: a flusher about to end
            # has already seen the queue empty, so a request is never left without one.
            self._running += 1
            flusher = loop.create_task(self._run(), name="submit-coalescer")
            self._flushers.add(flusher)
            flusher.add_done_callback(self._flushers.discard)
        # A caller whose deadline passes is cancelled by grpc; that cancels only its own future.
        return await future

    async def _run(self) -> None:
        group: list[_Pending] = []
        try:
            while self._pending:
                group = self._pending[: self.max_group]
                del self._pending[: self.max_group]
                await self._send(group)
        except BaseException as exc:  # cancelled at shutdown: nobody may wait forever
            pending, self._pending = [*group, *self._pending], []
            error = exc if isinstance(exc, Exception) else RuntimeError("gateway stopping")
            for p in pending:
                if not p.future.done():
                    p.future.set_exception(error)
            raise
        finally:
            self._running -= 1

    async def _send(self, group: list[_Pending]) -> None:
        now = time.monotonic()
        live = [p for p in group if not p.future.done() and p.deadline > now]
        for p in group:
            if not p.future.done() and p.deadline <= now:
                p.future.set_exception(
                    DownstreamError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
                )
        if not live:
            return
        self.calls += 1
        if self.group_size is not None:
            self.group_size.observe(len(live))
        request = self._group_request(live)
        live = [p for p in live if not p.future.done()]
        if not live:
            return
        try:
            response: s.SubmitTaskGroupResponse = await self.scheduler.call(
                lambda stub: stub.SubmitTaskGroup,
                request,
                None,
                budget_seconds=max(p.deadline for p in live) - now,
            )
        except RpcError as exc:
            for p in live:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        except Exception:
            logger.exception(
                "submit group call failed", extra={"action": "submit_group_call_failed"}
            )
            for p in live:
                if not p.future.done():
                    p.future.set_exception(
                        DownstreamError(grpc.StatusCode.INTERNAL, "internal error")
                    )
            return
        if len(response.outcomes) != len(live):
            logger.error(
                "scheduler answered %d outcomes for %d submits",
                len(response.outcomes),
                len(live),
                extra={"action": "submit_group_mismatch"},
            )
            for p in live:
                if not p.future.done():
                    p.future.set_exception(
                        DownstreamError(grpc.StatusCode.INTERNAL, "internal error")
                    )
            return
        for p, outcome in zip(live, response.outcomes, strict=True):
            if p.future.done():
                continue
            if outcome.WhichOneof("outcome") == "response":
                p.future.set_result(outcome.response)
            else:
                p.future.set_exception(outcome_error(outcome.status))

    @staticmethod
    def _group_request(live: list[_Pending]) -> s.SubmitTaskGroupRequest:
        """The group of ``live``; an item that cannot be nested in it (protobuf's depth limit)
        fails alone, so one bad item costs the others of its group nothing."""
        request = s.SubmitTaskGroupRequest()
        for p in live:
            count = len(request.items)
            try:
                request.items.append(p.request)
            except Exception:
                del request.items[count:]  # upb may have appended before refusing the copy
                logger.warning(
                    "submit item cannot be grouped", extra={"action": "submit_group_item_refused"}
                )
                p.future.set_exception(
                    InvalidArgument(
                        [FieldViolation("spec.input", "nested too deeply to be forwarded")]
                    )
                )
        return request

    async def close(self) -> None:
        """Wait for the calls in flight (their callers are still waiting for them)."""
        if self._flushers:
            await asyncio.gather(*self._flushers, return_exceptions=True)
