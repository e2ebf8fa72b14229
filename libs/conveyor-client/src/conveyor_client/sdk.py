"""The typed SDK: :class:`AsyncClient` (asyncio) and :class:`Client` (blocking), one surface.

Both return the dataclasses and enums of :mod:`conveyor_client.types`; both are built on
:class:`~conveyor_client.client.AsyncConveyorClient`, so they share its retries (UNAVAILABLE, and
RESOURCE_EXHAUSTED after the server's RetryInfo delay, within the call's deadline, under the same
request id), token providers and automatic batch splitting. Failures raise
:class:`~conveyor_client.errors.ConveyorError`.
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator, Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any, TypeVar

import grpc

from conveyor.tasks.v1 import admin_service_pb2 as admin_pb2
from conveyor.tasks.v1 import group_pb2, task_pb2
from conveyor_client.client import AsyncConveyorClient
from conveyor_client.enums import EventType, Priority, TaskKind, TaskStatus, Tier
from conveyor_client.options import TokenProvider, build_spec
from conveyor_client.types import (
    BatchSubmitted,
    Paused,
    QueueStat,
    Submitted,
    Task,
    TaskEvent,
    TaskPage,
    Tenant,
    TenantLimits,
)

T = TypeVar("T")

SpecLike = task_pb2.TaskSpec | Mapping[str, Any]
"""A batch item: a TaskSpec, or the keyword arguments of :func:`spec` as a mapping."""


def spec(
    kind: TaskKind | str,
    *,
    model: str | None = None,
    deployment: str | None = None,
    input: dict[str, Any] | None = None,
    priority: Priority | str = Priority.UNSPECIFIED,
    queue_deadline: datetime | None = None,
    run_timeout: timedelta | float | None = None,
    max_attempts: int = 0,
    labels: dict[str, str] | None = None,
    webhook_url: str | None = None,
    webhook_events: Iterable[EventType | str] = (),
) -> task_pb2.TaskSpec:
    """A task spec for :meth:`AsyncClient.submit_batch`."""
    return build_spec(
        TaskKind.parse(kind).value,
        model=model,
        deployment=deployment,
        input=input,
        priority=Priority.parse(priority).value,
        queue_deadline=queue_deadline,
        run_timeout=run_timeout,
        max_attempts=max_attempts,
        labels=labels,
        webhook_url=webhook_url,
        webhook_events=[EventType.parse(e).proto for e in webhook_events],  # type: ignore[misc]
    )


def _spec(item: SpecLike) -> task_pb2.TaskSpec:
    return item if isinstance(item, task_pb2.TaskSpec) else spec(**item)


def _selector(
    task_ids: Iterable[str],
    tenant_id: str,
    model: str,
    statuses: Iterable[TaskStatus | str],
    created_before: datetime | None,
    limit: int,
) -> admin_pb2.BulkSelector:
    sel = admin_pb2.BulkSelector(
        task_ids=builtins.list(task_ids),
        tenant_id=tenant_id,
        model=model,
        statuses=[TaskStatus.parse(s).proto for s in statuses],  # type: ignore[misc]
        limit=limit,
    )
    if created_before is not None:
        sel.created_before.FromDatetime(created_before)
    return sel


class AsyncClient:
    """Typed asyncio client of the Conveyor gateway.

    ``token`` is a bearer token or a callable returning one (asked again shortly before the token's
    ``exp``, and once more after UNAUTHENTICATED). ``timeout`` is the default deadline of a call,
    retries included. Use :meth:`from_env` to read ``CONVEYOR_ADDRESS``/``CONVEYOR_TOKEN`` (and
    ``CONVEYOR_TLS``, ``CONVEYOR_CA_FILE``, ``CONVEYOR_CERT_FILE``, ``CONVEYOR_KEY_FILE``).
    """

    def __init__(
        self,
        address: str,
        token: str | TokenProvider | None = None,
        *,
        timeout: float = 10.0,
        credentials: grpc.ChannelCredentials | None = None,
        **options: Any,
    ) -> None:
        self.raw = AsyncConveyorClient(
            address, token, timeout=timeout, credentials=credentials, **options
        )
        """The protobuf-level client (webhook endpoints and anything not wrapped here)."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **options: Any) -> AsyncClient:
        """A client configured by ``CONVEYOR_*`` environment variables."""
        client = cls.__new__(cls)
        client.raw = AsyncConveyorClient.from_env(environ, **options)
        return client

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel."""
        await self.raw.close()

    # -- tasks ---------------------------------------------------------------------------------

    async def submit(
        self,
        kind: TaskKind | str,
        *,
        model: str | None = None,
        deployment: str | None = None,
        input: dict[str, Any] | None = None,
        priority: Priority | str = Priority.UNSPECIFIED,
        queue_deadline: datetime | None = None,
        run_timeout: timedelta | float | None = None,
        max_attempts: int = 0,
        labels: dict[str, str] | None = None,
        webhook_url: str | None = None,
        webhook_events: Iterable[EventType | str] = (),
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Submitted:
        """Submit one task; returns at once with the queued task."""
        task_spec = spec(
            kind,
            model=model,
            deployment=deployment,
            input=input,
            priority=priority,
            queue_deadline=queue_deadline,
            run_timeout=run_timeout,
            max_attempts=max_attempts,
            labels=labels,
            webhook_url=webhook_url,
            webhook_events=webhook_events,
        )
        resp = await self.raw.submit(spec=task_spec, request_id=request_id, rpc_timeout=timeout)
        return Submitted(Task.from_proto(resp.task), resp.deduplicated)

    async def submit_batch(
        self,
        specs: Iterable[SpecLike],
        *,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> BatchSubmitted:
        """Submit many tasks: atomic up to the server's item limit (100), split beyond it.

        Items are :func:`spec` results or mappings of its arguments.
        """
        resp = await self.raw.submit_batch(
            [_spec(s) for s in specs], request_id=request_id, rpc_timeout=timeout
        )
        return BatchSubmitted(
            [
                Submitted(Task.from_proto(t), dedup)
                for t, dedup in zip(resp.tasks, resp.deduplicated, strict=True)
            ]
        )

    async def get(self, task_id: str, *, timeout: float | None = None) -> Task:
        """One task, with its position in line and an estimated start while queued."""
        return Task.from_proto(await self.raw.get(task_id, rpc_timeout=timeout))

    async def list(
        self,
        *,
        statuses: Iterable[TaskStatus | str] = (),
        kinds: Iterable[TaskKind | str] = (),
        model: str = "",
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        limit: int | None = None,
        page_size: int = 100,
        timeout: float | None = None,
    ) -> AsyncIterator[Task]:
        """The caller's tasks, newest first (pages fetched as needed), at most ``limit``."""
        count = 0
        async for page in self.raw.list(
            statuses=[TaskStatus.parse(s).proto for s in statuses],  # type: ignore[misc]
            kinds=[TaskKind.parse(k).proto for k in kinds],  # type: ignore[misc]
            model=model,
            created_after=created_after,
            created_before=created_before,
            page_size=page_size,
            rpc_timeout=timeout,
        ):
            for msg in page:
                if limit is not None and count >= limit:
                    return
                count += 1
                yield Task.from_proto(msg)

    async def cancel(
        self,
        task_id: str,
        *,
        reason: str = "",
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Task:
        """Cancel a task. A running task ends later: the result has ``cancel_requested`` set."""
        msg = await self.raw.cancel(
            task_id, reason=reason, request_id=request_id, rpc_timeout=timeout
        )
        return Task.from_proto(msg, cancel_requested=True)

    async def watch(
        self, task_id: str, *, after_sequence: int = 0, timeout: float | None = None
    ) -> AsyncIterator[TaskEvent]:
        """The task's events after ``after_sequence``, resuming over broken streams, to the end.

        ``timeout`` bounds the whole watch (none by default).
        """
        cancel_requested = False
        async for msg in self.raw.watch(
            task_id, after_sequence=after_sequence, rpc_timeout=timeout
        ):
            event = TaskEvent.from_proto(msg, cancel_requested=cancel_requested)
            cancel_requested = event.task.cancel_requested
            yield event

    async def watch_many(
        self, task_ids: Iterable[str], *, timeout: float | None = None
    ) -> AsyncIterator[TaskEvent]:
        """The events of several tasks as they come (each task's in order); ends when all ended."""
        cancel_requested: set[str] = set()
        async for msg in self.raw.watch_many(task_ids, rpc_timeout=timeout):
            event = TaskEvent.from_proto(msg, cancel_requested=msg.task_id in cancel_requested)
            if event.task.cancel_requested:
                cancel_requested.add(event.task_id)
            yield event

    async def wait(self, task_id: str, *, timeout: float | None = None) -> Task:
        """Follow the task until it ends; returns its final state."""
        final: Task | None = None
        async for event in self.watch(task_id, timeout=timeout):
            final = event.task
        if final is not None and final.terminal:
            return final
        return await self.get(task_id)

    async def stats(
        self, *, kind: TaskKind | str = TaskKind.UNSPECIFIED, model: str = ""
    ) -> builtins.list[QueueStat]:
        """Queue statistics by kind and model."""
        resp = await self.raw.stats(kind=TaskKind.parse(kind).proto, model=model)  # type: ignore[arg-type]
        return [QueueStat.from_proto(row) for row in resp.stats]

    # -- admin ---------------------------------------------------------------------------------

    async def get_tenant(self, tenant_id: str) -> Tenant:
        """A tenant's tier and limits (admin)."""
        return Tenant.from_proto(await self.raw.get_tenant(tenant_id))

    async def upsert_tenant(
        self,
        tenant_id: str,
        *,
        tier: Tier | str = Tier.UNSPECIFIED,
        limits: TenantLimits | None = None,
        request_id: str | None = None,
    ) -> Tenant:
        """Create or update a tenant (admin)."""
        msg = await self.raw.upsert_tenant(
            tenant_id,
            tier=Tier.parse(tier).proto,  # type: ignore[arg-type]
            limits=limits.to_proto() if limits is not None else None,
            request_id=request_id,
        )
        return Tenant.from_proto(msg)

    async def pause_model(
        self, model: str, *, reason: str = "", allow_unknown: bool = False
    ) -> bool:
        """Pause dispatch of a model (admin); returns whether it is paused. A model no task has
        used is refused (NOT_FOUND) unless ``allow_unknown``."""
        return await self.raw.pause_model(model, reason=reason, allow_unknown=allow_unknown)

    async def pause_tenant(self, tenant_id: str, *, reason: str = "") -> bool:
        """Pause dispatch of a tenant's tasks (admin); they are still accepted and wait."""
        return await self.raw.pause_tenant(tenant_id, reason=reason)

    async def resume_tenant(self, tenant_id: str) -> bool:
        """Resume dispatch of a paused tenant (admin); returns whether it is still paused."""
        return await self.raw.resume_tenant(tenant_id)

    async def paused(self) -> builtins.list[Paused]:
        """The paused models and tenants (admin)."""
        return [Paused.from_proto(e) for e in await self.raw.list_paused()]

    async def resume_model(self, model: str) -> bool:
        """Resume dispatch of a model (admin); returns whether it is still paused."""
        return await self.raw.resume_model(model)

    async def dead_letters(
        self, *, tenant_id: str = "", page_size: int = 0, page_token: str = ""
    ) -> TaskPage:
        """One page of dead-lettered tasks (admin)."""
        return TaskPage.from_dead_letters(
            await self.raw.list_dead_letters(
                tenant_id=tenant_id, page_size=page_size, page_token=page_token
            )
        )

    async def redrive(
        self,
        *,
        task_ids: Iterable[str] = (),
        tenant_id: str = "",
        model: str = "",
        statuses: Iterable[TaskStatus | str] = (),
        created_before: datetime | None = None,
        limit: int = 0,
    ) -> builtins.list[str]:
        """Queue matching dead-lettered tasks again (admin); returns their ids."""
        return await self.raw.redrive(
            _selector(task_ids, tenant_id, model, statuses, created_before, limit)
        )

    async def bulk_cancel(
        self,
        *,
        task_ids: Iterable[str] = (),
        tenant_id: str = "",
        model: str = "",
        statuses: Iterable[TaskStatus | str] = (),
        created_before: datetime | None = None,
        limit: int = 0,
        reason: str = "",
    ) -> builtins.list[str]:
        """Cancel every matching non-terminal task (admin); returns their ids."""
        return await self.raw.bulk_cancel(
            _selector(task_ids, tenant_id, model, statuses, created_before, limit), reason=reason
        )

    # -- task groups (protobuf results; see conveyor_client.groups) ----------------------------

    async def submit_group(self, children: Iterable[SpecLike], **kwargs: Any) -> group_pb2.Group:
        """Submit a group of tasks atomically (children: :func:`spec` results or mappings of its
        arguments); ``fail_fast``, ``follow_up``, ``outputs_field``, ``labels``, ``request_id``,
        ``webhook_url`` and ``webhook_events`` (group event types; empty = ``group.completed``)."""
        return await self.raw.submit_group([_spec(c) for c in children], **kwargs)

    async def get_group(self, group_id: str) -> group_pb2.Group:
        """One group with its aggregate progress and child ids."""
        return await self.raw.get_group(group_id)

    async def cancel_group(self, group_id: str, *, reason: str = "") -> group_pb2.Group:
        """Cancel every child of a group (running ones at the provider)."""
        return await self.raw.cancel_group(group_id, reason=reason)

    def watch_group(
        self, group_id: str, *, after_sequence: int = 0
    ) -> AsyncIterator[group_pb2.GroupEvent]:
        """The group's events (every child's events, its progress, its completion); resumes."""
        return self.raw.watch_group(group_id, after_sequence=after_sequence)
