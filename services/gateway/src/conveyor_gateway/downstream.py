"""Calls to the scheduler: deadline propagation, retries on UNAVAILABLE, status pass-through.

Every call gets the caller's remaining time as its budget (``context.time_remaining()``; the default
timeout when the caller set none). Each attempt is bounded by ``attempt_timeout``, doubled after each
attempt that hit it, so a replica that stopped answering (frozen, stalled, half dead) costs a caller
a short attempt: the next one goes to another replica (round_robin), and a slow but working call
still gets the time it needs. UNAVAILABLE is retried with exponential backoff
and full jitter inside the budget, an attempt's own timeout at once; this is safe because every
mutating call is idempotent by request_id. A downstream
error reaches the caller with its code, message and rich details (``grpc-status-details-bin``)
unchanged, via :class:`DownstreamError`; UNKNOWN never passes (it becomes INTERNAL, except grpc-core's
"Stream removed", a connection lost mid-call, which is UNAVAILABLE: ``call_code``), and transport
errors without details get a generic message that does not leak internal addresses.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import grpc

from conveyor.scheduler.v1 import group_service_pb2_grpc as group_grpc
from conveyor.scheduler.v1 import scheduler_service_pb2_grpc as sched_grpc
from conveyor_common import limits
from conveyor_common.channels import call_code, client_options
from conveyor_common.errors import RpcError, Unavailable
from conveyor_common.randomness import rng
from conveyor_common.tls import TlsFiles, open_channel

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
    code = call_code(exc)
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


def _split_target(target: str) -> tuple[list[str], str, int] | None:
    """(addresses, host, port) of a target naming replicas we can dial one by one: a static list
    (``ipv4:a:p,b:p``) or a DNS name (``dns:///host:port``, ``host:port``) resolved by us; None
    for anything else (left to gRPC's own resolver)."""
    if target.startswith(("ipv4:", "ipv6:")):
        scheme, _, rest = target.partition(":")
        parts = [p for p in rest.split(",") if p]
        addresses = [f"{scheme}:{p}" for p in parts]
        return (addresses, "", 0) if addresses else None
    name = target.removeprefix("dns:///").removeprefix("dns:")
    host, sep, port = name.rpartition(":")
    if not sep or not port.isdigit() or not host or "/" in host or "," in host:
        return None
    return [], host.strip("[]"), int(port)


class ReplicaPool:
    """One channel per scheduler replica, so that a call that timed out on one replica is retried
    on another: a replica that stops answering (frozen, stalled, half dead) is marked suspect for
    ``suspect_seconds`` and skipped while others remain. DNS names (a headless Service) are
    re-resolved every ``refresh_seconds``; a target we cannot split is one gRPC channel
    (round_robin inside)."""

    def __init__(
        self,
        target: str,
        tls: TlsFiles | None,
        options: list[tuple[str, str | int]],
        *,
        connections: int = 1,
        suspect_seconds: float = 5.0,
        refresh_seconds: float = 5.0,
    ) -> None:
        self.target = target
        self.tls = tls
        self.options = options
        self.connections = max(1, connections)
        self.suspect_seconds = suspect_seconds
        self.refresh_seconds = refresh_seconds
        split = _split_target(target)
        self._static = split is not None and bool(split[0])
        self._dns = split if split is not None and not split[0] else None
        self._channels: dict[str, list[grpc.aio.Channel]] = {}
        self._stubs: dict[str, list[sched_grpc.SchedulerServiceStub]] = {}
        self._group_stubs: dict[int, group_grpc.TaskGroupServiceStub] = {}
        """TaskGroupService stub on the channel of each SchedulerService stub (by id)."""
        self._suspect: dict[str, float] = {}
        self._order: list[str] = []
        self._next = 0
        self._resolved_at = 0.0
        self._resolving: asyncio.Task[None] | None = None
        if split is None or self._dns is not None:
            self._set([target])  # until the first resolution (or for good)
        else:
            self._set(split[0])

    def _open(self, address: str) -> list[grpc.aio.Channel]:
        options = list(self.options)
        if self._dns is not None and address != self.target:
            # Dialled by IP: the certificate names the service, as the original target did.
            options.append(("grpc.default_authority", f"{self._dns[1]}:{self._dns[2]}"))
            if self.tls is not None and not self.tls.server_name:
                options.append(("grpc.ssl_target_name_override", self._dns[1]))
        return [open_channel(address, self.tls, options) for _ in range(self.connections)]

    def _set(self, addresses: list[str]) -> None:
        for address in addresses:
            if address not in self._channels:
                self._channels[address] = self._open(address)
                self._stubs[address] = [
                    sched_grpc.SchedulerServiceStub(ch) for ch in self._channels[address]
                ]
                for ch, stub in zip(self._channels[address], self._stubs[address], strict=True):
                    self._group_stubs[id(stub)] = group_grpc.TaskGroupServiceStub(ch)
        gone = [a for a in self._channels if a not in addresses]
        for address in gone:
            for ch in self._channels.pop(address):
                asyncio.get_event_loop().create_task(ch.close(grace=5.0))
            for stub in self._stubs.pop(address, []):
                self._group_stubs.pop(id(stub), None)
            self._suspect.pop(address, None)
        self._order = list(addresses)

    async def _resolve(self) -> None:
        assert self._dns is not None
        _, host, port = self._dns
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
        except OSError as exc:
            logger.warning(
                "scheduler address not resolved: %s",
                exc,
                extra={"action": "scheduler_resolve_failed"},
            )
            return
        addresses = sorted(
            {
                f"ipv6:[{info[4][0]}]:{port}"
                if info[0] == socket.AF_INET6
                else f"ipv4:{info[4][0]}:{port}"
                for info in infos
            }
        )
        if addresses and addresses != self._order:
            self._set(addresses)

    def _maybe_refresh(self) -> None:
        if self._dns is None or (self._resolving is not None and not self._resolving.done()):
            return
        now = time.monotonic()
        if now - self._resolved_at >= self.refresh_seconds:
            self._resolved_at = now
            self._resolving = asyncio.get_running_loop().create_task(self._resolve())

    def pick(
        self, avoid: AbstractSet[str] = frozenset()
    ) -> tuple[str, sched_grpc.SchedulerServiceStub]:
        """The next replica (round robin), skipping suspect ones and ``avoid`` while others
        remain."""
        self._maybe_refresh()
        now = time.monotonic()
        order = self._order
        healthy = [a for a in order if self._suspect.get(a, 0.0) <= now and a not in avoid]
        candidates = healthy or [a for a in order if a not in avoid] or order
        self._next += 1
        address = candidates[self._next % len(candidates)]
        stubs = self._stubs[address]
        return address, stubs[self._next % len(stubs)]

    def group_stub(self, stub: sched_grpc.SchedulerServiceStub) -> group_grpc.TaskGroupServiceStub:
        """The TaskGroupService stub on the channel of ``stub`` (from :meth:`pick`)."""
        return self._group_stubs[id(stub)]

    def suspect(self, address: str) -> None:
        """``address`` timed out: prefer the others for a while."""
        if len(self._order) > 1:
            self._suspect[address] = time.monotonic() + self.suspect_seconds

    async def close(self) -> None:
        if self._resolving is not None:
            self._resolving.cancel()
        for channels in self._channels.values():
            for ch in channels:
                await ch.close()


class SchedulerClient:
    """SchedulerService stubs, one set per replica, with retries and deadline propagation."""

    def __init__(
        self,
        address: str,
        *,
        channels: int = 2,
        default_timeout: float = 10.0,
        attempts: int = 4,
        base_delay: float = 0.05,
        max_delay: float = 1.0,
        attempt_timeout: float = 0.5,
        tls: TlsFiles | None = None,
    ) -> None:
        options = client_options(
            ("grpc.max_receive_message_length", limits.MESSAGE_BYTES_CEILING),
            # Distinct channel args keep the channels on separate HTTP/2 connections.
            ("grpc.use_local_subchannel_pool", 1),
        )
        self.replicas = ReplicaPool(address, tls, options, connections=channels)
        self.default_timeout = default_timeout
        self.attempts = attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.attempt_timeout = attempt_timeout

    def stub(self) -> sched_grpc.SchedulerServiceStub:
        """The next replica's stub."""
        return self.replicas.pick()[1]

    async def call(
        self,
        method: Callable[[Any], Any],
        request: Any,
        context: grpc.aio.ServicerContext[Any, Any] | None,
        *,
        budget_seconds: float | None = None,
        groups: bool = False,
    ) -> Resp:
        """Call ``method(stub)(request)``; retry UNAVAILABLE and a timed-out attempt within the
        caller's deadline."""
        total = (
            budget_seconds if budget_seconds is not None else budget(context, self.default_timeout)
        )
        deadline = time.monotonic() + total
        attempt = 0  # attempts that ended UNAVAILABLE (bounded by ``attempts``)
        timeouts = 0  # attempts that hit their own bound (bounded by the caller's deadline)
        tried: set[str] = set()
        while True:
            attempt += 1
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DownstreamError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
            last = attempt >= self.attempts
            # Each attempt is bounded; after two timed-out attempts the bound doubles, so a slow
            # but working call still finishes while an unresponsive replica costs a short one.
            timeout = min(remaining, self.attempt_timeout * 2 ** max(0, timeouts - 1))
            replica, stub = self.replicas.pick(tried)
            try:
                target: Any = self.replicas.group_stub(stub) if groups else stub
                response: Resp = await method(target)(request, timeout=timeout)
                return response
            except grpc.aio.AioRpcError as exc:
                code = call_code(exc)
                if code == grpc.StatusCode.DEADLINE_EXCEEDED and timeout < remaining:
                    # This attempt's own bound, not the caller's: another replica, at once.
                    self.replicas.suspect(replica)
                    tried.add(replica)
                    timeouts += 1
                    attempt -= 1
                    logger.info(
                        "scheduler attempt timed out, retrying on another replica",
                        extra={"action": "scheduler_retry_timeout", "timeouts": timeouts},
                    )
                    continue
                if code == grpc.StatusCode.UNAVAILABLE:
                    tried.add(replica)
                if code != grpc.StatusCode.UNAVAILABLE or last:
                    reraise(exc)
                delay = rng.uniform(0, min(self.max_delay, self.base_delay * 2 ** (attempt - 1)))
                if time.monotonic() + delay >= deadline:
                    reraise(exc)
                logger.info(
                    "scheduler unavailable, retrying",
                    extra={"action": "scheduler_retry", "attempt": attempt, "delay": delay},
                )
                await asyncio.sleep(delay)

    async def close(self) -> None:
        """Close every channel."""
        await self.replicas.close()
