"""TaskService, AdminService and WebhookService: validate, then forward to the scheduler.

Each handler takes the principal from the auth interceptor, validates the public request by its rule
table (a bad request is answered INVALID_ARGUMENT and never forwarded), wraps it with the principal
and calls the scheduler with the caller's deadline. Mutating calls without a request_id get one here,
so the gateway's own retries stay idempotent.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from conveyor.notifier.v1 import notifier_service_pb2_grpc as notifier_grpc
from conveyor.scheduler.v1 import scheduler_service_pb2 as s
from conveyor.scheduler.v1 import scheduler_service_pb2_grpc as sched_grpc
from conveyor.tasks.v1 import admin_service_pb2_grpc as admin_grpc
from conveyor.tasks.v1 import task_service_pb2 as svc_pb2
from conveyor.tasks.v1 import task_service_pb2_grpc as svc_grpc
from conveyor.tasks.v1 import webhook_service_pb2_grpc as hook_grpc
from conveyor_common.context import bound, current_traceparent
from conveyor_common.errors import Unavailable
from conveyor_gateway.auth import current_principal
from conveyor_gateway.coalesce import SubmitCoalescer
from conveyor_gateway.downstream import SchedulerClient
from conveyor_gateway.forwarding import handler
from conveyor_gateway.validation import Validator
from conveyor_gateway.watch import TaskWatcher, watch_tenant

logger = logging.getLogger(__name__)

Ctx = grpc.aio.ServicerContext[Any, Any]
W = TypeVar("W", bound=Message)
Method = Callable[[sched_grpc.SchedulerServiceStub], Any]


_forward = functools.partial(handler, s, "SchedulerService")
"""The forwarding method of one SchedulerService RPC (see conveyor_gateway.forwarding)."""
_SUBMIT_ALONE = _forward("SubmitTask")
"""SubmitTask forwarded alone (when the gateway does not coalesce submits)."""


class _Forwarder:
    def __init__(self, scheduler: SchedulerClient, validator: Validator) -> None:
        self.scheduler = scheduler
        self.validator = validator


class TaskServicer(svc_grpc.TaskServiceServicer, _Forwarder):
    """The public task API."""

    BatchSubmitTasks = _forward("BatchSubmitTasks", mint_request_id=True)
    GetTask = _forward("GetTask")
    ListTasks = _forward("ListTasks")
    CancelTask = _forward("CancelTask", mint_request_id=True)
    GetQueueStats = _forward("GetQueueStats")

    def __init__(
        self,
        scheduler: SchedulerClient,
        validator: Validator,
        watcher: TaskWatcher,
        notifier: notifier_grpc.WatchFanoutServiceStub | None,
        ready_timeout: float = 5.0,
        *,
        submits: SubmitCoalescer | None = None,
    ) -> None:
        _Forwarder.__init__(self, scheduler, validator)
        self.submits = submits
        self.watcher = watcher
        self.notifier = notifier
        self.ready_timeout = ready_timeout

    async def SubmitTask(
        self, request: svc_pb2.SubmitTaskRequest, context: Ctx
    ) -> svc_pb2.SubmitTaskResponse:
        if self.submits is not None:
            principal = current_principal()
            await self.validator.check(request)
            wrapped = s.SchedulerServiceSubmitTaskRequest(
                principal=principal.to_proto(),
                request=request,
                traceparent=current_traceparent(),  # the group call carries only one trace
            )
            return await self.submits.submit(wrapped, context)
        result: svc_pb2.SubmitTaskResponse = await _SUBMIT_ALONE(self, request, context)
        return result

    async def WatchTask(
        self, request: svc_pb2.WatchTaskRequest, context: Ctx
    ) -> AsyncIterator[svc_pb2.WatchTaskResponse]:
        principal = current_principal()
        await self.validator.check(request)
        with bound(task_id=request.task_id):
            async for event in self.watcher.watch(
                principal, request.task_id, request.after_sequence, context
            ):
                yield svc_pb2.WatchTaskResponse(event=event)

    async def WatchTasks(
        self, request: svc_pb2.WatchTasksRequest, context: Ctx
    ) -> AsyncIterator[svc_pb2.WatchTasksResponse]:
        principal = current_principal()
        await self.validator.check(request)
        if self.notifier is None:
            raise Unavailable("live watch is not available (no notifier configured)", 5.0)
        try:
            async for event in watch_tenant(
                self.notifier, principal, set(request.types), self.ready_timeout
            ):
                yield svc_pb2.WatchTasksResponse(event=event)
        except grpc.aio.AioRpcError as exc:
            # Notifier statuses are internal: the caller learns only that it may subscribe again.
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise Unavailable("live stream fell behind; subscribe again", 0.1) from None
            logger.warning(
                "notifier subscribe failed: %s",
                exc.code().name,
                extra={"action": "watch_tasks_unavailable"},
            )
            raise Unavailable("live watch is not available; retry later", 1.0) from None
        except (TimeoutError, ConnectionError):
            raise Unavailable("live watch is not available; retry later", 1.0) from None


class AdminServicer(admin_grpc.AdminServiceServicer, _Forwarder):
    """The operator API (admin role enforced by the auth interceptor)."""

    GetTenant = _forward("GetTenant")
    UpsertTenant = _forward("UpsertTenant", mint_request_id=True)
    PauseModel = _forward("PauseModel", mint_request_id=True)
    ResumeModel = _forward("ResumeModel", mint_request_id=True)
    ListDeadLetters = _forward("ListDeadLetters")
    RedriveTasks = _forward("RedriveTasks", mint_request_id=True)
    BulkCancelTasks = _forward("BulkCancelTasks", mint_request_id=True)
    PauseTenant = _forward("PauseTenant", mint_request_id=True)
    ResumeTenant = _forward("ResumeTenant", mint_request_id=True)
    ListPaused = _forward("ListPaused")


class WebhookServicer(hook_grpc.WebhookServiceServicer, _Forwarder):
    """Client webhook endpoints (forwarded to the scheduler's webhook calls)."""

    CreateWebhookEndpoint = _forward("CreateWebhookEndpoint", mint_request_id=True)
    ListWebhookEndpoints = _forward("ListWebhookEndpoints")
    DeleteWebhookEndpoint = _forward("DeleteWebhookEndpoint", mint_request_id=True)
    RotateWebhookSecret = _forward("RotateWebhookSecret", mint_request_id=True)
    ListWebhookDeliveries = _forward("ListWebhookDeliveries")
