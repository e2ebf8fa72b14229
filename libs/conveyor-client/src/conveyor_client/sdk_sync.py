"""The synchronous typed SDK client (:class:`Client`): :class:`~conveyor_client.sdk.AsyncClient` run on
a private event loop thread, with the same surface."""

from __future__ import annotations

import asyncio
import builtins
import threading
from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator, Mapping
from datetime import datetime, timedelta
from typing import Any, TypeVar

import grpc

from conveyor.tasks.v1 import group_pb2
from conveyor_client.client import AsyncConveyorClient
from conveyor_client.enums import EventType, Priority, TaskKind, TaskStatus, Tier
from conveyor_client.options import TokenProvider
from conveyor_client.sdk import AsyncClient, SpecLike
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


class Client:
    """Blocking twin of :class:`AsyncClient`: the same methods and arguments, without ``await``.

    Runs an :class:`AsyncClient` on a private event-loop thread, so it works from any thread,
    including code running inside another event loop. Streaming methods return iterators.
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
        self._start()

        async def make() -> AsyncClient:
            return AsyncClient(address, token, timeout=timeout, credentials=credentials, **options)

        self._client = self._run(make())

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **options: Any) -> Client:
        """A client configured by ``CONVEYOR_*`` environment variables."""
        client = cls.__new__(cls)
        client._start()

        async def make() -> AsyncClient:
            return AsyncClient.from_env(environ, **options)

        client._client = client._run(make())
        return client

    def _start(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="conveyor-client", daemon=True
        )
        self._thread.start()

    @property
    def raw(self) -> AsyncConveyorClient:
        """The protobuf-level async client (runs on this client's loop thread)."""
        return self._client.raw

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _iterate(self, agen: AsyncIterator[T]) -> Iterator[T]:
        async def step() -> T:
            return await agen.__anext__()

        try:
            while True:
                try:
                    yield self._run(step())
                except StopAsyncIteration:
                    return
        finally:
            closer = getattr(agen, "aclose", None)
            if closer is not None:

                async def close() -> None:
                    await closer()

                self._run(close())

    def __enter__(self) -> Client:
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

    def submit(
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
        """See :meth:`AsyncClient.submit`."""
        return self._run(
            self._client.submit(
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
                request_id=request_id,
                timeout=timeout,
            )
        )

    def submit_batch(
        self,
        specs: Iterable[SpecLike],
        *,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> BatchSubmitted:
        """See :meth:`AsyncClient.submit_batch`."""
        return self._run(self._client.submit_batch(specs, request_id=request_id, timeout=timeout))

    def get(self, task_id: str, *, timeout: float | None = None) -> Task:
        """See :meth:`AsyncClient.get`."""
        return self._run(self._client.get(task_id, timeout=timeout))

    def list(
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
    ) -> Iterator[Task]:
        """See :meth:`AsyncClient.list`."""
        return self._iterate(
            self._client.list(
                statuses=statuses,
                kinds=kinds,
                model=model,
                created_after=created_after,
                created_before=created_before,
                limit=limit,
                page_size=page_size,
                timeout=timeout,
            )
        )

    def cancel(
        self,
        task_id: str,
        *,
        reason: str = "",
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Task:
        """See :meth:`AsyncClient.cancel`."""
        return self._run(
            self._client.cancel(task_id, reason=reason, request_id=request_id, timeout=timeout)
        )

    def watch(
        self, task_id: str, *, after_sequence: int = 0, timeout: float | None = None
    ) -> Iterator[TaskEvent]:
        """See :meth:`AsyncClient.watch`."""
        return self._iterate(
            self._client.watch(task_id, after_sequence=after_sequence, timeout=timeout)
        )

    def watch_many(
        self, task_ids: Iterable[str], *, timeout: float | None = None
    ) -> Iterator[TaskEvent]:
        """See :meth:`AsyncClient.watch_many`."""
        return self._iterate(self._client.watch_many(task_ids, timeout=timeout))

    def wait(self, task_id: str, *, timeout: float | None = None) -> Task:
        """See :meth:`AsyncClient.wait`."""
        return self._run(self._client.wait(task_id, timeout=timeout))

    def stats(
        self, *, kind: TaskKind | str = TaskKind.UNSPECIFIED, model: str = ""
    ) -> builtins.list[QueueStat]:
        """See :meth:`AsyncClient.stats`."""
        return self._run(self._client.stats(kind=kind, model=model))

    def get_tenant(self, tenant_id: str) -> Tenant:
        """See :meth:`AsyncClient.get_tenant`."""
        return self._run(self._client.get_tenant(tenant_id))

    def upsert_tenant(
        self,
        tenant_id: str,
        *,
        tier: Tier | str = Tier.UNSPECIFIED,
        limits: TenantLimits | None = None,
        request_id: str | None = None,
    ) -> Tenant:
        """See :meth:`AsyncClient.upsert_tenant`."""
        return self._run(
            self._client.upsert_tenant(tenant_id, tier=tier, limits=limits, request_id=request_id)
        )

    def pause_model(self, model: str, *, reason: str = "", allow_unknown: bool = False) -> bool:
        """See :meth:`AsyncClient.pause_model`."""
        return self._run(
            self._client.pause_model(model, reason=reason, allow_unknown=allow_unknown)
        )

    def pause_tenant(self, tenant_id: str, *, reason: str = "") -> bool:
        """See :meth:`AsyncClient.pause_tenant`."""
        return self._run(self._client.pause_tenant(tenant_id, reason=reason))

    def resume_tenant(self, tenant_id: str) -> bool:
        """See :meth:`AsyncClient.resume_tenant`."""
        return self._run(self._client.resume_tenant(tenant_id))

    def paused(self) -> builtins.list[Paused]:
        """See :meth:`AsyncClient.paused`."""
        return self._run(self._client.paused())

    def resume_model(self, model: str) -> bool:
        """See :meth:`AsyncClient.resume_model`."""
        return self._run(self._client.resume_model(model))

    def dead_letters(
        self, *, tenant_id: str = "", page_size: int = 0, page_token: str = ""
    ) -> TaskPage:
        """See :meth:`AsyncClient.dead_letters`."""
        return self._run(
            self._client.dead_letters(
                tenant_id=tenant_id, page_size=page_size, page_token=page_token
            )
        )

    def redrive(
        self,
        *,
        task_ids: Iterable[str] = (),
        tenant_id: str = "",
        model: str = "",
        statuses: Iterable[TaskStatus | str] = (),
        created_before: datetime | None = None,
        limit: int = 0,
    ) -> builtins.list[str]:
        """See :meth:`AsyncClient.redrive`."""
        return self._run(
            self._client.redrive(
                task_ids=task_ids,
                tenant_id=tenant_id,
                model=model,
                statuses=statuses,
                created_before=created_before,
                limit=limit,
            )
        )

    def bulk_cancel(
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
        """See :meth:`AsyncClient.bulk_cancel`."""
        return self._run(
            self._client.bulk_cancel(
                task_ids=task_ids,
                tenant_id=tenant_id,
                model=model,
                statuses=statuses,
                created_before=created_before,
                limit=limit,
                reason=reason,
            )
        )

    def submit_group(self, children: Iterable[SpecLike], **kwargs: Any) -> group_pb2.Group:
        """See :meth:`AsyncClient.submit_group`."""
        return self._run(self._client.submit_group(builtins.list(children), **kwargs))

    def get_group(self, group_id: str) -> group_pb2.Group:
        """See :meth:`AsyncClient.get_group`."""
        return self._run(self._client.get_group(group_id))

    def cancel_group(self, group_id: str, *, reason: str = "") -> group_pb2.Group:
        """See :meth:`AsyncClient.cancel_group`."""
        return self._run(self._client.cancel_group(group_id, reason=reason))

    def watch_group(
        self, group_id: str, *, after_sequence: int = 0
    ) -> Iterator[group_pb2.GroupEvent]:
        """See :meth:`AsyncClient.watch_group`."""
        return self._iterate(self._client.watch_group(group_id, after_sequence=after_sequence))
