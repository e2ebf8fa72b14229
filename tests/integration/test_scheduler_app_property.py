"""Concurrency property test: three scheduler replicas (own engines, own leader loops) on one real
PostgreSQL, under thousands of random, concurrent submit / duplicate submit / cancel / BeginSubmit /
CompleteSubmit / start / progress / succeed / fail (retryable or not) / cancel / abort / duplicate and
stale result operations, plus leader-connection kills. Results go through the consumer's handler.

Checked after every round on one consistent snapshot: no global, tenant, model or kind limit is ever
exceeded, slots match in-flight tasks, counters match the queue, event sequences have no gaps. At the
end (after draining): every task is terminal with exactly one terminal event.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import text

from conveyor.events.v1 import events_pb2
from conveyor.tasks.v1 import task_pb2
from conveyor_common.errors import FailedPrecondition, NotFound, ResourceExhausted
from conveyor_common.kafka import Envelope
from conveyor_scheduler.app import SchedulerApp
from conveyor_scheduler.results.consumer import results_handler
from conveyor_testkit import scheduler as kit

pytestmark = [pytest.mark.integration, pytest.mark.postgres, pytest.mark.slow]

SEED = int(os.environ.get("SCHEDULER_PROPERTY_SEED", "20261123"))
ROUNDS = int(os.environ.get("SCHEDULER_PROPERTY_ROUNDS", "120"))
OPS_PER_ROUND = 20
TENANTS = ["t0", "t1", "t2", "t3", "t4"]
TIER = {"t0": 1, "t1": 1, "t2": 2, "t3": 3, "t4": 1}
"""A tenant's token always claims the same tier (a changing tier would change its limit)."""
MODELS = ["m/a", "m/b", "m/c"]
LIMITS = {
    "global_concurrency": 6,
    "tier_concurrency": {"free": 3, "premium": 4, "pro": 5},
    "kind_cost": {"video": 2, "image": 1, "text": 1, "audio": 1},
    "kind_limits": {"video": 4},
    "model_limits": {"m/a": 3},
    "queue_capacity": 400,
    "tenant_max_waiting": 120,
    "retry_base_seconds": 0.01,
    "retry_max_seconds": 0.05,
    "dispatch_poll_seconds": 0.05,
    "maintenance_seconds": 5.0,
}


# Test instrumentation: every transaction that inserts slots checks every limit before it commits
# and records a violation in the same transaction, so a committed over-admission is seen even if
# the slots were released again before the next round's snapshot check.
_WATCH_SQL = [
    "CREATE TABLE IF NOT EXISTS test_limit_violations (at timestamptz DEFAULT now(), what text)",
    """
    CREATE OR REPLACE FUNCTION test_check_limits() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      INSERT INTO test_limit_violations (what)
      SELECT 'global ' || sum(cost) FROM active_slots HAVING sum(cost) > 6
      UNION ALL
      SELECT 'tenant ' || s.tenant_id || ' ' || sum(s.cost) FROM active_slots s
        JOIN tenants t USING (tenant_id)
        GROUP BY s.tenant_id, t.claimed_tier
        HAVING sum(s.cost) > CASE COALESCE(t.claimed_tier, 1) WHEN 1 THEN 3 WHEN 2 THEN 4 ELSE 5 END
      UNION ALL
      SELECT 'model m/a ' || sum(cost) FROM active_slots WHERE model = 'm/a' HAVING sum(cost) > 3
      UNION ALL
      SELECT 'kind video ' || sum(cost) FROM active_slots WHERE kind = 1 HAVING sum(cost) > 4;
      RETURN NULL;
    END $$
    """,
    "DROP TRIGGER IF EXISTS test_check_limits ON active_slots",
    "CREATE TRIGGER test_check_limits AFTER INSERT ON active_slots"
    " FOR EACH STATEMENT EXECUTE FUNCTION test_check_limits()",
]


@pytest.fixture
async def replicas(database_url: str) -> AsyncIterator[list[SchedulerApp]]:
    await kit.migrate(database_url)
    apps = [
        SchedulerApp(
            kit.make_settings(database_url, instance_id=f"prop-{i}", **LIMITS),
            kafka=False,
            grpc=False,
        )
        for i in range(3)
    ]
    await kit.reset(apps[0].engine)
    async with apps[0].engine.begin() as conn:
        for sql in _WATCH_SQL:
            await conn.execute(text(sql))
        await conn.execute(text("TRUNCATE test_limit_violations"))
    for app in apps:
        await app.start()
    try:
        yield apps
    finally:
        for app in apps:
            await app.stop()


def _envelope(result: events_pb2.ProviderResult) -> Envelope:
    return Envelope(
        id=result.result_id,
        type="conveyor.events.v1.ProviderResult",
        source="/services/provider-adapter",
        subject=result.task_id,
        time="",
        traceparent=None,
        key=result.task_id,
        message=result,
        topic="conveyor.provider.v1.results",
    )


async def _kill_leader(app: SchedulerApp) -> None:
    async with app.engine.begin() as conn:
        await conn.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name LIKE 'conveyor-scheduler-leader:%'"
            )
        )


async def test_random_interleavings_keep_every_invariant(replicas: list[SchedulerApp]) -> None:
    rng = random.Random(SEED)
    handlers = [results_handler(app.core) for app in replicas]
    engine = replicas[0].engine
    policy = replicas[0].core.policy
    sent: list[events_pb2.ProviderResult] = []
    request_ids: list[tuple[str, str, int]] = []
    stats = {"ops": 0, "rejected": 0, "dup_submits": 0, "kills": 0, "results": 0}
    max_seen = {"global": 0, "tenant": 0, "model": 0, "kind": 0}
    logging.getLogger("conveyor_scheduler").setLevel(logging.ERROR)
    started = time.monotonic()

    async def in_flight() -> list[tuple[uuid.UUID, int, int, int]]:
        async with engine.connect() as conn:
            rows = await conn.execute(
                text("SELECT id, attempt, status, submit_state FROM tasks WHERE status IN (2, 3)")
            )
            return [(r.id, r.attempt, r.status, r.submit_state) for r in rows]

    async def any_task() -> uuid.UUID | None:
        async with engine.connect() as conn:
            found: uuid.UUID | None = await conn.scalar(
                text("SELECT id FROM tasks ORDER BY random() LIMIT 1")
            )
            return found

    async def op(i: int, flights: list[tuple[uuid.UUID, int, int, int]]) -> None:
        app = replicas[i % len(replicas)]
        core = app.core
        handle = handlers[i % len(handlers)]
        roll = rng.random()
        try:
            if roll < 0.30 or not flights:
                tenant = rng.choice(TENANTS)
                if request_ids and rng.random() < 0.15:
                    t, rid, seed = rng.choice(request_ids)
                    stats["dup_submits"] += 1
                    await core.submit(t, TIER[t], [kit.item(rid, prompt=str(seed))])
                    return
                kind = rng.choice([1, 2, 2, 3])
                seed = rng.randrange(1 << 30)
                rid = uuid.uuid4().hex
                request_ids.append((tenant, rid, seed))
                await core.submit(
                    tenant,
                    TIER[tenant],
                    [
                        kit.item(
                            rid,
                            kind=kind,
                            model=rng.choice(MODELS),
                            priority=rng.choice([1, 2, 3, 4]),
                            max_attempts=rng.choice([1, 2, 3]),
                            prompt=str(seed),
                        )
                    ],
                )
            elif roll < 0.36:
                task = await any_task()
                if task is not None:
                    await core.cancel(None, str(task), "random")
            elif roll < 0.40 and sent:
                stats["results"] += 1
                await handle(_envelope(rng.choice(sent)))  # a redelivered result
            else:
                task_id, attempt, _status, submit_state = rng.choice(flights)
                if rng.random() < 0.05:
                    attempt -= 1  # a stale attempt's result
                choice = rng.random()
                if submit_state == 1 and choice < 0.5:
                    decision, _ = await core.begin_submit(str(task_id), attempt)
                    if decision == 1 and rng.random() < 0.7:
                        await core.complete_submit(str(task_id), attempt, f"p-{task_id}-{attempt}")
                    return
                outcome = rng.choices(
                    ["started", "progress", "succeeded", "failed", "canceled", "aborted"],
                    weights=[2, 2, 5, 3, 1, 1],
                )[0]
                extra: dict[str, object] = {}
                if outcome == "failed":
                    extra["retryable"] = rng.random() < 0.7
                if outcome == "progress":
                    extra["percent"] = rng.randrange(1, 100)
                res = kit.result(task_id, attempt, outcome, **extra)
                sent.append(res)
                stats["results"] += 1
                await handle(_envelope(res))
        except ResourceExhausted:
            stats["rejected"] += 1
        except (NotFound, FailedPrecondition):
            pass

    for round_no in range(ROUNDS):
        flights = await in_flight()
        await asyncio.gather(
            *(op(round_no * OPS_PER_ROUND + j, flights) for j in range(OPS_PER_ROUND))
        )
        stats["ops"] += OPS_PER_ROUND
        if round_no % 40 == 39:
            stats["kills"] += 1
            await _kill_leader(replicas[0])
        await asyncio.sleep(0.01)
        seen = await kit.check_invariants(engine, policy)
        for k, v in seen.items():
            max_seen[k] = max(max_seen[k], v)

    # Drain: the adapter completes everything in flight until the queue is empty.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        flights = await in_flight()
        async with engine.connect() as conn:
            queued = await conn.scalar(text("SELECT count(*) FROM tasks WHERE status = 1"))
        if not flights and not queued:
            break
        for task_id, attempt, _, _ in flights:
            await handlers[0](_envelope(kit.result(task_id, attempt, "succeeded")))
        await asyncio.sleep(0.05)
        seen = await kit.check_invariants(engine, policy)
        for k, v in seen.items():
            max_seen[k] = max(max_seen[k], v)
    async with engine.connect() as conn:
        open_tasks = await conn.scalar(text("SELECT count(*) FROM tasks WHERE status IN (1, 2, 3)"))
        total = await conn.scalar(text("SELECT count(*) FROM tasks"))
        by_status: dict[int, int] = dict(
            (await conn.execute(text("SELECT status, count(*) FROM tasks GROUP BY status"))).all()
        )
        violations = (
            await conn.execute(text("SELECT what FROM test_limit_violations LIMIT 5"))
        ).all()
        watched = await conn.scalar(
            text("SELECT count(*) FROM pg_trigger WHERE tgname = 'test_check_limits'")
        )
        leaders = await conn.scalar(
            text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
                " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            )
        )
    await kit.check_invariants(engine, policy)
    print(
        f"\nproperty: seed={SEED} ops={stats['ops']} tasks={total} by_status={by_status}"
        f" rejected={stats['rejected']} dup_submits={stats['dup_submits']}"
        f" results={stats['results']} leader_kills={stats['kills']} max_observed={max_seen}"
        f" limits(global={policy.global_concurrency}) elapsed={time.monotonic() - started:.1f}s"
        f" at={datetime.now(UTC):%H:%M:%S}"
    )
    assert watched == 1
    assert violations == [], violations  # no dispatch transaction ever committed an excess
    assert open_tasks == 0
    assert leaders == 1
    assert max_seen["global"] <= policy.global_concurrency
    assert max_seen["global"] >= policy.global_concurrency - 2  # the limits were actually exercised
    assert by_status.get(4, 0) > 0
    assert task_pb2.TASK_STATUS_SUCCEEDED == 4
