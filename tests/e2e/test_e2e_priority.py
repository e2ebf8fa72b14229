"""Priority, aging and limits, observed where it matters: at the provider (the fake's ledger).

The session system ages waiting tasks by 0.2 class steps per second (``AGING_PER_MINUTE``), so a low
task that waited more than 5 s outranks a normal task submitted just now, while tasks submitted within
a fraction of a second keep their class order.
"""

from __future__ import annotations

import asyncio

import pytest

from conveyor.tasks.v1 import task_pb2
from conveyor_client import AsyncConveyorClient
from tests.e2e.checker import TaskMeta, peak_slots
from tests.e2e.harness import (
    E2E,
    GLOBAL_LIMIT,
    KIND_COST,
    LIMITED_MODEL,
    MODEL_LIMIT,
    creates,
    wait_for_event,
    wait_terminal,
)

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.slow]

S = task_pb2


async def test_urgent_starts_first_at_the_provider(e2e: E2E) -> None:
    _, client = await e2e.tenant("prio", max_concurrency=1)
    seq = await e2e.ledger_seq()
    blocker = (
        await client.submit("image", model="e2e/prio", input={"__fake_duration_s": 2.0})
    ).task
    await wait_for_event(client, blocker.task_id, [S.TASK_EVENT_TYPE_DISPATCHED])
    order: dict[str, str] = {}
    for priority in ("low", "normal", "high", "urgent"):  # worst first: FIFO would be wrong
        task = (
            await client.submit(
                "image", model="e2e/prio", input={"__fake_duration_s": 0.2}, priority=priority
            )
        ).task
        order[task.task_id] = priority
    queued = await client.get(next(iter(order)))
    assert queued.status == S.TASK_STATUS_QUEUED
    final = await wait_terminal(client, [blocker.task_id, *order])
    assert all(t.status == S.TASK_STATUS_SUCCEEDED for t in final.values())

    ledger = await e2e.ledger(seq)
    started = [order.get(t, "blocker") for t in creates(ledger, final)]
    assert started == ["blocker", "urgent", "high", "normal", "low"]
    meta = {t: TaskMeta("prio", "image", "e2e/prio", "") for t in final}
    _, by_tenant, _ = peak_slots(ledger, meta, KIND_COST)
    assert by_tenant == {"prio": 1}


async def test_an_old_low_task_beats_a_new_normal_one(e2e: E2E) -> None:
    """Aging: low waited > 5 s (more than one class step) when the slot frees; a new low did not."""
    _, client = await e2e.tenant("aging", max_concurrency=1)
    seq = await e2e.ledger_seq()
    blocker = (
        await client.submit("image", model="e2e/aging", input={"__fake_duration_s": 7.5})
    ).task
    await wait_for_event(client, blocker.task_id, [S.TASK_EVENT_TYPE_DISPATCHED])
    short = {"__fake_duration_s": 0.2}
    old_low = (await client.submit("image", model="e2e/aging", input=short, priority="low")).task
    await asyncio.sleep(6.5)  # 1.3 class steps
    new_low = (await client.submit("image", model="e2e/aging", input=short, priority="low")).task
    new_normal = (
        await client.submit("image", model="e2e/aging", input=short, priority="normal")
    ).task
    assert (await client.get(old_low.task_id)).status == S.TASK_STATUS_QUEUED
    names = {old_low.task_id: "old low", new_low.task_id: "new low", new_normal.task_id: "normal"}
    final = await wait_terminal(client, [blocker.task_id, *names])
    assert all(t.status == S.TASK_STATUS_SUCCEEDED for t in final.values())

    started = [names.get(t, "blocker") for t in creates(await e2e.ledger(seq), final)]
    assert started == ["blocker", "old low", "normal", "new low"]


async def test_global_tenant_and_model_limits_are_never_exceeded(e2e: E2E) -> None:
    """Demand above every limit at once; the ledger's intervals never exceed any of them."""
    small, small_client = await e2e.tenant("limit-small", max_concurrency=2)
    big, big_client = await e2e.tenant("limit-big", tier="pro", max_concurrency=10)
    seq = await e2e.ledger_seq()
    meta: dict[str, TaskMeta] = {}

    async def submit(
        client: AsyncConveyorClient, tenant: str, kind: str, model: str, n: int
    ) -> None:
        for i in range(n):
            inputs = {"i": i, "__fake_duration_s": 0.8}
            task = (await client.submit(kind, model=model, input=inputs)).task
            meta[task.task_id] = TaskMeta(tenant, kind, model, task.request_id)

    await asyncio.gather(
        submit(small_client, small, "image", "e2e/small", 6),
        submit(big_client, big, "image", LIMITED_MODEL, 6),
        submit(big_client, big, "video", "e2e/video", 4),
        submit(big_client, big, "text", "e2e/text", 6),
    )
    final: dict[str, task_pb2.Task] = {}
    final.update(
        await wait_terminal(small_client, [t for t, m in meta.items() if m.tenant == small])
    )
    final.update(await wait_terminal(big_client, [t for t, m in meta.items() if m.tenant == big]))
    assert all(t.status == S.TASK_STATUS_SUCCEEDED for t in final.values())

    ledger = await e2e.ledger(seq)
    assert sorted(creates(ledger, meta)) == sorted(meta)
    peak_global, by_tenant, by_model = peak_slots(ledger, meta, KIND_COST)
    # Never above a limit; and each limit was reached, so the test could have seen an excess.
    assert GLOBAL_LIMIT - 1 <= peak_global <= GLOBAL_LIMIT
    assert by_tenant[small] == 2
    assert by_model[LIMITED_MODEL] == MODEL_LIMIT
    assert by_tenant[big] <= GLOBAL_LIMIT
