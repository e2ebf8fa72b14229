"""Test doubles for the gateway's unit tests: an in-memory SchedulerService and a notifier.

These stand in for the scheduler and the notifier only in *unit* tests of the gateway's own logic
(forwarding, retries, deadlines, the watch algorithm). Integration tests run the real scheduler on real
PostgreSQL. Also: key material and token minting for tests.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from conveyor.notifier.v1 import notifier_service_pb2 as notifier_pb2
from conveyor.notifier.v1 import notifier_service_pb2_grpc as notifier_grpc
from conveyor.scheduler.v1 import scheduler_service_pb2 as s
from conveyor.scheduler.v1 import scheduler_service_pb2_grpc as sched_grpc
from conveyor.tasks.v1 import task_pb2
from conveyor.tasks.v1 import task_service_pb2 as svc_pb2
from conveyor_common.errors import NotFound, RpcError, Unavailable
from conveyor_common.grpc_server import GrpcService, ServiceBinding, create_server
from conveyor_common.metrics import RpcMetrics

Ctx = grpc.aio.ServicerContext[Any, Any]


@dataclass
class _Stored:
    task: task_pb2.Task
    events: list[task_pb2.TaskEvent] = field(default_factory=list)


class FakeScheduler(sched_grpc.SchedulerServiceServicer):
    """In-memory SchedulerService with fault injection and call recording."""

    def __init__(self, notifier: FakeNotifier | None = None) -> None:
        self.tasks: dict[str, _Stored] = {}
        self.by_request: dict[tuple[str, str], str] = {}
        self.calls: list[tuple[str, Any, float | None]] = []
        self.fail_unavailable = 0
        self.fail_with: RpcError | None = None
        self.fail_request: dict[str, RpcError] = {}
        """Per request_id refusals (SubmitTaskGroup answers them as that item's status)."""
        self.delay = 0.0
        """Seconds every SubmitTaskGroup call takes."""
        self.notifier = notifier

    def _record(self, name: str, request: Any, context: Ctx) -> None:
        remaining: Any = context.time_remaining()
        self.calls.append((name, request, remaining))
        if self.fail_unavailable > 0:
            self.fail_unavailable -= 1
            raise Unavailable("injected outage", 0.01)
        if self.fail_with is not None:
            raise self.fail_with

    def _owned(self, principal: s.Principal, task_id: str) -> _Stored:
        stored = self.tasks.get(task_id)
        if stored is None or stored.task.tenant_id != principal.tenant_id:
            raise NotFound("task", task_id)
        return stored

    def append_event(
        self, task_id: str, type_: task_pb2.TaskEventType.ValueType, *, progress: int = 0,
        status: task_pb2.TaskStatus.ValueType | None = None, publish: bool = True,
    ) -> task_pb2.TaskEvent:  # fmt: skip
        """Add an event to a task's history (and publish it to the fake notifier)."""
        stored = self.tasks[task_id]
        if status is not None:
            stored.task.status = status
        stored.task.progress = progress
        stored.task.last_sequence += 1
        event = task_pb2.TaskEvent(
            event_id=str(uuid.uuid4()),
            task_id=task_id,
            tenant_id=stored.task.tenant_id,
            sequence=stored.task.last_sequence,
            type=type_,
            task=stored.task,
        )
        event.occurred_at.GetCurrentTime()
        stored.events.append(event)
        if publish and self.notifier is not None:
            self.notifier.publish(event)
        return event

    def _create(self, principal: s.Principal, request_id: str, spec: task_pb2.TaskSpec) -> tuple[task_pb2.Task, bool]:  # fmt: skip
        key = (principal.tenant_id, request_id)
        if key in self.by_request:
            return self.tasks[self.by_request[key]].task, True
        task = task_pb2.Task(
            task_id=str(uuid.uuid4()),
            tenant_id=principal.tenant_id,
            request_id=request_id,
            spec=spec,
            status=task_pb2.TASK_STATUS_QUEUED,
            max_attempts=spec.max_attempts or 3,
            tier=principal.tier,
            queue_position=len(self.tasks) + 1,
        )
        task.created_at.GetCurrentTime()
        self.tasks[task.task_id] = _Stored(task)
        self.by_request[key] = task.task_id
        self.append_event(task.task_id, task_pb2.TASK_EVENT_TYPE_SUBMITTED)
        return task, False

    async def SubmitTask(
        self, request: s.SchedulerServiceSubmitTaskRequest, context: Ctx
    ) -> s.SchedulerServiceSubmitTaskResponse:
        self._record("SubmitTask", request, context)
        task, dedup = self._create(
            request.principal, request.request.request_id, request.request.spec
        )
        return s.SchedulerServiceSubmitTaskResponse(
            response=svc_pb2.SubmitTaskResponse(task=task, deduplicated=dedup)
        )

    async def SubmitTaskGroup(
        self, request: s.SubmitTaskGroupRequest, context: Ctx
    ) -> s.SubmitTaskGroupResponse:
        """Each item recorded as a ``SubmitTask`` call. An injected outage fails the whole call
        (as a real transport failure would); an injected ``fail_with`` refuses each item alone."""
        resp = s.SubmitTaskGroupResponse()
        if self.delay:
            await asyncio.sleep(self.delay)
        for item in request.items:
            remaining: Any = context.time_remaining()
            self.calls.append(("SubmitTask", item, remaining))
            if self.fail_unavailable > 0:
                self.fail_unavailable -= 1
                raise Unavailable("injected outage", 0.01)
        for item in request.items:
            out = resp.outcomes.add()
            refusal = self.fail_request.get(item.request.request_id, self.fail_with)
            if refusal is not None:
                out.status = refusal.to_status_proto().SerializeToString()
                continue
            task, dedup = self._create(item.principal, item.request.request_id, item.request.spec)
            out.response.CopyFrom(svc_pb2.SubmitTaskResponse(task=task, deduplicated=dedup))
        return resp

    async def BatchSubmitTasks(
        self, request: s.SchedulerServiceBatchSubmitTasksRequest, context: Ctx
    ) -> s.SchedulerServiceBatchSubmitTasksResponse:
        self._record("BatchSubmitTasks", request, context)
        resp = svc_pb2.BatchSubmitTasksResponse()
        for item in request.request.items:
            task, dedup = self._create(request.principal, item.request_id, item.spec)
            resp.tasks.append(task)
            resp.deduplicated.append(dedup)
        return s.SchedulerServiceBatchSubmitTasksResponse(response=resp)

    async def GetTask(
        self, request: s.SchedulerServiceGetTaskRequest, context: Ctx
    ) -> s.SchedulerServiceGetTaskResponse:
        self._record("GetTask", request, context)
        stored = self._owned(request.principal, request.request.task_id)
        return s.SchedulerServiceGetTaskResponse(response=svc_pb2.GetTaskResponse(task=stored.task))

    async def ListTasks(
        self, request: s.SchedulerServiceListTasksRequest, context: Ctx
    ) -> s.SchedulerServiceListTasksResponse:
        self._record("ListTasks", request, context)
        own = [
            st.task
            for st in self.tasks.values()
            if st.task.tenant_id == request.principal.tenant_id
        ]
        return s.SchedulerServiceListTasksResponse(
            response=svc_pb2.ListTasksResponse(tasks=own[::-1])
        )

    async def CancelTask(
        self, request: s.SchedulerServiceCancelTaskRequest, context: Ctx
    ) -> s.SchedulerServiceCancelTaskResponse:
        self._record("CancelTask", request, context)
        stored = self._owned(request.principal, request.request.task_id)
        self.append_event(
            stored.task.task_id,
            task_pb2.TASK_EVENT_TYPE_CANCELED,
            status=task_pb2.TASK_STATUS_CANCELED,
        )
        return s.SchedulerServiceCancelTaskResponse(
            response=svc_pb2.CancelTaskResponse(task=stored.task)
        )

    async def GetQueueStats(
        self, request: s.SchedulerServiceGetQueueStatsRequest, context: Ctx
    ) -> s.SchedulerServiceGetQueueStatsResponse:
        self._record("GetQueueStats", request, context)
        return s.SchedulerServiceGetQueueStatsResponse(
            response=svc_pb2.GetQueueStatsResponse(
                stats=[task_pb2.QueueStats(kind=task_pb2.TASK_KIND_IMAGE, waiting=len(self.tasks))]
            )
        )

    async def GetTaskEvents(
        self, request: s.GetTaskEventsRequest, context: Ctx
    ) -> s.GetTaskEventsResponse:
        self._record("GetTaskEvents", request, context)
        stored = self._owned(request.principal, request.task_id)
        limit = request.limit or 500
        events = [e for e in stored.events if e.sequence > request.after_sequence][:limit]
        terminal = stored.task.status in (
            task_pb2.TASK_STATUS_SUCCEEDED,
            task_pb2.TASK_STATUS_FAILED,
            task_pb2.TASK_STATUS_CANCELED,
            task_pb2.TASK_STATUS_DEAD_LETTERED,
            task_pb2.TASK_STATUS_EXPIRED,
        )
        return s.GetTaskEventsResponse(
            events=events, terminal=terminal, last_sequence=stored.task.last_sequence
        )

    # Admin and webhook calls: the fake only records them and answers an empty response.

    async def GetTenant(
        self, request: s.SchedulerServiceGetTenantRequest, context: Ctx
    ) -> s.SchedulerServiceGetTenantResponse:
        self._record("GetTenant", request, context)
        return s.SchedulerServiceGetTenantResponse()

    async def UpsertTenant(
        self, request: s.SchedulerServiceUpsertTenantRequest, context: Ctx
    ) -> s.SchedulerServiceUpsertTenantResponse:
        self._record("UpsertTenant", request, context)
        return s.SchedulerServiceUpsertTenantResponse()

    async def PauseModel(
        self, request: s.SchedulerServicePauseModelRequest, context: Ctx
    ) -> s.SchedulerServicePauseModelResponse:
        self._record("PauseModel", request, context)
        return s.SchedulerServicePauseModelResponse()

    async def ResumeModel(
        self, request: s.SchedulerServiceResumeModelRequest, context: Ctx
    ) -> s.SchedulerServiceResumeModelResponse:
        self._record("ResumeModel", request, context)
        return s.SchedulerServiceResumeModelResponse()

    async def PauseTenant(
        self, request: s.SchedulerServicePauseTenantRequest, context: Ctx
    ) -> s.SchedulerServicePauseTenantResponse:
        self._record("PauseTenant", request, context)
        return s.SchedulerServicePauseTenantResponse()

    async def ResumeTenant(
        self, request: s.SchedulerServiceResumeTenantRequest, context: Ctx
    ) -> s.SchedulerServiceResumeTenantResponse:
        self._record("ResumeTenant", request, context)
        return s.SchedulerServiceResumeTenantResponse()

    async def ListPaused(
        self, request: s.SchedulerServiceListPausedRequest, context: Ctx
    ) -> s.SchedulerServiceListPausedResponse:
        self._record("ListPaused", request, context)
        return s.SchedulerServiceListPausedResponse()

    async def ListDeadLetters(
        self, request: s.SchedulerServiceListDeadLettersRequest, context: Ctx
    ) -> s.SchedulerServiceListDeadLettersResponse:
        self._record("ListDeadLetters", request, context)
        return s.SchedulerServiceListDeadLettersResponse()

    async def RedriveTasks(
        self, request: s.SchedulerServiceRedriveTasksRequest, context: Ctx
    ) -> s.SchedulerServiceRedriveTasksResponse:
        self._record("RedriveTasks", request, context)
        return s.SchedulerServiceRedriveTasksResponse()

    async def BulkCancelTasks(
        self, request: s.SchedulerServiceBulkCancelTasksRequest, context: Ctx
    ) -> s.SchedulerServiceBulkCancelTasksResponse:
        self._record("BulkCancelTasks", request, context)
        return s.SchedulerServiceBulkCancelTasksResponse()

    async def CreateWebhookEndpoint(
        self, request: s.SchedulerServiceCreateWebhookEndpointRequest, context: Ctx
    ) -> s.SchedulerServiceCreateWebhookEndpointResponse:
        self._record("CreateWebhookEndpoint", request, context)
        return s.SchedulerServiceCreateWebhookEndpointResponse()

    async def ListWebhookEndpoints(
        self, request: s.SchedulerServiceListWebhookEndpointsRequest, context: Ctx
    ) -> s.SchedulerServiceListWebhookEndpointsResponse:
        self._record("ListWebhookEndpoints", request, context)
        return s.SchedulerServiceListWebhookEndpointsResponse()

    async def DeleteWebhookEndpoint(
        self, request: s.SchedulerServiceDeleteWebhookEndpointRequest, context: Ctx
    ) -> s.SchedulerServiceDeleteWebhookEndpointResponse:
        self._record("DeleteWebhookEndpoint", request, context)
        return s.SchedulerServiceDeleteWebhookEndpointResponse()

    async def RotateWebhookSecret(
        self, request: s.SchedulerServiceRotateWebhookSecretRequest, context: Ctx
    ) -> s.SchedulerServiceRotateWebhookSecretResponse:
        self._record("RotateWebhookSecret", request, context)
        return s.SchedulerServiceRotateWebhookSecretResponse()

    async def ListWebhookDeliveries(
        self, request: s.SchedulerServiceListWebhookDeliveriesRequest, context: Ctx
    ) -> s.SchedulerServiceListWebhookDeliveriesResponse:
        self._record("ListWebhookDeliveries", request, context)
        return s.SchedulerServiceListWebhookDeliveriesResponse()


class FakeNotifier(notifier_grpc.WatchFanoutServiceServicer):
    """WatchFanoutService fed by :meth:`publish`; can drop events or break streams."""

    def __init__(self) -> None:
        self.subscribers: list[tuple[notifier_pb2.SubscribeRequest, asyncio.Queue[Any]]] = []
        self.drop_sequences: set[int] = set()
        self.break_after: int | None = None
        self.subscribe_count = 0

    def publish(self, event: task_pb2.TaskEvent) -> None:
        """Deliver an event to every matching subscriber (unless its sequence is dropped)."""
        if event.sequence in self.drop_sequences:
            return
        for req, queue in self.subscribers:
            if req.tenant_id == event.tenant_id and req.task_id in ("", event.task_id):
                queue.put_nowait(event)

    async def Subscribe(
        self, request: notifier_pb2.SubscribeRequest, context: Ctx
    ) -> AsyncIterator[notifier_pb2.SubscribeResponse]:
        self.subscribe_count += 1
        queue: asyncio.Queue[Any] = asyncio.Queue()
        entry = (request, queue)
        self.subscribers.append(entry)
        sent = 0
        try:
            yield notifier_pb2.SubscribeResponse(ready=True)
            while True:
                event = await queue.get()
                yield notifier_pb2.SubscribeResponse(event=event)
                sent += 1
                if self.break_after is not None and sent >= self.break_after:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "injected break")
        finally:
            self.subscribers.remove(entry)


async def serve(*bindings: ServiceBinding) -> GrpcService:
    """Start the fakes on 127.0.0.1:0 with the common server bootstrap (rich error mapping)."""
    service = create_server(
        bindings, host="127.0.0.1", port=0, metrics=RpcMetrics(CollectorRegistry(), "fake")
    )
    await service.start()
    return service


def scheduler_binding(fake: FakeScheduler) -> ServiceBinding:
    """Mount a FakeScheduler."""
    return ServiceBinding(
        sched_grpc.add_SchedulerServiceServicer_to_server,
        fake,
        "conveyor.scheduler.v1.SchedulerService",
    )


def notifier_binding(fake: FakeNotifier) -> ServiceBinding:
    """Mount a FakeNotifier."""
    return ServiceBinding(
        notifier_grpc.add_WatchFanoutServiceServicer_to_server,
        fake,
        "conveyor.notifier.v1.WatchFanoutService",
    )
