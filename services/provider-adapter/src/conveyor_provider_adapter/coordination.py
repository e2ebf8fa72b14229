"""Client of the scheduler's ProviderCoordinationService, retrying while the scheduler is away.

UNAVAILABLE, DEADLINE_EXCEEDED and RESOURCE_EXHAUSTED are retried with capped backoff for up to
``retry_s``; any other status is raised at once. BeginSubmit is safe to repeat (the scheduler answers
from the attempt's state), and so are CompleteSubmit / MarkSubmitUnknown (idempotent per attempt).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import TypeVar

import grpc
from google.protobuf import timestamp_pb2

from conveyor.scheduler.v1 import provider_coordination_service_pb2 as provider_pb2
from conveyor.scheduler.v1 import provider_coordination_service_pb2_grpc as provider_grpc
from conveyor_common.channels import client_options
from conveyor_common.tls import TlsFiles, open_channel

logger = logging.getLogger(__name__)

T = TypeVar("T")
_RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


class Coordinator:
    """The adapter's calls of the submit protocol."""

    def __init__(
        self,
        address: str,
        *,
        adapter_id: str,
        timeout_s: float = 5.0,
        retry_s: float = 30.0,
        tls: TlsFiles | None = None,
    ) -> None:
        self.adapter_id = adapter_id
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self._channel = open_channel(address, tls, client_options(("grpc.enable_retries", 1)))
        self._stub = provider_grpc.ProviderCoordinationServiceStub(self._channel)

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()

    async def _retry(self, name: str, call: Callable[[], Awaitable[T]]) -> T:
        deadline = time.monotonic() + self.retry_s
        delay = 0.1
        while True:
            try:
                return await call()
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in _RETRYABLE or time.monotonic() + delay > deadline:
                    raise
                logger.warning(
                    "scheduler call failed, retrying",
                    extra={"action": "coordination_retry", "call": name, "code": exc.code().name},
                )
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 2.0)

    async def begin_submit(self, task_id: str, attempt: int) -> provider_pb2.BeginSubmitResponse:
        """Record the intent to create (task, attempt); the answer says what to do."""
        req = provider_pb2.BeginSubmitRequest(
            task_id=task_id, attempt=attempt, adapter_id=self.adapter_id
        )
        return await self._retry(
            "BeginSubmit", lambda: self._stub.BeginSubmit(req, timeout=self.timeout_s)
        )

    async def complete_submit(self, task_id: str, attempt: int, prediction_id: str) -> bool:
        """Record the prediction id; False = stale attempt (cancel the prediction)."""
        req = provider_pb2.CompleteSubmitRequest(
            task_id=task_id, attempt=attempt, prediction_id=prediction_id
        )
        resp = await self._retry(
            "CompleteSubmit", lambda: self._stub.CompleteSubmit(req, timeout=self.timeout_s)
        )
        return bool(resp.accepted)

    async def mark_unknown(self, task_id: str, attempt: int, reason: str) -> bool:
        """Record an ambiguous create outcome; False = stale attempt."""
        req = provider_pb2.MarkSubmitUnknownRequest(
            task_id=task_id, attempt=attempt, reason=reason[:500]
        )
        resp = await self._retry(
            "MarkSubmitUnknown", lambda: self._stub.MarkSubmitUnknown(req, timeout=self.timeout_s)
        )
        return bool(resp.accepted)

    async def in_flight(
        self, *, quiet_since: datetime | None = None, page_size: int = 500
    ) -> AsyncIterator[provider_pb2.InFlightAttempt]:
        """Every attempt in flight (all pages)."""
        token = ""
        while True:
            req = provider_pb2.ListInFlightRequest(page_size=page_size, page_token=token)
            if quiet_since is not None:
                ts = timestamp_pb2.Timestamp()
                ts.FromDatetime(quiet_since)
                req.quiet_since.CopyFrom(ts)
            resp = await self._retry(
                "ListInFlight",
                lambda req=req: self._stub.ListInFlight(req, timeout=self.timeout_s),  # type: ignore[misc]
            )
            for attempt in resp.attempts:
                yield attempt
            token = resp.next_page_token
            if not token:
                return
