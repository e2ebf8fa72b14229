"""conveyor_scheduler.dispatch.cycle on real PostgreSQL (cycles driven by hand): limits, paused models,
throttles, aging, fair share and slot costs.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text

from conveyor.tasks.v1 import task_pb2
from conveyor_scheduler.dispatch.candidates import (
    SPECULATIVE_CANDIDATES_SQL,
    SpeculativeRead,
    speculative_params,
)
from conveyor_scheduler.dispatch.statements import CANDIDATES_SQL, TENANTS_SQL, USAGE_SQL
from conveyor_scheduler.store import models
from conveyor_testkit import scheduler as kit
from tests.integration.scheduler_env import Env, drain


async def test_dispatch_respects_limits_and_results_free_slots(
    make_env: Callable[..., Awaitable[Env]],
) -> None:
    env = await make_env(lead=True, global_concurrency=5)
    for tenant in ("a", "b"):
        await env.core.submit(tenant, 1, [kit.item() for _ in range(5)])
    await env.core.submit("v", 1, [kit.item(kind=task_pb2.TASK_KIND_VIDEO) for _ in range(3)])
    n = await env.dispatch()
    assert 1 <= n <= 5
    assert env.dispatcher.room.saturated == (n == 5)  # a cycle filling the limit says so itself
    maxima = await env.check()
    assert maxima["global"] <= 5
    assert maxima["tenant"] <= 3
    assert await env.dispatch() == 0  # saturated
    active = await env.rows("SELECT id, attempt FROM tasks WHERE status = 2 ORDER BY id")
    # One DispatchTask and one DISPATCHED event per dispatched task, keyed by task id.
    cmds = await env.scalar(
        "SELECT count(*) FROM outbox WHERE topic = 'conveyor.provider.v1.commands'"
        " AND ce_type = 'conveyor.events.v1.DispatchTask'"
    )
    assert cmds == len(active)
    first = active[0]
    await env.core.apply_results([kit.result(first.id, first.attempt, "started")])
    dup = kit.result(first.id, first.attempt, "progress", percent=40)
    await env.core.apply_results([dup])
    await env.core.apply_results([dup])  # redelivery: the inbox absorbs it
    stale = kit.result(first.id, first.attempt + 1, "succeeded")
    await env.core.apply_results([stale])  # another attempt's: ignored
    row = await env.task(first.id)
    assert row["status"] == models.RUNNING
    assert row["progress"] == 40
    assert row["last_sequence"] == 4  # submitted, dispatched, started, progress
    await env.core.apply_results([kit.result(first.id, first.attempt, "succeeded")])
    row = await env.task(first.id)
    assert row["status"] == models.SUCCEEDED
    assert row["progress"] == 100
    assert await env.scalar("SELECT count(*) FROM active_slots WHERE task_id = :t", t=first.id) == 0
    assert await env.dispatch() >= 1  # the freed slot is used again
    await env.check()
    # Drain everything: all end succeeded, limits held throughout.
    for _ in range(100):
        rows = await env.rows("SELECT id, attempt FROM tasks WHERE status IN (2, 3)")
        if not rows and await env.scalar("SELECT count(*) FROM tasks WHERE status = 1") == 0:
            break
        await env.core.apply_results([kit.result(r.id, r.attempt, "succeeded") for r in rows])
        await env.dispatch()
        await env.check()
    assert await env.scalar("SELECT count(*) FROM tasks WHERE status <> 4") == 0


async def test_model_pause_kind_limit_and_throttle(make_env: Callable[..., Awaitable[Env]]) -> None:
    env = await make_env(lead=True, global_concurrency=10, kind_limits={"video": 2})
    await env.core.submit(
        "a", 3, [kit.item(kind=task_pb2.TASK_KIND_VIDEO, model="acme/vid") for _ in range(3)]
    )
    await env.core.submit("b", 3, [kit.item(model="acme/paused") for _ in range(2)])
    await env.core.set_model_paused("acme/paused", True, "maintenance")
    assert await env.dispatch() == 1  # one video (cost 2) fills the video limit of 2
    assert (
        await env.scalar("SELECT count(*) FROM tasks WHERE model = 'acme/paused' AND status = 1")
        == 2
    )
    await env.core.set_model_paused("acme/paused", False, None)
    # Throttle: the provider is paused until retry_at; dispatch resumes afterwards.
    vid = (await env.rows("SELECT id, attempt FROM tasks WHERE status = 2"))[0]
    until = datetime.now(UTC) + timedelta(seconds=1.0)
    await env.core.apply_results([kit.result(vid.id, vid.attempt, "throttled", retry_at=until)])
    assert await env.dispatch() == 0
    assert env.dispatcher.next_wake is not None
    await asyncio.sleep(1.1)
    assert await env.dispatch() == 2  # the two unpaused image tasks
    await env.check()


async def test_aging_lets_an_old_low_task_go_first(make_env: Callable[..., Awaitable[Env]]) -> None:
    # 60 class steps per minute = one class per second: a low task that waited 2.5 s outranks a
    # normal task submitted now.
    env = await make_env(lead=True, global_concurrency=1, aging_rate_per_minute=60.0)
    [(low, _)] = await env.core.submit("a", 1, [kit.item(priority=task_pb2.PRIORITY_LOW)])
    [(high, _)] = await env.core.submit("b", 1, [kit.item(priority=task_pb2.PRIORITY_HIGH)])
    await asyncio.sleep(0.05)
    assert await env.dispatch() == 1
    assert (await env.task(high["id"]))["status"] == models.DISPATCHED  # fresh: class decides
    await env.core.apply_results([kit.result(high["id"], 1, "succeeded")])
    await asyncio.sleep(1.6)
    [(normal, _)] = await env.core.submit("c", 1, [kit.item(priority=task_pb2.PRIORITY_NORMAL)])
    assert await env.dispatch() == 1
    assert (await env.task(low["id"]))["status"] == models.DISPATCHED
    assert (await env.task(normal["id"]))["status"] == models.QUEUED


async def test_fair_share_light_tenant_not_stuck_behind_flood(
    make_env: Callable[..., Awaitable[Env]],
) -> None:
    env = await make_env(
        lead=True,
        global_concurrency=2,
        tier_concurrency={"free": 2, "premium": 2, "pro": 2},
        aging_rate_per_minute=0.0,
    )
    await env.core.submit("flood", 1, [kit.item() for _ in range(100)])
    await env.core.submit("light", 1, [kit.item() for _ in range(5)])
    order: list[str] = []
    for _ in range(60):
        await env.dispatch()
        rows = await env.rows("SELECT id, attempt, tenant_id FROM tasks WHERE status = 2")
        order += [r.tenant_id for r in rows]
        await env.core.apply_results([kit.result(r.id, r.attempt, "succeeded") for r in rows])
        if order.count("light") == 5:
            break
    # Equal weights: the light tenant's 5 tasks go out within the first ~10 dispatches, not after
    # the flood's 100.
    last_light = max(i for i, t in enumerate(order) if t == "light")
    assert last_light < 12, order[:20]
    await env.check()


async def test_saturated_model_at_the_head_does_not_block_a_tenant(
    make_env: Callable[..., Awaitable[Env]],
) -> None:
    env = await make_env(lead=True, global_concurrency=10, model_limits={"m/x": 1})
    await env.core.submit(
        "a", 1, [kit.item(model="m/x", priority=task_pb2.PRIORITY_HIGH) for _ in range(3)]
    )
    await env.core.submit("a", 1, [kit.item(model="m/y") for _ in range(3)])
    assert await env.dispatch() == 1  # one m/x: the model limit
    assert await env.dispatch() == 2  # the tenant's m/y tasks behind it go next (tenant limit 3)
    assert await env.dispatch() == 0
    rows = await env.rows("SELECT model, count(*) AS n FROM tasks WHERE status = 2 GROUP BY model")
    assert {r.model: r.n for r in rows} == {"m/x": 1, "m/y": 2}
    # The m/x slot frees: the next m/x task goes out (the cache is re-read for it).
    [x] = await env.rows("SELECT id, attempt FROM tasks WHERE status = 2 AND model = 'm/x'")
    await env.core.apply_results([kit.result(x.id, x.attempt, "succeeded")])
    assert await env.dispatch() == 1
    assert await env.scalar("SELECT count(*) FROM tasks WHERE status = 2 AND model = 'm/x'") == 1
    await env.check()


async def test_task_costlier_than_its_tenant_limit_runs_alone_and_blocks_nothing(
    make_env: Callable[..., Awaitable[Env]],
) -> None:
    env = await make_env(lead=True, global_concurrency=5)
    await env.core.upsert_tenant("a", 0, task_pb2.TenantLimits(max_concurrency=1))
    [(video, _)] = await env.core.submit("a", 1, [kit.item(kind=task_pb2.TASK_KIND_VIDEO)])
    images = await env.core.submit("a", 1, [kit.item() for _ in range(3)])
    assert video["slot_cost"] == 2  # the nominal cost stays; the clamp happens at dispatch
    assert await env.dispatch() == 1
    [slot] = await env.rows("SELECT task_id, cost FROM active_slots")
    assert (slot.task_id, slot.cost) == (video["id"], 1)  # clamped to the tenant's limit of 1
    assert await env.dispatch() == 0  # the tenant's limit holds
    order = await drain(env)
    assert [t for t, _ in order] == [video["id"]] + [r["id"] for r, _ in images]
    assert await env.scalar("SELECT count(*) FROM tasks WHERE status <> 4") == 0


async def test_tenant_limit_lowered_below_a_queued_cost_later(
    make_env: Callable[..., Awaitable[Env]],
) -> None:
    env = await make_env(lead=True, global_concurrency=5)
    [(video, _)] = await env.core.submit("b", 1, [kit.item(kind=task_pb2.TASK_KIND_VIDEO)])
    images = await env.core.submit("b", 1, [kit.item() for _ in range(2)])
    # Lowered after submit (the free tier's 3 down to 1): the queued video still goes, alone.
    await env.core.upsert_tenant("b", 0, task_pb2.TenantLimits(max_concurrency=1))
    order = await drain(env)
    assert order == [(video["id"], 1)] + [(r["id"], 1) for r, _ in images]
    assert await env.scalar("SELECT count(*) FROM tasks WHERE status <> 4") == 0


async def test_kind_limit_below_the_kind_cost_still_dispatches(
    make_env: Callable[..., Awaitable[Env]],
) -> None:
    # A video costs 2 but the video kind's limit is 1: videos run one at a time, images alongside.
    env = await make_env(lead=True, global_concurrency=5, kind_limits={"video": 1})
    await env.core.submit("k", 1, [kit.item(kind=task_pb2.TASK_KIND_VIDEO) for _ in range(2)])
    await env.core.submit("k", 1, [kit.item() for _ in range(2)])
    assert await env.dispatch() == 2  # one video (cost 1 now) and an image (read: 3 by rank)
    assert await env.dispatch() == 1  # the other image, past the second video (kind full)
    assert await env.scalar("SELECT sum(cost) FROM active_slots WHERE kind = 1") == 1
    order = await drain(env)
    assert len(order) == 4
    assert await env.scalar("SELECT count(*) FROM tasks WHERE status <> 4") == 0


async def test_dispatch_stops_at_the_window_and_an_urgent_task_goes_next(
    make_env: Callable[..., Awaitable[Env]],
) -> None:
    """At most ``dispatch_window`` commands wait for an adapter: a backlog of one tenant is not
    dispatched ahead of an urgent task of another submitted later (#13: priority at the provider)."""
    env = await make_env(
        lead=True,
        dispatch_window=3,
        global_concurrency=100,
        tier_concurrency={"free": 100, "premium": 100, "pro": 100},
    )
    await env.core.submit("bulk", 1, [kit.item(prompt=f"p{i}") for i in range(10)])
    assert await env.dispatch() == 3
    assert await env.dispatch() == 0  # the window is full: nothing more goes to Kafka
    [(urgent, _)] = await env.core.submit("calm", 1, [kit.item(priority=task_pb2.PRIORITY_URGENT)])
    assert await env.dispatch() == 0
    first = (await env.rows("SELECT id, attempt FROM tasks WHERE status = 2 LIMIT 1"))[0]
    decision, _ = await env.core.begin_submit(str(first.id), first.attempt)
    assert decision == 1  # PROCEED: the command left the window
    assert await env.dispatch() == 1
    assert (await env.task(urgent["id"]))["status"] == models.DISPATCHED
    assert await env.scalar("SELECT count(*) FROM tasks WHERE status = 2 AND submit_state = 1") == 3
    await env.check()


async def test_a_zero_window_does_not_bound_dispatch(
    make_env: Callable[..., Awaitable[Env]],
) -> None:
    env = await make_env(
        lead=True,
        dispatch_window=0,
        global_concurrency=100,
        tier_concurrency={"free": 100, "premium": 100, "pro": 100},
    )
    await env.core.submit("bulk", 1, [kit.item(prompt=f"p{i}") for i in range(10)])
    assert await env.dispatch() == 10


async def test_a_cycle_on_a_session_that_lost_the_lock_writes_nothing(
    make_env: Callable[..., Awaitable[Env]],
) -> None:
    """The cycle's first round trip fences it: a leader whose session no longer holds the lock
    (released behind its back here) raises LostLeadership before it writes anything."""

    from conveyor_scheduler.dispatch.leadership import LostLeadership

    env = await make_env(lead=True, global_concurrency=5)
    [(row, _)] = await env.core.submit("a", 1, [kit.item()])
    conn = env.leader.conn
    assert conn is not None
    await conn.execute(text("SELECT pg_advisory_unlock_all()"))
    await conn.commit()
    with pytest.raises(LostLeadership):
        await env.dispatch()
    assert (await env.task(row["id"]))["status"] == models.QUEUED
    assert await env.scalar("SELECT count(*) FROM active_slots") == 0
    assert await env.scalar("SELECT count(*) FROM outbox WHERE topic LIKE '%commands%'") == 0


async def test_a_cycle_stopped_at_the_capacity_leaves_new_work_for_the_next(
    make_env: Callable[..., Awaitable[Env]],
) -> None:
    """A stale candidate cache is re-read in the capacity read's round trip. A cycle that stops
    at the capacity (no provider token here) read the tenants without using them: the task
    submitted before it is still found by the first cycle after, with no other wake-up."""
    env = await make_env(
        lead=True,
        global_concurrency=10,
        provider_rate_per_second=4.0,
        provider_burst=1,
        candidate_cache_seconds=60.0,
    )
    await env.core.submit("a", 1, [kit.item(prompt="first")])
    assert await env.dispatch() == 1  # the cache is read, valid for a minute; the token spent
    [(second, _)] = await env.core.submit("a", 1, [kit.item(prompt="second")])
    assert env.dispatcher.wakeups.candidates_stale
    assert await env.dispatch() == 0  # no token: stopped after the capacity read
    assert env.dispatcher.wakeups.candidates_stale  # what it read is not taken for the cache
    await asyncio.sleep(0.3)
    assert await env.dispatch() == 1
    assert (await env.task(second["id"]))["status"] == models.DISPATCHED


async def test_a_dispatch_whose_commit_round_trip_fails_writes_nothing(
    make_env: Callable[..., Awaitable[Env]],
) -> None:
    """The slots, events, outbox rows, counters and COMMIT go in one round trip: a failure in it
    (a trigger refusing the outbox rows here) rolls the whole dispatch back, and the next cycle
    dispatches the same tasks."""
    env = await make_env(lead=True, global_concurrency=5)
    rows = await env.core.submit("a", 1, [kit.item(prompt=f"p{i}") for i in range(3)])
    refuse = (
        "CREATE OR REPLACE FUNCTION conveyor_test_refuse() RETURNS trigger LANGUAGE plpgsql AS"
        " $$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$;"
        " CREATE TRIGGER conveyor_test_refuse BEFORE INSERT ON outbox"
        " FOR EACH ROW EXECUTE FUNCTION conveyor_test_refuse()"
    )
    async with env.core.engine.begin() as conn:
        driver: Any = (await conn.get_raw_connection()).driver_connection
        await driver.execute(refuse)
    try:
        with pytest.raises(Exception, match="refused by the test"):
            await env.dispatch()
    finally:
        async with env.core.engine.begin() as conn:
            driver = (await conn.get_raw_connection()).driver_connection
            await driver.execute(
                "DROP TRIGGER conveyor_test_refuse ON outbox; DROP FUNCTION conveyor_test_refuse()"
            )
    for row, _ in rows:
        assert (await env.task(row["id"]))["status"] == models.QUEUED
    assert await env.scalar("SELECT count(*) FROM active_slots") == 0
    assert await env.scalar("SELECT sum(waiting) FROM tenants WHERE tenant_id = 'a'") == 3
    assert await env.dispatch() == 3
    await env.check()


async def _committed(env: Env, sql: str, **params: Any) -> None:
    async with env.core.engine.begin() as conn:
        await conn.execute(text(sql), params)


async def test_the_speculative_candidate_read_is_what_the_probe_reads(
    make_env: Callable[..., Awaitable[Env]],
) -> None:
    """The candidates read in the capacity round trip (every tenant's k computed in SQL from its
    explicit or tier limit and its slots) are exactly what the probe reads with the k the cycle
    computes in Python: for a tenant with free slots under the cap, over it, at an explicit limit,
    with only tasks of a blocked model, and with only delayed tasks."""
    env = await make_env(
        lead=True,
        global_concurrency=100,
        tenant_candidates_max=4,
        tier_concurrency={"free": 3, "premium": 5, "pro": 10},
        aging_rate_per_minute=0.0,
    )
    await env.core.submit("free", 1, [kit.item(prompt=f"f{i}") for i in range(2)])
    await env.core.submit("pro", 3, [kit.item(prompt=f"p{i}") for i in range(3)])
    await env.core.submit("capped", 1, [kit.item(prompt=f"c{i}") for i in range(2)])
    await _committed(env, "UPDATE tenants SET max_concurrency = 2 WHERE tenant_id = 'capped'")
    assert await env.dispatch() == 7  # slots in use: free 2 of 3, pro 3 of 10, capped 2 of 2
    priorities = [task_pb2.PRIORITY_LOW, task_pb2.PRIORITY_HIGH, task_pb2.PRIORITY_NORMAL]
    await env.core.submit("free", 1, [kit.item(priority=p) for p in priorities * 2])
    await env.core.submit("pro", 3, [kit.item(priority=p) for p in priorities * 2])
    await env.core.submit("capped", 1, [kit.item() for _ in range(2)])
    await env.core.submit("blocked", 2, [kit.item(model="acme/paused") for _ in range(2)])
    await env.core.submit("later", 2, [kit.item(prompt=f"l{i}") for i in range(2)])
    await _committed(
        env, "UPDATE tasks SET not_before = now() + interval '1 hour' WHERE tenant_id = 'later'"
    )
    await env.core.set_model_paused("acme/paused", True, "test")
    policy = env.dispatcher.policy
    now = datetime.now(UTC)
    async with env.core.engine.connect() as conn:
        spec = SpeculativeRead(
            list(
                await conn.execute(
                    SPECULATIVE_CANDIDATES_SQL,
                    speculative_params(policy.tier_concurrency, 4, now, ["acme/paused"], []),
                )
            ),
            frozenset({"acme/paused"}),
            frozenset(),
        )
        got, ks = spec.by_tenant()
        used = {
            r.tenant_id: r.used for r in await conn.execute(USAGE_SQL) if r.tenant_id is not None
        }
        tenants = list(await conn.execute(TENANTS_SQL))
        expected_k = {
            t.tenant_id: max(
                0,
                min(4, policy.tenant_limit(t.tier, t.max_concurrency) - used.get(t.tenant_id, 0)),
            )
            for t in tenants
        }
        probed = [t for t, k in expected_k.items() if k > 0]
        rows = await conn.execute(
            CANDIDATES_SQL,
            {
                "tenants": probed,
                "ks": [expected_k[t] for t in probed],
                "now": now,
                "blocked_models": ["acme/paused"],
                "blocked_kinds": [],
            },
        )
        expected: dict[str, list[Any]] = {}
        for r in rows:
            expected.setdefault(r.tenant_id, []).append(r.id)
    assert expected_k == {"free": 1, "pro": 4, "capped": 0, "blocked": 4, "later": 4}
    assert ks == expected_k
    assert {t: [c.id for c in cs] for t, cs in got.items()} == expected
    assert [len(v) for v in expected.values()] == [1, 4]  # free's best and pro's top 4 only
    assert all(c.rank >= d.rank for c, d in itertools.pairwise(got["pro"]))


async def test_a_cycle_after_a_submit_reads_its_candidates_in_the_capacity_round_trip(
    make_env: Callable[..., Awaitable[Env]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A submit makes the candidate cache stale; the next cycle takes the candidates read with the
    capacity and sends no probe of its own. When a model filled up or was paused since the previous
    read, the speculative read used the wrong filter: the cycle probes as before and dispatches the
    same."""
    from conveyor_scheduler.dispatch import cycle as cycle_module
    from conveyor_scheduler.dispatch.candidates import read_candidates as real

    probes: list[Any] = []

    async def counting(conn: Any, tenants: list[str], *args: Any) -> Any:
        probes.append(tenants)
        return await real(conn, tenants, *args)

    monkeypatch.setattr(cycle_module, "read_candidates", counting)
    env = await make_env(lead=True, global_concurrency=10, candidate_cache_seconds=60.0)
    for i in range(3):
        [(row, _)] = await env.core.submit(f"t{i}", 1, [kit.item(prompt=f"s{i}")])
        assert env.dispatcher.wakeups.candidates_stale
        assert await env.dispatch() == 1
        assert (await env.task(row["id"]))["status"] == models.DISPATCHED
    assert probes == []
    await env.core.set_model_paused("acme/paused", True, "test")
    await env.core.submit("t9", 1, [kit.item(model="acme/paused"), kit.item(model="acme/ok")])
    assert await env.dispatch() == 1
    assert probes == [["t9"]]
    dispatched = await env.rows("SELECT model FROM tasks WHERE tenant_id = 't9' AND status = 2")
    assert [r.model for r in dispatched] == ["acme/ok"]
    await env.check()


async def test_a_cycle_plans_its_small_reads_once_and_its_candidate_reads_each_time(
    make_env: Callable[..., Awaitable[Env]],
) -> None:
    """The session plans every execution anew (custom plans, store/db.py) because the LATERAL
    candidate reads need it; the cycle's other parameterized statements (the fence, the controls,
    the earliest backoff, the dispatch UPDATE) take a generic plan once prepared instead of a
    custom plan at every cycle, which cost PostgreSQL more than running them."""
    env = await make_env(lead=True, global_concurrency=20, candidate_cache_seconds=60.0)
    for i in range(10):  # psycopg prepares a statement at its sixth execution
        await env.core.submit(f"t{i}", 1, [kit.item(prompt=f"p{i}")])
        assert env.dispatcher.wakeups.candidates_stale  # the capacity trip reads the candidates
        assert await env.dispatch() == 1
    conn = env.leader.conn
    assert conn is not None
    plans = {
        " ".join(r[0].split()): (r[1], r[2])
        for r in await conn.execute(
            text("SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements")
        )
    }
    await conn.rollback()

    def counts(fragment: str) -> tuple[int, int]:
        [found] = [v for s, v in plans.items() if fragment in s]
        return found

    for fragment in (
        "FROM pg_locks",
        "FROM provider_controls",
        "SELECT min(not_before) FROM tasks",
        "UPDATE tasks SET status = 2",
    ):
        generic, custom = counts(fragment)
        assert generic >= 4, fragment
        assert custom == 0, fragment
    generic, custom = counts("LEFT JOIN LATERAL")  # the speculative candidate read
    assert generic == 0
    assert custom >= 4
    await env.check()
