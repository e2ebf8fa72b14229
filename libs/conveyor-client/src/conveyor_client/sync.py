"""The synchronous :class:`ConveyorClient`: the async client run on a private event loop thread, with
the same surface."""

from __future__ import annotations

import asyncio
import builtins
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Iterator
from typing import Any, TypeVar

from conveyor.tasks.v1 import admin_service_pb2 as admin_pb2
from conveyor.tasks.v1 import task_pb2
from conveyor.tasks.v1 import task_service_pb2 as svc_pb2
from conveyor_client.client import AsyncConveyorClient
from conveyor_client.groups import SyncGroupMethods
from conveyor_client.options import channel_options_from_env

T = TypeVar("T")


class ConveyorClient(SyncGroupMethods):
    """Blocking wrapper of :class:`AsyncConveyorClient`: runs it on a private event-loop thread.

    Usable from any thread, including code that runs inside another event loop.
    """

    def __init__(self, address: str, token: str | None = None, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="conveyor-client", daemon=True
        )
        self._thread.start()

        async def make() -> AsyncConveyorClient:
            return AsyncConveyorClient(address, token, **kwargs)

        self._client = self._run(make())

    @classmethod
    def from_env(cls, environ: Any = None, **kwargs: Any) -> ConveyorClient:
        """A client configured by ``CONVEYOR_*`` variables (see :func:`channel_options_from_env`)."""
        address, token, credentials = channel_options_from_env(environ)
        kwargs.setdefault("credentials", credentials)
        return cls(address, kwargs.pop("token", token), **kwargs)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _iterate(self, agen: AsyncIterator[T]) -> Iterator[T]:
        try:
            while True:
                try:
                    yield self._run(_anext(agen))
                except StopAsyncIteration:
                    return
        finally:
            closer: Callable[[], Awaitable[None]] | None = getattr(agen, "aclose", None)
            if closer is not None:
                self._run(_await(closer()))

    def __enter__(self) -> ConveyorClient:
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

    def submit(self, kind: Any = None, **kwargs: Any) -> svc_pb2.SubmitTaskResponse:
        """See :meth:`AsyncConveyorClient.submit`."""
        return self._run(self._client.submit(kind, **kwargs))

    def submit_batch(self, specs: Any, **kwargs: Any) -> svc_pb2.BatchSubmitTasksResponse:
        """See :meth:`AsyncConveyorClient.submit_batch`."""
        return self._run(self._client.submit_batch(specs, **kwargs))

    def get(self, task_id: str, **kwargs: Any) -> task_pb2.Task:
        """See :meth:`AsyncConveyorClient.get`."""
        return self._run(self._client.get(task_id, **kwargs))

    def list(self, **kwargs: Any) -> Iterator[builtins.list[task_pb2.Task]]:
        """See :meth:`AsyncConveyorClient.list` (pages)."""
        return self._iterate(self._client.list(**kwargs))

    def cancel(self, task_id: str, **kwargs: Any) -> task_pb2.Task:
        """See :meth:`AsyncConveyorClient.cancel`."""
        return self._run(self._client.cancel(task_id, **kwargs))

    def watch(self, task_id: str, **kwargs: Any) -> Iterator[task_pb2.TaskEvent]:
        """See :meth:`AsyncConveyorClient.watch`."""
        return self._iterate(self._client.watch(task_id, **kwargs))

    def watch_many(self, task_ids: Iterable[str], **kwargs: Any) -> Iterator[task_pb2.TaskEvent]:
        """See :meth:`AsyncConveyorClient.watch_many`."""
        return self._iterate(self._client.watch_many(task_ids, **kwargs))

    def wait(self, task_id: str, **kwargs: Any) -> task_pb2.Task:
        """See :meth:`AsyncConveyorClient.wait`."""
        return self._run(self._client.wait(task_id, **kwargs))

    def stats(self, **kwargs: Any) -> svc_pb2.GetQueueStatsResponse:
        """See :meth:`AsyncConveyorClient.stats`."""
        return self._run(self._client.stats(**kwargs))

    def get_tenant(self, tenant_id: str) -> task_pb2.Tenant:
        """See :meth:`AsyncConveyorClient.get_tenant`."""
        return self._run(self._client.get_tenant(tenant_id))

    def upsert_tenant(self, tenant_id: str, **kwargs: Any) -> task_pb2.Tenant:
        """See :meth:`AsyncConveyorClient.upsert_tenant`."""
        return self._run(self._client.upsert_tenant(tenant_id, **kwargs))

    def pause_model(self, model: str, **kwargs: Any) -> bool:
        """See :meth:`AsyncConveyorClient.pause_model`."""
        return self._run(self._client.pause_model(model, **kwargs))

    def resume_model(self, model: str, **kwargs: Any) -> bool:
        """See :meth:`AsyncConveyorClient.resume_model`."""
        return self._run(self._client.resume_model(model, **kwargs))

    def list_dead_letters(self, **kwargs: Any) -> admin_pb2.ListDeadLettersResponse:
        """See :meth:`AsyncConveyorClient.list_dead_letters`."""
        return self._run(self._client.list_dead_letters(**kwargs))

    def redrive(self, selector: admin_pb2.BulkSelector, **kwargs: Any) -> builtins.list[str]:
        """See :meth:`AsyncConveyorClient.redrive`."""
        return self._run(self._client.redrive(selector, **kwargs))

    def bulk_cancel(self, selector: admin_pb2.BulkSelector, **kwargs: Any) -> builtins.list[str]:
        """See :meth:`AsyncConveyorClient.bulk_cancel`."""
        return self._run(self._client.bulk_cancel(selector, **kwargs))


async def _anext(agen: AsyncIterator[T]) -> T:
    return await agen.__anext__()


async def _await(aw: Awaitable[None]) -> None:
    await aw
