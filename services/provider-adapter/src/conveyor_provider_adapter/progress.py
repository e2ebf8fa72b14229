"""Coalescing of progress per attempt (docs/adr/0006-progress-is-durable-and-rate-bounded.md).

Every published progress result costs a scheduler transaction, a task event and its fan-out, so a
progress result is published only when the percentage grew past the last one published for the
attempt *and* at least ``min_interval_s`` passed since the attempt's previous progress result. An
update coalesced away is dropped, not delayed: the next observation carries the whole log (so the
latest percentage) and the terminal result supersedes it. ``started`` and terminal results never go
through here: they are never held back.

The decision is synchronous (no await between the check and the update of the attempt's state), so
concurrent observers of one attempt (webhook worker, reconciler, command handler) cannot both admit
the same update.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from conveyor_provider_adapter.state import AttemptInfo


class ProgressCoalescer:
    """Decides which progress updates of an attempt are published."""

    def __init__(
        self,
        min_interval_s: float = 0.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_coalesced: Callable[[], None] | None = None,
    ) -> None:
        if min_interval_s < 0:
            raise ValueError("min_interval_s must be >= 0")
        self.min_interval_s = min_interval_s
        self.clock = clock
        self.on_coalesced = on_coalesced

    def admit(self, info: AttemptInfo, percent: int | None) -> bool:
        """Whether a progress result of ``percent`` is published now for the attempt; when it is,
        the attempt's last published percentage and time are updated."""
        if percent is None or percent <= info.last_percent:
            return False  # no change: nothing to say
        now = self.clock()
        if self.min_interval_s > 0 and now - info.last_progress_at < self.min_interval_s:
            if self.on_coalesced is not None:
                self.on_coalesced()
            return False
        info.last_percent = percent
        info.last_progress_at = now
        return True
