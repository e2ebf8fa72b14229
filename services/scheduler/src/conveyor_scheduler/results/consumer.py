"""The results consumer: Kafka ``provider-results`` records, applied in batches (one transaction per
fetched Kafka batch), committed after the transaction.

:func:`results_batch_handler` applies every record of a fetch in one transaction (a task's records
in their partition order); if that fails, the consumer falls back to :func:`results_handler`, record
by record, where concurrent partitions still share transactions (:class:`ResultBatcher`) and a bad
record is isolated.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from conveyor.events.v1 import events_pb2
from conveyor_common.kafka import (
    BatchHandler,
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
        await batcher.apply(_result_of(envelope))

    return handle


APPLY_CHUNK = 500
"""Most results applied in one transaction."""


def _result_of(envelope: Envelope) -> events_pb2.ProviderResult:
    msg = envelope.message
    if not isinstance(msg, events_pb2.ProviderResult):
        raise PermanentError(f"unexpected {envelope.type} on the results topic")
    if not msg.result_id:
        msg.result_id = envelope.id
    return msg


def results_batch_handler(core: SchedulerCore) -> BatchHandler:
    """The results consumer's batch handler: a fetched Kafka batch in one transaction (chunks of
    :data:`APPLY_CHUNK`; a chunk applied twice after a failure is deduplicated by the inbox)."""

    async def handle(envelopes: Sequence[Envelope]) -> None:
        results = [_result_of(e) for e in envelopes]
        for start in range(0, len(results), APPLY_CHUNK):
            await core.apply_results(results[start : start + APPLY_CHUNK])

    return handle
