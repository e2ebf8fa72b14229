"""The results consumer: Kafka ``provider-results`` records, applied in batches (one transaction per
batch), committed after the transaction.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from conveyor.events.v1 import events_pb2
from conveyor_common.kafka import (
    Envelope,
    PermanentError,
)
from conveyor_scheduler.core import SchedulerCore


class ResultBatcher:
    """Applies provider results from concurrent handler calls in shared transactions.

    The consumer handles its partitions concurrently, each partition's records one after another.
    Each call waits until its result is committed (so per-partition order and at-least-once hold:
    the offset is committed only after), while results arriving from other partitions within
    ``linger_seconds`` share one transaction.
    """

    def __init__(self, core: SchedulerCore, *, max_batch: int = 500, linger_seconds: float = 0.002):
        self.core = core
        self.max_batch = max_batch
        self.linger = linger_seconds
        self._pending: list[tuple[events_pb2.ProviderResult, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def apply(self, result: events_pb2.ProviderResult) -> None:
        """Apply one result (returns once its transaction committed; raises if it failed)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((result, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        await future

    async def _flush(self) -> None:
        await asyncio.sleep(self.linger)
        while self._pending:
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            try:
                await self.core.apply_results([r for r, _ in batch])
            except Exception:
                # Isolate the failing result: the others must not fail (and be dead-lettered)
                # with it.
                for r, f in batch:
                    try:
                        await self.core.apply_results([r])
                    except Exception as exc:
                        if not f.done():
                            f.set_exception(exc)
                    else:
                        if not f.done():
                            f.set_result(None)
            else:
                for _, f in batch:
                    if not f.done():
                        f.set_result(None)


def results_handler(core: SchedulerCore) -> Callable[[Envelope], Awaitable[None]]:
    """The results consumer's handler (results of concurrent partitions share transactions)."""
    batcher = ResultBatcher(core)

    async def handle(envelope: Envelope) -> None:
        msg = envelope.message
        if not isinstance(msg, events_pb2.ProviderResult):
            raise PermanentError(f"unexpected {envelope.type} on the results topic")
        if not msg.result_id:
            msg.result_id = envelope.id
        await batcher.apply(msg)

    return handle
