"""The reconciler's cancel backstop: a cancel another replica's command brought waits one pass."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from prometheus_client import CollectorRegistry

from conveyor.scheduler.v1 import provider_coordination_service_pb2 as provider_pb2
from conveyor_provider_adapter.metrics import AdapterMetrics
from conveyor_provider_adapter.reconciler import Reconciler
from conveyor_provider_adapter.replicate import Prediction
from conveyor_provider_adapter.state import AttemptInfo, LocalState

S = provider_pb2.SubmitState


class Coordinator:
    def __init__(self, attempts: list[provider_pb2.InFlightAttempt]) -> None:
        self.attempts = attempts

    async def in_flight(self) -> AsyncIterator[provider_pb2.InFlightAttempt]:
        for attempt in self.attempts:
            yield attempt


class Observer:
    def __init__(self) -> None:
        self.cancels: list[str] = []
        self.observed: list[str] = []

    async def cancel_once(self, info: AttemptInfo, prediction_id: str) -> Prediction | None:
        self.cancels.append(prediction_id)
        info.canceled.add(prediction_id)
        return Prediction(id=prediction_id, status="canceled")

    async def observe(self, prediction: Prediction, *args: Any, **kwargs: Any) -> None:
        self.observed.append(prediction.status)


class Provider:
    async def get(self, prediction_id: str) -> Prediction:
        return Prediction(id=prediction_id, status="canceled")


def reconciler(
    attempts: list[provider_pb2.InFlightAttempt], state: LocalState, observer: Observer
) -> Reconciler:
    stub: Any = None
    return Reconciler(
        coordinator=Coordinator(attempts),  # type: ignore[arg-type]
        replicate=Provider(),  # type: ignore[arg-type]
        observer=observer,  # type: ignore[arg-type]
        publisher=stub,
        state=state,
        metrics=AdapterMetrics(CollectorRegistry()),
    )


def pending_cancel(task_id: str) -> provider_pb2.InFlightAttempt:
    return provider_pb2.InFlightAttempt(
        task_id=task_id,
        attempt=1,
        prediction_id=f"p-{task_id}",
        state=S.SUBMIT_STATE_SUBMITTED,
        cancel_requested=True,
    )


async def test_a_cancel_from_another_replicas_command_waits_one_pass() -> None:
    """With two adapters, the CancelTask reaches one; the other's reconciler sees the scheduler's
    cancel request while that cancel is under way and must not send a second one at once."""
    observer = Observer()
    state = LocalState()
    rec = reconciler([pending_cancel("a")], state, observer)
    assert await rec.run_once() == {}
    assert observer.cancels == []
    # Still pending a pass later (the other replica's cancel failed or was lost): the backstop acts.
    assert await rec.run_once() == {"cancel": 1}
    assert observer.cancels == ["p-a"]
    assert observer.observed == ["canceled"]
    # Accepted before: later passes look where it stands instead of canceling again.
    assert await rec.run_once() == {"cancel": 1}
    assert observer.cancels == ["p-a"]


async def test_a_cancel_this_replica_received_is_not_held_back() -> None:
    observer = Observer()
    state = LocalState()
    state.attempt("b", 1).cancel_requested = True  # its CancelTask came here
    rec = reconciler([pending_cancel("b")], state, observer)
    assert await rec.run_once() == {"cancel": 1}
    assert observer.cancels == ["p-b"]
