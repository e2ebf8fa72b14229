"""Calls to the scheduler: deadline propagation, retries on UNAVAILABLE, status pass-through.

Every call gets the caller's remaining time as its timeout (``context.time_remaining()``; the default
timeout when the caller set none). UNAVAILABLE is retried with exponential backoff and full jitter
inside that budget; this is safe because every mutating call is idempotent by request_id. A downstream
error reaches the caller with its code, message and rich details (``grpc-status-details-bin``)
unchanged, via :class:`DownstreamError`; UNKNOWN never passes (it becomes INTERNAL), and transport
errors without details get a generic message that does not leak internal addresses.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import grpc

from conveyor.scheduler.v1 import group_service_pb2_grpc as group_grpc
from conveyor.scheduler.v1 import scheduler_service_pb2_grpc as sched_grpc
from conveyor_common.channels import client_options
from conveyor_common.errors import RpcError, Unavailable

logger = logging.getLogger(__name__)

DETAILS_KEY = "grpc-status-details-bin"
Resp = TypeVar("Resp")


@dataclass(frozen=True)
class _Status(grpc.Status):
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


class DownstreamError(RpcError):
    """A downstream status re-raised as is (code, message and rich details)."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        trailing_metadata: Sequence[tuple[str, str | bytes]] = (),
    ) -> None:
        super().__init__(message, reason=code.name)
        self.code = code
        self.trailing = tuple(trailing_metadata)

    def to_status(self) -> grpc.Status:
        return _Status(self.code, self.message, self.trailing)


_GENERIC_MESSAGES = {
    grpc.StatusCode.UNAVAILABLE: "the {what} is unavailable; retry later",
    grpc.StatusCode.DEADLINE_EXCEEDED: "deadline exceeded",
    grpc.StatusCode.CANCELLED: "canceled",
}


def reraise(exc: grpc.aio.AioRpcError, *, what: str = "scheduler") -> NoReturn:
    """Re-raise a downstream error for the caller, keeping its rich details."""
    code = exc.code()
    trailing: Any = exc.trailing_metadata() or ()
    details_md = tuple((k, v) for k, v in trailing if k == DETAILS_KEY)
    if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.OK) or code is None:
        logger.error(
            "downstream returned %s", code, extra={"action": "downstream_unknown", "peer": what}
        )
        raise DownstreamError(grpc.StatusCode.INTERNAL, "internal error") from None
    if not details_md and code == grpc.StatusCode.UNAVAILABLE:
        raise Unavailable(_GENERIC_MESSAGES[code].format(what=what), 1.0) from None
    if not details_md and code in _GENERIC_MESSAGES:
        # Transport failures carry grpc-core text with internal addresses: do not forward it.
        raise DownstreamError(code, _GENERIC_MESSAGES[code].format(what=what)) from None
    raise DownstreamError(code, exc.details() or code.name.lower(), details_md) from None


def budget(context: grpc.aio.ServicerContext[Any, Any] | None, default: float) -> float:
    """Seconds the downstream call may take: the caller's remaining time, or ``default``."""
    if context is None:
        return default
    remaining: Any = context.time_remaining()
    if remaining is None or remaining > 1e8:
        return default
    return max(0.0, float(remaining))


class SchedulerClient:
    """SchedulerService stubs over a few channels, with retries and deadline propagation."""

    def __init__(
        self,
        address: str,
        *,
        channels: int = 2,
        default_timeout: float = 10.0,
        attempts: int = 4,
        base_delay: float = 0.05,
        max_delay: float = 1.0,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        options = client_options(
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
            # Distinct channel args keep the channels on separate HTTP/2 connections.
            ("grpc.use_local_subchannel_pool", 1),
        )
        self._channels: list[grpc.aio.Channel] = [
            grpc.aio.secure_channel(address, credentials, options=options)
            if credentials is not None
            else grpc.aio.insecure_channel(address, options=options)
            for _ in range(channels)
        ]
        self._stubs = [sched_grpc.SchedulerServiceStub(ch) for ch in self._channels]
        self._group_stubs = [group_grpc.TaskGroupServiceStub(ch) for ch in self._channels]
        self._next = itertools.cycle(range(len(self._stubs)))
        self.default_timeout = default_timeout
        self.attempts = attempts
        self.base_delay = base_delay
        self.max_delay = max_delay

    def stub(self) -> sched_grpc.SchedulerServiceStub:
        """The next stub (round robin over the channels)."""
        return self._stubs[next(self._next)]

    async def call(
        self,
        method: Callable[[Any], Any],
        request: Any,
        context: grpc.aio.ServicerContext[Any, Any] | None,
        *,
        budget_seconds: float | None = None,
        groups: bool = False,
    ) -> Resp:
        """Call ``method(stub)(request)``; retry UNAVAILABLE within the caller's deadline."""
        total = (
            budget_seconds if budget_seconds is not None else budget(context, self.default_timeout)
        )
        deadline = time.monotonic() + total
        attempt = 0
        while True:
            attempt += 1
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DownstreamError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
            try:
                stub: Any = self._group_stubs[next(self._next)] if groups else self.stub()
                response: Resp = await method(stub)(request, timeout=remaining)
                return response
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt >= self.attempts:
                    reraise(exc)
                delay = random.uniform(0, min(self.max_delay, self.base_delay * 2 ** (attempt - 1)))
                if time.monotonic() + delay >= deadline:
                    reraise(exc)
                logger.info(
                    "scheduler unavailable, retrying",
                    extra={"action": "scheduler_retry", "attempt": attempt, "delay": delay},
                )
                await asyncio.sleep(delay)

    async def close(self) -> None:
        """Close every channel."""
        for channel in self._channels:
            await channel.close()
