"""The adapter's submit-protocol client: concurrent BeginSubmit/CompleteSubmit calls coalesced into
batch calls (one scheduler transaction each), a lone call sent at once, and the fallbacks (a
scheduler without batch calls, a failed batch, one bad item)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from conveyor.scheduler.v1 import provider_coordination_service_pb2 as provider_pb2
from conveyor_provider_adapter.coordination import Coalescer, Coordinator
from conveyor_testkit.adapter import InMemoryCoordination

D = provider_pb2.SubmitDecision


async def _pair(batches: bool) -> tuple[InMemoryCoordination, Coordinator]:
    service = InMemoryCoordination(batches=batches)
    address = await service.start()
    return service, Coordinator(address, adapter_id="adapter-test", retry_s=2.0)


@pytest.fixture
async def pair() -> AsyncIterator[tuple[InMemoryCoordination, Coordinator]]:
    service, client = await _pair(batches=True)
    yield service, client
    await client.close()
    await service.stop()


async def test_concurrent_calls_are_coalesced_and_each_gets_its_answer(
    pair: tuple[InMemoryCoordination, Coordinator],
) -> None:
    service, client = pair
    for i in range(60):
        service.dispatched(f"t{i}", attempt=1)
    stale = await client.begin_submit("t0", 2)  # a lone call: the single RPC at once
    assert stale.decision == D.SUBMIT_DECISION_STOP
    assert service.batch_sizes == []

    answers = await asyncio.gather(*(client.begin_submit(f"t{i}", 1) for i in range(60)))
    assert [a.decision for a in answers] == [D.SUBMIT_DECISION_PROCEED] * 60
    assert sum(n for _, n in service.batch_sizes) >= 50  # the first may have gone alone
    assert len(service.batch_sizes) <= 3
    again = await asyncio.gather(client.begin_submit("t1", 1), client.begin_submit("t2", 1))
    assert [a.decision for a in again] == [D.SUBMIT_DECISION_RECONCILE] * 2

    accepted = await asyncio.gather(
        *(client.complete_submit(f"t{i}", 1, f"p{i}") for i in range(10)),
        client.complete_submit("t11", 7, "p-stale"),  # stale attempt: refused alone
    )
    assert accepted == [True] * 10 + [False]
    assert any(m == "CompleteSubmitBatch" and n > 1 for m, n in service.batch_sizes)
    assert service.tasks["t3"].prediction_id == "p3"


async def test_a_scheduler_without_batch_calls_gets_single_calls() -> None:
    service, client = await _pair(batches=False)
    try:
        for i in range(20):
            service.dispatched(f"t{i}")
        answers = await asyncio.gather(*(client.begin_submit(f"t{i}", 1) for i in range(20)))
        assert [a.decision for a in answers] == [D.SUBMIT_DECISION_PROCEED] * 20
        assert service.decisions("t5") == ["PROCEED"]
        assert service.batch_sizes == []
        accepted = await asyncio.gather(
            *(client.complete_submit(f"t{i}", 1, "p") for i in range(5))
        )
        assert accepted == [True] * 5
    finally:
        await client.close()
        await service.stop()


async def test_coalescer_failures_reach_the_right_waiters() -> None:
    calls: list[list[int]] = []

    async def send(items: list[int]) -> list[int | BaseException]:
        calls.append(items)
        await asyncio.sleep(0.01)
        if 13 in items:
            raise RuntimeError("batch refused")
        return [ValueError(f"bad {i}") if i < 0 else i * 10 for i in items]

    coalescer: Coalescer[int, int] = Coalescer(send, max_items=4)
    results = await asyncio.gather(
        *(coalescer.call(i) for i in (1, 2, -3, 4, 5, 6)), return_exceptions=True
    )
    assert results[:2] == [10, 20]
    assert isinstance(results[2], ValueError)  # its own failure only
    assert results[3:] == [40, 50, 60]
    assert [len(c) for c in calls] == [4, 2]  # queued together: batches of at most 4

    failed = await asyncio.gather(coalescer.call(13), coalescer.call(14), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in failed)  # the whole batch failed
    assert await coalescer.call(7) == 70  # and the next batch is unaffected
    assert coalescer.batches == 4
