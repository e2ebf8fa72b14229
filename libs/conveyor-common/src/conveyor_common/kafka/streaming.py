"""Records handled as a stream, by key (``ConsumerConfig.key_concurrency`` > 1).

The consumer fetches again as soon as half of its ``limit`` is free, not when a whole fetched batch
has finished: up to ``limit`` records are in hand at once over every partition, and a slow record
holds its own slot only. Records of one key run one after another
in offset order (a record waits for the one before it, across fetches); records of different keys
run side by side. Each partition's committable offset is the end of its handled prefix, so a crash or
a failure re-reads from the first record not handled (records of other keys after it are handled
again: consumers are idempotent).

A record whose predecessor of the same key failed is not handled (its key's order would break); the
consumer waits for everything in hand, rewinds each partition to its first unhandled record and
reads on from there.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

RecordHandler = Callable[[Any], Awaitable[None]]


class _Partition:
    """Offsets in hand of one partition, in order, and how far they were handled without a gap."""

    def __init__(self) -> None:
        self.offsets: deque[int] = deque()
        self.handled: set[int] = set()
        self.committable: int | None = None

    def add(self, offset: int) -> None:
        self.offsets.append(offset)

    def done(self, offset: int) -> bool:
        """Mark ``offset`` handled; True when the handled prefix grew."""
        self.handled.add(offset)
        grew = False
        while self.offsets and self.offsets[0] in self.handled:
            first = self.offsets.popleft()
            self.handled.discard(first)
            self.committable = first + 1
            grew = True
        return grew

    def first_unhandled(self) -> int | None:
        return self.offsets[0] if self.offsets else None


class KeyedStream:
    """Records in hand, each key's in order, at most ``limit`` at once."""

    def __init__(self, limit: int, handle: RecordHandler, on_prefix: Callable[[Any, int], None]):
        self.limit = max(1, limit)
        self._handle = handle
        self._on_prefix = on_prefix
        self._partitions: dict[Any, _Partition] = {}
        self._tails: dict[Any, asyncio.Task[bool]] = {}
        self._tasks: set[asyncio.Task[bool]] = set()
        self._changed = asyncio.Event()
        self.failure: BaseException | None = None
        self.closed = False

    @property
    def in_hand(self) -> int:
        return len(self._tasks)

    @property
    def room(self) -> int:
        return self.limit - len(self._tasks)

    def add(self, tp: Any, records: list[Any]) -> None:
        """Start handling fetched ``records`` of ``tp`` (in offset order)."""
        part = self._partitions.setdefault(tp, _Partition())
        for record in records:
            part.add(record.offset)
            chain_key = (tp, record.key)
            before = self._tails.get(chain_key)
            task = asyncio.create_task(self._run(tp, record, before))
            self._tails[chain_key] = task
            self._tasks.add(task)
            task.add_done_callback(self._finished(chain_key))

    def _finished(self, chain_key: Any) -> Callable[[asyncio.Task[bool]], None]:
        def done(task: asyncio.Task[bool]) -> None:
            self._tasks.discard(task)
            if self._tails.get(chain_key) is task:
                del self._tails[chain_key]
            self._changed.set()

        return done

    async def _run(self, tp: Any, record: Any, before: asyncio.Task[bool] | None) -> bool:
        """Handle ``record`` after its key's previous record; False when it was not handled."""
        if before is not None and not await asyncio.shield(before):
            return False  # an earlier record of its key failed: the rewind re-reads both
        if self.failure is not None:
            return False  # a rewind is coming: do not run ahead of it
        try:
            await self._handle(record)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if self.failure is None:
                self.failure = exc
            self._changed.set()
            return False
        part = self._partitions.get(tp)
        if part is not None and part.done(record.offset) and part.committable is not None:
            self._on_prefix(tp, part.committable)
        return True

    async def wait_room(self) -> None:
        """Until half the limit is free (or a failure needs a rewind). Taking records as soon as
        one slot frees would fetch them a few at a time under load, and everything downstream
        (the submit protocol's batch calls) would shrink with the fetches: with a quarter, 8%
        fewer tasks/s than whole batches in the pipeline bench's mid-size runs; with half, 10%
        more."""
        need = max(1, self.limit // 2)
        while self.room < need and self.failure is None and not self.closed:
            self._changed.clear()
            await self._changed.wait()

    def close(self) -> None:
        """Take no more records (a waiting :meth:`wait_room` returns)."""
        self.closed = True
        self._changed.set()

    async def drain(self, within_s: float | None = None) -> bool:
        """Wait for every record in hand (False if some were still running after ``within_s``)."""
        if not self._tasks:
            return True
        _, pending = await asyncio.wait(set(self._tasks), timeout=within_s)
        return not pending

    def rewind_points(self) -> dict[Any, int]:
        """Each partition's first record not handled (call after :meth:`drain`)."""
        return {
            tp: first
            for tp, part in self._partitions.items()
            if (first := part.first_unhandled()) is not None
        }

    def reset(self, partitions: Any = None) -> None:
        """Forget the offsets of ``partitions`` (all by default) and any failure (after a drain)."""
        if partitions is None:
            self._partitions.clear()
            self.failure = None
        else:
            for tp in partitions:
                self._partitions.pop(tp, None)

    async def cancel(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
