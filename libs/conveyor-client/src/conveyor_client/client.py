"""Typed Conveyor client: :class:`AsyncConveyorClient` (grpc.aio) and :class:`ConveyorClient` (sync).

These clients speak protobuf; :mod:`conveyor_client.sdk` (``Client``, ``AsyncClient``) wraps them
with typed results. Every call carries the bearer token (a string, or a provider callable asked again
before the token expires) and a deadline (``rpc_timeout`` per call, the client's ``timeout`` otherwise)
that bounds the call *with* its retries. UNAVAILABLE is retried with exponential backoff and jitter,
RESOURCE_EXHAUSTED after the delay its ``google.rpc.RetryInfo`` asks for, in both cases only while the
deadline leaves room; failures raise :class:`~conveyor_client.errors.ConveyorError` with the decoded
rich details. Mutating calls get a uuid4 ``request_id`` when none is given; the same id is reused
across retries, so a retried submit never creates a second task. A batch larger than the server's item
limit is sent as several batches (each atomic on its own). :meth:`AsyncConveyorClient.watch` resumes from the last sequence number it
yielded when the stream breaks, and ends after the task's terminal event.
"""

from __future__ import annotations

import asyncio
import builtins
import random
from collections.abc import AsyncIterator, Iterable
from datetime import datetime
from typing import Any, TypeVar

import grpc

from conveyor.tasks.v1 import admin_service_pb2_grpc as admin_grpc
from conveyor.tasks.v1 import task_pb2
from conveyor.tasks.v1 import task_service_pb2 as svc_pb2
from conveyor.tasks.v1 import task_service_pb2_grpc as svc_grpc
from conveyor.tasks.v1 import webhook_service_pb2_grpc as hook_grpc
from conveyor_client.admin_calls import AdminCalls
from conveyor_client.errors import ConveyorError, call_code
from conveyor_client.groups import GroupMethods
from conveyor_client.options import (
    MAX_BATCH_ITEMS,
    RETRYABLE,
    TERMINAL_EVENTS,
    TOKEN_REFRESH_MARGIN_SECONDS,
    WATCH_RESUMABLE,
    TokenProvider,
    _chunk_request_id,
    _TokenSource,
    build_spec,
    channel_options_from_env,
    new_request_id,
)

T = TypeVar("T")

CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    # gRPC waits 1 s, then 1.6 times longer each time (up to 120 s), before connecting again to a
    # server that went away: a gateway back after 6 s was reached after ~9.5, and the retries of a
    # call, failing at once while the channel waits, ran out in between. Try at least every second.
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 1_000),
)
"""The client channel's defaults (``options`` given to the client come after, and win)."""


class AsyncConveyorClient(GroupMethods, AdminCalls):
    """Async client of the gateway (TaskService, AdminService, WebhookService)."""

    def __init__(
        self,
        address: str,
        token: str | TokenProvider | None = None,
        *,
        timeout: float = 10.0,
        retries: int = 4,
        backoff_base: float = 0.1,
        backoff_max: float = 2.0,
        watch_reconnects: int = 20,
        credentials: grpc.ChannelCredentials | None = None,
        options: Iterable[tuple[str, Any]] = (),
        retry_resource_exhausted: bool = True,
        max_batch_items: int = MAX_BATCH_ITEMS,
        token_refresh_margin: float = TOKEN_REFRESH_MARGIN_SECONDS,
    ) -> None:
        opts = [*CHANNEL_OPTIONS, *options]
        self._channel = (
            grpc.aio.secure_channel(address, credentials, options=opts)
            if credentials is not None
            else grpc.aio.insecure_channel(address, options=opts)
        )
        self._tasks: Any = svc_grpc.TaskServiceStub(self._channel)
        self._admin: Any = admin_grpc.AdminServiceStub(self._channel)
        self._hooks: Any = hook_grpc.WebhookServiceStub(self._channel)
        self._token = _TokenSource(token, token_refresh_margin)
        self.timeout = timeout
        self.retries = retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.watch_reconnects = watch_reconnects
        self.retry_resource_exhausted = retry_resource_exhausted
        self.max_batch_items = max_batch_items

    @classmethod
    def from_env(cls, environ: Any = None, **kwargs: Any) -> AsyncConveyorClient:
        """A client configured by ``CONVEYOR_*`` variables (see :func:`channel_options_from_env`)."""
        address, token, credentials = channel_options_from_env(environ)
        kwargs.setdefault("credentials", credentials)
        return cls(address, kwargs.pop("token", token), **kwargs)

    @property
    def token(self) -> str | None:
        """The current bearer token (asks the provider when it is about to expire)."""
        return self._token.get()

    @token.setter
    def token(self, value: str | TokenProvider | None) -> None:
        self._token = _TokenSource(value, self._token.margin)

    async def __aenter__(self) -> AsyncConveyorClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        token = self._token.get()
        return (("authorization", f"Bearer {token}"),) if token else ()

    def _backoff(self, attempt: int) -> float:
        return random.uniform(0, min(self.backoff_max, self.backoff_base * 2**attempt))

    def _retry_delay(self, err: ConveyorError, attempt: int) -> float | None:
        """Seconds to wait before the next attempt, or None when the error is final."""
        if attempt >= self.retries:
            return None
        if err.code in RETRYABLE:
            return self._backoff(attempt)
        if (
            err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            and self.retry_resource_exhausted
            and err.retry_after_seconds is not None
        ):
            # A little jitter so that callers refused together do not come back together.
            return err.retry_after_seconds * random.uniform(1.0, 1.1)
        return None

    async def _unary(self, method: Any, request: Any, rpc_timeout: float | None) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (rpc_timeout if rpc_timeout is not None else self.timeout)
        attempt = 0
        reauthenticated = False
        while True:
            try:
                return await method(
                    request,
                    timeout=max(0.001, deadline - loop.time()),
                    metadata=self._metadata(),
                )
            except grpc.aio.AioRpcError as exc:
                err = ConveyorError.from_rpc_error(exc)
            if (
                err.code == grpc.StatusCode.UNAUTHENTICATED
                and not reauthenticated
                and self._token.invalidate()
            ):
                reauthenticated = True  # a provided token may have been revoked early: ask once
                continue
            delay = self._retry_delay(err, attempt)
            if delay is None or loop.time() + delay >= deadline:
                raise err
            await asyncio.sleep(delay)
            attempt += 1

    # -- tasks ---------------------------------------------------------------------------------

    async def submit(
        self,
        kind: task_pb2.TaskKind.ValueType | str | None = None,
        *,
        spec: task_pb2.TaskSpec | None = None,
        request_id: str | None = None,
        rpc_timeout: float | None = None,
        **fields: Any,
    ) -> svc_pb2.SubmitTaskResponse:
        """Submit one task: either a ready ``spec`` or ``kind`` plus :func:`build_spec` fields."""
        if spec is None:
            if kind is None:
                raise ValueError("kind or spec is required")
            spec = build_spec(kind, **fields)
        request = svc_pb2.SubmitTaskRequest(request_id=request_id or new_request_id(), spec=spec)
        result: svc_pb2.SubmitTaskResponse = await self._unary(
            self._tasks.SubmitTask, request, rpc_timeout
        )
        return result

    async def submit_batch(
        self,
        specs: Iterable[task_pb2.TaskSpec | tuple[str, task_pb2.TaskSpec]],
        *,
        request_id: str | None = None,
        rpc_timeout: float | None = None,
    ) -> svc_pb2.BatchSubmitTasksResponse:
        """Submit several tasks; items are specs or (request_id, spec) pairs.

        Up to ``max_batch_items`` items go in one atomic call; more are sent in consecutive calls
        of that size (each atomic, the first under ``request_id``, the others under ids derived from
        it, so a retried call is deduplicated). ``rpc_timeout`` bounds each call.
        """
        batch_id = request_id or new_request_id()
        items = [item if isinstance(item, tuple) else (new_request_id(), item) for item in specs]
        size = max(1, self.max_batch_items)
        merged = svc_pb2.BatchSubmitTasksResponse()
        for index, start in enumerate(range(0, max(len(items), 1), size)):
            request = svc_pb2.BatchSubmitTasksRequest(request_id=_chunk_request_id(batch_id, index))
            for rid, spec in items[start : start + size]:
                request.items.add(request_id=rid, spec=spec)
            result: svc_pb2.BatchSubmitTasksResponse = await self._unary(
                self._tasks.BatchSubmitTasks, request, rpc_timeout
            )
            merged.tasks.extend(result.tasks)
            merged.deduplicated.extend(result.deduplicated)
        return merged

    async def get(self, task_id: str, *, rpc_timeout: float | None = None) -> task_pb2.Task:
        """One task, with its position in line and ETA while queued."""
        resp: svc_pb2.GetTaskResponse = await self._unary(
            self._tasks.GetTask, svc_pb2.GetTaskRequest(task_id=task_id), rpc_timeout
        )
        return resp.task

    async def list(
        self,
        *,
        statuses: Iterable[task_pb2.TaskStatus.ValueType] = (),
        kinds: Iterable[task_pb2.TaskKind.ValueType] = (),
        model: str = "",
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        page_size: int = 0,
        page_token: str = "",
        rpc_timeout: float | None = None,
    ) -> AsyncIterator[builtins.list[task_pb2.Task]]:
        """The caller's tasks, newest first, one page at a time."""
        request = svc_pb2.ListTasksRequest(page_size=page_size, page_token=page_token)
        request.filter.statuses.extend(statuses)
        request.filter.kinds.extend(kinds)
        request.filter.model = model
        if created_after is not None:
            request.filter.created_after.FromDatetime(created_after)
        if created_before is not None:
            request.filter.created_before.FromDatetime(created_before)
        while True:
            resp: svc_pb2.ListTasksResponse = await self._unary(
                self._tasks.ListTasks, request, rpc_timeout
            )
            yield builtins.list(resp.tasks)
            if not resp.next_page_token:
                return
            request.page_token = resp.next_page_token

    async def cancel(
        self,
        task_id: str,
        *,
        reason: str = "",
        request_id: str | None = None,
        rpc_timeout: float | None = None,
    ) -> task_pb2.Task:
        """Cancel a task; returns it after the cancel."""
        request = svc_pb2.CancelTaskRequest(
            request_id=request_id or new_request_id(), task_id=task_id, reason=reason
        )
        resp: svc_pb2.CancelTaskResponse = await self._unary(
            self._tasks.CancelTask, request, rpc_timeout
        )
        return resp.task

    async def watch(
        self, task_id: str, *, after_sequence: int = 0, rpc_timeout: float | None = None
    ) -> AsyncIterator[task_pb2.TaskEvent]:
        """The task's events after ``after_sequence``; resumes on a broken stream; ends at terminal.

        ``rpc_timeout`` bounds the whole watch (none by default).
        """
        last = after_sequence
        failures = 0
        while True:
            call = self._tasks.WatchTask(
                svc_pb2.WatchTaskRequest(task_id=task_id, after_sequence=last),
                timeout=rpc_timeout,
                metadata=self._metadata(),
            )
            try:
                async for resp in call:
                    failures = 0
                    event: task_pb2.TaskEvent = resp.event
                    if event.sequence <= last:
                        continue
                    last = event.sequence
                    yield event
                    if event.type in TERMINAL_EVENTS:
                        call.cancel()
                        return
                return
            except grpc.aio.AioRpcError as exc:
                # Without a deadline of ours, DEADLINE_EXCEEDED came from a hop behind the gateway
                # (e.g. a slow scheduler page): resume like any other broken stream.
                code = call_code(exc)
                resumable = code in WATCH_RESUMABLE or (
                    code == grpc.StatusCode.DEADLINE_EXCEEDED and rpc_timeout is None
                )
                if not resumable or failures >= self.watch_reconnects:
                    raise ConveyorError.from_rpc_error(exc) from None
                await asyncio.sleep(self._backoff(min(failures, 5)))
                failures += 1
            finally:
                call.cancel()

    async def watch_many(
        self, task_ids: Iterable[str], *, rpc_timeout: float | None = None
    ) -> AsyncIterator[task_pb2.TaskEvent]:
        """The events of several tasks as they come (each task's in order); ends when all ended.

        Each task is followed by its own resuming :meth:`watch`; the first failure ends the
        whole watch.
        """
        ids = builtins.list(dict.fromkeys(task_ids))
        queue: asyncio.Queue[task_pb2.TaskEvent | BaseException | None] = asyncio.Queue(maxsize=256)

        async def follow(task_id: str) -> None:
            try:
                async for event in self.watch(task_id, rpc_timeout=rpc_timeout):
                    await queue.put(event)
            except Exception as exc:  # handed to the consumer
                await queue.put(exc)
            else:
                await queue.put(None)

        followers = [asyncio.create_task(follow(task_id)) for task_id in ids]
        try:
            remaining = len(followers)
            while remaining:
                item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for follower in followers:
                follower.cancel()
            await asyncio.gather(*followers, return_exceptions=True)

    async def watch_all(
        self, *, types: Iterable[task_pb2.TaskEventType.ValueType] = ()
    ) -> AsyncIterator[task_pb2.TaskEvent]:
        """Live events of all the caller's tasks (no history, no resume)."""
        call = self._tasks.WatchTasks(
            svc_pb2.WatchTasksRequest(types=builtins.list(types)), metadata=self._metadata()
        )
        try:
            async for resp in call:
                yield resp.event
        except grpc.aio.AioRpcError as exc:
            raise ConveyorError.from_rpc_error(exc) from None
        finally:
            call.cancel()

    async def wait(self, task_id: str, *, rpc_timeout: float | None = None) -> task_pb2.Task:
        """Follow the task until it ends; returns its final state."""
        async for event in self.watch(task_id, rpc_timeout=rpc_timeout):
            if event.type in TERMINAL_EVENTS:
                return event.task
        return await self.get(task_id)

    async def stats(
        self,
        *,
        kind: task_pb2.TaskKind.ValueType = task_pb2.TASK_KIND_UNSPECIFIED,
        model: str = "",
        rpc_timeout: float | None = None,
    ) -> svc_pb2.GetQueueStatsResponse:
        """Queue statistics per kind and model."""
        result: svc_pb2.GetQueueStatsResponse = await self._unary(
            self._tasks.GetQueueStats,
            svc_pb2.GetQueueStatsRequest(kind=kind, model=model),
            rpc_timeout,
        )
        return result

    # -- admin ---------------------------------------------------------------------------------

    # -- webhooks ------------------------------------------------------------------------------
