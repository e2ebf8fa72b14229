"""SchedulerService's operator RPCs (a mixin of the servicer): tenants, paused models and tenants,
dead letters, redrive and bulk cancel. Every one requires ROLE_ADMIN (PERMISSION_DENIED otherwise)."""

from __future__ import annotations

from typing import Any

import grpc

from conveyor.scheduler.v1 import scheduler_service_pb2 as pb
from conveyor.tasks.v1 import admin_service_pb2, task_pb2
from conveyor_common.errors import (
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from conveyor_scheduler.admission.validation import (
    MAX_ID_LEN,
    _bulk_limit,
)
from conveyor_scheduler.core import SchedulerCore
from conveyor_scheduler.dispatch.policy import Policy
from conveyor_scheduler.store import models as m
from conveyor_scheduler.store.convert import from_ts, task_proto


def _tenant_field(value: str) -> str:
    if not value or len(value) > MAX_ID_LEN:
        raise InvalidArgument(
            [FieldViolation("tenant_id", f"required, at most {MAX_ID_LEN} characters")]
        )
    return value


class AdminRpcs:
    """The admin RPCs; the servicer provides ``core``."""

    core: SchedulerCore

    async def GetTenant(
        self,
        request: pb.SchedulerServiceGetTenantRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.SchedulerServiceGetTenantResponse:
        require_admin(request.principal)
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
        require_admin(request.principal)
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
        require_admin(request.principal)
        model = request.request.model
        if not model or len(model) > 256:
            raise InvalidArgument([FieldViolation("model", "required")])
        paused = await self.core.set_model_paused(
            model,
            True,
            request.request.reason or None,
            allow_unknown=request.request.allow_unknown,
        )
        return pb.SchedulerServicePauseModelResponse(
            response=admin_service_pb2.PauseModelResponse(paused=paused)
        )

    async def ResumeModel(
        self,
        request: pb.SchedulerServiceResumeModelRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.SchedulerServiceResumeModelResponse:
        require_admin(request.principal)
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
        require_admin(request.principal)
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
        require_admin(request.principal)
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
        require_admin(request.principal)
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

    async def PauseTenant(
        self,
        request: pb.SchedulerServicePauseTenantRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.SchedulerServicePauseTenantResponse:
        require_admin(request.principal)
        tenant = _tenant_field(request.request.tenant_id)
        paused = await self.core.set_tenant_paused(tenant, True, request.request.reason or None)
        return pb.SchedulerServicePauseTenantResponse(
            response=admin_service_pb2.PauseTenantResponse(paused=paused)
        )

    async def ResumeTenant(
        self,
        request: pb.SchedulerServiceResumeTenantRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.SchedulerServiceResumeTenantResponse:
        require_admin(request.principal)
        tenant = _tenant_field(request.request.tenant_id)
        paused = await self.core.set_tenant_paused(tenant, False, None)
        return pb.SchedulerServiceResumeTenantResponse(
            response=admin_service_pb2.ResumeTenantResponse(paused=paused)
        )

    async def ListPaused(
        self,
        request: pb.SchedulerServiceListPausedRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.SchedulerServiceListPausedResponse:
        require_admin(request.principal)
        out = admin_service_pb2.ListPausedResponse()
        for row in await self.core.list_paused():
            entry = out.entries.add(reason=row["reason"] or "", queued=int(row["queued"] or 0))
            if row["kind"] == "model":
                entry.model = row["name"]
            else:
                entry.tenant_id = row["name"]
            if row["since"] is not None:
                entry.paused_since.FromDatetime(row["since"])
        return pb.SchedulerServiceListPausedResponse(response=out)


def require_admin(principal: pb.Principal) -> None:
    if principal.role != pb.ROLE_ADMIN:
        raise PermissionDenied("this call requires the admin role", reason="ADMIN_REQUIRED")


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
