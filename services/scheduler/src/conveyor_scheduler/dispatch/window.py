"""The dispatch window: how far dispatch may run ahead of the adapters (issue #13).

Commands dispatched but not yet taken up by an adapter wait in Kafka in FIFO order, where priority
and fair share no longer apply. Keeping that queue about ``dispatch_window_seconds`` long (at the
adapters' measured take-up rate) keeps priority and fair share where they matter, at the provider,
without starving the adapters.
"""

from __future__ import annotations

from sqlalchemy import text

AWAITING_ADAPTER_SQL = text("SELECT count(*) FROM tasks WHERE status = 2 AND submit_state = 1")
"""Dispatched tasks no adapter has begun to create (index ix_tasks_awaiting_adapter)."""


class DispatchWindow:
    """How many more commands may be dispatched ahead of the adapters.

    The adapters' take-up rate (dispatched tasks that got their BeginSubmit) is measured between
    cycles from the count of tasks awaiting an adapter, as an exponentially weighted average over
    periods of at least ``period`` seconds when something was waiting; the window holds
    ``seconds`` of it, within ``[minimum, maximum]``. ``seconds == 0`` keeps a fixed window of
    ``maximum``.
    """

    def __init__(
        self,
        maximum: int,
        minimum: int,
        seconds: float,
        *,
        smoothing: float = 0.3,
        period: float = 0.1,
    ) -> None:
        self.maximum = maximum
        self.period = period
        self.minimum = min(minimum, maximum) if maximum else minimum
        self.seconds = seconds
        self.smoothing = smoothing
        self.rate = 0.0
        """Measured take-up, tasks per second."""
        self._last: tuple[int, float] | None = None
        self._since = 0
        self._taken = 0
        self._elapsed = 0.0

    def size(self) -> int:
        """The current window."""
        if not self.seconds:
            return self.maximum
        return max(self.minimum, min(self.maximum, int(self.rate * self.seconds) + self.minimum))

    def room(self, awaiting: int, now: float) -> int:
        """Commands that may be dispatched now, given ``awaiting`` (read in this cycle)."""
        if self._last is not None:
            before, at = self._last
            if before + self._since > 0:  # only while something waited: idle keeps the estimate
                self._taken += max(0, before + self._since - awaiting)
                self._elapsed += now - at
                if self._elapsed >= self.period:
                    self.rate += self.smoothing * (self._taken / self._elapsed - self.rate)
                    self._taken, self._elapsed = 0, 0.0
        self._last = (awaiting, now)
        self._since = 0
        return self.size() - awaiting

    def dispatched(self, n: int) -> None:
        """``n`` more commands were dispatched after the last :meth:`room`."""
        self._since += n


class Room:
    """What is full for the dispatcher: ``slots`` (the global limit) and/or ``window`` (the
    dispatch window), as of the last capacity read minus what was dispatched since. The leader's
    loop skips a cycle until each of them may have changed (dispatch/loops.py)."""

    def __init__(self) -> None:
        self.full: frozenset[str] = frozenset()
        self._limit = 0
        self._window: int | None = None

    @property
    def saturated(self) -> bool:
        """Nothing can be dispatched until something full changes."""
        return bool(self.full)

    def read(self, limit_room: int, window_room: int | None) -> None:
        """Room read from the database (``window_room`` None: no dispatch window)."""
        self._limit, self._window = limit_room, window_room
        self._update()

    def filled(self, n: int) -> None:
        """``n`` tasks were dispatched from the room last read."""
        self._limit -= n
        if self._window is not None:
            self._window -= n
        self._update()

    def _update(self) -> None:
        rooms = (("slots", self._limit), ("window", self._window))
        self.full = frozenset(name for name, room in rooms if room is not None and room <= 0)
