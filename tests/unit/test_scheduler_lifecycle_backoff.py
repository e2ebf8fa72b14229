"""conveyor_scheduler.lifecycle.Backoff: exponential growth, cap and jitter."""

from __future__ import annotations

from conveyor_scheduler.lifecycle import Backoff


def test_backoff_grows_with_cap_and_jitter() -> None:
    b = Backoff(base=1.0, cap=10.0, jitter=0.0)
    assert [b.delay(n) for n in (1, 2, 3, 4, 5, 6)] == [1, 2, 4, 8, 10, 10]
    j = Backoff(base=1.0, cap=100.0, jitter=0.5)
    delays = {round(j.delay(3), 3) for _ in range(50)}
    assert len(delays) > 1
    assert all(2.0 <= d <= 6.0 for d in delays)
