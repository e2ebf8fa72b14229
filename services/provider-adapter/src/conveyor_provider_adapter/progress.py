"""Coalescing of progress per attempt (docs/adr/0006-progress-is-durable-and-rate-bounded.md).

Every published progress result costs a scheduler transaction, a task event and its fan-out, so a
progress result is published only when the percentage grew past the last one published (or held)
for the attempt, on a trailing edge:

* a raised percentage is due ``hold_s`` after it was seen, and never sooner than ``min_interval_s``
  after the attempt's previous progress result;
* until then it is *held*: a later raise replaces it (keeping its due time), and a terminal result
  drops it (the terminal result supersedes it). A prediction that ends within the hold costs no
  progress result at all; a long one gets about one per interval, its latest percentage.

``started`` and terminal results never go through here: they are never held back.

The decisions are synchronous (no await between the check and the update of the attempt's state),
so concurrent observers of one attempt (webhook worker, reconciler, command handler) cannot both
admit the same update.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias

from conveyor.events.v1 import events_pb2
from conveyor_provider_adapter.state import AttemptInfo


class ProgressCoalescer:
    """Decides when the progress updates of an attempt are published."""

    def __init__(
        self,
        min_interval_s: float = 0.0,
        *,
        hold_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        on_coalesced: Callable[[], None] | None = None,
    ) -> None:
        if min_interval_s < 0:
            raise ValueError("min_interval_s must be >= 0")
        if hold_s < 0:
            raise ValueError("hold_s must be >= 0")
        self.min_interval_s = min_interval_s
        self.hold_s = hold_s
        self.clock = clock
        self.on_coalesced = on_coalesced

    def admit(self, info: AttemptInfo, percent: int | None) -> float | None:
        """What becomes of a progress update of ``percent`` for the attempt.

        ``None``: nothing to publish (no raise). ``0``: publish it now (the attempt's last
        published percentage and time are updated). Otherwise the update is held for that many
        seconds; when one was already held, it replaces that one and the delay is what is left of
        its hold.
        """
        if percent is None or percent <= max(info.last_percent, info.held_percent):
            return None  # no change: nothing to say
        now = self.clock()
        if info.held_percent >= 0:
            info.held_percent = percent
            self.coalesced()  # the held update is superseded by this one
            return max(0.0, info.held_due - now)
        due = max(now + self.hold_s, info.last_progress_at + self.min_interval_s)
        if due <= now:
            self.published(info, percent)
            return 0.0
        info.held_percent = percent
        info.held_due = due
        return due - now

    def published(self, info: AttemptInfo, percent: int) -> None:
        """Record that a progress result of ``percent`` goes out now (a held one is released)."""
        info.last_percent = max(info.last_percent, percent)
        info.last_progress_at = self.clock()
        info.held_percent = -1

    def dropped(self, info: AttemptInfo) -> None:
        """A held update is dropped (a terminal result supersedes it)."""
        if info.held_percent >= 0:
            info.held_percent = -1
            self.coalesced()

    def coalesced(self) -> None:
        """Count an update that will never be published."""
        if self.on_coalesced is not None:
            self.on_coalesced()


class Cancelable(Protocol):
    """A timer that can be canceled (``asyncio.TimerHandle``)."""

    def cancel(self) -> None: ...


CallLater: TypeAlias = Callable[[float, Callable[[], None]], Cancelable]
"""Runs a callback after a delay: the running loop's ``call_later`` (tests inject their own)."""


def loop_call_later(delay: float, callback: Callable[[], None]) -> Cancelable:
    """:data:`CallLater` on the running loop."""
    return asyncio.get_running_loop().call_later(delay, callback)


@dataclass
class _Held:
    info: AttemptInfo
    result: events_pb2.ProviderResult
    handle: Cancelable


class HeldProgress:
    """The progress results :class:`ProgressCoalescer` holds, one per attempt, until their time."""

    def __init__(
        self,
        coalescer: ProgressCoalescer,
        publish: Callable[[events_pb2.ProviderResult], Coroutine[Any, Any, bool]],
        call_later: CallLater = loop_call_later,
    ) -> None:
        self.coalescer = coalescer
        self.publish = publish
        self.call_later = call_later
        self._held: dict[tuple[str, int], _Held] = {}
        self._releases: set[asyncio.Task[bool]] = set()

    def holds(self, info: AttemptInfo) -> bool:
        """Whether a progress result of the attempt is held."""
        return (info.task_id, info.attempt) in self._held

    def hold(self, info: AttemptInfo, result: events_pb2.ProviderResult, delay: float) -> None:
        """Hold ``result`` for ``delay`` seconds; one already held is replaced (keeping its time)."""
        key = (info.task_id, info.attempt)
        held = self._held.get(key)
        if held is not None:
            held.result = result
            return
        handle = self.call_later(delay, lambda: self._release(key))
        self._held[key] = _Held(info, result, handle)

    def drop(self, info: AttemptInfo) -> None:
        """Drop the attempt's held result (its terminal result supersedes it)."""
        held = self._held.pop((info.task_id, info.attempt), None)
        if held is not None:
            held.handle.cancel()
            self.coalescer.dropped(info)

    def _release(self, key: tuple[str, int]) -> None:
        held = self._held.pop(key, None)
        if held is None:
            return
        info = held.info
        if info.terminal_reported or info.terminal_publishing:
            self.coalescer.dropped(info)  # nothing goes after a terminal result
            return
        self.coalescer.published(info, held.result.progress.percent)
        task = asyncio.create_task(self.publish(held.result))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def flush(self) -> None:
        """Publish every held result now and wait for the publishes (graceful shutdown)."""
        for key, held in list(self._held.items()):
            held.handle.cancel()
            self._release(key)
        if self._releases:
            await asyncio.gather(*self._releases, return_exceptions=True)
