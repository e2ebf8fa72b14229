"""GroupService: task groups on the public API (validate, forward to the scheduler's
TaskGroupService) and WatchGroup, one resumable, gap-free stream per group.

WatchGroup reads the group's history (``GetGroupEvents``: every child's events and the group's
progress, sequence 1, 2, 3... per group) from the caller's ``after_sequence`` and emits it, so the
history is the only source of events and the stream can have neither gaps nor duplicates. To stay
live without polling hard it subscribes to the notifier's live stream of the tenant and re-reads the
history as soon as an event of one of the group's children arrives (``task.group_id``); without a
notifier, or between child events (a follow-up submitted, a cancel), it re-reads every
``poll_interval``. It ends once the scheduler reports the group's stream finished and every event
was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.message import Message

from conveyor.notifier.v1 import notifier_service_pb2 as notifier_pb2
from conveyor.notifier.v1 import notifier_service_pb2_grpc as notifier_grpc
from conveyor.scheduler.v1 import group_service_pb2 as gs
from conveyor.tasks.v1 import group_pb2
from conveyor.tasks.v1 import group_service_pb2 as grp_pb2
from conveyor.tasks.v1 import group_service_pb2_grpc as grp_grpc
from conveyor_common.grpc_server import ServiceBinding
from conveyor_gateway.auth import Principal, current_principal
from conveyor_gateway.downstream import SchedulerClient
from conveyor_gateway.forwarding import handler
from conveyor_gateway.validation import TABLES, Validator
from conveyor_gateway.validation.checks import (
    MAX_FILTER_VALUES,
    Ctx,
    Table,
    group_event_types,
    int_range,
    nested,
    page_size,
    page_token,
    reason,
    repeated_enum,
    request_id,
    timestamp,
    validate,
)
from conveyor_gateway.validation.tasks import TASK_SPEC, spec_labels, webhook_url
from conveyor_gateway.watch import WatchConfig

logger = logging.getLogger(__name__)

GROUP_SERVICE = "conveyor.tasks.v1.GroupService"

# -- validation ------------------------------------------------------------------------------------


def group_children(msg: Message, path: str, ctx: Ctx) -> None:
    """1..max_group_children valid task specs, none with its own webhook."""
    spec: Any = msg
    children = spec.children
    if not children:
        ctx.bad(path, "at least one child is required")
        return
    if len(children) > ctx.limits.max_group_children:
        ctx.bad(path, f"at most {ctx.limits.max_group_children} children per group")
        return
    for i, child in enumerate(children):
        child_path = f"{path}[{i}]"
        validate(child, TASK_SPEC, ctx, child_path)
        if child.HasField("webhook"):
            ctx.bad(f"{child_path}.webhook", "children have no webhook; watch the group instead")


def group_labels(msg: Message, path: str, ctx: Ctx) -> None:
    """Labels of the group, with the rules of task labels."""
    spec_labels(msg, path, ctx)


def follow_up_outputs_field(msg: Message, path: str, ctx: Ctx) -> None:
    """A plain input field name, not also set by the follow-up's own input."""
    fu: Any = msg
    name = fu.outputs_field
    if name and (len(name) > 64 or not name.replace("_", "").isalnum()):
        ctx.bad(path, "1-64 letters, digits or _")
    if fu.HasField("spec") and (name or "inputs") in fu.spec.input.fields:
        ctx.bad(path, f"the follow-up's input already sets {name or 'inputs'!r}")


GROUP_FOLLOW_UP: Table = {
    "spec": [nested(TASK_SPEC, required=True)],
    "outputs_field": [follow_up_outputs_field],
}

GROUP_WEBHOOK: Table = {
    "url": [webhook_url(required=True)],
    "events": [group_event_types],
}

GROUP_SPEC: Table = {
    "children": [group_children],
    "policy": [int_range(0, 2)],
    "follow_up": [nested(GROUP_FOLLOW_UP)],
    "labels": [group_labels],
    "webhook": [nested(GROUP_WEBHOOK)],
}

CREATE_GROUP: Table = {
    "request_id": [request_id(required=True)],
    "spec": [nested(GROUP_SPEC, required=True)],
}


def group_id(msg: Message, path: str, ctx: Ctx) -> None:
    """A UUID."""
    from conveyor_gateway.validation.checks import UUID_RE

    value: str = getattr(msg, path.rsplit(".", 1)[-1])
    if not value:
        ctx.bad(path, "is required")
    elif not UUID_RE.match(value):
        ctx.bad(path, "must be a UUID")


GET_GROUP: Table = {"group_id": [group_id]}
LIST_GROUPS: Table = {
    "statuses": [repeated_enum(group_pb2.GroupStatus, MAX_FILTER_VALUES)],
    "page_size": [page_size],
    "page_token": [page_token],
    "created_after": [timestamp()],
}
CANCEL_GROUP: Table = {
    "request_id": [request_id(required=False)],
    "group_id": [group_id],
    "reason": [reason],
}
WATCH_GROUP: Table = {"group_id": [group_id], "after_sequence": [int_range(0, 2**62)]}

TABLES.update(
    {
        grp_pb2.CreateGroupRequest: CREATE_GROUP,
        grp_pb2.GetGroupRequest: GET_GROUP,
        grp_pb2.ListGroupsRequest: LIST_GROUPS,
        grp_pb2.CancelGroupRequest: CANCEL_GROUP,
        grp_pb2.WatchGroupRequest: WATCH_GROUP,
    }
)

# -- watch -------------------------------------------------------------------------------------------


class GroupWatcher:
    """Runs the WatchGroup algorithm for one request."""

    def __init__(
        self,
        scheduler: SchedulerClient,
        notifier: notifier_grpc.WatchFanoutServiceStub | None,
        config: WatchConfig,
    ) -> None:
        self.scheduler = scheduler
        self.notifier = notifier
        self.config = config

    async def _history(
        self, principal: Principal, gid: str, after: int, context: Any
    ) -> tuple[list[group_pb2.GroupEvent], bool]:
        """Every stored event after ``after``, and whether the stream is finished."""
        events: list[group_pb2.GroupEvent] = []
        while True:
            resp: gs.GetGroupEventsResponse = await self.scheduler.call(
                lambda s: s.GetGroupEvents,
                gs.GetGroupEventsRequest(
                    principal=principal.to_proto(),
                    group_id=gid,
                    after_sequence=after,
                    limit=self.config.history_page,
                ),
                context,
                groups=True,
            )
            events.extend(e for e in resp.events if e.sequence > after)
            if resp.events:
                after = max(after, resp.events[-1].sequence)
            if not resp.events or after >= resp.last_sequence:
                return events, resp.finished and after >= resp.last_sequence

    async def _live(self, principal: Principal, gid: str, wake: asyncio.Event) -> None:
        """Set ``wake`` at every live event of one of the group's children (best effort)."""
        assert self.notifier is not None
        while True:
            call: Any = self.notifier.Subscribe(
                notifier_pb2.SubscribeRequest(tenant_id=principal.tenant_id)
            )
            try:
                while True:
                    msg = await call.read()
                    if msg is grpc.aio.EOF:
                        break
                    item = msg.WhichOneof("item")
                    if item == "ready" or (item == "event" and msg.event.task.group_id == gid):
                        wake.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.info(
                    "group live stream broke: %s",
                    type(exc).__name__,
                    extra={"action": "watch_group_live_broken"},
                )
            finally:
                call.cancel()
            await asyncio.sleep(self.config.resubscribe_interval)

    async def watch(
        self, principal: Principal, gid: str, after_sequence: int, context: Any = None
    ) -> AsyncIterator[group_pb2.GroupEvent]:
        """The group's events after ``after_sequence``, ending when the stream is finished."""
        last = after_sequence
        wake = asyncio.Event()
        live: asyncio.Task[None] | None = None
        if self.notifier is not None:
            live = asyncio.create_task(self._live(principal, gid, wake))
        try:
            while True:
                wake.clear()
                started = time.monotonic()
                history, finished = await self._history(principal, gid, last, context)
                for event in history:
                    yield event
                    last = event.sequence
                if finished:
                    return
                timeout = max(0.0, self.config.poll_interval - (time.monotonic() - started))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), timeout=timeout)
        finally:
            if live is not None:
                live.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await live


# -- servicer ----------------------------------------------------------------------------------------

_forward = functools.partial(handler, gs, "TaskGroupService", groups=True)
"""The forwarding method of one TaskGroupService RPC (see conveyor_gateway.forwarding)."""


class GroupServicer(grp_grpc.GroupServiceServicer):
    """conveyor.tasks.v1.GroupService."""

    def __init__(
        self, scheduler: SchedulerClient, validator: Validator, watcher: GroupWatcher
    ) -> None:
        self.scheduler = scheduler
        self.validator = validator
        self.watcher = watcher

    CreateGroup = _forward("CreateGroup")
    GetGroup = _forward("GetGroup")
    ListGroups = _forward("ListGroups")
    CancelGroup = _forward("CancelGroup", mint_request_id=True)

    async def WatchGroup(
        self, request: grp_pb2.WatchGroupRequest, context: Any
    ) -> AsyncIterator[grp_pb2.WatchGroupResponse]:
        principal = current_principal()
        await self.validator.check(request)
        async for event in self.watcher.watch(
            principal, request.group_id, request.after_sequence, context
        ):
            yield grp_pb2.WatchGroupResponse(event=event)


def binding(
    scheduler: SchedulerClient,
    validator: Validator,
    notifier: notifier_grpc.WatchFanoutServiceStub | None,
    config: WatchConfig,
) -> ServiceBinding:
    """The GroupService binding of the gateway's server."""
    return ServiceBinding(
        grp_grpc.add_GroupServiceServicer_to_server,
        GroupServicer(scheduler, validator, GroupWatcher(scheduler, notifier, config)),
        GROUP_SERVICE,
    )
