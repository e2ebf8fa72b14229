"""Test helpers: an in-memory ProviderCoordinationService with the scheduler's fencing rules, and
a collector of ProviderResults from Kafka that feeds them back into it.

The fencing rules (what the real scheduler implements over PostgreSQL):

* ``BeginSubmit(task, attempt)``: unknown task, another attempt, or a finished task -> STOP;
  DISPATCHED -> SUBMITTING (intent recorded, ``submit_started_at`` = now) and PROCEED, once per
  (task, attempt); SUBMITTING or UNKNOWN -> RECONCILE; SUBMITTED -> ALREADY_SUBMITTED + id.
* ``CompleteSubmit``: stale attempt or finished task -> not accepted; SUBMITTED with another
  prediction id -> not accepted; otherwise SUBMITTED with the id (repeating the same id is accepted).
* ``MarkSubmitUnknown``: stale -> not accepted; SUBMITTING -> UNKNOWN; otherwise unchanged.
* ``ListInFlight``: every unfinished attempt past DISPATCHED, filtered by ``quiet_since``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc
from aiokafka import AIOKafkaConsumer

from conveyor.events.v1 import events_pb2
from conveyor.scheduler.v1 import provider_coordination_service_pb2 as provider_pb2
from conveyor.scheduler.v1 import provider_coordination_service_pb2_grpc as provider_grpc
from conveyor_common.kafka import decode, default_registry

D = provider_pb2.SubmitDecision
S = provider_pb2.SubmitState
TERMINAL_OUTCOMES = frozenset({"succeeded", "failed", "canceled", "aborted"})


@dataclass
class TaskRecord:
    """The scheduler-side view of one task."""

    task_id: str
    tenant_id: str
    attempt: int
    model: str = ""
    state: int = S.SUBMIT_STATE_DISPATCHED
    prediction_id: str = ""
    submit_started_at: datetime | None = None
    last_update: datetime | None = None
    run_deadline: datetime | None = None
    cancel_requested: bool = False
    finished: str = ""
    applied: set[str] = field(default_factory=set)
    running: bool = False
    """The task runs, as the scheduler sees it: a CompleteSubmit was accepted (which starts the
    task) or a started or progress result was applied."""


class InMemoryCoordination(provider_grpc.ProviderCoordinationServiceServicer):
    """ProviderCoordinationService over a dict, with the fencing rules above."""

    def __init__(self, *, batches: bool = True) -> None:
        self.tasks: dict[str, TaskRecord] = {}
        self.calls: list[tuple[str, str, int, str]] = []
        self.batches = batches
        """False: the batch calls answer UNIMPLEMENTED (a scheduler older than them)."""
        self.batch_sizes: list[tuple[str, int]] = []
        """(method, items) of every batch call served."""
        self._server: grpc.aio.Server | None = None
        self.address = ""

    # ---- test side ----

    def dispatched(
        self,
        task_id: str,
        attempt: int = 1,
        *,
        tenant_id: str = "tenant-a",
        model: str = "",
        run_deadline: datetime | None = None,
    ) -> TaskRecord:
        """Register (or move to) a dispatched attempt, as the scheduler does before DispatchTask."""
        record = TaskRecord(task_id, tenant_id, attempt, model=model, run_deadline=run_deadline)
        self.tasks[task_id] = record
        return record

    def running(self, task_id: str) -> bool:
        """Whether the scheduler side sees the task running (its prediction created)."""
        record = self.tasks.get(task_id)
        return record is not None and record.running

    def decisions(self, task_id: str) -> list[str]:
        """BeginSubmit decisions given for a task, in order."""
        return [d for (m, t, _a, d) in self.calls if m == "BeginSubmit" and t == task_id]

    def apply(self, result: events_pb2.ProviderResult) -> None:
        """Apply a result as the scheduler would (dedup by result id, fenced by attempt)."""
        record = self.tasks.get(result.task_id)
        if record is None or result.attempt != record.attempt or result.result_id in record.applied:
            return
        record.applied.add(result.result_id)
        record.last_update = datetime.now(UTC)
        outcome = result.WhichOneof("outcome") or ""
        record.running |= outcome in ("started", "progress")
        if result.prediction_id and not record.prediction_id and outcome != "throttled":
            record.prediction_id = result.prediction_id
            record.state = S.SUBMIT_STATE_SUBMITTED
        if outcome in TERMINAL_OUTCOMES and not record.finished:
            record.finished = outcome

    async def start(self, host: str = "127.0.0.1") -> str:
        """Serve on an ephemeral loopback port; returns ``host:port``."""
        server = grpc.aio.server()
        provider_grpc.add_ProviderCoordinationServiceServicer_to_server(self, server)
        port = server.add_insecure_port(f"{host}:0")
        await server.start()
        self._server = server
        self.address = f"{host}:{port}"
        return self.address

    async def stop(self) -> None:
        """Stop serving."""
        if self._server is not None:
            await self._server.stop(0.5)
            self._server = None

    # ---- service ----

    def _log(self, method: str, task_id: str, attempt: int, what: str) -> None:
        self.calls.append((method, task_id, attempt, what))

    async def BeginSubmit(
        self, request: provider_pb2.BeginSubmitRequest, context: Any
    ) -> provider_pb2.BeginSubmitResponse:
        record = self.tasks.get(request.task_id)
        resp = provider_pb2.BeginSubmitResponse(decision=D.SUBMIT_DECISION_STOP)
        if record is not None and record.attempt == request.attempt and not record.finished:
            if record.state == S.SUBMIT_STATE_DISPATCHED:
                record.state = S.SUBMIT_STATE_SUBMITTING
                record.submit_started_at = datetime.now(UTC)
                resp.decision = D.SUBMIT_DECISION_PROCEED
            elif record.state in (S.SUBMIT_STATE_SUBMITTING, S.SUBMIT_STATE_UNKNOWN):
                resp.decision = D.SUBMIT_DECISION_RECONCILE
                assert record.submit_started_at is not None
                resp.submit_started_at.FromDatetime(record.submit_started_at)
            else:
                resp.decision = D.SUBMIT_DECISION_ALREADY_SUBMITTED
                resp.prediction_id = record.prediction_id
        self._log(
            "BeginSubmit",
            request.task_id,
            request.attempt,
            provider_pb2.SubmitDecision.Name(resp.decision).removeprefix("SUBMIT_DECISION_"),
        )
        return resp

    async def CompleteSubmit(
        self, request: provider_pb2.CompleteSubmitRequest, context: Any
    ) -> provider_pb2.CompleteSubmitResponse:
        record = self.tasks.get(request.task_id)
        accepted = (
            record is not None
            and record.attempt == request.attempt
            and not record.finished
            and record.prediction_id in ("", request.prediction_id)
        )
        if accepted:
            assert record is not None
            record.prediction_id = request.prediction_id
            record.state = S.SUBMIT_STATE_SUBMITTED
            record.running = True
        self._log("CompleteSubmit", request.task_id, request.attempt, str(accepted))
        return provider_pb2.CompleteSubmitResponse(accepted=accepted)

    async def BeginSubmitBatch(
        self, request: provider_pb2.BeginSubmitBatchRequest, context: Any
    ) -> provider_pb2.BeginSubmitBatchResponse:
        if not self.batches:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no batch calls here")
        self.batch_sizes.append(("BeginSubmitBatch", len(request.items)))
        return provider_pb2.BeginSubmitBatchResponse(
            results=[await self.BeginSubmit(item, context) for item in request.items]
        )

    async def CompleteSubmitBatch(
        self, request: provider_pb2.CompleteSubmitBatchRequest, context: Any
    ) -> provider_pb2.CompleteSubmitBatchResponse:
        if not self.batches:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no batch calls here")
        self.batch_sizes.append(("CompleteSubmitBatch", len(request.items)))
        return provider_pb2.CompleteSubmitBatchResponse(
            results=[await self.CompleteSubmit(item, context) for item in request.items]
        )

    async def MarkSubmitUnknown(
        self, request: provider_pb2.MarkSubmitUnknownRequest, context: Any
    ) -> provider_pb2.MarkSubmitUnknownResponse:
        record = self.tasks.get(request.task_id)
        accepted = record is not None and record.attempt == request.attempt and not record.finished
        if accepted and record is not None and record.state == S.SUBMIT_STATE_SUBMITTING:
            record.state = S.SUBMIT_STATE_UNKNOWN
        self._log("MarkSubmitUnknown", request.task_id, request.attempt, str(accepted))
        return provider_pb2.MarkSubmitUnknownResponse(accepted=accepted)

    async def ListInFlight(
        self, request: provider_pb2.ListInFlightRequest, context: Any
    ) -> provider_pb2.ListInFlightResponse:
        quiet = (
            request.quiet_since.ToDatetime(tzinfo=UTC) if request.HasField("quiet_since") else None
        )
        resp = provider_pb2.ListInFlightResponse()
        for r in self.tasks.values():
            if r.finished or r.state == S.SUBMIT_STATE_DISPATCHED:
                continue
            if quiet is not None and r.last_update is not None and r.last_update > quiet:
                continue
            item = resp.attempts.add(
                task_id=r.task_id,
                tenant_id=r.tenant_id,
                attempt=r.attempt,
                prediction_id=r.prediction_id,
                state=r.state,
                model=r.model,
                cancel_requested=r.cancel_requested,
            )
            if r.submit_started_at:
                item.submit_started_at.FromDatetime(r.submit_started_at)
            if r.last_update:
                item.last_provider_update_at.FromDatetime(r.last_update)
            if r.run_deadline:
                item.run_deadline.FromDatetime(r.run_deadline)
        return resp


class ResultCollector:
    """Consumes ProviderResults from a topic, keeps them, and applies them to a coordination."""

    def __init__(
        self, bootstrap: str, topic: str, coordination: InMemoryCoordination | None = None
    ) -> None:
        self.results: list[events_pb2.ProviderResult] = []
        self.coordination = coordination
        self._consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            group_id=None,
        )
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    async def start(self) -> None:
        await self._consumer.start()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._consumer.stop()

    async def _run(self) -> None:
        registry = default_registry()
        async for record in self._consumer:
            envelope = decode(record, registry)
            result = envelope.message
            assert isinstance(result, events_pb2.ProviderResult)
            self.results.append(result)
            if self.coordination is not None:
                self.coordination.apply(result)
            self._changed.set()

    def for_task(self, task_id: str) -> list[events_pb2.ProviderResult]:
        """Results of one task, in arrival order."""
        return [r for r in self.results if r.task_id == task_id]

    async def wait_for(
        self,
        predicate: Callable[[list[events_pb2.ProviderResult]], bool],
        task_id: str,
        wait_s: float = 20.0,
    ) -> list[events_pb2.ProviderResult]:
        """Wait until ``predicate(results of task)`` holds; returns those results."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            current = self.for_task(task_id)
            if predicate(current):
                return current
            left = deadline - loop.time()
            if left <= 0:
                outcomes = [(r.WhichOneof("outcome"), r.result_id) for r in current]
                raise AssertionError(f"timed out waiting for results of {task_id}: {outcomes}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=min(left, 0.5))


def outcomes(results: list[events_pb2.ProviderResult]) -> list[str]:
    """The outcome names of results, in order."""
    return [r.WhichOneof("outcome") or "" for r in results]


def has_terminal(results: list[events_pb2.ProviderResult]) -> bool:
    """Whether a terminal outcome is among the results."""
    return any(o in TERMINAL_OUTCOMES for o in outcomes(results))


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on loopback (for servers whose URL must be known up front)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class Commands:
    """Publishes DispatchTask / CancelTask records to a commands topic, as the scheduler's relay."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        from conveyor_common.kafka import EventProducer, ProducerConfig

        self.topic = topic
        self.producer = EventProducer(
            ProducerConfig(bootstrap_servers=bootstrap, client_id="adapter-tests"),
            source="/tests/scheduler",
        )

    async def start(self) -> None:
        await self.producer.start()

    async def stop(self) -> None:
        await self.producer.stop()

    async def dispatch(
        self,
        task_id: str,
        *,
        attempt: int = 1,
        tenant_id: str = "tenant-a",
        model: str | None = "acme/flux",
        deployment: str | None = None,
        inputs: dict[str, Any] | None = None,
        run_deadline: datetime | None = None,
    ) -> events_pb2.DispatchTask:
        """Send one DispatchTask (a new record id each call, like a redelivery by the relay)."""
        msg = events_pb2.DispatchTask(
            task_id=task_id, tenant_id=tenant_id, attempt=attempt, provider="replicate"
        )
        if deployment:
            msg.deployment = deployment
        elif model:
            msg.model = model
        msg.input.update(inputs or {})
        if run_deadline is not None:
            msg.run_deadline.FromDatetime(run_deadline)
        msg.dispatched_at.FromDatetime(datetime.now(UTC))
        await self.producer.send(self.topic, msg, key=task_id)
        return msg

    async def cancel(
        self, task_id: str, *, attempt: int = 1, prediction_id: str = "", reason: str = "user"
    ) -> None:
        """Send one CancelTask."""
        msg = events_pb2.CancelTask(
            task_id=task_id,
            tenant_id="tenant-a",
            attempt=attempt,
            prediction_id=prediction_id,
            reason=reason,
        )
        await self.producer.send(self.topic, msg, key=task_id)
