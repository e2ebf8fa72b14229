"""What one adapter replica remembers about attempts (bounded, in memory, lost on restart).

Nothing here is needed for correctness after a restart: the scheduler holds the submit state and
the prediction ids, and dedups results durably. This cache only saves calls (no re-adoption of a
prediction this replica created), orders the first ``started`` before progress, keeps progress
monotonic and coalesced (progress.py), remembers cancels that arrived before the prediction id, and keeps the dispatch of an
ambiguous create so the reconciler can match it by input.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class LRU(Generic[K, V]):
    """A bounded mapping that forgets the least recently used entries."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._data: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.maxsize:
            self._data.popitem(last=False)

    def pop(self, key: K) -> V | None:
        return self._data.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)


@dataclass
class AttemptInfo:
    """Local knowledge of one (task, attempt)."""

    task_id: str
    attempt: int
    tenant_id: str = ""
    prediction_id: str = ""
    """Prediction id of this attempt once known (created here, adopted, or from the scheduler)."""
    creating: bool = False
    """This replica's create call of the attempt is in flight (its answer names the prediction)."""
    create_answered: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when a create call of the attempt returned (or failed); cleared when one starts."""
    rejected: set[str] = field(default_factory=set)
    """Prediction ids the scheduler refused for this attempt (stale or duplicates): ignored."""
    started_reported: bool = False
    """The scheduler knows (or will know) the attempt runs: a ``started`` result was published or
    is held (this replica's create, ``Observer.report_created``), or an adoption's CompleteSubmit
    was accepted (which starts the task in its transaction), so a ``start`` webhook has nothing to
    add."""
    last_percent: int = -1
    """Percentage of the last progress result published (progress.py)."""
    last_progress_at: float = float("-inf")
    """Monotonic time of the last progress result published (progress.py coalesces within it)."""
    held_percent: int = -1
    """Percentage of the progress update held for the attempt (progress.py), -1 when none."""
    held_due: float = 0.0
    """Monotonic time the held progress update is published at."""
    terminal_reported: bool = False
    terminal_publishing: bool = False
    """A terminal result of the attempt is being published: no non-terminal one is sent after it."""
    cancel_requested: bool = False
    cancel_reason: str = ""
    cancels_in_flight: set[str] = field(default_factory=set)
    """Prediction ids whose cancel call is under way (a second caller does not repeat it)."""
    canceled: set[str] = field(default_factory=set)
    """Prediction ids the provider accepted a cancel for."""
    cancel_noticed: bool = False
    """A reconcile pass saw the scheduler's cancel request before any CancelTask reached this
    replica: the next pass cancels if it is still pending."""
    model: str = ""
    deployment: str = ""
    input: dict[str, Any] | None = None
    """Input of the dispatch (kept for an ambiguous create, to match it in the list endpoint)."""
    deadline_canceled: bool = False
    """The adapter canceled the prediction at its run deadline (a deadline under Cancel-After's
    minimum): its ``canceled`` outcome is a deadline, not a user cancel."""
    unknown_since: datetime | None = None
    last_polled: float = float("-inf")
    """Monotonic time of the reconciler's last GET of the prediction."""


class LocalState:
    """Bounded caches of attempts and prediction ids."""

    def __init__(self, maxsize: int = 50_000) -> None:
        self._attempts: LRU[tuple[str, int], AttemptInfo] = LRU(maxsize)

    def attempt(self, task_id: str, attempt: int, tenant_id: str = "") -> AttemptInfo:
        """The entry of (task, attempt), created when missing."""
        key = (task_id, attempt)
        info = self._attempts.get(key)
        if info is None:
            info = AttemptInfo(task_id=task_id, attempt=attempt)
            self._attempts.put(key, info)
        if tenant_id and not info.tenant_id:
            info.tenant_id = tenant_id
        return info

    def peek(self, task_id: str, attempt: int) -> AttemptInfo | None:
        """The entry of (task, attempt), if any."""
        return self._attempts.get((task_id, attempt))
