"""Table-driven forwarding of the public unary RPCs to the scheduler.

Most public methods do the same four things: validate the request by its rule table, mint a
``request_id`` when a mutating request has none (so the gateway's own retries stay idempotent), wrap
it with the caller's principal in the scheduler's ``<Service><Method>Request`` and unwrap the
scheduler's answer. (Where the request id is the caller's idempotency key, SubmitTask and
CreateGroup, it is required, never minted.) :func:`handler` builds such a method; a servicer lists its forwarded methods as
class attributes, one line each. A ``task_id`` field in the request binds the task id to the
call's logs, so a new RPC is one line.
Methods that do more (the coalesced SubmitTask, the watch streams) are written out in their servicer.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Awaitable, Callable
from types import ModuleType
from typing import Any, Protocol

import grpc
from google.protobuf.message import Message

from conveyor_common.context import bound
from conveyor_gateway.auth import current_principal
from conveyor_gateway.downstream import SchedulerClient
from conveyor_gateway.validation import Validator

Ctx = grpc.aio.ServicerContext[Any, Any]
Handler = Callable[[Any, Any, Any], Awaitable[Any]]
"""A servicer method: (self, request, context) -> the public response."""


class Forwarding(Protocol):
    """What a servicer using :func:`forwards` holds."""

    scheduler: SchedulerClient
    validator: Validator


def ensure_request_id(request: Any) -> None:
    """Mint a request id for a mutating request that has none."""
    if not request.request_id:
        request.request_id = str(uuid.uuid4())


def handler(
    wrappers: ModuleType,
    service: str,
    method: str,
    *,
    mint_request_id: bool = False,
    groups: bool = False,
) -> Any:
    """The forwarding method of ``method``: the scheduler's ``<service><method>Request`` wraps it.

    Typed ``Any`` because it overrides a generated servicer method: mypy cannot match a method built
    at runtime against the generated signature. The handler itself is a :data:`Handler`.
    """
    wrapper: type[Message] = getattr(wrappers, f"{service}{method}Request")
    public = wrapper.DESCRIPTOR.fields_by_name["request"].message_type
    assert public is not None, f"{wrapper.__name__}.request is not a message"
    if mint_request_id and "request_id" not in public.fields_by_name:
        raise TypeError(f"{public.full_name} has no request_id to mint")
    task_scoped = "task_id" in public.fields_by_name

    async def forward(self: Forwarding, request: Message, context: Ctx) -> Message:
        if mint_request_id:
            ensure_request_id(request)
        scope = (
            bound(task_id=getattr(request, "task_id") or None)  # noqa: B009 (a proto field)
            if task_scoped
            else contextlib.nullcontext()
        )
        with scope:
            await self.validator.check(request)
            wrapped: Any = wrapper(principal=current_principal().to_proto(), request=request)
            response: Any = await self.scheduler.call(
                lambda stub: getattr(stub, method), wrapped, context, groups=groups
            )
        answer: Message = response.response
        return answer

    forward.__name__ = forward.__qualname__ = method
    typed: Handler = forward
    forward.__doc__ = f"Forwarded to the scheduler's {service}.{method}."
    return typed
