"""Group commit of single submits (``SchedulerCore.submit_one`` / ``SubmitBatcher``) on real
PostgreSQL: concurrent callers share transactions while each keeps the outcome a lone submit would
get (admission and idempotency per request; a rejected request fails alone and writes nothing)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import pytest
from google.protobuf import duration_pb2
from sqlalchemy import text

from conveyor.tasks.v1 import task_pb2
from conveyor_common.errors import FailedPrecondition, ResourceExhausted
from conveyor_scheduler.admission.batcher import SubmitBatcher
from conveyor_scheduler.admission.submit import NewTask
from conveyor_scheduler.core import SchedulerCore
from conveyor_scheduler.dispatch.wakeups import Wakeups
from conveyor_scheduler.store import db
from conveyor_testkit import scheduler as kit

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


@pytest.fixture(scope="module")
async def sched_url(database_url: str) -> str:
    await kit.migrate(database_url)
    return database_url


@pytest.fixture
async def make_core(sched_url: str) -> AsyncIterator[Callable[..., Awaitable[SchedulerCore]]]:
    cores: list[SchedulerCore] = []

    async def make(**overrides: Any) -> SchedulerCore:
        engine = db.create_engine(sched_url, pool_size=5)
        await kit.reset(engine)
        core = SchedulerCore(engine, kit.make_settings(sched_url, **overrides), wakeups=Wakeups())
        cores.append(core)
        return core

    yield make
    for core in cores:
        await core.engine.dispose()


async def _scalar(core: SchedulerCore, sql: str, **params: Any) -> Any:
    async with core.engine.connect() as conn:
        return await conn.scalar(text(sql), params)


def _groups(core: SchedulerCore) -> int:
    assert isinstance(core._submits, SubmitBatcher)
    return core._submits.groups


async def _all(calls: Sequence[Awaitable[Any]]) -> list[Any]:
    return list(await asyncio.gather(*calls, return_exceptions=True))


@pytest.mark.parametrize("flushers", [1, 2])
async def test_concurrent_submits_share_transactions(
    make_core: Callable[..., Awaitable[SchedulerCore]], flushers: int
) -> None:
    core = await make_core(submit_group_concurrency=flushers)
    items = [(f"t{i % 7}", kit.item(f"r{i}")) for i in range(60)]
    out = await _all([core.submit_one(t, 1, it) for t, it in items])
    assert all(isinstance(o, tuple) and not o[1] for o in out)
    assert len({o[0]["id"] for o in out}) == 60
    assert _groups(core) < 10  # 60 callers, a handful of commits
    assert await _scalar(core, "SELECT count(*) FROM tasks WHERE status = 1") == 60
    assert await _scalar(core, "SELECT count(*) FROM task_events WHERE type = 1") == 60
    # Each answer is the committed row of its own request.
    for (tenant, item), (row, _) in zip(items, out, strict=True):
        assert (row["tenant_id"], row["request_id"]) == (tenant, item.request_id)
    # FIFO inside a group: enqueued in call order.
    ordered = [o[0]["enqueued_at"] for o in out]
    assert ordered == sorted(ordered)
    await kit.check_invariants(core.engine, core.policy)
    # An idle submit is written at once, alone.
    before = _groups(core)
    row, dedup = await core.submit_one("t0", 1, kit.item("alone"))
    assert not dedup
    assert _groups(core) == before + 1


async def test_a_rejected_request_fails_alone_and_writes_nothing(
    make_core: Callable[..., Awaitable[SchedulerCore]],
) -> None:
    core = await make_core()
    await core.upsert_tenant("capped", 0, task_pb2.TenantLimits(max_waiting=3))
    capped = [kit.item(f"c{i}") for i in range(6)]
    others = [kit.item(f"o{i}") for i in range(6)]
    calls = [core.submit_one("capped", 1, it) for it in capped]
    calls += [core.submit_one("free", 1, it) for it in others]
    out = await _all(calls)
    ok = [o for o in out[:6] if isinstance(o, tuple)]
    rejected = [o for o in out[:6] if isinstance(o, ResourceExhausted)]
    assert len(ok) == 3  # the first three, in call order
    assert len(rejected) == 3
    assert all(isinstance(o, tuple) for o in out[:3])
    assert "waiting" in rejected[0].violations[0].subject
    assert all(isinstance(o, tuple) and not o[1] for o in out[6:])  # the other tenant: unaffected
    # Nothing of a rejected request was written: not its task, not its idempotency key.
    rejected_ids = [it.request_id for it in capped[3:]]
    for table in ("tasks", "idempotency_keys"):
        n = await _scalar(
            core,
            f"SELECT count(*) FROM {table} WHERE tenant_id = 'capped' AND request_id = ANY(:r)",
            r=rejected_ids,
        )
        assert n == 0
    await kit.check_invariants(core.engine, core.policy)
    # Once there is room, the same request id is a fresh submit (not a duplicate).
    await core.upsert_tenant("capped", 0, task_pb2.TenantLimits(max_waiting=10))
    row, dedup = await core.submit_one("capped", 1, capped[3])
    assert not dedup
    assert row["request_id"] == capped[3].request_id


async def test_global_capacity_and_submit_rate_per_request(
    make_core: Callable[..., Awaitable[SchedulerCore]],
) -> None:
    core = await make_core(queue_capacity=5)
    out = await _all([core.submit_one(f"g{i}", 1, kit.item()) for i in range(8)])
    assert sum(isinstance(o, tuple) for o in out) == 5
    assert all(
        isinstance(o, ResourceExhausted) and o.violations[0].subject == "queue" for o in out[5:]
    )
    await kit.check_invariants(core.engine, core.policy)

    core = await make_core(tenant_submit_burst=4, tenant_submit_rate=0.01)
    out = await _all([core.submit_one("burst", 1, kit.item()) for _ in range(6)])
    assert [isinstance(o, tuple) for o in out] == [True] * 4 + [False] * 2
    assert all("submit_rate" in o.violations[0].subject for o in out[4:])
    await kit.check_invariants(core.engine, core.policy)


@pytest.mark.parametrize("flushers", [1, 2])
async def test_idempotency_per_request_inside_a_group(
    make_core: Callable[..., Awaitable[SchedulerCore]], flushers: int
) -> None:
    core = await make_core(submit_group_concurrency=flushers)
    first = kit.item("same")
    other_body = kit.item("same", prompt="a dog")
    calls = [core.submit_one("t", 1, first) for _ in range(3)]
    calls.append(core.submit_one("t", 1, other_body))
    calls += [core.submit_one("t", 1, kit.item(f"n{i}")) for i in range(3)]
    out = await _all(calls)
    same = out[:3]
    assert all(isinstance(o, tuple) for o in same)
    assert len({o[0]["id"] for o in same}) == 1
    assert [o[1] for o in same] == [False, True, True]  # created once, then duplicates
    assert isinstance(out[3], FailedPrecondition)  # same key, another body: that caller only
    assert all(isinstance(o, tuple) and not o[1] for o in out[4:])
    assert await _scalar(core, "SELECT count(*) FROM tasks WHERE request_id = 'same'") == 1
    # A duplicate of an earlier group answers the task, takes no quota.
    row, dedup = await core.submit_one("t", 1, first)
    assert dedup
    assert row["id"] == same[0][0]["id"]
    await kit.check_invariants(core.engine, core.policy)


async def test_a_group_that_fails_as_a_whole_retries_each_request_alone(
    make_core: Callable[..., Awaitable[SchedulerCore]],
) -> None:
    core = await make_core()
    spec = kit.spec()
    spec.run_timeout.CopyFrom(duration_pb2.Duration(seconds=10**12))  # overflows the column
    poison = NewTask("poison", spec, b"x" * 32)
    calls = [core.submit_one("t", 1, kit.item(f"p{i}")) for i in range(5)]
    calls.insert(2, core.submit_one("t", 1, poison))
    out = await _all(calls)
    assert isinstance(out[2], Exception)
    assert all(isinstance(o, tuple) and not o[1] for i, o in enumerate(out) if i != 2)
    assert await _scalar(core, "SELECT count(*) FROM tasks") == 5
    assert await _scalar(core, "SELECT count(*) FROM idempotency_keys") == 5
    await kit.check_invariants(core.engine, core.policy)


async def test_group_commit_can_be_turned_off(
    make_core: Callable[..., Awaitable[SchedulerCore]],
) -> None:
    core = await make_core(submit_group_commit=False)
    await core.submit_one("t", 1, kit.item())  # the tenant row exists (see below)
    out = await _all([core.submit_one("t", 1, kit.item()) for _ in range(4)])
    assert all(isinstance(o, tuple) for o in out)
    assert core._submits is None
    # Concurrent first submits of a new tenant race to create its row: the loser decides again
    # inside its transaction, so no caller sees contention dressed up as a quota.
    out = await _all([core.submit_one(f"fresh-{i % 2}", 1, kit.item()) for i in range(8)])
    assert all(isinstance(o, tuple) for o in out), out
    # The group path also creates a new tenant's row safely under concurrency.
    core = await make_core()
    out = await _all([core.submit_one("new", 1, kit.item()) for _ in range(4)])
    assert all(isinstance(o, tuple) for o in out)
    assert _groups(core) == 1


@pytest.mark.parametrize("group_commit", [True, False])
async def test_a_tenant_below_its_share_is_never_refused_for_capacity_others_took(
    make_core: Callable[..., Awaitable[SchedulerCore]], group_commit: bool
) -> None:
    """A flooding tenant fills the queue; a calm tenant arriving then is admitted up to its
    weighted share (here half), and the flooder, now over its share, is refused."""
    core = await make_core(
        submit_group_commit=group_commit,
        queue_capacity=20,
        tenant_max_waiting=1000,
        tenant_submit_burst=1000,
        tenant_submit_rate=1000.0,
    )
    flood = await _all([core.submit_one("flood", 1, kit.item()) for _ in range(25)])
    assert sum(isinstance(o, tuple) for o in flood) == 20
    refused = [o for o in flood if isinstance(o, ResourceExhausted)]
    assert len(refused) == 5
    assert "queue" in refused[0].message
    calm = await _all([core.submit_one("calm", 1, kit.item()) for _ in range(10)])
    assert all(isinstance(o, tuple) for o in calm), calm  # its share: 20 * 1 / 2 = 10
    more = await _all([core.submit_one("calm", 1, kit.item()) for _ in range(2)])
    assert all(isinstance(o, ResourceExhausted) for o in more)  # beyond its share, queue full
    again = await _all([core.submit_one("flood", 1, kit.item()) for _ in range(3)])
    assert all(isinstance(o, ResourceExhausted) for o in again)
    waiting = await _scalar(core, "SELECT sum(waiting) FROM queue_counters")
    assert waiting == 30  # the capacity plus the calm tenant's share, never more
    await kit.check_invariants(core.engine, core.policy)
