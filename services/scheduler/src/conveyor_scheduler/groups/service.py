"""Group use cases (one transaction each), the group worker, metrics and the gRPC servicer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge
from sqlalchemy import text

from conveyor.scheduler.v1 import group_service_pb2 as gpb
from conveyor.scheduler.v1 import group_service_pb2_grpc as gpb_grpc
from conveyor.scheduler.v1 import scheduler_service_pb2 as spb
from conveyor.tasks.v1 import group_pb2, group_service_pb2
from conveyor_common.errors import FieldViolation, InvalidArgument, RpcError
from conveyor_common.vocabulary import GROUP_STATUS_NAME
from conveyor_scheduler.admission.validation import validate_item
from conveyor_scheduler.client_webhooks.rpcs import check_callback_url, group_event_type_violations
from conveyor_scheduler.client_webhooks.settings import WebhookPolicy
from conveyor_scheduler.clock import utcnow
from conveyor_scheduler.core import SchedulerCore
from conveyor_scheduler.groups.cancel import cancel_children, request_cancel
from conveyor_scheduler.groups.events import group_proto
from conveyor_scheduler.groups.follow_up import pending_work, submit_follow_up
from conveyor_scheduler.groups.store import (
    child_ids,
    create_group,
    events_after,
    list_groups,
    load_group,
    stream_finished,
    work_available,
)
from conveyor_scheduler.store.convert import from_ts

logger = logging.getLogger(__name__)


class GroupMetrics:
    """``conveyor_scheduler_groups*`` metrics."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        kw: dict[str, Any] = {"registry": registry} if registry is not None else {"registry": None}
        self.created = Counter("conveyor_scheduler_groups_created", "Task groups created.", **kw)
        self.children = Counter(
            "conveyor_scheduler_group_children_created", "Children of created task groups.", **kw
        )
        self.follow_ups = Counter(
            "conveyor_scheduler_group_follow_ups", "Fan-in follow-up tasks submitted.", **kw
        )
        self.groups = Gauge(
            "conveyor_scheduler_groups",
            "Task groups by status (refreshed by the group worker every few seconds).",
            ["status"],
            **kw,
        )
        self.running_progress = Gauge(
            "conveyor_scheduler_groups_running_progress_percent",
            "Mean aggregate progress of the running groups (0-100).",
            **kw,
        )


class GroupCore:
    """The group use cases on the scheduler core's engine, and the group worker loop."""

    def __init__(self, core: SchedulerCore, metrics: GroupMetrics | None = None) -> None:
        self.core = core
        self.metrics = metrics
        self._task: asyncio.Task[None] | None = None
        self._gauges_at = 0.0

    # ------------------------------------------------------------------ use cases

    async def create(
        self, tenant_id: str, tier: int, request_id: str, spec: group_pb2.GroupSpec
    ) -> tuple[group_pb2.Group, bool]:
        """CreateGroup: (group with child ids, deduplicated)."""
        core = self.core
        try:
            async with core.engine.begin() as conn:
                row, ids, dedup = await create_group(
                    conn,
                    tenant_id=tenant_id,
                    claimed_tier=tier or 1,
                    request_id=request_id,
                    spec=spec,
                    policy=core.policy,
                    settings=core.settings,
                    now=utcnow(),
                )
        except RpcError as exc:
            from conveyor_common.errors import ResourceExhausted

            if isinstance(exc, ResourceExhausted):
                core._rejected(exc)
            raise
        if not dedup:
            core._submitted(len(ids))
            if self.metrics is not None:
                self.metrics.created.inc()
                self.metrics.children.inc(len(ids))
        return group_proto(row, ids), dedup

    async def get(self, tenant_id: str, group_id: str) -> group_pb2.Group:
        """GetGroup."""
        async with self.core.engine.connect() as conn:
            row = await load_group(conn, group_id, tenant_id)
            ids = await child_ids(conn, row["id"])
        return group_proto(row, ids)

    async def cancel(self, tenant_id: str, group_id: str, reason: str) -> group_pb2.Group:
        """CancelGroup: mark, then cancel every child in a second transaction (the worker
        finishes the second step if this replica dies between the two)."""
        async with self.core.engine.begin() as conn:
            row = await request_cancel(conn, group_id, tenant_id, reason, utcnow())
        if row["cancel_pending"]:
            await self._cancel_children(row["id"])
        return await self.get(tenant_id, group_id)

    async def _cancel_children(self, gid: uuid.UUID) -> None:
        async with self.core.engine.begin() as conn:
            changes = await cancel_children(conn, gid, utcnow())
        self.core._after(changes, poke=bool(changes.free_slots or changes.outbox))

    async def _follow_up(self, gid: uuid.UUID) -> None:
        async with self.core.engine.begin() as conn:
            row = await submit_follow_up(
                conn, gid, policy=self.core.policy, settings=self.core.settings, now=utcnow()
            )
        if row is not None:
            self.core._submitted(1)
            if self.metrics is not None:
                self.metrics.follow_ups.inc()

    # ------------------------------------------------------------------ worker

    def start(self) -> None:
        """Start the group worker (every replica runs one; rows are taken with SKIP LOCKED)."""
        self._task = asyncio.create_task(self._run(), name="group-worker")

    async def stop(self) -> None:
        """Stop the worker."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    async def _run(self) -> None:
        interval = self.core.settings.maintenance_seconds
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that races an
            # already-set event, and this loop would then never stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await work_available.wait()
            work_available.clear()
            try:
                await self.run_once()
            except Exception:
                logger.warning(
                    "group worker failed", extra={"action": "group_worker_failed"}, exc_info=True
                )
                await asyncio.sleep(0.5)

    async def run_once(self) -> int:
        """Cancel pending children and submit owed follow-ups; returns the groups handled."""
        async with self.core.engine.connect() as conn:
            work = await pending_work(conn)
        for gid, what in work:
            if what == "cancel":
                await self._cancel_children(gid)
            else:
                await self._follow_up(gid)
        if self.metrics is not None and time.monotonic() - self._gauges_at > 5.0:
            self._gauges_at = time.monotonic()
            await self._refresh_gauges()
        return len(work)

    async def _refresh_gauges(self) -> None:
        assert self.metrics is not None
        async with self.core.engine.connect() as conn:
            rows = await conn.execute(
                text(
                    "SELECT status, count(*), avg(progress_sum::float8 / total)"
                    " FROM task_groups GROUP BY status"
                )
            )
            seen = set()
            for status, n, avg in rows:
                name = GROUP_STATUS_NAME.get(status, str(status))
                seen.add(name)
                self.metrics.groups.labels(name).set(n)
                if status == 1:
                    self.metrics.running_progress.set(avg or 0.0)
            for name in GROUP_STATUS_NAME.values():
                if name not in seen:
                    self.metrics.groups.labels(name).set(0)
            if "running" not in seen:
                self.metrics.running_progress.set(0.0)


# ---------------------------------------------------------------------- gRPC

MAX_ID_LEN = 128


def _tenant(principal: spb.Principal) -> str:
    if not principal.tenant_id or len(principal.tenant_id) > MAX_ID_LEN:
        raise InvalidArgument(
            [FieldViolation("principal.tenant_id", "required, at most 128 chars")]
        )
    return principal.tenant_id


def validate_group(
    request: group_service_pb2.CreateGroupRequest, max_children: int, max_attempts_cap: int
) -> list[FieldViolation]:
    """Defensive checks of a CreateGroup (the gateway does the full validation)."""

    v: list[FieldViolation] = []
    rid = request.request_id
    if not rid or len(rid) > MAX_ID_LEN:
        v.append(FieldViolation("request_id", "required, 1-128 characters"))
    spec = request.spec
    n = len(spec.children)
    if not 1 <= n <= max_children:
        v.append(FieldViolation("spec.children", f"1 to {max_children} children"))
        return v
    if spec.policy not in (0, 1, 2):
        v.append(FieldViolation("spec.policy", "unknown policy"))
    for i, child in enumerate(spec.children):
        v += validate_item(f"spec.children[{i}].", rid or "x", child, max_attempts_cap)
        if child.HasField("webhook"):
            v.append(FieldViolation(f"spec.children[{i}].spec.webhook", "not allowed on a child"))
    if spec.HasField("follow_up"):
        v += validate_item("spec.follow_up.", rid or "x", spec.follow_up.spec, max_attempts_cap)
    if spec.HasField("webhook"):
        if not spec.webhook.url:
            v.append(FieldViolation("spec.webhook.url", "is required"))
        v += group_event_type_violations(
            [int(e) for e in spec.webhook.events], "spec.webhook.events"
        )
    return v


class TaskGroupServicer(gpb_grpc.TaskGroupServiceServicer):
    """conveyor.scheduler.v1.TaskGroupService."""

    def __init__(self, groups: GroupCore, webhook_policy: WebhookPolicy | None = None) -> None:
        self.groups = groups
        self.webhook_policy = webhook_policy

    async def CreateGroup(
        self,
        request: gpb.TaskGroupServiceCreateGroupRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> gpb.TaskGroupServiceCreateGroupResponse:
        tenant = _tenant(request.principal)
        s = self.groups.core.settings
        violations = validate_group(request.request, s.group_max_children, s.max_attempts_cap)
        if violations:
            raise InvalidArgument(violations)
        spec = request.request.spec
        if spec.HasField("webhook"):  # the shared SSRF policy, as for a task's webhook
            if self.webhook_policy is None:
                self.webhook_policy = WebhookPolicy()
            await check_callback_url(spec.webhook.url, self.webhook_policy, "spec.webhook.url")
        group, dedup = await self.groups.create(
            tenant, request.principal.tier, request.request.request_id, request.request.spec
        )
        return gpb.TaskGroupServiceCreateGroupResponse(
            response=group_service_pb2.CreateGroupResponse(group=group, deduplicated=dedup)
        )

    async def GetGroup(
        self,
        request: gpb.TaskGroupServiceGetGroupRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> gpb.TaskGroupServiceGetGroupResponse:
        group = await self.groups.get(_tenant(request.principal), request.request.group_id)
        return gpb.TaskGroupServiceGetGroupResponse(
            response=group_service_pb2.GetGroupResponse(group=group)
        )

    async def ListGroups(
        self,
        request: gpb.TaskGroupServiceListGroupsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> gpb.TaskGroupServiceListGroupsResponse:
        tenant = _tenant(request.principal)
        r = request.request
        size = r.page_size or 50
        if not 1 <= size <= 500:
            raise InvalidArgument([FieldViolation("page_size", "must be 0-500")])
        async with self.groups.core.engine.connect() as conn:
            rows, token = await list_groups(
                conn,
                tenant,
                statuses=[int(x) for x in r.statuses],
                created_after=from_ts(r.created_after) if r.HasField("created_after") else None,
                page_size=size,
                page_token=r.page_token,
            )
        return gpb.TaskGroupServiceListGroupsResponse(
            response=group_service_pb2.ListGroupsResponse(
                groups=[group_proto(row) for row in rows], next_page_token=token
            )
        )

    async def CancelGroup(
        self,
        request: gpb.TaskGroupServiceCancelGroupRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> gpb.TaskGroupServiceCancelGroupResponse:
        tenant = _tenant(request.principal)
        if len(request.request.reason) > 1024:
            raise InvalidArgument([FieldViolation("reason", "at most 1024 characters")])
        group = await self.groups.cancel(tenant, request.request.group_id, request.request.reason)
        return gpb.TaskGroupServiceCancelGroupResponse(
            response=group_service_pb2.CancelGroupResponse(group=group)
        )

    async def GetGroupEvents(
        self, request: gpb.GetGroupEventsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> gpb.GetGroupEventsResponse:
        tenant = _tenant(request.principal)
        limit = request.limit or 500
        if not 1 <= limit <= 1000 or request.after_sequence < 0:
            raise InvalidArgument(
                [FieldViolation("limit", "1-1000 (0 = 500); after_sequence must be >= 0")]
            )
        async with self.groups.core.engine.connect() as conn:
            row = await load_group(conn, request.group_id, tenant)
            payloads = await events_after(conn, row, request.after_sequence, limit)
        out = gpb.GetGroupEventsResponse(
            finished=stream_finished(row), last_sequence=row["last_sequence"]
        )
        for p in payloads:
            out.events.add().ParseFromString(p)
        return out


def binding(core: SchedulerCore, registry: CollectorRegistry | None) -> tuple[Any, GroupCore]:
    """The TaskGroupService binding of the scheduler's gRPC server, and the group core (whose
    worker the app starts and stops)."""
    from conveyor_common.grpc_server import ServiceBinding

    groups = GroupCore(core, GroupMetrics(registry))
    return (
        ServiceBinding(
            gpb_grpc.add_TaskGroupServiceServicer_to_server,
            TaskGroupServicer(groups),
            "conveyor.scheduler.v1.TaskGroupService",
        ),
        groups,
    )


__all__ = ["GroupCore", "TaskGroupServicer", "binding"]
