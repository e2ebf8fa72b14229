"""conveyor_scheduler.dispatch.window: the window follows the adapters' take-up rate."""

from __future__ import annotations

from conveyor_scheduler.dispatch.window import DispatchWindow


def test_a_fixed_window_when_seconds_is_zero() -> None:
    w = DispatchWindow(maximum=10, minimum=2, seconds=0)
    assert w.room(awaiting=0, now=0.0) == 10
    assert w.room(awaiting=7, now=1.0) == 3


def test_the_window_grows_with_the_measured_take_up_and_stays_bounded() -> None:
    w = DispatchWindow(maximum=500, minimum=8, seconds=0.5, smoothing=1.0, period=0.1)
    assert w.room(awaiting=0, now=0.0) == 8  # nothing measured yet: the minimum
    w.dispatched(8)
    # 0.2 s later all 8 were taken up: 40 tasks/s -> 20 in flight for 0.5 s, plus the minimum.
    assert w.room(awaiting=0, now=0.2) == 28
    assert w.rate == 40.0
    w.dispatched(28)
    # A faster take-up (28 in 0.2 s: 140 tasks/s) widens it: 70 + 8.
    assert w.room(awaiting=0, now=0.4) == 78
    for step in range(1, 20):  # ever faster adapters: up to the maximum only
        w.dispatched(w.size())
        w.room(awaiting=0, now=0.4 + 0.2 * step)
    assert w.size() == 500


def test_an_idle_system_keeps_its_estimate_and_a_stalled_adapter_closes_the_window() -> None:
    w = DispatchWindow(maximum=500, minimum=8, seconds=1.0, smoothing=0.5, period=0.1)
    w.room(awaiting=0, now=0.0)
    w.dispatched(100)
    w.room(awaiting=0, now=1.0)  # 100 taken up in 1 s
    assert w.rate == 50.0
    assert w.room(awaiting=0, now=60.0) == w.size()  # a minute idle: nothing waited, no decay
    assert w.rate == 50.0
    w.dispatched(58)
    assert w.room(awaiting=58, now=61.0) < 58 - 8  # nothing taken up for 1 s: the rate halves
    assert w.room(awaiting=58, now=62.0) <= 0  # ... and the window is full
