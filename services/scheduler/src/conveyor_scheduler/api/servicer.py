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
from conveyor.tasks.v1 import admin_service_pb2, task_pb2, task_service_pb2
from conveyor_common.errors import (
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RpcError,
)
from conveyor_common.faults import classify
from conveyor_scheduler.admission.submit import NewTask, SubmitRequest, fingerprint
from conveyor_scheduler.admission.validation import (
    MAX_GROUP,
    MAX_ID_LEN,
    _bulk_limit,
    validate_item,
    webhook_url_violations,
)
from conveyor_scheduler.client_webhooks.rpcs import WebhookRpcs
from conveyor_scheduler.core import SchedulerCore
from conveyor_scheduler.dispatch.policy import Policy
from conveyor_scheduler.store import models as m
from conveyor_scheduler.store.convert import duration, from_ts, task_proto

logger = logging.getLogger(__name__)


def _tenant(principal: pb.Principal) -> str:
    tenant = principal.tenant_id
    if not tenant or len(tenant) > MAX_ID_LEN:
        raise InvalidArgument(
            [FieldViolation("principal.tenant_id", "required, at most 128 chars")]
        )
    return tenant


def _require_admin(principal: pb.Principal) -> None:
    if principal.role != pb.ROLE_ADMIN:
        raise PermissionDenied("this call requires the admin role", reason="ADMIN_REQUIRED")


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


def tenant_proto(
    row: dict[str, Any] | None, tenant_id: str, policy: Policy, settings: Any
) -> task_pb2.Tenant:
    """A Tenant with its explicit and effective limits."""
    row = row or {}
    tier = row.get("tier") or row.get("claimed_tier") or 1
    explicit = task_pb2.TenantLimits(
        max_concurrency=row.get("max_concurrency") or 0,
        max_waiting=row.get("max_waiting") or 0,
        submit_rate_per_second=row.get("submit_rate") or 0.0,
        submit_burst=row.get("submit_burst") or 0,
        weight=row.get("weight") or 0,
    )
    effective = task_pb2.TenantLimits(
        max_concurrency=policy.tenant_limit(tier, row.get("max_concurrency")),
        max_waiting=row.get("max_waiting") or settings.tenant_max_waiting,
        submit_rate_per_second=row.get("submit_rate") or settings.tenant_submit_rate,
        submit_burst=row.get("submit_burst") or settings.tenant_submit_burst,
        weight=policy.tenant_weight(tier, row.get("weight")),
    )
    return task_pb2.Tenant(
        tenant_id=tenant_id,
        tier=task_pb2.Tier.ValueType(tier),
        limits=explicit,
        effective_limits=effective,
    )


class SchedulerServicer(WebhookRpcs, pb_grpc.SchedulerServiceServicer):
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

    async def GetTenant(
        self,
        request: pb.SchedulerServiceGetTenantRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.SchedulerServiceGetTenantResponse:
        _require_admin(request.principal)
        tid = request.request.tenant_id
        row = await self.core.get_tenant(tid)
        if row is None:
            raise NotFound("tenant", tid)
        tenant = tenant_proto(row, tid, self.core.policy, self.core.settings)
        return pb.SchedulerServiceGetTenantResponse(
            response=admin_service_pb2.GetTenantResponse(tenant=tenant)
        )

    async def UpsertTenant(
        self,
        request: pb.SchedulerServiceUpsertTenantRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.SchedulerServiceUpsertTenantResponse:
        _require_admin(request.principal)
        r = request.request
        v: list[FieldViolation] = []
        if not r.tenant_id or len(r.tenant_id) > MAX_ID_LEN:
            v.append(FieldViolation("tenant_id", "required, at most 128 characters"))
        if r.tier not in (0, 1, 2, 3):
            v.append(FieldViolation("tier", "unknown tier"))
        lim = r.limits
        v.extend(
            FieldViolation(f"limits.{name}", "must be >= 0")
            for name in ("max_concurrency", "max_waiting", "submit_burst", "weight")
            if getattr(lim, name) < 0
        )
        if lim.submit_rate_per_second < 0:
            v.append(FieldViolation("limits.submit_rate_per_second", "must be >= 0"))
        if v:
            raise InvalidArgument(v)
        row = await self.core.upsert_tenant(r.tenant_id, int(r.tier), lim)
        tenant = tenant_proto(row, r.tenant_id, self.core.policy, self.core.settings)
        return pb.SchedulerServiceUpsertTenantResponse(
            response=admin_service_pb2.UpsertTenantResponse(tenant=tenant)
        )

    async def PauseModel(
        self,
        request: pb.SchedulerServicePauseModelRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.SchedulerServicePauseModelResponse:
        _require_admin(request.principal)
        model = request.request.model
        if not model or len(model) > 256:
            raise InvalidArgument([FieldViolation("model", "required")])
        paused = await self.core.set_model_paused(model, True, request.request.reason or None)
        return pb.SchedulerServicePauseModelResponse(
            response=admin_service_pb2.PauseModelResponse(paused=paused)
        )

    async def ResumeModel(
        self,
        request: pb.SchedulerServiceResumeModelRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.SchedulerServiceResumeModelResponse:
        _require_admin(request.principal)
        model = request.request.model
        if not model or len(model) > 256:
            raise InvalidArgument([FieldViolation("model", "required")])
        paused = await self.core.set_model_paused(model, False, None)
        return pb.SchedulerServiceResumeModelResponse(
            response=admin_service_pb2.ResumeModelResponse(paused=paused)
        )

    async def ListDeadLetters(
        self,
        request: pb.SchedulerServiceListDeadLettersRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.SchedulerServiceListDeadLettersResponse:
        _require_admin(request.principal)
        r = request.request
        if r.page_size < 0 or r.page_size > 500:
            raise InvalidArgument([FieldViolation("page_size", "must be 0-500")])
        rows, token = await self.core.list_tasks(
            r.tenant_id or None,
            statuses=[m.DEAD_LETTERED],
            page_size=r.page_size or 50,
            page_token=r.page_token,
        )
        return pb.SchedulerServiceListDeadLettersResponse(
            response=admin_service_pb2.ListDeadLettersResponse(
                tasks=[task_proto(x) for x in rows], next_page_token=token
            )
        )

    async def RedriveTasks(
        self,
        request: pb.SchedulerServiceRedriveTasksRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.SchedulerServiceRedriveTasksResponse:
        _require_admin(request.principal)
        sel = request.request.selector
        statuses = [int(s) for s in sel.statuses] or [m.DEAD_LETTERED]
        if any(s not in (m.DEAD_LETTERED, m.FAILED) for s in statuses):
            raise InvalidArgument(
                [FieldViolation("selector.statuses", "only dead-lettered or failed tasks")]
            )
        ids = await self.core.bulk(
            "redrive",
            task_ids=list(sel.task_ids),
            tenant_id=sel.tenant_id,
            model=sel.model,
            statuses=statuses,
            created_before=from_ts(sel.created_before) if sel.HasField("created_before") else None,
            limit=_bulk_limit(sel),
        )
        return pb.SchedulerServiceRedriveTasksResponse(
            response=admin_service_pb2.RedriveTasksResponse(task_ids=[str(i) for i in ids])
        )

    async def BulkCancelTasks(
        self,
        request: pb.SchedulerServiceBulkCancelTasksRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.SchedulerServiceBulkCancelTasksResponse:
        _require_admin(request.principal)
        sel = request.request.selector
        statuses = [int(s) for s in sel.statuses] or [m.QUEUED, m.DISPATCHED, m.RUNNING]
        if any(s not in (1, 2, 3, 4, 5, 6, 7, 8) for s in statuses):
            raise InvalidArgument([FieldViolation("selector.statuses", "unknown status")])
        ids = await self.core.bulk(
            "cancel",
            task_ids=list(sel.task_ids),
            tenant_id=sel.tenant_id,
            model=sel.model,
            statuses=statuses,
            created_before=from_ts(sel.created_before) if sel.HasField("created_before") else None,
            limit=_bulk_limit(sel),
            reason=request.request.reason,
        )
        return pb.SchedulerServiceBulkCancelTasksResponse(
            response=admin_service_pb2.BulkCancelTasksResponse(task_ids=[str(i) for i in ids])
        )
