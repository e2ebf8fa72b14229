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
