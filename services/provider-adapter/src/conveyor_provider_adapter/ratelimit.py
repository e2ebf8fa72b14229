"""Token bucket on creates, with a shared pause after a 429.

Every create waits for a token (``rate_per_min`` refill, ``burst`` capacity). A 429 pauses the whole
bucket until ``retry_at``: every waiting create sleeps until then, so one throttle answer slows all
creates of this replica instead of each dispatch hammering the provider on its own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class TokenBucket:
    """An asyncio token bucket with a pause (monotonic clock)."""

    def __init__(
        self,
        rate_per_min: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_per_min <= 0 or burst < 1:
            raise ValueError("rate_per_min must be > 0 and burst >= 1")
        self.rate_per_s = rate_per_min / 60.0
        self.burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._updated = clock()
        self._paused_until = 0.0
        self._lock = asyncio.Lock()

    def _refill(self, now: float) -> None:
        self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate_per_s)
        self._updated = now

    def pause_for(self, seconds: float) -> float:
        """Pause every acquirer for ``seconds`` (extends, never shortens, a pause). Returns its end."""
        until = self._clock() + max(0.0, seconds)
        self._paused_until = max(self._paused_until, until)
        return self._paused_until

    @property
    def paused_for(self) -> float:
        """Seconds left of the current pause (0 when not paused)."""
        return max(0.0, self._paused_until - self._clock())

    def try_acquire(self) -> float:
        """Take a token now and return 0, or return how long to wait (taking nothing)."""
        now = self._clock()
        if now < self._paused_until:
            return self._paused_until - now
        self._refill(now)
        if self._tokens >= 1.0 - 1e-9:
            self._tokens = max(0.0, self._tokens - 1.0)
            return 0.0
        return (1.0 - self._tokens) / self.rate_per_s

    async def acquire(self) -> float:
        """Wait for a token; returns the seconds waited. Acquirers are served in arrival order."""
        started = self._clock()
        async with self._lock:
            while True:
                wait = self.try_acquire()
                if wait <= 0:
                    return self._clock() - started
                await asyncio.sleep(wait)
