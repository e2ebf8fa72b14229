"""conveyor_common.ratelimit: the one token bucket (scheduler, adapter, notifier, fake Replicate)."""

from __future__ import annotations

import asyncio
import math

import pytest

from conveyor_common.ratelimit import AsyncTokenBucket, TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_refills_at_the_rate_up_to_the_burst() -> None:
    clock = Clock()
    bucket = TokenBucket(0.5, 2, clock=clock)
    assert [bucket.try_take() == 0 for _ in range(3)] == [True, True, False]
    clock.now += 1.0
    assert bucket.try_take() == pytest.approx(1.0)  # half a token: one more second
    clock.now += 1.0
    assert bucket.try_take() == 0
    clock.now += 100
    assert bucket.available() == 2


def test_a_pause_after_a_429_holds_every_taker_and_never_shortens() -> None:
    clock = Clock()
    bucket = TokenBucket.per_minute(600, 2, clock=clock)  # 10 per second
    assert bucket.try_take() == 0
    assert bucket.try_take() == 0
    assert bucket.try_take() == pytest.approx(0.1)
    clock.now += 0.1
    assert bucket.try_take() == 0
    bucket.pause_for(5)
    clock.now += 1
    assert bucket.try_take() == pytest.approx(4)
    bucket.pause_for(1)
    assert bucket.paused_for == pytest.approx(4)
    clock.now += 4
    assert bucket.try_take() == 0


def test_spending_ahead_is_a_debt_repaid_first() -> None:
    clock = Clock()
    bucket = TokenBucket(10, 5, clock=clock)
    bucket.spend(8)  # the scheduler dispatches, then accounts
    assert bucket.available() == -3
    assert bucket.seconds_until(1) == pytest.approx(0.4)
    clock.now += 0.4
    assert bucket.try_take() == 0


def test_a_zero_rate_never_refills() -> None:
    bucket = TokenBucket(0, 1, clock=Clock())
    assert bucket.try_take() == 0
    assert math.isinf(bucket.try_take())


async def test_acquire_spaces_takers_in_arrival_order() -> None:
    bucket = AsyncTokenBucket(50, 1)  # burst 1
    loop = asyncio.get_running_loop()
    start = loop.time()
    for _ in range(6):
        await bucket.acquire()
    assert loop.time() - start >= 0.09  # 5 refills of 20 ms
