"""Typed Conveyor client: :class:`AsyncConveyorClient` (grpc.aio) and :class:`ConveyorClient` (sync).

Every call carries the bearer token and a deadline (``timeout`` per call, the client's default
otherwise), is retried with exponential backoff and jitter on UNAVAILABLE, and raises
:class:`~conveyor_client.errors.ConveyorError` with the decoded rich details on failure. Mutating calls
get a uuid4 ``request_id`` when none is given; the same id is reused across retries, so a retried submit
never creates a second task. :meth:`AsyncConveyorClient.watch` resumes from the last sequence number it
yielded when the stream breaks, and ends after the task's terminal event.
"""

from __future__ import annotations

import asyncio
import builtins
import random
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Iterator
from datetime import datetime, timedelta
from typing import Any, TypeVar

import grpc
from google.protobuf import struct_pb2

from conveyor.tasks.v1 import admin_service_pb2 as admin_pb2
from conveyor.tasks.v1 import admin_service_pb2_grpc as admin_grpc
from conveyor.tasks.v1 import task_pb2
from conveyor.tasks.v1 import task_service_pb2 as svc_pb2
from conveyor.tasks.v1 import task_service_pb2_grpc as svc_grpc
from conveyor.tasks.v1 import webhook_service_pb2 as hook_pb2
from conveyor.tasks.v1 import webhook_service_pb2_grpc as hook_grpc
from conveyor_client.errors import ConveyorError
from conveyor_client.groups import GroupMethods, SyncGroupMethods

T = TypeVar("T")

TERMINAL_EVENTS = frozenset(
    {
        task_pb2.TASK_EVENT_TYPE_SUCCEEDED,
        task_pb2.TASK_EVENT_TYPE_FAILED,
        task_pb2.TASK_EVENT_TYPE_CANCELED,
        task_pb2.TASK_EVENT_TYPE_DEAD_LETTERED,
        task_pb2.TASK_EVENT_TYPE_EXPIRED,
    }
)
TERMINAL_STATUSES = frozenset(
    {
        task_pb2.TASK_STATUS_SUCCEEDED,
        task_pb2.TASK_STATUS_FAILED,
        task_pb2.TASK_STATUS_CANCELED,
        task_pb2.TASK_STATUS_DEAD_LETTERED,
        task_pb2.TASK_STATUS_EXPIRED,
    }
)
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})

WATCH_RESUMABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        # A watcher that fell too far behind is told to resume; an edge rate limit clears too.
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)
"""Codes on which a watch stream resumes from its last sequence number."""


def new_request_id() -> str:
    """A fresh idempotency key."""
    return str(uuid.uuid4())


def build_spec(
    kind: task_pb2.TaskKind.ValueType | str,
    *,
    model: str | None = None,
    deployment: str | None = None,
    input: dict[str, Any] | None = None,
    priority: task_pb2.Priority.ValueType | str = task_pb2.PRIORITY_UNSPECIFIED,
    queue_deadline: datetime | None = None,
    run_timeout: timedelta | float | None = None,
    max_attempts: int = 0,
    labels: dict[str, str] | None = None,
    webhook_url: str | None = None,
    webhook_events: Iterable[task_pb2.TaskEventType.ValueType] = (),
) -> task_pb2.TaskSpec:
    """A TaskSpec from plain Python values (kind/priority by enum or name: ``"video"``, ``"high"``)."""
    spec = task_pb2.TaskSpec(
        kind=_enum(task_pb2.TaskKind, "TASK_KIND_", kind),
        priority=_enum(task_pb2.Priority, "PRIORITY_", priority),
        max_attempts=max_attempts,
    )
    if model is not None:
        spec.model = model
    if deployment is not None:
        spec.deployment = deployment
    if input is not None:
        doc = struct_pb2.Struct()
        doc.update(input)
        spec.input.CopyFrom(doc)
    if queue_deadline is not None:
        spec.queue_deadline.FromDatetime(queue_deadline)
    if run_timeout is not None:
        seconds = run_timeout.total_seconds() if isinstance(run_timeout, timedelta) else run_timeout
        spec.run_timeout.FromTimedelta(timedelta(seconds=seconds))
    if labels:
        spec.labels.update(labels)
    if webhook_url is not None:
        spec.webhook.url = webhook_url
        spec.webhook.events.extend(webhook_events)
    return spec


def _enum(enum: Any, prefix: str, value: int | str) -> Any:
    if isinstance(value, str):
        name = value.upper()
        if not name.startswith(prefix):
            name = prefix + name
        return enum.Value(name)
    return value


class AsyncConveyorClient(GroupMethods):
    """Async client of the gateway (TaskService, AdminService, WebhookService)."""

    def __init__(
        self,
        address: str,
        token: str | None = None,
        *,
        timeout: float = 10.0,
        retries: int = 4,
        backoff_base: float = 0.1,
        backoff_max: float = 2.0,
        watch_reconnects: int = 20,
        credentials: grpc.ChannelCredentials | None = None,
        options: Iterable[tuple[str, Any]] = (),
    ) -> None:
        opts = [("grpc.keepalive_time_ms", 30_000), *options]
        self._channel = (
            grpc.aio.secure_channel(address, credentials, options=opts)
            if credentials is not None
            else grpc.aio.insecure_channel(address, options=opts)
        )
        self._tasks: Any = svc_grpc.TaskServiceStub(self._channel)
        self._admin: Any = admin_grpc.AdminServiceStub(self._channel)
        self._hooks: Any = hook_grpc.WebhookServiceStub(self._channel)
        self.token = token
        self.timeout = timeout
        self.retries = retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.watch_reconnects = watch_reconnects

    async def __aenter__(self) -> AsyncConveyorClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def _backoff(self, attempt: int) -> float:
        return random.uniform(0, min(self.backoff_max, self.backoff_base * 2**attempt))

    async def _unary(self, method: Any, request: Any, rpc_timeout: float | None) -> Any:
        attempt = 0
        while True:
            try:
                return await method(
                    request,
                    timeout=rpc_timeout if rpc_timeout is not None else self.timeout,
                    metadata=self._metadata(),
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE or attempt >= self.retries:
                    raise ConveyorError.from_rpc_error(exc) from None
                await asyncio.sleep(self._backoff(attempt))
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
        """Submit several tasks atomically; items are specs or (request_id, spec) pairs."""
        request = svc_pb2.BatchSubmitTasksRequest(request_id=request_id or new_request_id())
        for item in specs:
            rid, spec = item if isinstance(item, tuple) else (new_request_id(), item)
            request.items.add(request_id=rid, spec=spec)
        result: svc_pb2.BatchSubmitTasksResponse = await self._unary(
            self._tasks.BatchSubmitTasks, request, rpc_timeout
        )
        return result

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
                resumable = exc.code() in WATCH_RESUMABLE or (
                    exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and rpc_timeout is None
                )
                if not resumable or failures >= self.watch_reconnects:
                    raise ConveyorError.from_rpc_error(exc) from None
                await asyncio.sleep(self._backoff(min(failures, 5)))
                failures += 1
            finally:
                call.cancel()

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

    async def get_tenant(
        self, tenant_id: str, *, rpc_timeout: float | None = None
    ) -> task_pb2.Tenant:
        """A tenant's tier and limits (admin)."""
        resp: admin_pb2.GetTenantResponse = await self._unary(
            self._admin.GetTenant, admin_pb2.GetTenantRequest(tenant_id=tenant_id), rpc_timeout
        )
        return resp.tenant

    async def upsert_tenant(
        self,
        tenant_id: str,
        *,
        tier: task_pb2.Tier.ValueType | str = task_pb2.TIER_UNSPECIFIED,
        limits: task_pb2.TenantLimits | None = None,
        request_id: str | None = None,
        rpc_timeout: float | None = None,
    ) -> task_pb2.Tenant:
        """Create or update a tenant (admin)."""
        request = admin_pb2.UpsertTenantRequest(
            request_id=request_id or new_request_id(),
            tenant_id=tenant_id,
            tier=_enum(task_pb2.Tier, "TIER_", tier),
        )
        if limits is not None:
            request.limits.CopyFrom(limits)
        resp: admin_pb2.UpsertTenantResponse = await self._unary(
            self._admin.UpsertTenant, request, rpc_timeout
        )
        return resp.tenant

    async def pause_model(
        self, model: str, *, reason: str = "", request_id: str | None = None
    ) -> bool:
        """Pause dispatch of a model (admin); returns whether it is paused."""
        resp: admin_pb2.PauseModelResponse = await self._unary(
            self._admin.PauseModel,
            admin_pb2.PauseModelRequest(
                request_id=request_id or new_request_id(), model=model, reason=reason
            ),
            None,
        )
        return resp.paused

    async def resume_model(self, model: str, *, request_id: str | None = None) -> bool:
        """Resume dispatch of a model (admin); returns whether it is still paused."""
        resp: admin_pb2.ResumeModelResponse = await self._unary(
            self._admin.ResumeModel,
            admin_pb2.ResumeModelRequest(request_id=request_id or new_request_id(), model=model),
            None,
        )
        return resp.paused

    async def list_dead_letters(
        self, *, tenant_id: str = "", page_size: int = 0, page_token: str = ""
    ) -> admin_pb2.ListDeadLettersResponse:
        """One page of dead-lettered tasks (admin)."""
        result: admin_pb2.ListDeadLettersResponse = await self._unary(
            self._admin.ListDeadLetters,
            admin_pb2.ListDeadLettersRequest(
                tenant_id=tenant_id, page_size=page_size, page_token=page_token
            ),
            None,
        )
        return result

    async def redrive(
        self, selector: admin_pb2.BulkSelector, *, request_id: str | None = None
    ) -> builtins.list[str]:
        """Queue dead-lettered tasks again (admin); returns their ids."""
        resp: admin_pb2.RedriveTasksResponse = await self._unary(
            self._admin.RedriveTasks,
            admin_pb2.RedriveTasksRequest(
                request_id=request_id or new_request_id(), selector=selector
            ),
            None,
        )
        return builtins.list(resp.task_ids)

    async def bulk_cancel(
        self, selector: admin_pb2.BulkSelector, *, reason: str = "", request_id: str | None = None
    ) -> builtins.list[str]:
        """Cancel every non-terminal task the selector matches (admin); returns their ids."""
        resp: admin_pb2.BulkCancelTasksResponse = await self._unary(
            self._admin.BulkCancelTasks,
            admin_pb2.BulkCancelTasksRequest(
                request_id=request_id or new_request_id(), selector=selector, reason=reason
            ),
            None,
        )
        return builtins.list(resp.task_ids)

    # -- webhooks ------------------------------------------------------------------------------

    async def create_webhook_endpoint(
        self,
        url: str,
        *,
        events: Iterable[task_pb2.TaskEventType.ValueType] = (),
        request_id: str | None = None,
    ) -> hook_pb2.CreateWebhookEndpointResponse:
        """Register a callback endpoint; the response carries the signing secret once."""
        result: hook_pb2.CreateWebhookEndpointResponse = await self._unary(
            self._hooks.CreateWebhookEndpoint,
            hook_pb2.CreateWebhookEndpointRequest(
                request_id=request_id or new_request_id(), url=url, events=builtins.list(events)
            ),
            None,
        )
        return result

    async def list_webhook_endpoints(self) -> builtins.list[hook_pb2.WebhookEndpoint]:
        """The caller's endpoints."""
        resp: hook_pb2.ListWebhookEndpointsResponse = await self._unary(
            self._hooks.ListWebhookEndpoints, hook_pb2.ListWebhookEndpointsRequest(), None
        )
        return builtins.list(resp.endpoints)

    async def delete_webhook_endpoint(
        self, endpoint_id: str, *, request_id: str | None = None
    ) -> None:
        """Delete an endpoint."""
        await self._unary(
            self._hooks.DeleteWebhookEndpoint,
            hook_pb2.DeleteWebhookEndpointRequest(
                request_id=request_id or new_request_id(), endpoint_id=endpoint_id
            ),
            None,
        )

    async def rotate_webhook_secret(
        self, *, overlap_seconds: int = 0, request_id: str | None = None
    ) -> hook_pb2.RotateWebhookSecretResponse:
        """Rotate the tenant's signing secret."""
        result: hook_pb2.RotateWebhookSecretResponse = await self._unary(
            self._hooks.RotateWebhookSecret,
            hook_pb2.RotateWebhookSecretRequest(
                request_id=request_id or new_request_id(), overlap_seconds=overlap_seconds
            ),
            None,
        )
        return result

    async def list_webhook_deliveries(
        self, *, task_id: str = "", endpoint_id: str = "", page_size: int = 0, page_token: str = ""
    ) -> hook_pb2.ListWebhookDeliveriesResponse:
        """One page of delivery attempts."""
        result: hook_pb2.ListWebhookDeliveriesResponse = await self._unary(
            self._hooks.ListWebhookDeliveries,
            hook_pb2.ListWebhookDeliveriesRequest(
                task_id=task_id, endpoint_id=endpoint_id, page_size=page_size, page_token=page_token
            ),
            None,
        )
        return result


class ConveyorClient(SyncGroupMethods):
    """Blocking wrapper of :class:`AsyncConveyorClient`: runs it on a private event-loop thread.

    Usable from any thread, including code that runs inside another event loop.
    """

    def __init__(self, address: str, token: str | None = None, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="conveyor-client", daemon=True
        )
        self._thread.start()

        async def make() -> AsyncConveyorClient:
            return AsyncConveyorClient(address, token, **kwargs)

        self._client = self._run(make())

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _iterate(self, agen: AsyncIterator[T]) -> Iterator[T]:
        try:
            while True:
                try:
                    yield self._run(_anext(agen))
                except StopAsyncIteration:
                    return
        finally:
            closer: Callable[[], Awaitable[None]] | None = getattr(agen, "aclose", None)
            if closer is not None:
                self._run(_await(closer()))

    def __enter__(self) -> ConveyorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel and stop the loop thread."""
        if self._loop.is_closed():
            return
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def submit(self, kind: Any = None, **kwargs: Any) -> svc_pb2.SubmitTaskResponse:
        """See :meth:`AsyncConveyorClient.submit`."""
        return self._run(self._client.submit(kind, **kwargs))

    def submit_batch(self, specs: Any, **kwargs: Any) -> svc_pb2.BatchSubmitTasksResponse:
        """See :meth:`AsyncConveyorClient.submit_batch`."""
        return self._run(self._client.submit_batch(specs, **kwargs))

    def get(self, task_id: str, **kwargs: Any) -> task_pb2.Task:
        """See :meth:`AsyncConveyorClient.get`."""
        return self._run(self._client.get(task_id, **kwargs))

    def list(self, **kwargs: Any) -> Iterator[builtins.list[task_pb2.Task]]:
        """See :meth:`AsyncConveyorClient.list` (pages)."""
        return self._iterate(self._client.list(**kwargs))

    def cancel(self, task_id: str, **kwargs: Any) -> task_pb2.Task:
        """See :meth:`AsyncConveyorClient.cancel`."""
        return self._run(self._client.cancel(task_id, **kwargs))

    def watch(self, task_id: str, **kwargs: Any) -> Iterator[task_pb2.TaskEvent]:
        """See :meth:`AsyncConveyorClient.watch`."""
        return self._iterate(self._client.watch(task_id, **kwargs))

    def wait(self, task_id: str, **kwargs: Any) -> task_pb2.Task:
        """See :meth:`AsyncConveyorClient.wait`."""
        return self._run(self._client.wait(task_id, **kwargs))

    def stats(self, **kwargs: Any) -> svc_pb2.GetQueueStatsResponse:
        """See :meth:`AsyncConveyorClient.stats`."""
        return self._run(self._client.stats(**kwargs))

    def get_tenant(self, tenant_id: str) -> task_pb2.Tenant:
        """See :meth:`AsyncConveyorClient.get_tenant`."""
        return self._run(self._client.get_tenant(tenant_id))

    def upsert_tenant(self, tenant_id: str, **kwargs: Any) -> task_pb2.Tenant:
        """See :meth:`AsyncConveyorClient.upsert_tenant`."""
        return self._run(self._client.upsert_tenant(tenant_id, **kwargs))

    def pause_model(self, model: str, **kwargs: Any) -> bool:
        """See :meth:`AsyncConveyorClient.pause_model`."""
        return self._run(self._client.pause_model(model, **kwargs))

    def resume_model(self, model: str, **kwargs: Any) -> bool:
        """See :meth:`AsyncConveyorClient.resume_model`."""
        return self._run(self._client.resume_model(model, **kwargs))

    def list_dead_letters(self, **kwargs: Any) -> admin_pb2.ListDeadLettersResponse:
        """See :meth:`AsyncConveyorClient.list_dead_letters`."""
        return self._run(self._client.list_dead_letters(**kwargs))

    def redrive(self, selector: admin_pb2.BulkSelector, **kwargs: Any) -> builtins.list[str]:
        """See :meth:`AsyncConveyorClient.redrive`."""
        return self._run(self._client.redrive(selector, **kwargs))

    def bulk_cancel(self, selector: admin_pb2.BulkSelector, **kwargs: Any) -> builtins.list[str]:
        """See :meth:`AsyncConveyorClient.bulk_cancel`."""
        return self._run(self._client.bulk_cancel(selector, **kwargs))


async def _anext(agen: AsyncIterator[T]) -> T:
    return await agen.__anext__()


async def _await(aw: Awaitable[None]) -> None:
    await aw
