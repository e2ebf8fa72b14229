"""Shared fixtures of the scheduler's integration tests (loaded as a plugin by tests/conftest.py).

* ``sched_url``: a migrated database for the module; ``make_env(lead=False, **settings)``: a
  :class:`Env` (a SchedulerCore with a Dispatcher driven by hand, so each test controls exactly when
  dispatch happens), leading if asked;
* ``app`` / ``stubs``: one in-process scheduler replica with its gRPC stubs, for the API tests;
* helpers: :func:`drain`, :func:`details`, :func:`submit_request` and three principals.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from grpc_status import rpc_status
from sqlalchemy import text

from conveyor.scheduler.v1 import provider_coordination_service_pb2_grpc as provider_grpc
from conveyor.scheduler.v1 import scheduler_service_pb2 as pb
from conveyor.scheduler.v1 import scheduler_service_pb2_grpc as pb_grpc
from conveyor.tasks.v1 import task_pb2, task_service_pb2
from conveyor_common.errors import unpack_details
from conveyor_scheduler.app import SchedulerApp
from conveyor_scheduler.core import SchedulerCore
from conveyor_scheduler.dispatch.cycle import Dispatcher
from conveyor_scheduler.dispatch.leadership import Leader
from conveyor_scheduler.dispatch.wakeups import Wakeups
from conveyor_scheduler.store import db
from conveyor_testkit import scheduler as kit


@pytest.fixture(scope="module")
async def sched_url(database_url: str) -> str:
    await kit.migrate(database_url)
    return database_url


@dataclass
class Env:
    core: SchedulerCore
    dispatcher: Dispatcher
    leader: Leader

    async def dispatch(self) -> int:
        return await self.dispatcher.cycle()

    async def scalar(self, sql: str, **params: Any) -> Any:
        async with self.core.engine.connect() as conn:
            return await conn.scalar(text(sql), params)

    async def rows(self, sql: str, **params: Any) -> list[Any]:
        async with self.core.engine.connect() as conn:
            return list((await conn.execute(text(sql), params)).all())

    async def task(self, task_id: Any) -> dict[str, Any]:
        async with self.core.engine.connect() as conn:
            row = (
                (await conn.execute(text("SELECT * FROM tasks WHERE id = :id"), {"id": task_id}))
                .mappings()
                .one()
            )
            return dict(row)

    async def check(self) -> dict[str, int]:
        return await kit.check_invariants(self.core.engine, self.core.policy)


@pytest.fixture
async def make_env(sched_url: str) -> AsyncIterator[Callable[..., Awaitable[Env]]]:
    envs: list[Env] = []

    async def make(lead: bool = False, **overrides: Any) -> Env:
        settings = kit.make_settings(sched_url, **overrides)
        engine = db.create_engine(sched_url, pool_size=5)
        if not envs:
            await kit.reset(engine)
        core = SchedulerCore(engine, settings, wakeups=Wakeups())
        leader = Leader(settings, sched_url, f"test-{len(envs)}")
        env = Env(core, Dispatcher(settings, core.policy, leader, core.wakeups), leader)
        envs.append(env)
        if lead:
            assert await leader.try_acquire()
        return env

    yield make
    for env in envs:
        await env.leader.dispose()
        await env.core.engine.dispose()


async def drain(env: Env, rounds: int = 50) -> list[Any]:
    """Dispatch and complete until nothing is left, checking every limit after each step.

    Returns the dispatched (task id, slot cost) in dispatch order.
    """
    order: list[Any] = []
    for _ in range(rounds):
        await env.dispatch()
        await env.check()
        rows = await env.rows(
            "SELECT s.task_id, s.attempt, s.cost FROM active_slots s ORDER BY s.acquired_at"
        )
        order += [(r.task_id, r.cost) for r in rows if (r.task_id, r.cost) not in order]
        if not rows:
            if await env.scalar("SELECT count(*) FROM tasks WHERE status = 1") == 0:
                break
            continue
        await env.core.apply_results([kit.result(r.task_id, r.attempt, "succeeded") for r in rows])
    return order


TENANT = pb.Principal(tenant_id="acme", tier=task_pb2.TIER_PRO, role=pb.ROLE_TENANT)


OTHER = pb.Principal(tenant_id="other", tier=task_pb2.TIER_FREE, role=pb.ROLE_TENANT)


ADMIN = pb.Principal(tenant_id="ops", role=pb.ROLE_ADMIN)


@pytest.fixture(scope="module")
async def app(database_url: str) -> AsyncIterator[SchedulerApp]:
    await kit.migrate(database_url)
    settings = kit.make_settings(
        database_url, global_concurrency=2, queue_capacity=50, instance_id="grpc-test"
    )
    app = SchedulerApp(settings, kafka=False)
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


@pytest.fixture(scope="module")
async def stubs(
    app: SchedulerApp,
) -> AsyncIterator[
    tuple[pb_grpc.SchedulerServiceStub, provider_grpc.ProviderCoordinationServiceStub]
]:
    assert app.server is not None
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.server.port}")
    try:
        yield (
            pb_grpc.SchedulerServiceStub(channel),
            provider_grpc.ProviderCoordinationServiceStub(channel),
        )
    finally:
        await channel.close()


def details(err: grpc.aio.AioRpcError) -> dict[str, Any]:
    status = rpc_status.from_call(err)
    assert status is not None
    return unpack_details(status)


def submit_request(request_id: str, **kwargs: Any) -> pb.SchedulerServiceSubmitTaskRequest:
    return pb.SchedulerServiceSubmitTaskRequest(
        principal=TENANT,
        request=task_service_pb2.SubmitTaskRequest(request_id=request_id, spec=kit.spec(**kwargs)),
    )
