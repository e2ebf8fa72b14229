"""Client of the scheduler's ProviderCoordinationService, retrying while the scheduler is away.

UNAVAILABLE, DEADLINE_EXCEEDED and RESOURCE_EXHAUSTED are retried with capped backoff for up to
``retry_s``; any other status is raised at once. BeginSubmit is safe to repeat (the scheduler answers
from the attempt's state), and so are CompleteSubmit / MarkSubmitUnknown (idempotent per attempt).

Concurrent BeginSubmit and CompleteSubmit calls are coalesced (:class:`Coalescer`): while one batch
call is in flight the next ones wait and go out together as ``BeginSubmitBatch`` /
``CompleteSubmitBatch``, one scheduler transaction for all. A lone call goes out at once (no added
wait). A scheduler without the batch calls (UNIMPLEMENTED, a rolling upgrade) gets single calls, and
a refused batch (INVALID_ARGUMENT) is retried item by item so only the bad item fails.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Generic, TypeVar

import grpc
from google.protobuf import timestamp_pb2

from conveyor.scheduler.v1 import provider_coordination_service_pb2 as provider_pb2
from conveyor.scheduler.v1 import provider_coordination_service_pb2_grpc as provider_grpc
from conveyor_common.channels import call_code, client_options
from conveyor_common.tls import TlsFiles, open_channel

logger = logging.getLogger(__name__)

T = TypeVar("T")
Req = TypeVar("Req")
Resp = TypeVar("Resp")

MAX_BATCH = 200
"""Items per batch call (the scheduler accepts up to 500)."""


class Coalescer(Generic[Req, Resp]):
    """Coalesce concurrent calls into batch calls, one batch in flight at a time.

    ``call(item)`` queues the item and waits for its result; the first call of a quiet period
    starts a drain that sends everything queued (up to ``max_items`` per call) until the queue is
    empty. Items queued while a batch is in flight go in the next batch, so batches grow with the
    load and a lone call waits for nothing."""

    def __init__(
        self,
        send: Callable[[list[Req]], Awaitable[list[Resp | BaseException]]],
        max_items: int = MAX_BATCH,
    ) -> None:
        self._send = send
        self._max = max_items
        self._queue: list[tuple[Req, asyncio.Future[Resp]]] = []
        self._drainer: asyncio.Task[None] | None = None
        self.batches = 0
        """Batch calls sent (tests, metrics)."""

    async def call(self, item: Req) -> Resp:
        """The result of ``item`` (its batch's exception if the batch call failed)."""
        future: asyncio.Future[Resp] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[: self._max], self._queue[self._max :]
            self.batches += 1
            try:
                results = await self._send([item for item, _ in batch])
            except Exception as exc:  # every waiter of the batch gets it
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, BaseException):  # this item alone failed
                    future.set_exception(result)
                else:
                    future.set_result(result)


_RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


class Coordinator:
    """The adapter's calls of the submit protocol."""

    def __init__(
        self,
        address: str,
        *,
        adapter_id: str,
        timeout_s: float = 5.0,
        retry_s: float = 30.0,
        tls: TlsFiles | None = None,
    ) -> None:
        self.adapter_id = adapter_id
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self._channel = open_channel(address, tls, client_options(("grpc.enable_retries", 1)))
        self._stub = provider_grpc.ProviderCoordinationServiceStub(self._channel)
        self._batches = True
        """False once the scheduler answered UNIMPLEMENTED (an older scheduler)."""
        self.begins: Coalescer[provider_pb2.BeginSubmitRequest, provider_pb2.BeginSubmitResponse]
        self.begins = Coalescer(self._begin_batch)
        self.completes: Coalescer[
            provider_pb2.CompleteSubmitRequest, provider_pb2.CompleteSubmitResponse
        ] = Coalescer(self._complete_batch)

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()

    async def _retry(self, name: str, call: Callable[[], Awaitable[T]]) -> T:
        deadline = time.monotonic() + self.retry_s
        delay = 0.1
        while True:
            try:
                return await call()
            except grpc.aio.AioRpcError as exc:
                code = call_code(exc)
                if code not in _RETRYABLE or time.monotonic() + delay > deadline:
                    raise
                logger.warning(
                    "scheduler call failed, retrying",
                    extra={"action": "coordination_retry", "call": name, "code": code.name},
                )
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 2.0)

    async def begin_submit(self, task_id: str, attempt: int) -> provider_pb2.BeginSubmitResponse:
        """Record the intent to create (task, attempt); the answer says what to do."""
        return await self.begins.call(
            provider_pb2.BeginSubmitRequest(
                task_id=task_id, attempt=attempt, adapter_id=self.adapter_id
            )
        )

    async def complete_submit(self, task_id: str, attempt: int, prediction_id: str) -> bool:
        """Record the prediction id; False = stale attempt (cancel the prediction)."""
        resp = await self.completes.call(
            provider_pb2.CompleteSubmitRequest(
                task_id=task_id, attempt=attempt, prediction_id=prediction_id
            )
        )
        return bool(resp.accepted)

    async def _begin_batch(
        self, items: list[provider_pb2.BeginSubmitRequest]
    ) -> list[provider_pb2.BeginSubmitResponse | BaseException]:
        async def one(req: provider_pb2.BeginSubmitRequest) -> provider_pb2.BeginSubmitResponse:
            return await self._retry(
                "BeginSubmit", lambda: self._stub.BeginSubmit(req, timeout=self.timeout_s)
            )

        async def many() -> list[provider_pb2.BeginSubmitResponse]:
            req = provider_pb2.BeginSubmitBatchRequest(items=items)
            resp = await self._retry(
                "BeginSubmitBatch",
                lambda: self._stub.BeginSubmitBatch(req, timeout=self.timeout_s),
            )
            return list(resp.results)

        return await self._batched(items, one, many)

    async def _complete_batch(
        self, items: list[provider_pb2.CompleteSubmitRequest]
    ) -> list[provider_pb2.CompleteSubmitResponse | BaseException]:
        async def one(
            req: provider_pb2.CompleteSubmitRequest,
        ) -> provider_pb2.CompleteSubmitResponse:
            return await self._retry(
                "CompleteSubmit", lambda: self._stub.CompleteSubmit(req, timeout=self.timeout_s)
            )

        async def many() -> list[provider_pb2.CompleteSubmitResponse]:
            req = provider_pb2.CompleteSubmitBatchRequest(items=items)
            resp = await self._retry(
                "CompleteSubmitBatch",
                lambda: self._stub.CompleteSubmitBatch(req, timeout=self.timeout_s),
            )
            return list(resp.results)

        return await self._batched(items, one, many)

    async def _batched(
        self,
        items: list[Req],
        one: Callable[[Req], Awaitable[Resp]],
        many: Callable[[], Awaitable[list[Resp]]],
    ) -> list[Resp | BaseException]:
        """One batch call for several items (a single item: the single call); item by item when
        the scheduler has no batch calls or refused the batch."""
        if len(items) > 1 and self._batches:
            try:
                return list(await many())
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    self._batches = False
                elif exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    raise
        return list(await asyncio.gather(*(one(item) for item in items), return_exceptions=True))

    async def mark_unknown(self, task_id: str, attempt: int, reason: str) -> bool:
        """Record an ambiguous create outcome; False = stale attempt."""
        req = provider_pb2.MarkSubmitUnknownRequest(
            task_id=task_id, attempt=attempt, reason=reason[:500]
        )
        resp = await self._retry(
            "MarkSubmitUnknown", lambda: self._stub.MarkSubmitUnknown(req, timeout=self.timeout_s)
        )
        return bool(resp.accepted)

    async def in_flight(
        self, *, quiet_since: datetime | None = None, page_size: int = 500
    ) -> AsyncIterator[provider_pb2.InFlightAttempt]:
        """Every attempt in flight (all pages)."""
        token = ""
        while True:
            req = provider_pb2.ListInFlightRequest(page_size=page_size, page_token=token)
            if quiet_since is not None:
                ts = timestamp_pb2.Timestamp()
                ts.FromDatetime(quiet_since)
                req.quiet_since.CopyFrom(ts)
            resp = await self._retry(
                "ListInFlight",
                lambda req=req: self._stub.ListInFlight(req, timeout=self.timeout_s),  # type: ignore[misc]
            )
            for attempt in resp.attempts:
                yield attempt
            token = resp.next_page_token
            if not token:
                return
