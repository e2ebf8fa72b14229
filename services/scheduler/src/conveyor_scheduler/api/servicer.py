"""SchedulerService (gateway-facing).

Every task call is scoped to ``principal.tenant_id``; another tenant's task answers NOT_FOUND exactly
like a missing one. Admin calls require ROLE_ADMIN (PERMISSION_DENIED otherwise). Validation here is
defensive (the gateway validates): garbage gets INVALID_ARGUMENT naming the fields, and writes nothing.
Field paths are relative to the public request (``spec.max_attempts``), so the gateway relays them
as they are.
The five webhook RPCs come from the ``conveyor_scheduler.client_webhooks.WebhookRpcs`` mixin (it reads
``self.sessionmaker``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from conveyor.scheduler.v1 import scheduler_service_pb2 as pb
from conveyor.scheduler.v1 import scheduler_service_pb2_grpc as pb_grpc
from conveyor.tasks.v1 import task_pb2, task_service_pb2
from conveyor_common.errors import (
    FieldViolation,
    InvalidArgument,
    RpcError,
)
from conveyor_common.faults import classify
from conveyor_scheduler.admission.submit import NewTask, SubmitRequest, fingerprint
from conveyor_scheduler.admission.validation import (
    MAX_GROUP,
    MAX_ID_LEN,
    validate_item,
    webhook_url_violations,
)
from conveyor_scheduler.api.admin import AdminRpcs
from conveyor_scheduler.client_webhooks.rpcs import WebhookRpcs
from conveyor_scheduler.core import SchedulerCore
from conveyor_scheduler.store.convert import duration, from_ts, task_proto

logger = logging.getLogger(__name__)


def _tenant(principal: pb.Principal) -> str:
    tenant = principal.tenant_id
    if not tenant or len(tenant) > MAX_ID_LEN:
        raise InvalidArgument(
            [FieldViolation("principal.tenant_id", "required, at most 128 chars")]
        )
    return tenant


def _stats_proto(s: dict[str, Any]) -> task_pb2.QueueStats:
    return task_pb2.QueueStats(
        kind=s["kind"],
        model=s["model"],
        waiting=s["waiting"],
        active=s["active"],
        succeeded=s["succeeded"],
        failed=s["failed"],
        dead_lettered=s["dead_lettered"],
        canceled=s["canceled"],
        expired=s["expired"],
        oldest_waiting_age=duration(s["oldest_waiting_age"]),
        recent_run_time_p50=duration(s["recent_run_time_p50"]),
    )


class SchedulerServicer(AdminRpcs, WebhookRpcs, pb_grpc.SchedulerServiceServicer):
    """SchedulerService."""

    def __init__(self, core: SchedulerCore) -> None:
        self.core = core
        self.sessionmaker = core.sessionmaker

    # ---- submit

    async def _submit(
        self, request: pb.SchedulerServiceSubmitTaskRequest
    ) -> task_service_pb2.SubmitTaskResponse:
        """One single submit (group commit with concurrent ones); raises its own refusal."""
        tenant = _tenant(request.principal)
        r = request.request
        violations = validate_item("", r.request_id, r.spec, self.core.settings.max_attempts_cap)
        violations += await webhook_url_violations([("", r.spec)], self._policy())
        if violations:
            raise InvalidArgument(violations)
        row, dedup = await self.core.submit_one(
            tenant, int(request.principal.tier), NewTask(r.request_id, r.spec, fingerprint(r.spec))
        )
        return task_service_pb2.SubmitTaskResponse(task=task_proto(row), deduplicated=dedup)

    async def SubmitTask(
        self,
        request: pb.SchedulerServiceSubmitTaskRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.SchedulerServiceSubmitTaskResponse:
        return pb.SchedulerServiceSubmitTaskResponse(response=await self._submit(request))

    async def SubmitTaskGroup(
        self, request: pb.SubmitTaskGroupRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.SubmitTaskGroupResponse:
        """Each item as its own SubmitTask; all of them join the same group commit."""
        if len(request.items) > MAX_GROUP:
            raise InvalidArgument([FieldViolation("items", f"at most {MAX_GROUP} items")])
        items = list(request.items)
        outcomes: list[task_service_pb2.SubmitTaskResponse | BaseException | None] = [None] * len(
            items
        )
        cap = self.core.settings.max_attempts_cap
        hooked = [i for i, it in enumerate(items) if it.request.spec.HasField("webhook")]
        url_checks = await asyncio.gather(
            *(
                webhook_url_violations([("", items[i].request.spec)], self._policy())
                for i in hooked
            ),
            return_exceptions=True,
        )
        url_outcome = dict(zip(hooked, url_checks, strict=True))
        admitted: list[int] = []
        submits: list[SubmitRequest] = []
        for i, item in enumerate(items):
            try:
                tenant = _tenant(item.principal)
                r = item.request
                violations = validate_item("", r.request_id, r.spec, cap)
                checked = url_outcome.get(i, [])
                if isinstance(checked, BaseException):
                    raise checked
                violations += checked
                if violations:
                    raise InvalidArgument(violations)
            except Exception as exc:
                outcomes[i] = exc
                continue
            admitted.append(i)
            submits.append(
                SubmitRequest(
                    tenant,
                    int(item.principal.tier) or 1,
                    NewTask(r.request_id, r.spec, fingerprint(r.spec), item.traceparent),
                )
            )
        futures = self.core.submit_many(submits)
        for i, done in zip(
            admitted, await asyncio.gather(*futures, return_exceptions=True), strict=True
        ):
            if isinstance(done, BaseException):
                outcomes[i] = done
            else:
                row, dedup = done
                outcomes[i] = task_service_pb2.SubmitTaskResponse(
                    task=task_proto(row), deduplicated=dedup
                )
        response = pb.SubmitTaskGroupResponse()
        for item, outcome in zip(items, outcomes, strict=True):
            out = response.outcomes.add()
            if isinstance(outcome, task_service_pb2.SubmitTaskResponse):
                out.response.CopyFrom(outcome)
                continue
            if isinstance(outcome, asyncio.CancelledError):
                raise outcome
            if not isinstance(outcome, RpcError):
                # An outage: UNAVAILABLE with RetryInfo, per item.
                mapped = classify(outcome) if outcome is not None else None
                if mapped is None:
                    logger.error(
                        "submit of a group item failed",
                        exc_info=outcome,
                        extra={
                            "action": "submit_group_item_failed",
                            "tenant_id": item.principal.tenant_id,
                        },
                    )
                outcome = mapped or RpcError("internal error")
            out.status = outcome.to_status_proto().SerializeToString()
        return response

    async def BatchSubmitTasks(
        self,
        request: pb.SchedulerServiceBatchSubmitTasksRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.SchedulerServiceBatchSubmitTasksResponse:
        tenant = _tenant(request.principal)
        items = request.request.items
        violations: list[FieldViolation] = []
        if not items or len(items) > self.core.settings.max_batch_items:
            violations.append(
                FieldViolation("items", f"1-{self.core.settings.max_batch_items} items required")
            )
        seen: set[str] = set()
        for i, it in enumerate(items):
            violations += validate_item(
                f"items[{i}].", it.request_id, it.spec, self.core.settings.max_attempts_cap
            )
            if it.request_id in seen:
                violations.append(FieldViolation(f"items[{i}].request_id", "duplicate in batch"))
            seen.add(it.request_id)
        violations += await webhook_url_violations(
            [(f"items[{i}].", it.spec) for i, it in enumerate(items)], self._policy()
        )
        if violations:
            raise InvalidArgument(violations)
        out = await self.core.submit(
            tenant,
            int(request.principal.tier),
            [NewTask(it.request_id, it.spec, fingerprint(it.spec)) for it in items],
        )
        return pb.SchedulerServiceBatchSubmitTasksResponse(
            response=task_service_pb2.BatchSubmitTasksResponse(
                tasks=[task_proto(row) for row, _ in out], deduplicated=[d for _, d in out]
            )
        )

    # ---- reads

    async def GetTask(
        self,
        request: pb.SchedulerServiceGetTaskRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.SchedulerServiceGetTaskResponse:
        tenant = _tenant(request.principal)
        task = await self.core.get_task(tenant, request.request.task_id)
        return pb.SchedulerServiceGetTaskResponse(
            response=task_service_pb2.GetTaskResponse(task=task)
        )

    async def ListTasks(
        self,
        request: pb.SchedulerServiceListTasksRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.SchedulerServiceListTasksResponse:
        tenant = _tenant(request.principal)
        r = request.request
        if r.page_size < 0 or r.page_size > 500:
            raise InvalidArgument([FieldViolation("page_size", "must be 0-500")])
        f = r.filter
        rows, token = await self.core.list_tasks(
            tenant,
            statuses=[int(s) for s in f.statuses],
            kinds=[int(k) for k in f.kinds],
            model=f.model,
            created_after=from_ts(f.created_after) if f.HasField("created_after") else None,
            created_before=from_ts(f.created_before) if f.HasField("created_before") else None,
            page_size=r.page_size or 50,
            page_token=r.page_token,
        )
        return pb.SchedulerServiceListTasksResponse(
            response=task_service_pb2.ListTasksResponse(
                tasks=[task_proto(x) for x in rows], next_page_token=token
            )
        )

    async def CancelTask(
        self,
        request: pb.SchedulerServiceCancelTaskRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.SchedulerServiceCancelTaskResponse:
        tenant = _tenant(request.principal)
        r = request.request
        if len(r.reason) > 1000:
            raise InvalidArgument([FieldViolation("reason", "at most 1000 characters")])
        row = await self.core.cancel(tenant, r.task_id, r.reason)
        return pb.SchedulerServiceCancelTaskResponse(
            response=task_service_pb2.CancelTaskResponse(task=task_proto(row))
        )

    async def GetQueueStats(
        self,
        request: pb.SchedulerServiceGetQueueStatsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.SchedulerServiceGetQueueStatsResponse:
        tenant = _tenant(request.principal)
        r = request.request
        if r.kind not in (0, 1, 2, 3, 4):
            raise InvalidArgument([FieldViolation("kind", "unknown kind")])
        # A tenant's statistics are its own; the admin role sees every tenant's.
        scope = None if request.principal.role == pb.ROLE_ADMIN else tenant
        stats = await self.core.queue_stats(int(r.kind), r.model, scope)
        now = timestamp_pb2.Timestamp()
        now.GetCurrentTime()
        return pb.SchedulerServiceGetQueueStatsResponse(
            response=task_service_pb2.GetQueueStatsResponse(
                stats=[_stats_proto(s) for s in stats], computed_at=now
            )
        )

    async def GetTaskEvents(
        self, request: pb.GetTaskEventsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetTaskEventsResponse:
        tenant = _tenant(request.principal)
        if request.limit < 0 or request.limit > 1000 or request.after_sequence < 0:
            raise InvalidArgument(
                [FieldViolation("limit", "must be 0-1000; after_sequence must be >= 0")]
            )
        events, terminal, last = await self.core.task_events(
            tenant, request.task_id, request.after_sequence, request.limit or 500
        )
        return pb.GetTaskEventsResponse(events=events, terminal=terminal, last_sequence=last)

    # ---- admin
