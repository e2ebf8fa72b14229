"""The operator and webhook calls of :class:`~conveyor_client.client.AsyncConveyorClient` (a mixin):
tenants, paused models, dead letters, redrive, bulk cancel, and client webhook endpoints."""

from __future__ import annotations

import builtins
from collections.abc import Iterable
from typing import Any

from conveyor.tasks.v1 import admin_service_pb2 as admin_pb2
from conveyor.tasks.v1 import group_pb2, task_pb2
from conveyor.tasks.v1 import webhook_service_pb2 as hook_pb2
from conveyor_client.options import _enum, new_request_id


class AdminCalls:
    """Admin and webhook calls; the client provides the stubs and the retrying unary call."""

    _admin: Any
    _hooks: Any

    async def _unary(self, method: Any, request: Any, rpc_timeout: float | None) -> Any:
        raise NotImplementedError

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
        self,
        model: str,
        *,
        reason: str = "",
        allow_unknown: bool = False,
        request_id: str | None = None,
    ) -> bool:
        """Pause dispatch of a model (admin); returns whether it is paused. A model no task has
        used is NOT_FOUND unless ``allow_unknown`` (pausing ahead of first use)."""
        resp: admin_pb2.PauseModelResponse = await self._unary(
            self._admin.PauseModel,
            admin_pb2.PauseModelRequest(
                request_id=request_id or new_request_id(),
                model=model,
                reason=reason,
                allow_unknown=allow_unknown,
            ),
            None,
        )
        return resp.paused

    async def pause_tenant(
        self, tenant_id: str, *, reason: str = "", request_id: str | None = None
    ) -> bool:
        """Pause dispatch of a tenant's tasks (admin); they are still accepted and wait."""
        resp: admin_pb2.PauseTenantResponse = await self._unary(
            self._admin.PauseTenant,
            admin_pb2.PauseTenantRequest(
                request_id=request_id or new_request_id(), tenant_id=tenant_id, reason=reason
            ),
            None,
        )
        return resp.paused

    async def resume_tenant(self, tenant_id: str, *, request_id: str | None = None) -> bool:
        """Resume dispatch of a paused tenant (admin); returns whether it is still paused."""
        resp: admin_pb2.ResumeTenantResponse = await self._unary(
            self._admin.ResumeTenant,
            admin_pb2.ResumeTenantRequest(
                request_id=request_id or new_request_id(), tenant_id=tenant_id
            ),
            None,
        )
        return resp.paused

    async def list_paused(self) -> builtins.list[admin_pb2.PausedEntry]:
        """The paused models and tenants (admin)."""
        resp: admin_pb2.ListPausedResponse = await self._unary(
            self._admin.ListPaused, admin_pb2.ListPausedRequest(), None
        )
        return list(resp.entries)

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

    async def create_webhook_endpoint(
        self,
        url: str,
        *,
        events: Iterable[task_pb2.TaskEventType.ValueType] = (),
        group_events: Iterable[group_pb2.GroupEventType.ValueType] = (),
        request_id: str | None = None,
    ) -> hook_pb2.CreateWebhookEndpointResponse:
        """Register a callback endpoint; the response carries the signing secret once.

        ``events``: task event types (empty = terminal ones); ``group_events``: group event types
        (empty = ``GROUP_EVENT_TYPE_COMPLETED``, with every child's outcome)."""
        result: hook_pb2.CreateWebhookEndpointResponse = await self._unary(
            self._hooks.CreateWebhookEndpoint,
            hook_pb2.CreateWebhookEndpointRequest(
                request_id=request_id or new_request_id(),
                url=url,
                events=builtins.list(events),
                group_events=builtins.list(group_events),
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
