"""TaskService, AdminService and WebhookService: validate, then forward to the scheduler.

Each handler takes the principal from the auth interceptor, validates the public request by its rule
table (a bad request is answered INVALID_ARGUMENT and never forwarded), wraps it with the principal
and calls the scheduler with the caller's deadline. Mutating calls without a request_id get one here,
so the gateway's own retries stay idempotent.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from conveyor.notifier.v1 import notifier_service_pb2_grpc as notifier_grpc
from conveyor.scheduler.v1 import scheduler_service_pb2 as s
from conveyor.scheduler.v1 import scheduler_service_pb2_grpc as sched_grpc
from conveyor.tasks.v1 import admin_service_pb2 as admin_pb2
from conveyor.tasks.v1 import admin_service_pb2_grpc as admin_grpc
from conveyor.tasks.v1 import task_service_pb2 as svc_pb2
from conveyor.tasks.v1 import task_service_pb2_grpc as svc_grpc
from conveyor.tasks.v1 import webhook_service_pb2 as hook_pb2
from conveyor.tasks.v1 import webhook_service_pb2_grpc as hook_grpc
from conveyor_common.context import bound, current_traceparent
from conveyor_common.errors import Unavailable
from conveyor_gateway.auth import current_principal
from conveyor_gateway.coalesce import SubmitCoalescer
from conveyor_gateway.downstream import SchedulerClient
from conveyor_gateway.validation import Validator
from conveyor_gateway.watch import TaskWatcher, watch_tenant

logger = logging.getLogger(__name__)

Ctx = grpc.aio.ServicerContext[Any, Any]
W = TypeVar("W", bound=Message)
Method = Callable[[sched_grpc.SchedulerServiceStub], Any]


def _ensure_request_id(request: Any) -> None:
    if not request.request_id:
        request.request_id = str(uuid.uuid4())


class _Forwarder:
    def __init__(self, scheduler: SchedulerClient, validator: Validator) -> None:
        self.scheduler = scheduler
        self.validator = validator

    async def forward(
        self, request: Message, wrapper: type[W], method: Method, context: Ctx
    ) -> Any:
        """Validate ``request``, wrap it with the principal, call the scheduler, unwrap."""
        principal = current_principal()
        await self.validator.check(request)
        wrapped: Any = wrapper(principal=principal.to_proto(), request=request)
        response: Any = await self.scheduler.call(method, wrapped, context)
        return response.response


class TaskServicer(svc_grpc.TaskServiceServicer, _Forwarder):
    """The public task API."""

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
            wrapped = s.SubmitTaskRequest(
                principal=principal.to_proto(),
                request=request,
                traceparent=current_traceparent(),  # the group call carries only one trace
            )
            return await self.submits.submit(wrapped, context)
        result: svc_pb2.SubmitTaskResponse = await self.forward(
            request, s.SubmitTaskRequest, lambda st: st.SubmitTask, context
        )
        return result

    async def BatchSubmitTasks(
        self, request: svc_pb2.BatchSubmitTasksRequest, context: Ctx
    ) -> svc_pb2.BatchSubmitTasksResponse:
        _ensure_request_id(request)
        result: svc_pb2.BatchSubmitTasksResponse = await self.forward(
            request, s.BatchSubmitTasksRequest, lambda st: st.BatchSubmitTasks, context
        )
        return result

    async def GetTask(
        self, request: svc_pb2.GetTaskRequest, context: Ctx
    ) -> svc_pb2.GetTaskResponse:
        with bound(task_id=request.task_id or None):
            result: svc_pb2.GetTaskResponse = await self.forward(
                request, s.GetTaskRequest, lambda st: st.GetTask, context
            )
        return result

    async def ListTasks(
        self, request: svc_pb2.ListTasksRequest, context: Ctx
    ) -> svc_pb2.ListTasksResponse:
        result: svc_pb2.ListTasksResponse = await self.forward(
            request, s.ListTasksRequest, lambda st: st.ListTasks, context
        )
        return result

    async def CancelTask(
        self, request: svc_pb2.CancelTaskRequest, context: Ctx
    ) -> svc_pb2.CancelTaskResponse:
        _ensure_request_id(request)
        with bound(task_id=request.task_id or None):
            result: svc_pb2.CancelTaskResponse = await self.forward(
                request, s.CancelTaskRequest, lambda st: st.CancelTask, context
            )
        return result

    async def GetQueueStats(
        self, request: svc_pb2.GetQueueStatsRequest, context: Ctx
    ) -> svc_pb2.GetQueueStatsResponse:
        result: svc_pb2.GetQueueStatsResponse = await self.forward(
            request, s.GetQueueStatsRequest, lambda st: st.GetQueueStats, context
        )
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

    async def GetTenant(
        self, request: admin_pb2.GetTenantRequest, context: Ctx
    ) -> admin_pb2.GetTenantResponse:
        result: admin_pb2.GetTenantResponse = await self.forward(
            request, s.GetTenantRequest, lambda st: st.GetTenant, context
        )
        return result

    async def UpsertTenant(
        self, request: admin_pb2.UpsertTenantRequest, context: Ctx
    ) -> admin_pb2.UpsertTenantResponse:
        _ensure_request_id(request)
        result: admin_pb2.UpsertTenantResponse = await self.forward(
            request, s.UpsertTenantRequest, lambda st: st.UpsertTenant, context
        )
        return result

    async def PauseModel(
        self, request: admin_pb2.PauseModelRequest, context: Ctx
    ) -> admin_pb2.PauseModelResponse:
        _ensure_request_id(request)
        result: admin_pb2.PauseModelResponse = await self.forward(
            request, s.PauseModelRequest, lambda st: st.PauseModel, context
        )
        return result

    async def ResumeModel(
        self, request: admin_pb2.ResumeModelRequest, context: Ctx
    ) -> admin_pb2.ResumeModelResponse:
        _ensure_request_id(request)
        result: admin_pb2.ResumeModelResponse = await self.forward(
            request, s.ResumeModelRequest, lambda st: st.ResumeModel, context
        )
        return result

    async def ListDeadLetters(
        self, request: admin_pb2.ListDeadLettersRequest, context: Ctx
    ) -> admin_pb2.ListDeadLettersResponse:
        result: admin_pb2.ListDeadLettersResponse = await self.forward(
            request, s.ListDeadLettersRequest, lambda st: st.ListDeadLetters, context
        )
        return result

    async def RedriveTasks(
        self, request: admin_pb2.RedriveTasksRequest, context: Ctx
    ) -> admin_pb2.RedriveTasksResponse:
        _ensure_request_id(request)
        result: admin_pb2.RedriveTasksResponse = await self.forward(
            request, s.RedriveTasksRequest, lambda st: st.RedriveTasks, context
        )
        return result

    async def BulkCancelTasks(
        self, request: admin_pb2.BulkCancelTasksRequest, context: Ctx
    ) -> admin_pb2.BulkCancelTasksResponse:
        _ensure_request_id(request)
        result: admin_pb2.BulkCancelTasksResponse = await self.forward(
            request, s.BulkCancelTasksRequest, lambda st: st.BulkCancelTasks, context
        )
        return result


class WebhookServicer(hook_grpc.WebhookServiceServicer, _Forwarder):
    """Client webhook endpoints (forwarded to the scheduler's webhook calls)."""

    async def CreateWebhookEndpoint(
        self, request: hook_pb2.CreateWebhookEndpointRequest, context: Ctx
    ) -> hook_pb2.CreateWebhookEndpointResponse:
        _ensure_request_id(request)
        result: hook_pb2.CreateWebhookEndpointResponse = await self.forward(
            request, s.CreateWebhookEndpointRequest, lambda st: st.CreateWebhookEndpoint, context
        )
        return result

    async def ListWebhookEndpoints(
        self, request: hook_pb2.ListWebhookEndpointsRequest, context: Ctx
    ) -> hook_pb2.ListWebhookEndpointsResponse:
        result: hook_pb2.ListWebhookEndpointsResponse = await self.forward(
            request, s.ListWebhookEndpointsRequest, lambda st: st.ListWebhookEndpoints, context
        )
        return result

    async def DeleteWebhookEndpoint(
        self, request: hook_pb2.DeleteWebhookEndpointRequest, context: Ctx
    ) -> hook_pb2.DeleteWebhookEndpointResponse:
        _ensure_request_id(request)
        result: hook_pb2.DeleteWebhookEndpointResponse = await self.forward(
            request, s.DeleteWebhookEndpointRequest, lambda st: st.DeleteWebhookEndpoint, context
        )
        return result

    async def RotateWebhookSecret(
        self, request: hook_pb2.RotateWebhookSecretRequest, context: Ctx
    ) -> hook_pb2.RotateWebhookSecretResponse:
        _ensure_request_id(request)
        result: hook_pb2.RotateWebhookSecretResponse = await self.forward(
            request, s.RotateWebhookSecretRequest, lambda st: st.RotateWebhookSecret, context
        )
        return result

    async def ListWebhookDeliveries(
        self, request: hook_pb2.ListWebhookDeliveriesRequest, context: Ctx
    ) -> hook_pb2.ListWebhookDeliveriesResponse:
        result: hook_pb2.ListWebhookDeliveriesResponse = await self.forward(
            request, s.ListWebhookDeliveriesRequest, lambda st: st.ListWebhookDeliveries, context
        )
        return result
