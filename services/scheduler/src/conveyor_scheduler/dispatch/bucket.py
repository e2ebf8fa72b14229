"""The provider create-rate token bucket the dispatch cycle spends from (in memory, on the leader)."""

from __future__ import annotations

import time


class TokenBucket:
    """The provider's create rate (in the leader's memory; a new leader starts full)."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.at = time.monotonic()

    def available(self) -> float:
        """Tokens now."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        return self.tokens

    def take(self, n: int) -> None:
        """Spend ``n`` tokens."""
        self.tokens -= n

    def seconds_until(self, n: float) -> float:
        """Seconds until ``n`` tokens are available."""
        return max(0.0, (n - self.available()) / self.rate)
