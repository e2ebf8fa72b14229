"""The adapter's webhook pipeline: a task's deliveries in order, different tasks' side by side up to
the bound, the queue's size, and a drain that finishes what was queued."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from prometheus_client import CollectorRegistry

from conveyor_provider_adapter.metrics import AdapterMetrics
from conveyor_provider_adapter.provider_webhooks import Pipeline, WebhookJob
from conveyor_provider_adapter.replicate import Prediction


class SlowObserver:
    """Records what it handles; a delivery of a held task waits until released."""

    def __init__(self) -> None:
        self.handled: list[tuple[str, str]] = []
        self.running = 0
        self.most = 0
        self.held: dict[str, asyncio.Event] = {}

    async def observe(self, prediction: Prediction, task_id: str, attempt: int, **_: Any) -> None:
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            gate = self.held.get(task_id)
            if gate is not None:
                await gate.wait()
            await asyncio.sleep(0.01)
        finally:
            self.running -= 1
        self.handled.append((task_id, prediction.id))

    def copy_ahead(self, task_id: str, attempt: int, prediction: Prediction) -> None:
        pass

    def drop_copy(self, task_id: str, attempt: int, prediction: Prediction) -> None:
        pass

    def drop_copies(self) -> None:
        pass

    def terminal_queued(self, task_id: str, attempt: int, prediction_id: str) -> None:
        pass

    def terminal_handled(self, task_id: str, attempt: int, prediction_id: str) -> None:
        pass


def job(task_id: str, n: int) -> WebhookJob:
    prediction = Prediction.from_json({"id": f"{task_id}-{n}", "status": "processing"})
    return WebhookJob(
        webhook_id=f"msg-{task_id}-{n}",
        task_id=task_id,
        attempt=1,
        prediction=prediction,
        received=0.0,
    )


def pipeline(observer: SlowObserver, workers: int, queue_size: int = 100) -> Pipeline:
    metrics = AdapterMetrics(CollectorRegistry())
    return Pipeline(observer, metrics, workers=workers, queue_size=queue_size)  # type: ignore[arg-type]


async def test_a_slow_task_holds_up_only_its_own_deliveries() -> None:
    observer = SlowObserver()
    p = pipeline(observer, workers=4)
    p.start()
    observer.held["slow"] = asyncio.Event()
    assert all(p.offer(job("slow", n)) for n in range(3))
    assert all(p.offer(job(f"t{i}", 0)) for i in range(6))
    for _ in range(100):
        if len(observer.handled) == 6:
            break
        await asyncio.sleep(0.01)
    assert sorted(t for t, _ in observer.handled) == [f"t{i}" for i in range(6)]
    assert observer.most <= 4  # the bound, the held delivery included
    observer.held["slow"].set()
    await p.drain(wait_s=5)
    slow = [pid for t, pid in observer.handled if t == "slow"]
    assert slow == ["slow-0", "slow-1", "slow-2"]  # in order, after the others


async def test_tasks_run_side_by_side_where_fixed_workers_would_collide() -> None:
    observer = SlowObserver()
    p = pipeline(observer, workers=32)
    p.start()
    for i in range(20):  # a finished wave: twenty tasks' completions at once
        assert p.offer(job(str(uuid.uuid5(uuid.NAMESPACE_URL, f"wave-{i}")), 0))
    await p.drain(wait_s=5)
    assert len(observer.handled) == 20
    assert observer.most == 20  # none waited for another task's delivery


async def test_queue_size_bounds_what_waits_and_drain_finishes_it() -> None:
    observer = SlowObserver()
    p = pipeline(observer, workers=1, queue_size=3)
    assert [p.offer(job("a", n)) for n in range(4)] == [True, True, True, False]
    assert observer.handled == []  # not started: deliveries wait
    p.start()
    await p.drain(wait_s=5)
    assert observer.handled == [("a", "a-0"), ("a", "a-1"), ("a", "a-2")]
    assert not p.offer(job("a", 9))  # draining: refused (the receiver answers 503)


class Copier:
    """Copies take ``seconds``; records when each started."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started: list[tuple[str, float]] = []
        self.finished = 0

    async def copy_all(self, output: Any, task_id: str, attempt: int) -> list[Any]:
        from conveyor_provider_adapter.storage import CopiedFile

        self.started.append((task_id, asyncio.get_running_loop().time()))
        await asyncio.sleep(self.seconds)
        self.finished += 1
        return [CopiedFile(f"s3://ours/{task_id}/{attempt}", str(output), 3, "image/png")]


class Publisher:
    def __init__(self) -> None:
        self.published: list[tuple[Any, float]] = []

    async def publish(self, result: Any, *, required: bool = False) -> bool:
        self.published.append((result, asyncio.get_running_loop().time()))
        return True


class NothingInFlight:
    async def in_flight(self) -> Any:
        return
        yield


def observing(copier: Copier, started_hold_s: float = 0.0) -> tuple[Any, Any, Publisher, Pipeline]:
    from conveyor_provider_adapter.binding import Binder, SubmitRecords
    from conveyor_provider_adapter.results import Observer
    from conveyor_provider_adapter.state import LocalState

    metrics = AdapterMetrics(CollectorRegistry())
    state = LocalState()
    publisher = Publisher()
    stub: Any = None
    observer = Observer(
        state=state,
        coordinator=stub,
        replicate=stub,
        copier=copier,  # type: ignore[arg-type]
        publisher=publisher,  # type: ignore[arg-type]
        metrics=metrics,
        started_hold_s=started_hold_s,
    )
    binder = Binder(state=state, records=SubmitRecords(NothingInFlight()), metrics=metrics)  # type: ignore[arg-type]
    p = Pipeline(observer, metrics, workers=4, binder=binder)
    p.start()
    return state, observer, publisher, p


def delivery(task_id: str, prediction_id: str, status: str, n: int) -> WebhookJob:
    body = {"id": prediction_id, "status": status, "output": "http://fake/out.png"}
    return WebhookJob(
        webhook_id=f"msg-{n}",
        task_id=task_id,
        attempt=1,
        prediction=Prediction.from_json(body),
        received=0.0,
    )


async def test_own_output_is_copied_from_the_offer_and_published_without_a_started() -> None:
    """An instant prediction of this replica's create: its webhooks come while the ``started``
    that records it is held. The completed delivery's output copy starts when it is queued, the
    start delivery adds no ``started`` result, and the terminal result goes out alone once copied
    (it names the prediction: the scheduler records it from that)."""
    copier = Copier(seconds=0.2)
    state, _, publisher, p = observing(copier)
    info = state.attempt("t1", 1, "tenant")
    info.prediction_id = "p1"  # our create answered
    info.started_reported = True  # its ``started`` is held (Observer.report_created)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert p.offer(delivery("t1", "p1", "starting", 1))
    assert p.offer(delivery("t1", "p1", "succeeded", 2))
    await p.drain(wait_s=5)
    assert len(copier.started) == 1
    assert copier.started[0][1] - t0 < 0.05  # started at the offer
    [(result, at)] = publisher.published
    assert result.WhichOneof("outcome") == "succeeded"
    assert result.prediction_id == "p1"
    assert [f.url for f in result.succeeded.files] == ["s3://ours/t1/1"]
    assert at - t0 < 0.35  # a copy's time after the offer, no wait for anything else


async def test_no_copy_ahead_for_a_prediction_not_bound_to_the_attempt() -> None:
    """A delivery whose prediction is not the attempt's own create copies nothing before it is bound
    (a re-posted delivery of another task must not write into this task's outputs), and a copy
    whose delivery is not processed is dropped."""
    copier = Copier(seconds=0.05)
    state, observer, publisher, p = observing(copier)
    info = state.attempt("t2", 1, "tenant")
    info.prediction_id = "p-own"
    assert p.offer(delivery("t2", "p-other", "succeeded", 1))  # another prediction: unbound
    assert p.offer(delivery("t3", "p3", "succeeded", 2))  # an attempt this replica never created
    await p.drain(wait_s=5)
    assert copier.started == []
    assert publisher.published == []
    # A copy started ahead whose delivery is then not processed is canceled.
    observer.copy_ahead("t2", 1, delivery("t2", "p-own", "succeeded", 3).prediction)
    assert len(copier.started) == 0  # the task has not run yet
    observer.drop_copy("t2", 1, delivery("t2", "p-own", "succeeded", 3).prediction)
    await asyncio.sleep(0.1)
    assert copier.finished == 0


def created(task_id: str, prediction_id: str) -> Any:
    """The ``started`` the command handler reports when its create answered ``prediction_id``."""
    from conveyor.events.v1 import events_pb2

    started = events_pb2.ProviderResult(
        result_id=f"create:{task_id}:1:started",
        task_id=task_id,
        attempt=1,
        prediction_id=prediction_id,
    )
    started.started.SetInParent()
    return started


async def test_a_started_whose_hold_ends_while_its_terminal_delivery_waits_is_dropped() -> None:
    """An adapter behind on its deliveries: the prediction ended and its completed delivery waits in
    the pipeline (here: its output copy, 0.3 s) when the 0.05 s hold of the ``started`` that
    records the create ends. The terminal result goes out alone (it records the prediction): no
    ``started`` result and no RUNNING event for a prediction that already ended."""
    state, observer, publisher, p = observing(Copier(seconds=0.3), started_hold_s=0.05)
    info = state.attempt("t1", 1, "tenant")
    info.prediction_id = "p1"
    await observer.report_created(info, created("t1", "p1"))
    assert p.offer(delivery("t1", "p1", "succeeded", 1))
    await asyncio.sleep(0.1)  # the hold ended: the delivery is still being handled
    assert publisher.published == []
    await p.drain(wait_s=5)
    await asyncio.sleep(0.1)
    assert [r.WhichOneof("outcome") for r, _ in publisher.published] == ["succeeded"]
    assert publisher.published[0][0].prediction_id == "p1"
    await observer.flush_started()  # nothing is left held
    assert len(publisher.published) == 1


class BrokenCopier(Copier):
    async def copy_all(self, output: Any, task_id: str, attempt: int) -> list[Any]:
        await asyncio.sleep(self.seconds)
        raise RuntimeError("storage unreachable")


async def test_a_started_held_for_a_terminal_delivery_goes_out_when_that_delivery_fails() -> None:
    """The completed delivery could not be processed (its output copy failed; the reconciler polls
    the prediction later): the ``started`` held for it goes out once the delivery was handled, so
    the create is recorded meanwhile. A ``started`` with no terminal delivery waiting goes out
    when its hold ends."""
    state, observer, publisher, p = observing(BrokenCopier(seconds=0.2), started_hold_s=0.05)
    info = state.attempt("t1", 1, "tenant")
    info.prediction_id = "p1"
    await observer.report_created(info, created("t1", "p1"))
    assert p.offer(delivery("t1", "p1", "succeeded", 1))
    other = state.attempt("t2", 1, "tenant")
    other.prediction_id = "p2"
    await observer.report_created(other, created("t2", "p2"))
    await asyncio.sleep(0.1)
    assert [r.task_id for r, _ in publisher.published] == ["t2"]  # its hold ended: published
    await p.drain(wait_s=5)
    await asyncio.sleep(0.05)
    got = [(r.task_id, r.WhichOneof("outcome")) for r, _ in publisher.published]
    assert got == [("t2", "started"), ("t1", "started")]
