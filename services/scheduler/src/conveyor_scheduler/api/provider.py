"""ProviderCoordinationService: the provider adapter's calls around each prediction create, checked and
handed to :mod:`conveyor_scheduler.results.submit_protocol`.
"""

from __future__ import annotations

from datetime import UTC
from typing import Any

import grpc

from conveyor.scheduler.v1 import provider_coordination_service_pb2 as provider_pb2
from conveyor.scheduler.v1 import provider_coordination_service_pb2_grpc as provider_grpc
from conveyor_common.errors import (
    FieldViolation,
    InvalidArgument,
)
from conveyor_scheduler.core import SchedulerCore
from conveyor_scheduler.results.submit_protocol import BeginOutcome
from conveyor_scheduler.store.convert import from_ts, in_flight_proto

MAX_BATCH = 500


def _check_batch(
    items: list[tuple[str, str, int]], predictions: list[tuple[str, str]] | None = None
) -> None:
    """1-500 items, each with a task id, an attempt >= 1 (and a prediction id), named by index."""
    v = []
    if not 1 <= len(items) <= MAX_BATCH:
        v.append(FieldViolation("items", f"1 to {MAX_BATCH} items"))
    for prefix, task_id, attempt in items[:MAX_BATCH]:
        if not task_id:
            v.append(FieldViolation(f"{prefix}task_id", "required"))
        if attempt < 1:
            v.append(FieldViolation(f"{prefix}attempt", "must be >= 1"))
    for prefix, prediction_id in (predictions or [])[:MAX_BATCH]:
        if not prediction_id:
            v.append(FieldViolation(f"{prefix}prediction_id", "required"))
    if v:
        raise InvalidArgument(v)


class ProviderCoordinationServicer(provider_grpc.ProviderCoordinationServiceServicer):
    """ProviderCoordinationService: the submit protocol of reliability.md 2.5."""

    def __init__(self, core: SchedulerCore) -> None:
        self.core = core

    @staticmethod
    def _check(task_id: str, attempt: int) -> None:
        v = []
        if not task_id:
            v.append(FieldViolation("task_id", "required"))
        if attempt < 1:
            v.append(FieldViolation("attempt", "must be >= 1"))
        if v:
            raise InvalidArgument(v)

    @staticmethod
    def _begin_response(outcome: BeginOutcome) -> provider_pb2.BeginSubmitResponse:
        decision, row = outcome
        out = provider_pb2.BeginSubmitResponse(decision=decision)  # type: ignore[arg-type]
        if row is not None and decision == provider_pb2.SUBMIT_DECISION_ALREADY_SUBMITTED:
            out.prediction_id = row["prediction_id"] or ""
        if (
            row is not None
            and decision == provider_pb2.SUBMIT_DECISION_RECONCILE
            and row["submit_started_at"]
        ):
            out.submit_started_at.FromDatetime(row["submit_started_at"].astimezone(UTC))
        return out

    async def BeginSubmit(
        self, request: provider_pb2.BeginSubmitRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> provider_pb2.BeginSubmitResponse:
        self._check(request.task_id, request.attempt)
        return self._begin_response(await self.core.begin_submit(request.task_id, request.attempt))

    async def BeginSubmitBatch(
        self,
        request: provider_pb2.BeginSubmitBatchRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> provider_pb2.BeginSubmitBatchResponse:
        _check_batch(
            [(f"items[{i}].", it.task_id, it.attempt) for i, it in enumerate(request.items)]
        )
        outcomes = await self.core.begin_submits([(it.task_id, it.attempt) for it in request.items])
        return provider_pb2.BeginSubmitBatchResponse(
            results=[self._begin_response(o) for o in outcomes]
        )

    async def CompleteSubmit(
        self,
        request: provider_pb2.CompleteSubmitRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> provider_pb2.CompleteSubmitResponse:
        self._check(request.task_id, request.attempt)
        if not request.prediction_id:
            raise InvalidArgument([FieldViolation("prediction_id", "required")])
        ok = await self.core.complete_submit(
            request.task_id, request.attempt, request.prediction_id
        )
        return provider_pb2.CompleteSubmitResponse(accepted=ok)

    async def CompleteSubmitBatch(
        self,
        request: provider_pb2.CompleteSubmitBatchRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> provider_pb2.CompleteSubmitBatchResponse:
        _check_batch(
            [(f"items[{i}].", it.task_id, it.attempt) for i, it in enumerate(request.items)],
            [(f"items[{i}].", it.prediction_id) for i, it in enumerate(request.items)],
        )
        accepted = await self.core.complete_submits(
            [(it.task_id, it.attempt, it.prediction_id) for it in request.items]
        )
        return provider_pb2.CompleteSubmitBatchResponse(
            results=[provider_pb2.CompleteSubmitResponse(accepted=ok) for ok in accepted]
        )

    async def MarkSubmitUnknown(
        self,
        request: provider_pb2.MarkSubmitUnknownRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> provider_pb2.MarkSubmitUnknownResponse:
        self._check(request.task_id, request.attempt)
        ok = await self.core.mark_submit_unknown(request.task_id, request.attempt)
        return provider_pb2.MarkSubmitUnknownResponse(accepted=ok)

    async def ListInFlight(
        self, request: provider_pb2.ListInFlightRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> provider_pb2.ListInFlightResponse:
        if request.page_size < 0 or request.page_size > 1000:
            raise InvalidArgument([FieldViolation("page_size", "must be 0-1000")])
        rows, token = await self.core.list_in_flight(
            from_ts(request.quiet_since) if request.HasField("quiet_since") else None,
            request.page_size or 200,
            request.page_token,
        )
        return provider_pb2.ListInFlightResponse(
            attempts=[in_flight_proto(r) for r in rows], next_page_token=token
        )
