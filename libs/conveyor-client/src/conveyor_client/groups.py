"""Task groups and delayed tasks in the SDK: :class:`GroupMethods` (mixed into
:class:`~conveyor_client.AsyncConveyorClient`), :class:`SyncGroupMethods` (into
:class:`~conveyor_client.ConveyorClient`) and :func:`delayed`.

.. code-block:: python

    group = await client.submit_group(
        [build_spec("image", model="acme/sdxl", input={"prompt": p}) for p in prompts],
        follow_up=build_spec("video", model="acme/video"),
        outputs_field="frames",
    )
    async for event in client.watch_group(group.group_id):
        print(f"{event.group.progress.done}/{event.group.progress.total}")
"""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import AsyncIterator, Iterable, Iterator
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import grpc

from conveyor.tasks.v1 import group_pb2, task_pb2
from conveyor.tasks.v1 import group_service_pb2 as grp_pb2
from conveyor.tasks.v1 import group_service_pb2_grpc as grp_grpc

if TYPE_CHECKING:
    from conveyor_client.client import AsyncConveyorClient

GROUP_TERMINAL_STATUSES = frozenset(
    {
        group_pb2.GROUP_STATUS_SUCCEEDED,
        group_pb2.GROUP_STATUS_PARTIALLY_FAILED,
        group_pb2.GROUP_STATUS_FAILED,
        group_pb2.GROUP_STATUS_CANCELED,
    }
)


def delayed(
    spec: task_pb2.TaskSpec,
    *,
    delay: timedelta | float | None = None,
    not_before: datetime | None = None,
    retry_delay: timedelta | float | None = None,
    retry_backoff: str = "fixed",
    retry_max_delay: timedelta | float | None = None,
) -> task_pb2.TaskSpec:
    """``spec`` with a start delay (``delay`` or ``not_before``) and/or a retry delay policy
    (``retry_backoff`` "fixed" or "exponential")."""

    def td(value: timedelta | float) -> timedelta:
        return value if isinstance(value, timedelta) else timedelta(seconds=value)

    out = task_pb2.TaskSpec()
    out.CopyFrom(spec)
    if delay is not None:
        out.delay.FromTimedelta(td(delay))
    if not_before is not None:
        out.not_before.FromDatetime(not_before)
    if retry_delay is not None:
        out.retry_policy.backoff = task_pb2.RetryBackoff.Value(
            f"RETRY_BACKOFF_{retry_backoff.upper()}"
        )
        out.retry_policy.delay.FromTimedelta(td(retry_delay))
        if retry_max_delay is not None:
            out.retry_policy.max_delay.FromTimedelta(td(retry_max_delay))
    return out


class GroupMethods:
    """Group calls of the async client (uses its channel, metadata and retries)."""

    _channel: Any
    timeout: float
    watch_reconnects: int

    def _metadata(self) -> tuple[tuple[str, str], ...]:  # pragma: no cover - the client's
        raise NotImplementedError

    def _backoff(self, attempt: int) -> float:  # pragma: no cover - the client's
        raise NotImplementedError

    async def _unary(self, method: Any, request: Any, rpc_timeout: float | None) -> Any:
        raise NotImplementedError  # pragma: no cover - the client's

    @property
    def _groups(self) -> Any:
        stub = self.__dict__.get("_group_stub")
        if stub is None:
            stub = self.__dict__["_group_stub"] = grp_grpc.GroupServiceStub(self._channel)
        return stub

    async def submit_group(
        self,
        children: Iterable[task_pb2.TaskSpec],
        *,
        request_id: str | None = None,
        fail_fast: bool = False,
        follow_up: task_pb2.TaskSpec | None = None,
        outputs_field: str = "",
        labels: dict[str, str] | None = None,
        webhook_url: str | None = None,
        webhook_events: Iterable[group_pb2.GroupEventType.ValueType] = (),
        rpc_timeout: float | None = None,
    ) -> group_pb2.Group:
        """Submit a group of tasks atomically; returns the group (with its child ids).

        ``webhook_url`` receives the group's signed events (``webhook_events``; empty = the
        ``group.completed`` event, with every child's outcome)."""
        from conveyor_client.options import new_request_id

        spec = group_pb2.GroupSpec(
            children=list(children),
            policy=group_pb2.GROUP_POLICY_FAIL_FAST
            if fail_fast
            else group_pb2.GROUP_POLICY_ALL_SETTLED,
        )
        if follow_up is not None:
            spec.follow_up.spec.CopyFrom(follow_up)
            spec.follow_up.outputs_field = outputs_field
        if labels:
            spec.labels.update(labels)
        if webhook_url:
            spec.webhook.url = webhook_url
            spec.webhook.events.extend(webhook_events)
        resp: grp_pb2.CreateGroupResponse = await self._unary(
            self._groups.CreateGroup,
            grp_pb2.CreateGroupRequest(request_id=request_id or new_request_id(), spec=spec),
            rpc_timeout,
        )
        return resp.group

    async def get_group(
        self, group_id: str, *, rpc_timeout: float | None = None
    ) -> group_pb2.Group:
        """One group with its aggregate progress and child ids."""
        resp: grp_pb2.GetGroupResponse = await self._unary(
            self._groups.GetGroup, grp_pb2.GetGroupRequest(group_id=group_id), rpc_timeout
        )
        return resp.group

    async def list_groups(
        self,
        *,
        statuses: Iterable[group_pb2.GroupStatus.ValueType] = (),
        page_size: int = 0,
        page_token: str = "",
    ) -> grp_pb2.ListGroupsResponse:
        """One page of the caller's groups, newest first."""
        resp: grp_pb2.ListGroupsResponse = await self._unary(
            self._groups.ListGroups,
            grp_pb2.ListGroupsRequest(
                statuses=list(statuses), page_size=page_size, page_token=page_token
            ),
            None,
        )
        return resp

    async def cancel_group(
        self, group_id: str, *, reason: str = "", request_id: str | None = None
    ) -> group_pb2.Group:
        """Cancel every child of a group (running ones at the provider)."""
        from conveyor_client.options import new_request_id

        resp: grp_pb2.CancelGroupResponse = await self._unary(
            self._groups.CancelGroup,
            grp_pb2.CancelGroupRequest(
                request_id=request_id or new_request_id(), group_id=group_id, reason=reason
            ),
            None,
        )
        return resp.group

    async def watch_group(
        self, group_id: str, *, after_sequence: int = 0, rpc_timeout: float | None = None
    ) -> AsyncIterator[group_pb2.GroupEvent]:
        """The group's events after ``after_sequence`` (every child's events, the progress, the
        completion with every child's outputs); resumes a broken stream from the last sequence."""
        from conveyor_client.errors import ConveyorError, call_code
        from conveyor_client.options import WATCH_RESUMABLE

        last = after_sequence
        failures = 0
        while True:
            call = self._groups.WatchGroup(
                grp_pb2.WatchGroupRequest(group_id=group_id, after_sequence=last),
                timeout=rpc_timeout,
                metadata=self._metadata(),
            )
            try:
                async for resp in call:
                    failures = 0
                    event: group_pb2.GroupEvent = resp.event
                    if event.sequence <= last:
                        continue
                    last = event.sequence
                    yield event
                return
            except grpc.aio.AioRpcError as exc:
                code = call_code(exc)
                resumable = code in WATCH_RESUMABLE or (
                    code == grpc.StatusCode.DEADLINE_EXCEEDED and rpc_timeout is None
                )
                if not resumable or failures >= self.watch_reconnects:
                    raise ConveyorError.from_rpc_error(exc) from None
                await asyncio.sleep(self._backoff(min(failures, 5)))
                failures += 1
            finally:
                call.cancel()


class SyncGroupMethods:
    """Group calls of the blocking client."""

    _client: AsyncConveyorClient

    def _run(self, coro: Any) -> Any:  # pragma: no cover - the client's
        raise NotImplementedError

    def _iterate(self, agen: Any) -> Iterator[Any]:  # pragma: no cover - the client's
        raise NotImplementedError

    def submit_group(self, children: Iterable[task_pb2.TaskSpec], **kwargs: Any) -> group_pb2.Group:
        """See :meth:`GroupMethods.submit_group`."""
        out: group_pb2.Group = self._run(
            self._client.submit_group(builtins.list(children), **kwargs)
        )
        return out

    def get_group(self, group_id: str, **kwargs: Any) -> group_pb2.Group:
        """See :meth:`GroupMethods.get_group`."""
        out: group_pb2.Group = self._run(self._client.get_group(group_id, **kwargs))
        return out

    def cancel_group(self, group_id: str, **kwargs: Any) -> group_pb2.Group:
        """See :meth:`GroupMethods.cancel_group`."""
        out: group_pb2.Group = self._run(self._client.cancel_group(group_id, **kwargs))
        return out

    def watch_group(self, group_id: str, **kwargs: Any) -> Iterator[group_pb2.GroupEvent]:
        """See :meth:`GroupMethods.watch_group`."""
        return self._iterate(self._client.watch_group(group_id, **kwargs))
