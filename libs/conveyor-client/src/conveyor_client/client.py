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
import base64
import builtins
import json
import os
import random
import threading
import time
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
MAX_BATCH_ITEMS = 100
"""The gateway's default item limit of one BatchSubmitTasks call (GATEWAY_MAX_BATCH_ITEMS)."""
TOKEN_REFRESH_MARGIN_SECONDS = 60.0
"""A provided token is asked for again this long before its ``exp``."""

TokenProvider = Callable[[], str]
"""A callable returning a bearer token; called again shortly before the previous one expires."""

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


def token_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT (unverified), or None when it has none or is not a JWT."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        exp = claims.get("exp") if isinstance(claims, dict) else None
    except (IndexError, ValueError):
        return None
    return float(exp) if isinstance(exp, int | float) else None


class _TokenSource:
    """A static token or a provider whose token is cached until shortly before its expiry."""

    def __init__(self, token: str | TokenProvider | None, margin: float) -> None:
        self.provider: TokenProvider | None = (
            None if token is None or isinstance(token, str) else token
        )
        self.value: str | None = token if isinstance(token, str) else None
        self.expires_at: float | None = None
        self.margin = margin

    def get(self) -> str | None:
        if self.provider is not None and (
            self.value is None
            or self.expires_at is None
            or time.time() >= self.expires_at - self.margin
        ):
            self.value = self.provider()
            self.expires_at = token_expiry(self.value)
        return self.value

    def invalidate(self) -> bool:
        """Forget a provided token (after UNAUTHENTICATED); False for a static one."""
        if self.provider is None:
            return False
        self.value = None
        return True


def channel_options_from_env(
    environ: Any = None,
) -> tuple[str, str | None, grpc.ChannelCredentials | None]:
    """Address, token and TLS credentials from ``CONVEYOR_*`` variables.

    ``CONVEYOR_ADDRESS`` (default 127.0.0.1:50051), ``CONVEYOR_TOKEN``, ``CONVEYOR_TLS`` (1/true),
    ``CONVEYOR_CA_FILE``, ``CONVEYOR_CERT_FILE`` and ``CONVEYOR_KEY_FILE`` (mutual TLS); any of the
    files implies TLS.
    """
    env = os.environ if environ is None else environ
    address = env.get("CONVEYOR_ADDRESS") or "127.0.0.1:50051"
    token = env.get("CONVEYOR_TOKEN") or None
    ca, cert, key = (env.get(f"CONVEYOR_{n}_FILE") or None for n in ("CA", "CERT", "KEY"))
    tls = (env.get("CONVEYOR_TLS") or "").lower() in ("1", "true", "yes", "on")
    return address, token, tls_credentials(tls=tls, ca_file=ca, cert_file=cert, key_file=key)


def tls_credentials(
    *, tls: bool, ca_file: str | None, cert_file: str | None, key_file: str | None
) -> grpc.ChannelCredentials | None:
    """Channel credentials (None = plaintext) from PEM file paths."""
    if not (tls or ca_file or cert_file):
        return None

    def read(path: str | None) -> bytes | None:
        if path is None:
            return None
        with open(path, "rb") as f:
            return f.read()

    return grpc.ssl_channel_credentials(
        root_certificates=read(ca_file),
        private_key=read(key_file),
        certificate_chain=read(cert_file),
    )


def _chunk_request_id(request_id: str, index: int) -> str:
    """The batch request id of chunk ``index`` (the first keeps the caller's id); deterministic."""
    if index == 0:
        return request_id
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"conveyor-batch:{request_id}/{index}"))


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
        opts = [("grpc.keepalive_time_ms", 30_000), *options]
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
                resumable = exc.code() in WATCH_RESUMABLE or (
                    exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and rpc_timeout is None
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

    @classmethod
    def from_env(cls, environ: Any = None, **kwargs: Any) -> ConveyorClient:
        """A client configured by ``CONVEYOR_*`` variables (see :func:`channel_options_from_env`)."""
        address, token, credentials = channel_options_from_env(environ)
        kwargs.setdefault("credentials", credentials)
        return cls(address, kwargs.pop("token", token), **kwargs)

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

    def watch_many(self, task_ids: Iterable[str], **kwargs: Any) -> Iterator[task_pb2.TaskEvent]:
        """See :meth:`AsyncConveyorClient.watch_many`."""
        return self._iterate(self._client.watch_many(task_ids, **kwargs))

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
