"""Progress is cheap (issue #13 item 2, docs/adr/0005): the webhook events asked for, and the per-attempt
coalescing of progress results, with an injected clock (no sleeps)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web
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
    """A monotonic clock the test moves by hand, with the timers (``call_later``) it fires."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.timers: list[tuple[float, int, Callable[[], None], Timer]] = []

    def __call__(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = Timer()
        self.timers.append((self.now + delay, len(self.timers), callback, timer))
        return timer

    def advance(self, seconds: float) -> None:
        self.now += seconds
        due = sorted(t for t in self.timers if t[0] <= self.now + 1e-9)
        self.timers = [t for t in self.timers if t[0] > self.now + 1e-9]
        for _, _, callback, timer in due:
            if not timer.canceled:
                callback()


class Timer:
    def __init__(self) -> None:
        self.canceled = False

    def cancel(self) -> None:
        self.canceled = True


def tqdm(percent: int) -> str:
    return f"Using seed: 7\n{percent:3d}%|#####     | {percent}/100 [00:01<00:01, 30.00it/s]\n"


# ---- the coalescer ----


def test_first_change_is_published_and_later_ones_are_held_to_the_interval_end() -> None:
    clock = Clock()
    coalesced: list[int] = []
    c = ProgressCoalescer(1.0, clock=clock, on_coalesced=lambda: coalesced.append(1))
    info = AttemptInfo(task_id="t", attempt=1)
    assert c.admit(info, 10) == 0  # no hold: at once
    assert (info.last_percent, info.last_progress_at) == (10, clock.now)
    clock.advance(0.4)
    assert c.admit(info, 20) == pytest.approx(0.6)  # held to the end of the interval
    assert info.held_percent == 20
    clock.advance(0.5)
    assert c.admit(info, 30) == pytest.approx(0.1)  # replaces the held one, keeps its time
    assert (info.held_percent, len(coalesced)) == (30, 1)  # 20 will never be published
    assert not c.admit(info, 25)  # below the held one
    assert info.last_percent == 10  # a held update is not published yet
    clock.advance(0.1)
    c.published(info, 30)  # its timer fired
    assert (info.last_percent, info.held_percent, info.last_progress_at) == (30, -1, clock.now)
    clock.advance(5.0)
    assert c.admit(info, 41) == 0


def test_a_hold_delays_the_first_change_and_a_terminal_result_drops_it() -> None:
    clock = Clock()
    coalesced: list[int] = []
    c = ProgressCoalescer(1.0, hold_s=0.3, clock=clock, on_coalesced=lambda: coalesced.append(1))
    info = AttemptInfo(task_id="t", attempt=1)
    assert c.admit(info, 10) == pytest.approx(0.3)
    clock.advance(0.1)
    assert c.admit(info, 20) == pytest.approx(0.2)
    c.dropped(info)  # the prediction ended within the hold
    assert (info.held_percent, info.last_percent, len(coalesced)) == (-1, -1, 2)
    c.dropped(info)  # nothing held: nothing counted
    assert len(coalesced) == 2


def test_no_change_is_never_published_and_is_not_counted_as_coalesced() -> None:
    clock = Clock()
    coalesced: list[int] = []
    c = ProgressCoalescer(1.0, clock=clock, on_coalesced=lambda: coalesced.append(1))
    info = AttemptInfo(task_id="t", attempt=1)
    assert c.admit(info, None) is None  # logs without a percentage
    assert c.admit(info, 50) == 0
    clock.advance(10.0)
    assert c.admit(info, 50) is None
    assert c.admit(info, 49) is None  # never backwards
    assert c.admit(info, None) is None
    assert coalesced == []
    assert info.last_progress_at == 1000.0


def test_zero_interval_publishes_every_change() -> None:
    clock = Clock()
    c = ProgressCoalescer(0.0, clock=clock)
    info = AttemptInfo(task_id="t", attempt=1)
    assert [c.admit(info, p) for p in (1, 2, 2, 3, 100)] == [0, 0, None, 0, 0]


def test_attempts_are_coalesced_independently() -> None:
    clock = Clock()
    c = ProgressCoalescer(1.0, clock=clock)
    a, b = AttemptInfo(task_id="t", attempt=1), AttemptInfo(task_id="t", attempt=2)
    assert c.admit(a, 10) == 0
    assert c.admit(b, 10) == 0
    assert c.admit(a, 20) == pytest.approx(1.0)
    assert AttemptInfo(task_id="u", attempt=1).last_progress_at == float("-inf")


def test_a_negative_interval_or_hold_is_refused() -> None:
    with pytest.raises(ValueError, match="min_interval_s"):
        ProgressCoalescer(-0.1)
    with pytest.raises(ValueError, match="hold_s"):
        ProgressCoalescer(1.0, hold_s=-0.1)


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


def make_observer(
    clock: Clock, interval: float, hold: float = 0.0, started_hold: float = 0.0
) -> tuple[Observer, Publisher, CollectorRegistry]:
    """An observer of attempt ("t", 1), whose prediction "p1" this replica created and recorded."""
    registry = CollectorRegistry()
    metrics = AdapterMetrics(registry)
    publisher = Publisher()
    state = LocalState()
    info = state.attempt("t", 1, "tenant-a")
    info.prediction_id = "p1"
    stub: Any = None
    observer = Observer(
        state=state,
        coordinator=stub,
        replicate=stub,
        copier=Copier(),  # type: ignore[arg-type]
        publisher=publisher,  # type: ignore[arg-type]
        metrics=metrics,
        progress=ProgressCoalescer(
            interval, hold_s=hold, clock=clock, on_coalesced=metrics.progress_coalesced.inc
        ),
        call_later=clock.call_later,
        started_hold_s=started_hold,
    )
    return observer, publisher, registry


async def deliver(
    observer: Observer, wid: str, status: str, logs: str = ""
) -> list[events_pb2.ProviderResult]:
    prediction = Prediction(id="p1", status=status, logs=logs, output="https://x/o.png")
    return await observer.observe(prediction, "t", 1, source=WEBHOOK_SOURCE, webhook_id=wid)


def summary(results: list[events_pb2.ProviderResult]) -> list[tuple[str, str, int]]:
    return [(r.result_id, r.WhichOneof("outcome") or "", r.progress.percent) for r in results]


async def settle() -> None:
    """Let released progress results (publish tasks) run."""
    for _ in range(3):
        await asyncio.sleep(0)


async def test_many_log_lines_give_started_progress_once_per_interval_and_one_terminal() -> None:
    clock = Clock()
    observer, publisher, registry = make_observer(clock, 1.0)
    await deliver(observer, "w-start", "starting")
    for i in range(1, 51):  # a logs delivery every 0.1 s, 2 percent each: 5 s of run
        clock.advance(0.1)
        await settle()
        await deliver(observer, f"w-{i}", "processing", tqdm(2 * i))
    clock.advance(0.05)
    await settle()
    await deliver(observer, "w-done", "succeeded", tqdm(100))
    clock.advance(5.0)  # the update held when the terminal result came never goes out
    await settle()
    got = summary(publisher.sent)
    assert got[0] == ("wh:w-start", "started", 0)
    assert got[-1] == ("wh:w-done", "succeeded", 0)
    progress = [g for g in got if g[1] == "progress"]
    assert [g[1] for g in got[1:-1]] == ["progress"] * len(progress)
    # The first change goes out at once; then, at the end of each interval, the latest one.
    assert [p for (_, _, p) in progress] == [2, 20, 40, 60, 80], got
    # The ids of a delivery are the scheme of results.py: its webhook-id.
    assert all(rid == f"wh:w-{p // 2}" for (rid, _, p) in progress)
    coalesced = registry.get_sample_value("conveyor_adapter_progress_coalesced_total")
    assert coalesced == 50 - len(progress)


async def test_a_prediction_ending_within_the_hold_costs_no_progress_result() -> None:
    clock = Clock()
    observer, publisher, registry = make_observer(clock, 1.0, hold=0.3)
    await deliver(observer, "w-1", "processing", tqdm(40))
    clock.advance(0.1)
    await deliver(observer, "w-2", "processing", tqdm(90))
    assert summary(publisher.sent) == [("wh:w-1", "started", 0)]
    await deliver(observer, "w-3", "succeeded", tqdm(100))
    clock.advance(1.0)
    await settle()
    assert summary(publisher.sent) == [("wh:w-1", "started", 0), ("wh:w-3", "succeeded", 0)]
    assert registry.get_sample_value("conveyor_adapter_progress_coalesced_total") == 2


async def test_a_held_update_goes_out_at_the_end_of_the_hold_with_its_delivery_id() -> None:
    clock = Clock()
    observer, publisher, _ = make_observer(clock, 1.0, hold=0.3)
    await deliver(observer, "w-1", "processing", tqdm(40))
    clock.advance(0.1)
    await deliver(observer, "w-2", "processing", tqdm(50))
    clock.advance(0.2)  # the hold of the first change ends: the latest percentage goes out
    await settle()
    assert summary(publisher.sent) == [("wh:w-1", "started", 0), ("wh:w-2", "progress", 50)]
    clock.advance(0.3)
    await deliver(observer, "w-3", "processing", tqdm(60))  # held to the interval's end
    clock.advance(0.5)
    await settle()
    assert summary(publisher.sent)[1:] == [("wh:w-2", "progress", 50)]
    clock.advance(0.2)
    await settle()
    assert summary(publisher.sent)[1:] == [("wh:w-2", "progress", 50), ("wh:w-3", "progress", 60)]


async def test_a_held_update_is_not_released_while_a_terminal_result_is_publishing() -> None:
    clock = Clock()
    observer, publisher, _ = make_observer(clock, 0.0, hold=0.3)
    await deliver(observer, "w-1", "processing", tqdm(40))
    observer.state.attempt("t", 1).terminal_publishing = True  # e.g. the reconciler's poll
    clock.advance(0.3)
    await settle()
    assert [g[1] for g in summary(publisher.sent)] == ["started"]


async def test_held_updates_are_published_on_shutdown() -> None:
    clock = Clock()
    observer, publisher, _ = make_observer(clock, 1.0, hold=0.3)
    await deliver(observer, "w-1", "processing", tqdm(40))
    await observer.held.flush()
    assert summary(publisher.sent) == [
        ("wh:w-1", "started", 0),
        ("wh:w-1:progress", "progress", 40),
    ]
    clock.advance(1.0)  # its timer was canceled: not published twice
    await settle()
    assert len(publisher.sent) == 2


def created(observer: Observer) -> tuple[AttemptInfo, events_pb2.ProviderResult]:
    """What the command handler reports when the create of ("t", 1) answered "p1"."""
    info = observer.state.attempt("t", 1)
    started = events_pb2.ProviderResult(
        result_id="create:t:1:started", task_id="t", attempt=1, prediction_id="p1"
    )
    started.started.SetInParent()
    return info, started


async def test_a_created_prediction_ending_within_the_hold_costs_only_its_terminal_result() -> None:
    """The ``started`` that records a create is held; the start webhook adds none, and a terminal
    result within the hold goes out alone (it names the prediction: the scheduler records it)."""
    clock = Clock()
    observer, publisher, _ = make_observer(clock, 1.0, hold=0.3, started_hold=0.3)
    await observer.report_created(*created(observer))
    await deliver(observer, "w-1", "starting")
    clock.advance(0.1)
    await deliver(observer, "w-2", "succeeded", tqdm(100))
    clock.advance(1.0)
    await settle()
    assert summary(publisher.sent) == [("wh:w-2", "succeeded", 0)]
    assert publisher.sent[0].prediction_id == "p1"


async def test_a_held_started_goes_out_at_the_end_of_the_hold_unless_progress_came_first() -> None:
    clock = Clock()
    observer, publisher, _ = make_observer(clock, 1.0, hold=0.3, started_hold=0.3)
    await observer.report_created(*created(observer))
    await deliver(observer, "w-1", "starting")
    assert publisher.sent == []
    clock.advance(0.3)
    await settle()
    assert summary(publisher.sent) == [("create:t:1:started", "started", 0)]
    # Another attempt whose first progress comes within the hold: the progress records it alone.
    observer2, publisher2, _ = make_observer(clock, 0.0, hold=0.0, started_hold=0.3)
    await observer2.report_created(*created(observer2))
    await deliver(observer2, "w-1", "processing", tqdm(30))
    clock.advance(1.0)
    await settle()
    assert summary(publisher2.sent) == [("wh:w-1", "progress", 30)]


async def test_a_held_started_is_published_on_shutdown_and_at_once_without_a_hold() -> None:
    clock = Clock()
    observer, publisher, _ = make_observer(clock, 1.0, started_hold=0.3)
    await observer.report_created(*created(observer))
    await observer.flush_started()
    assert summary(publisher.sent) == [("create:t:1:started", "started", 0)]
    clock.advance(1.0)  # its timer was canceled: not published twice
    await settle()
    assert len(publisher.sent) == 1
    observer2, publisher2, _ = make_observer(clock, 1.0)
    await observer2.report_created(*created(observer2))
    assert summary(publisher2.sent) == [("create:t:1:started", "started", 0)]


async def test_a_started_that_could_not_be_published_is_left_to_the_next_delivery() -> None:
    clock = Clock()
    observer, publisher, _ = make_observer(clock, 1.0)
    publisher.fail_ids.add("create:t:1:started")
    info, started = created(observer)
    await observer.report_created(info, started)
    assert publisher.sent == []
    assert not info.started_reported
    await deliver(observer, "w-1", "processing")
    assert summary(publisher.sent) == [("wh:w-1", "started", 0)]


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


class AcceptingCoordinator:
    def __init__(self) -> None:
        self.completed: list[tuple[str, int, str]] = []

    async def complete_submit(self, task_id: str, attempt: int, prediction_id: str) -> bool:
        self.completed.append((task_id, attempt, prediction_id))
        return True


async def test_an_adopted_prediction_adds_no_started_result_to_its_accepted_complete_submit() -> (
    None
):
    """The scheduler starts the task in CompleteSubmit's transaction: a ``started`` result after an
    accepted adoption would be a Kafka record and a transaction that change nothing."""
    observer, publisher, _ = make_observer(Clock(), 0.0)
    observer.state.attempt("t", 1).prediction_id = ""  # an ambiguous create: id not known
    coordinator = AcceptingCoordinator()
    observer.coordinator = coordinator  # type: ignore[assignment]
    await deliver(observer, "w-start", "starting")
    assert coordinator.completed == [("t", 1, "p1")]
    assert publisher.sent == []
    await deliver(observer, "w-2", "processing", tqdm(30))
    assert summary(publisher.sent) == [("wh:w-2", "progress", 30)]
    assert coordinator.completed == [("t", 1, "p1")]  # adopted once


# ---- the webhook events asked for, the setting ----


async def test_creates_ask_only_for_start_logs_and_completed() -> None:
    bodies: list[dict[str, Any]] = []

    async def handler(request: web.Request) -> web.Response:
        bodies.append(json.loads(await request.read()))
        return web.json_response({"id": "p1", "status": "starting"}, status=201)

    app = web.Application()
    app.router.add_post("/v1/models/acme/flux/predictions", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    client = ReplicateClient(f"http://127.0.0.1:{port}", "r8_x")
    try:
        await client.create(
            CreateRequest(Target("model", "acme", "flux"), {"p": 1}, webhook="https://h/x")
        )
        await client.create(CreateRequest(Target("model", "acme", "flux"), {"p": 1}))
    finally:
        await client.close()
        await runner.cleanup()
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
    monkeypatch.setenv("ADAPTER_PROGRESS_MIN_INTERVAL_SECONDS", "1")
    assert AdapterSettings().progress_hold_seconds == 0.3  # type: ignore[call-arg]
    monkeypatch.setenv("ADAPTER_PROGRESS_HOLD_SECONDS", "0")
    assert AdapterSettings().progress_hold_seconds == 0.0  # type: ignore[call-arg]
    monkeypatch.setenv("ADAPTER_PROGRESS_HOLD_SECONDS", "-0.5")
    with pytest.raises(ValidationError):
        AdapterSettings()  # type: ignore[call-arg]
