"""The token bucket every service uses: the scheduler's provider create rate, the adapter's creates
(with a shared pause after a 429), the notifier's ops alerts and the fake Replicate's rate limits.

``burst`` tokens, refilled at ``rate`` per second on a monotonic clock (injectable for tests). A
pause (after a 429) makes every taker wait until it ends. :class:`AsyncTokenBucket` adds a waiting
``acquire`` that serves takers in arrival order.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable


class TokenBucket:
    """``burst`` tokens refilled at ``rate`` per second."""

    def __init__(
        self, rate: float, burst: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate < 0 or burst < 1:
            raise ValueError("rate must be >= 0 and burst >= 1")
        self.rate = rate
        self.burst = float(burst)
        self.clock = clock
        self.tokens = float(burst)
        self.updated = clock()
        self.paused_until = 0.0

    @classmethod
    def per_minute(
        cls, rate_per_min: float, burst: float, *, clock: Callable[[], float] = time.monotonic
    ) -> TokenBucket:
        """A bucket refilled at ``rate_per_min`` per minute."""
        return cls(rate_per_min / 60.0, burst, clock=clock)

    def available(self) -> float:
        """Tokens now (refilled up to ``burst``; may be negative after :meth:`spend`)."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        return self.tokens

    def seconds_until(self, n: float = 1.0) -> float:
        """Seconds until ``n`` tokens are available and no pause holds (inf at rate 0)."""
        wait = max(0.0, self.paused_until - self.clock())
        missing = n - self.available()
        if missing > 1e-9:
            wait = max(wait, math.inf if self.rate <= 0 else missing / self.rate)
        return wait

    def try_take(self, n: float = 1.0) -> float:
        """Take ``n`` tokens and return 0, or return how long to wait (taking nothing)."""
        wait = self.seconds_until(n)
        if wait <= 0:
            self.tokens = max(0.0, self.tokens - n)
        return wait

    def spend(self, n: float) -> None:
        """Spend ``n`` tokens unconditionally (the balance may go negative: a debt repaid first)."""
        self.available()
        self.tokens -= n

    def pause_for(self, seconds: float) -> float:
        """Pause every taker for ``seconds`` (extends, never shortens, a pause). Returns its end."""
        self.paused_until = max(self.paused_until, self.clock() + max(0.0, seconds))
        return self.paused_until

    @property
    def paused_for(self) -> float:
        """Seconds left of the current pause (0 when not paused)."""
        return max(0.0, self.paused_until - self.clock())


class AsyncTokenBucket(TokenBucket):
    """A :class:`TokenBucket` whose :meth:`acquire` waits for a token, in arrival order."""

    def __init__(
        self, rate: float, burst: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__(rate, burst, clock=clock)
        self._lock = asyncio.Lock()

    async def acquire(self) -> float:
        """Wait for a token; returns the seconds waited."""
        started = self.clock()
        async with self._lock:
            while True:
                wait = self.try_take()
                if wait <= 0:
                    return self.clock() - started
                await asyncio.sleep(wait)
