"""conveyor_scheduler.results.consumer's micro-batcher: concurrent results share one transaction; a
failing one is isolated.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from conveyor.events.v1 import events_pb2
from conveyor_scheduler.results.consumer import ResultBatcher


class RecordingCore:
    """Stands in for SchedulerCore.apply_results: records batch sizes, fails on task "bad"."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    async def apply_results(self, results: Sequence[events_pb2.ProviderResult]) -> None:
        self.batches.append([r.task_id for r in results])
        await asyncio.sleep(0)
        if any(r.task_id == "bad" for r in results):
            raise RuntimeError("boom")


async def test_concurrent_results_share_a_batch_and_failures_are_isolated() -> None:
    core = RecordingCore()
    batcher = ResultBatcher(core, linger_seconds=0.01)  # type: ignore[arg-type]
    ids = ["a", "b", "bad", "c"]
    outcomes: list[Any] = await asyncio.gather(
        *(batcher.apply(events_pb2.ProviderResult(task_id=i)) for i in ids),
        return_exceptions=True,
    )
    assert [isinstance(o, RuntimeError) for o in outcomes] == [False, False, True, False]
    assert core.batches[0] == ids  # one shared transaction first
    assert core.batches[1:] == [["a"], ["b"], ["bad"], ["c"]]  # then one by one to isolate


async def test_sequential_results_each_commit_before_returning() -> None:
    core = RecordingCore()
    batcher = ResultBatcher(core, linger_seconds=0.0)  # type: ignore[arg-type]
    for i in ("x", "y"):
        await batcher.apply(events_pb2.ProviderResult(task_id=i))
    assert core.batches == [["x"], ["y"]]
    with pytest.raises(RuntimeError):
        await batcher.apply(events_pb2.ProviderResult(task_id="bad"))
