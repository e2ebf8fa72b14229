"""Progress is cheap (issue #13 item 2, docs/adr/0005): the webhook events asked for, and the per-attempt
coalescing of progress results, with an injected clock (no sleeps)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from conveyor.events.v1 import events_pb2
from conveyor_provider_adapter.metrics import AdapterMetrics
from conveyor_provider_adapter.progress import ProgressCoalescer
from conveyor_provider_adapter.replicate import (
    WEBHOOK_EVENTS,
    CreateRequest,
    Prediction,
    ReplicateClient,
    Target,
)
from conveyor_provider_adapter.results import WEBHOOK_SOURCE, Observer
from conveyor_provider_adapter.settings import AdapterSettings
from conveyor_provider_adapter.state import AttemptInfo, LocalState


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def tqdm(percent: int) -> str:
    return f"Using seed: 7\n{percent:3d}%|#####     | {percent}/100 [00:01<00:01, 30.00it/s]\n"


# ---- the coalescer ----


def test_first_change_is_published_and_changes_within_the_interval_are_coalesced() -> None:
    clock = Clock()
    coalesced: list[int] = []
    c = ProgressCoalescer(1.0, clock=clock, on_coalesced=lambda: coalesced.append(1))
    info = AttemptInfo(task_id="t", attempt=1)
    assert c.admit(info, 10)
    assert (info.last_percent, info.last_progress_at) == (10, clock.now)
    clock.advance(0.4)
    assert not c.admit(info, 20)
    clock.advance(0.5)
    assert not c.admit(info, 30)  # 0.9 s after the last published one
    assert len(coalesced) == 2
    assert info.last_percent == 10  # what was coalesced away is not remembered as published
    clock.advance(0.1)
    assert c.admit(info, 40)  # exactly the interval later: the latest percentage goes out
    assert info.last_percent == 40
    clock.advance(5.0)
    assert c.admit(info, 41)


def test_no_change_is_never_published_and_is_not_counted_as_coalesced() -> None:
    clock = Clock()
    coalesced: list[int] = []
    c = ProgressCoalescer(1.0, clock=clock, on_coalesced=lambda: coalesced.append(1))
    info = AttemptInfo(task_id="t", attempt=1)
    assert not c.admit(info, None)  # logs without a percentage
    assert c.admit(info, 50)
    clock.advance(10.0)
    assert not c.admit(info, 50)
    assert not c.admit(info, 49)  # never backwards
    assert not c.admit(info, None)
    assert coalesced == []
    assert info.last_progress_at == 1000.0


def test_zero_interval_publishes_every_change() -> None:
    clock = Clock()
    c = ProgressCoalescer(0.0, clock=clock)
    info = AttemptInfo(task_id="t", attempt=1)
    assert [c.admit(info, p) for p in (1, 2, 2, 3, 100)] == [True, True, False, True, True]


def test_attempts_are_coalesced_independently() -> None:
    clock = Clock()
    c = ProgressCoalescer(1.0, clock=clock)
    a, b = AttemptInfo(task_id="t", attempt=1), AttemptInfo(task_id="t", attempt=2)
    assert c.admit(a, 10)
    assert c.admit(b, 10)
    assert not c.admit(a, 20)
    assert AttemptInfo(task_id="u", attempt=1).last_progress_at == float("-inf")


def test_a_negative_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="min_interval_s"):
        ProgressCoalescer(-0.1)


# ---- the observer: order, terminal never held back, ids ----


class Publisher:
    def __init__(self) -> None:
        self.sent: list[events_pb2.ProviderResult] = []
        self.fail_ids: set[str] = set()

    async def publish(self, result: events_pb2.ProviderResult, *, required: bool = False) -> bool:
        if result.result_id in self.fail_ids:
            return False
        self.sent.append(result)
        return True


class Copier:
    async def copy_all(self, output: Any, task_id: str, attempt: int) -> list[Any]:
        return []


def make_observer(clock: Clock, interval: float) -> tuple[Observer, Publisher, CollectorRegistry]:
    """An observer of attempt ("t", 1), whose prediction "p1" this replica created and recorded."""
    registry = CollectorRegistry()
    metrics = AdapterMetrics(registry)
    publisher = Publisher()
    state = LocalState()
    info = state.attempt("t", 1, "tenant-a")
    info.prediction_id = "p1"
    info.recorded.set()
    stub: Any = None
    observer = Observer(
        state=state,
        coordinator=stub,
        replicate=stub,
        copier=Copier(),  # type: ignore[arg-type]
        publisher=publisher,  # type: ignore[arg-type]
        metrics=metrics,
        progress=ProgressCoalescer(
            interval, clock=clock, on_coalesced=metrics.progress_coalesced.inc
        ),
    )
    return observer, publisher, registry


async def deliver(
    observer: Observer, wid: str, status: str, logs: str = ""
) -> list[events_pb2.ProviderResult]:
    prediction = Prediction(id="p1", status=status, logs=logs, output="https://x/o.png")
    return await observer.observe(prediction, "t", 1, source=WEBHOOK_SOURCE, webhook_id=wid)


def summary(results: list[events_pb2.ProviderResult]) -> list[tuple[str, str, int]]:
    return [(r.result_id, r.WhichOneof("outcome") or "", r.progress.percent) for r in results]


async def test_many_log_lines_give_started_coalesced_progress_and_one_terminal_in_order() -> None:
    clock = Clock()
    observer, publisher, registry = make_observer(clock, 1.0)
    await deliver(observer, "w-start", "starting")
    for i in range(1, 51):  # a logs delivery every 0.1 s, 2 percent each: 5 s of run
        clock.advance(0.1)
        await deliver(observer, f"w-{i}", "processing", tqdm(2 * i))
    await deliver(observer, "w-done", "succeeded", tqdm(100))
    got = summary(publisher.sent)
    assert got[0] == ("wh:w-start", "started", 0)
    assert got[-1] == ("wh:w-done", "succeeded", 0)
    progress = [g for g in got if g[1] == "progress"]
    assert [g[1] for g in got[1:-1]] == ["progress"] * len(progress)
    # The first change goes out at once, then at most one per second: 5 s of run -> 5 or 6.
    assert 5 <= len(progress) <= 6, got
    percents = [p for (_, _, p) in progress]
    assert percents == sorted(set(percents))
    assert percents[0] == 2
    # The ids of a delivery are the scheme of results.py: its webhook-id.
    assert all(rid == f"wh:w-{p // 2}" for (rid, _, p) in progress)
    coalesced = registry.get_sample_value("conveyor_adapter_progress_coalesced_total")
    assert coalesced == 50 - len(progress)


async def test_a_terminal_result_is_never_held_back_by_the_interval() -> None:
    clock = Clock()
    observer, publisher, _ = make_observer(clock, 60.0)
    await deliver(observer, "w-1", "processing", tqdm(10))
    clock.advance(0.01)
    await deliver(observer, "w-2", "processing", tqdm(90))  # coalesced
    clock.advance(0.01)
    await deliver(observer, "w-3", "failed", tqdm(95))
    assert summary(publisher.sent) == [
        ("wh:w-1", "started", 0),
        ("wh:w-1:progress", "progress", 10),
        ("wh:w-3", "failed", 0),
    ]
    clock.advance(120.0)
    await deliver(observer, "w-4", "processing", tqdm(99))  # late: nothing after the terminal
    assert len(publisher.sent) == 3


async def test_started_is_never_coalesced_and_precedes_progress_of_the_same_delivery() -> None:
    clock = Clock()
    observer, publisher, _ = make_observer(clock, 1.0)
    await deliver(observer, "w-1", "processing", tqdm(30))
    assert summary(publisher.sent) == [
        ("wh:w-1", "started", 0),
        ("wh:w-1:progress", "progress", 30),
    ]


async def test_no_progress_after_a_terminal_result_another_path_is_publishing() -> None:
    clock = Clock()
    observer, publisher, _ = make_observer(clock, 0.0)
    info = observer.state.attempt("t", 1)
    await deliver(observer, "w-1", "processing", tqdm(10))
    info.terminal_publishing = True  # e.g. the reconciler's poll is sending the terminal result
    await deliver(observer, "w-2", "processing", tqdm(20))
    assert [g[1] for g in summary(publisher.sent)] == ["started", "progress"]


async def test_a_redelivery_after_a_restart_keeps_its_result_id() -> None:
    """Whether a delivery yields a progress result depends on the replica's coalescing state, never
    its id: a redelivered webhook is the same record for the scheduler's inbox."""
    clock = Clock()
    first, pub1, _ = make_observer(clock, 1.0)
    await deliver(first, "w-1", "processing", tqdm(10))
    clock.advance(0.2)
    await deliver(first, "w-2", "processing", tqdm(20))  # coalesced on this replica
    restarted, pub2, _ = make_observer(clock, 1.0)
    restarted.state.attempt("t", 1).started_reported = True  # the scheduler knows it started
    await deliver(restarted, "w-2", "processing", tqdm(20))
    assert summary(pub1.sent)[-1] == ("wh:w-1:progress", "progress", 10)
    assert summary(pub2.sent) == [("wh:w-2", "progress", 20)]


# ---- the webhook events asked for, the setting ----


async def test_creates_ask_only_for_start_logs_and_completed() -> None:
    bodies: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(201, json={"id": "p1", "status": "starting"})

    client = ReplicateClient("https://api.example", "r8_x", transport=httpx.MockTransport(handler))
    try:
        await client.create(
            CreateRequest(Target("model", "acme", "flux"), {"p": 1}, webhook="https://h/x")
        )
        await client.create(CreateRequest(Target("model", "acme", "flux"), {"p": 1}))
    finally:
        await client.close()
    assert bodies[0]["webhook_events_filter"] == ["start", "logs", "completed"]
    assert list(WEBHOOK_EVENTS) == ["start", "logs", "completed"]
    assert "webhook_events_filter" not in bodies[1]  # no webhook, no filter


def test_progress_interval_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTER_REPLICATE_API_TOKEN", "r8_x")
    monkeypatch.setenv("ADAPTER_WEBHOOK_TOKEN_KEY", "key")
    monkeypatch.setenv("ADAPTER_WEBHOOK_PUBLIC_BASE_URL", "https://hooks.example.com")
    assert AdapterSettings().progress_min_interval_seconds == 1.0  # type: ignore[call-arg]
    monkeypatch.setenv("ADAPTER_PROGRESS_MIN_INTERVAL_SECONDS", "0")
    assert AdapterSettings().progress_min_interval_seconds == 0.0  # type: ignore[call-arg]
    monkeypatch.setenv("ADAPTER_PROGRESS_MIN_INTERVAL_SECONDS", "-1")
    with pytest.raises(ValidationError):
        AdapterSettings()  # type: ignore[call-arg]
