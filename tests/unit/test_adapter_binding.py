"""Binding a webhook delivery's prediction to the attempt of its URL (binding.py), over a stub of the
scheduler's ListInFlight."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client import CollectorRegistry

from conveyor.scheduler.v1 import provider_coordination_service_pb2 as provider_pb2
from conveyor_provider_adapter.binding import Binder, SubmitRecords
from conveyor_provider_adapter.metrics import AdapterMetrics
from conveyor_provider_adapter.replicate import Prediction
from conveyor_provider_adapter.state import LocalState

S = provider_pb2.SubmitState
NOW = datetime.now(UTC)


class StubCoordinator:
    def __init__(self, attempts: list[provider_pb2.InFlightAttempt]) -> None:
        self.attempts = attempts
        self.scans = 0

    async def in_flight(self, **_: Any) -> AsyncIterator[provider_pb2.InFlightAttempt]:
        self.scans += 1
        for a in self.attempts:
            yield a


def attempt(
    task: str,
    state: provider_pb2.SubmitState.ValueType,
    prediction_id: str = "",
    started: datetime = NOW,
) -> provider_pb2.InFlightAttempt:
    a = provider_pb2.InFlightAttempt(
        task_id=task, attempt=1, state=state, prediction_id=prediction_id
    )
    a.submit_started_at.FromDatetime(started)
    return a


def prediction(pid: str, created: datetime = NOW, **kw: Any) -> Prediction:
    return Prediction.from_json(
        {"id": pid, "status": "starting", "created_at": created.isoformat(), **kw}
    )


def make(
    attempts: list[provider_pb2.InFlightAttempt],
) -> tuple[Binder, StubCoordinator, LocalState, CollectorRegistry]:
    stub = StubCoordinator(attempts)
    registry = CollectorRegistry()
    state = LocalState()
    records = SubmitRecords(stub, min_refresh_s=0.0)  # type: ignore[arg-type]
    return (
        Binder(state=state, records=records, metrics=AdapterMetrics(registry)),
        stub,
        state,
        registry,
    )


def unbound(registry: CollectorRegistry, reason: str) -> float:
    value = registry.get_sample_value("conveyor_adapter_webhooks_unbound_total", {"reason": reason})
    return value or 0.0


async def test_recorded_prediction_binds_and_another_does_not() -> None:
    binder, stub, state, registry = make(
        [
            attempt("t2", S.SUBMIT_STATE_SUBMITTED, "p2"),
            attempt("t4", S.SUBMIT_STATE_SUBMITTED, "p4"),
        ]
    )
    assert await binder.bind("t2", 1, prediction("p2"))
    assert state.attempt("t2", 1).prediction_id == "p2"  # remembered: no scan next time
    scans = stub.scans
    assert await binder.bind("t2", 1, prediction("p2"))
    assert stub.scans == scans
    assert not await binder.bind("t2", 1, prediction("p4"))
    assert unbound(registry, "other_prediction") == 1


async def test_locally_known_prediction_decides_without_a_scan() -> None:
    binder, stub, state, _ = make([])
    state.attempt("t2", 1).prediction_id = "p2"  # our own create
    assert not await binder.bind("t2", 1, prediction("p4"))
    assert await binder.bind("t2", 1, prediction("p2"))
    assert stub.scans == 0


async def test_unknown_submit_adopts_only_a_plausible_prediction() -> None:
    binder, _, _, registry = make(
        [
            attempt("t2", S.SUBMIT_STATE_UNKNOWN),
            attempt("t4", S.SUBMIT_STATE_SUBMITTED, "p4"),
            attempt("t6", S.SUBMIT_STATE_DISPATCHED),
        ]
    )
    assert await binder.bind("t2", 1, prediction("pnew"))
    assert not await binder.bind("t2", 1, prediction("p4"))  # recorded for t4
    assert unbound(registry, "recorded_elsewhere") == 1
    old = prediction("pold", created=NOW - timedelta(minutes=10))
    assert not await binder.bind("t2", 1, old)  # created long before the intent
    assert unbound(registry, "mismatch") == 1
    assert not await binder.bind("t6", 1, prediction("pnew"))  # no create sent yet
    assert unbound(registry, "not_submitted") == 1
    assert not await binder.bind("t9", 1, prediction("pnew"))  # not in flight
    assert unbound(registry, "not_in_flight") == 1


async def test_unknown_submit_of_this_replica_needs_the_same_input() -> None:
    binder, _, state, registry = make([attempt("t2", S.SUBMIT_STATE_UNKNOWN)])
    info = state.attempt("t2", 1)
    info.input = {"prompt": "mine"}
    info.model = "acme/flux"
    theirs = prediction("p4", model="acme/flux", input={"prompt": "theirs"})
    assert not await binder.bind("t2", 1, theirs)
    assert unbound(registry, "mismatch") == 1
    mine = prediction("p2", model="acme/flux", input={"prompt": "mine"})
    assert await binder.bind("t2", 1, mine)


async def test_a_webhook_beating_this_replicas_create_answer_waits_for_it_without_a_scan() -> None:
    """An instant prediction's start webhook can arrive before the create call has returned: the
    answer names the prediction, so the delivery waits for it instead of rescanning the
    scheduler (a ListInFlight call each time, and a wait of up to ``min_refresh_s``)."""
    binder, stub, state, _ = make([])
    info = state.attempt("t2", 1)
    info.creating = True  # the create call is in flight (commands.py)
    mine = asyncio.create_task(binder.bind("t2", 1, prediction("p2")))
    other = asyncio.create_task(binder.bind("t2", 1, prediction("p9")))
    await asyncio.sleep(0.05)
    assert not mine.done()  # waiting for the answer
    assert not other.done()
    info.prediction_id = "p2"
    info.creating = False
    info.create_answered.set()
    assert await mine
    assert not await other
    assert stub.scans == 0


async def test_a_create_that_never_answers_bounds_the_wait() -> None:
    binder, stub, state, registry = make([])
    binder.create_wait_s = 0.05
    state.attempt("t2", 1).creating = True
    assert not await binder.bind("t2", 1, prediction("p2"))  # then the scheduler's view decides
    assert stub.scans == 1
    assert unbound(registry, "not_in_flight") == 1
