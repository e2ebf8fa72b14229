"""The scheduler's gRPC API over real loopback gRPC and PostgreSQL: statuses with details, tenant
scoping, the admin role, the submit protocol service, event-driven dispatch, and /metrics names.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.rpc import status_pb2
from grpc_status import rpc_status
from sqlalchemy import text

from conveyor.scheduler.v1 import delivery_coordination_service_pb2 as delivery_pb2
from conveyor.scheduler.v1 import delivery_coordination_service_pb2_grpc as delivery_grpc
from conveyor.scheduler.v1 import provider_coordination_service_pb2 as provider_pb2
from conveyor.scheduler.v1 import provider_coordination_service_pb2_grpc as provider_grpc
from conveyor.scheduler.v1 import scheduler_service_pb2 as pb
from conveyor.scheduler.v1 import scheduler_service_pb2_grpc as pb_grpc
from conveyor.tasks.v1 import admin_service_pb2, task_pb2, task_service_pb2
from conveyor_common.errors import unpack_details
from conveyor_devstack.postgres import PostgresServer
from conveyor_scheduler import testing as kit
from conveyor_scheduler.api.servicer import SchedulerServicer
from conveyor_scheduler.app import SchedulerApp
from conveyor_scheduler.webhooks.settings import WebhookPolicy, WebhookSettings

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

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


def _details(err: grpc.aio.AioRpcError) -> dict[str, Any]:
    status = rpc_status.from_call(err)
    assert status is not None
    return unpack_details(status)


def _submit(request_id: str, **kwargs: Any) -> pb.SchedulerServiceSubmitTaskRequest:
    return pb.SchedulerServiceSubmitTaskRequest(
        principal=TENANT,
        request=task_service_pb2.SubmitTaskRequest(request_id=request_id, spec=kit.spec(**kwargs)),
    )


async def test_submit_dispatches_at_once_and_protocol(stubs: Any, app: SchedulerApp) -> None:
    sched, coord = stubs
    started = time.perf_counter()
    got: Any = None
    resp = await sched.SubmitTask(_submit("g-1"))
    task_id = resp.response.task.task_id
    assert resp.response.task.status == task_pb2.TASK_STATUS_QUEUED
    assert resp.response.task.tier == task_pb2.TIER_PRO
    # Event-driven: the leader (this replica) dispatches within milliseconds, not a poll period.
    for _ in range(200):
        got = await sched.GetTask(
            pb.SchedulerServiceGetTaskRequest(
                principal=TENANT, request=task_service_pb2.GetTaskRequest(task_id=task_id)
            )
        )
        if got.response.task.status == task_pb2.TASK_STATUS_DISPATCHED:
            break
        await asyncio.sleep(0.005)
    assert got.response.task.status == task_pb2.TASK_STATUS_DISPATCHED
    assert time.perf_counter() - started < 0.5
    again = await sched.SubmitTask(_submit("g-1"))
    assert again.response.deduplicated
    assert again.response.task.task_id == task_id

    begin = await coord.BeginSubmit(
        provider_pb2.BeginSubmitRequest(task_id=task_id, attempt=1, adapter_id="a1")
    )
    assert begin.decision == provider_pb2.SUBMIT_DECISION_PROCEED
    dup = await coord.BeginSubmit(
        provider_pb2.BeginSubmitRequest(task_id=task_id, attempt=1, adapter_id="a2")
    )
    assert dup.decision == provider_pb2.SUBMIT_DECISION_RECONCILE
    assert dup.HasField("submit_started_at")
    done = await coord.CompleteSubmit(
        provider_pb2.CompleteSubmitRequest(task_id=task_id, attempt=1, prediction_id="pred-x")
    )
    assert done.accepted
    flight = await coord.ListInFlight(provider_pb2.ListInFlightRequest())
    mine = [a for a in flight.attempts if a.task_id == task_id]
    assert mine[0].state == provider_pb2.SUBMIT_STATE_SUBMITTED
    assert mine[0].prediction_id == "pred-x"
    assert mine[0].HasField("run_deadline")
    stale = await coord.BeginSubmit(provider_pb2.BeginSubmitRequest(task_id=task_id, attempt=7))
    assert stale.decision == provider_pb2.SUBMIT_DECISION_STOP

    events = await sched.GetTaskEvents(pb.GetTaskEventsRequest(principal=TENANT, task_id=task_id))
    assert [e.type for e in events.events] == [
        task_pb2.TASK_EVENT_TYPE_SUBMITTED,
        task_pb2.TASK_EVENT_TYPE_DISPATCHED,
        task_pb2.TASK_EVENT_TYPE_STARTED,
    ]
    assert not events.terminal
    assert events.last_sequence == 3

    cancel = await sched.CancelTask(
        pb.SchedulerServiceCancelTaskRequest(
            principal=TENANT,
            request=task_service_pb2.CancelTaskRequest(task_id=task_id, reason="r"),
        )
    )
    assert cancel.response.task.status == task_pb2.TASK_STATUS_RUNNING

    stats = await sched.GetQueueStats(
        pb.SchedulerServiceGetQueueStatsRequest(
            principal=TENANT, request=task_service_pb2.GetQueueStatsRequest()
        )
    )
    totals = [
        s for s in stats.response.stats if s.model == "" and s.kind == task_pb2.TASK_KIND_IMAGE
    ]
    assert totals[0].active >= 1


async def test_errors_have_details_and_write_nothing(stubs: Any) -> None:
    sched, coord = stubs
    bad = pb.SchedulerServiceSubmitTaskRequest(
        principal=TENANT,
        request=task_service_pb2.SubmitTaskRequest(request_id="", spec=task_pb2.TaskSpec()),
    )
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await sched.SubmitTask(bad)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = {v.field for v in _details(exc.value)["BadRequest"].field_violations}
    assert {"request.request_id", "request.spec.kind", "request.spec.target"} <= fields

    own = await sched.SubmitTask(_submit(f"own-{uuid.uuid4()}"))
    for principal, task_id in ((OTHER, own.response.task.task_id), (TENANT, str(uuid.uuid4()))):
        with pytest.raises(grpc.aio.AioRpcError) as nf:
            await sched.GetTask(
                pb.SchedulerServiceGetTaskRequest(
                    principal=principal, request=task_service_pb2.GetTaskRequest(task_id=task_id)
                )
            )
        assert nf.value.code() == grpc.StatusCode.NOT_FOUND
        assert _details(nf.value)["ResourceInfo"].resource_type == "task"

    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await sched.PauseModel(
            pb.SchedulerServicePauseModelRequest(
                principal=TENANT, request=admin_service_pb2.PauseModelRequest(model="acme/img")
            )
        )
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED

    with pytest.raises(grpc.aio.AioRpcError) as proto_bad:
        await coord.BeginSubmit(provider_pb2.BeginSubmitRequest(task_id="", attempt=0))
    assert proto_bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_admission_status_and_admin_calls(stubs: Any) -> None:
    sched, _ = stubs
    up = await sched.UpsertTenant(
        pb.SchedulerServiceUpsertTenantRequest(
            principal=ADMIN,
            request=admin_service_pb2.UpsertTenantRequest(
                tenant_id="capped",
                tier=task_pb2.TIER_PREMIUM,
                limits=task_pb2.TenantLimits(max_waiting=1, weight=3),
            ),
        )
    )
    assert up.response.tenant.effective_limits.max_waiting == 1
    assert up.response.tenant.effective_limits.weight == 3
    assert up.response.tenant.effective_limits.max_concurrency == 5  # premium default
    capped = pb.Principal(tenant_id="capped", tier=task_pb2.TIER_FREE)
    paused = await sched.PauseModel(
        pb.SchedulerServicePauseModelRequest(
            principal=ADMIN, request=admin_service_pb2.PauseModelRequest(model="acme/hold")
        )
    )
    assert paused.response.paused
    first = await sched.SubmitTask(
        pb.SchedulerServiceSubmitTaskRequest(
            principal=capped,
            request=task_service_pb2.SubmitTaskRequest(
                request_id="c1", spec=kit.spec(model="acme/hold")
            ),
        )
    )
    assert first.response.task.tier == task_pb2.TIER_PREMIUM  # the stored tier wins
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await sched.SubmitTask(
            pb.SchedulerServiceSubmitTaskRequest(
                principal=capped,
                request=task_service_pb2.SubmitTaskRequest(
                    request_id="c2", spec=kit.spec(model="acme/hold")
                ),
            )
        )
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = _details(exc.value)
    assert details["QuotaFailure"].violations[0].subject == "tenant:capped/waiting"
    assert details["RetryInfo"].retry_delay.seconds >= 1
    listed = await sched.ListTasks(
        pb.SchedulerServiceListTasksRequest(
            principal=capped, request=task_service_pb2.ListTasksRequest()
        )
    )
    assert [t.request_id for t in listed.response.tasks] == ["c1"]
    got = await sched.GetTask(
        pb.SchedulerServiceGetTaskRequest(
            principal=capped,
            request=task_service_pb2.GetTaskRequest(task_id=first.response.task.task_id),
        )
    )
    assert got.response.task.queue_position >= 1
    bulk = await sched.BulkCancelTasks(
        pb.SchedulerServiceBulkCancelTasksRequest(
            principal=ADMIN,
            request=admin_service_pb2.BulkCancelTasksRequest(
                selector=admin_service_pb2.BulkSelector(tenant_id="capped"), reason="cleanup"
            ),
        )
    )
    assert list(bulk.response.task_ids) == [first.response.task.task_id]
    tenant = await sched.GetTenant(
        pb.SchedulerServiceGetTenantRequest(
            principal=ADMIN, request=admin_service_pb2.GetTenantRequest(tenant_id="capped")
        )
    )
    assert tenant.response.tenant.tier == task_pb2.TIER_PREMIUM
    dead = await sched.ListDeadLetters(
        pb.SchedulerServiceListDeadLettersRequest(
            principal=ADMIN, request=admin_service_pb2.ListDeadLettersRequest()
        )
    )
    assert list(dead.response.tasks) == []


async def test_metrics_are_exposed(app: SchedulerApp) -> None:
    from prometheus_client import generate_latest

    text = generate_latest(app.registry).decode()
    for name in (
        "conveyor_scheduler_leader",
        "conveyor_scheduler_dispatched_total",
        "conveyor_scheduler_queue_wait_seconds",
        "conveyor_scheduler_admission_rejections_total",
        "conveyor_scheduler_outbox_lag_seconds",
    ):
        assert name in text
    assert app.registry.get_sample_value("conveyor_scheduler_leader") == 1.0


async def test_webhook_rpcs_and_delivery_service_are_mounted(stubs: Any, app: SchedulerApp) -> None:
    from conveyor.tasks.v1 import webhook_service_pb2

    sched, _ = stubs
    listed = await sched.ListWebhookEndpoints(
        pb.SchedulerServiceListWebhookEndpointsRequest(
            principal=TENANT, request=webhook_service_pb2.ListWebhookEndpointsRequest()
        )
    )
    assert list(listed.response.endpoints) == []
    assert app.server is not None
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.server.port}")
    try:
        claimed = await delivery_grpc.DeliveryCoordinationServiceStub(channel).ClaimDeliveries(
            delivery_pb2.ClaimDeliveriesRequest(worker_id="w1", max_deliveries=10, lease_seconds=30)
        )
    finally:
        await channel.close()
    assert list(claimed.deliveries) == []


def _with_webhook(request_id: str, url: str) -> task_service_pb2.SubmitTaskRequest:
    spec = kit.spec()
    spec.webhook.url = url
    return task_service_pb2.SubmitTaskRequest(request_id=request_id, spec=spec)


async def _written(app: SchedulerApp, *request_ids: str) -> int:
    async with app.core.engine.connect() as conn:
        return int(
            await conn.scalar(
                text("SELECT count(*) FROM tasks WHERE request_id = ANY(:ids)"),
                {"ids": list(request_ids)},
            )
        )


@pytest.mark.parametrize(
    "url",
    [
        "https://10.1.2.3/hook",  # private
        "https://127.0.0.1:8443/hook",  # loopback literal
        "https://localhost/hook",  # resolves (in a thread) to loopback
        "https://[::1]/hook",
        "http://93.184.216.34/hook",  # public, but not https
    ],
)
async def test_submit_refuses_a_webhook_url_the_ssrf_policy_refuses(
    stubs: Any, app: SchedulerApp, url: str
) -> None:
    sched, _ = stubs
    rid = f"wh-{uuid.uuid4()}"
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await sched.SubmitTask(
            pb.SchedulerServiceSubmitTaskRequest(principal=TENANT, request=_with_webhook(rid, url))
        )
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = [v.field for v in _details(exc.value)["BadRequest"].field_violations]
    assert fields == ["request.spec.webhook.url"]

    ok = f"wh-ok-{uuid.uuid4()}"
    batch = pb.SchedulerServiceBatchSubmitTasksRequest(
        principal=TENANT,
        request=task_service_pb2.BatchSubmitTasksRequest(
            items=[
                task_service_pb2.BatchSubmitItem(request_id=r.request_id, spec=r.spec)
                for r in (_with_webhook(ok, "https://93.184.216.34/hook"), _with_webhook(rid, url))
            ]
        ),
    )
    with pytest.raises(grpc.aio.AioRpcError) as bexc:
        await sched.BatchSubmitTasks(batch)
    assert bexc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = [v.field for v in _details(bexc.value)["BadRequest"].field_violations]
    assert fields == ["request.items[1].spec.webhook.url"]
    assert await _written(app, rid, ok) == 0  # nothing written, not even the good item


async def test_submit_accepts_public_and_allow_listed_webhook_urls(
    stubs: Any, app: SchedulerApp
) -> None:
    sched, _ = stubs
    rid = f"wh-pub-{uuid.uuid4()}"
    resp = await sched.SubmitTask(
        pb.SchedulerServiceSubmitTaskRequest(
            principal=TENANT, request=_with_webhook(rid, "https://93.184.216.34/h")
        )
    )
    assert resp.response.task.spec.webhook.url == "https://93.184.216.34/h"
    # SCHEDULER_WEBHOOK_ALLOW_HOSTS exempts a host (and allows http to it).
    servicer = SchedulerServicer(app.core)
    servicer.webhook_policy = WebhookPolicy(WebhookSettings(allow_hosts=["127.0.0.1"]))
    local = f"wh-local-{uuid.uuid4()}"
    request = pb.SchedulerServiceSubmitTaskRequest(
        principal=TENANT, request=_with_webhook(local, "http://127.0.0.1:8080/hook")
    )
    got = await servicer.SubmitTask(request, None)  # type: ignore[arg-type]
    assert got.response.task.spec.webhook.url == "http://127.0.0.1:8080/hook"
    assert await _written(app, rid, local) == 2


async def test_submit_task_group_decides_each_item_alone(stubs: Any, app: SchedulerApp) -> None:
    """One SubmitTaskGroup call: admitted, deduplicated, reused key, quota and invalid items each
    get what a lone SubmitTask would; a refused item writes nothing and fails no other item."""
    sched, _ = stubs
    await sched.UpsertTenant(
        pb.SchedulerServiceUpsertTenantRequest(
            principal=ADMIN,
            request=admin_service_pb2.UpsertTenantRequest(
                tenant_id="grp-capped", limits=task_pb2.TenantLimits(max_waiting=1)
            ),
        )
    )
    capped = pb.Principal(tenant_id="grp-capped", tier=task_pb2.TIER_FREE)
    first = await sched.SubmitTask(_submit("grp-dup"))
    bad = _submit("grp-bad")
    bad.request.spec.model = "no-owner"
    items = [
        _submit("grp-new-1"),
        _submit("grp-dup"),  # same body: the earlier task, deduplicated
        _submit("grp-dup", prompt="another body"),  # same key, other body: refused
        pb.SchedulerServiceSubmitTaskRequest(
            principal=capped,
            request=task_service_pb2.SubmitTaskRequest(request_id="cap-1", spec=kit.spec()),
        ),
        pb.SchedulerServiceSubmitTaskRequest(
            principal=capped,
            request=task_service_pb2.SubmitTaskRequest(request_id="cap-2", spec=kit.spec()),
        ),
        bad,
        _submit("grp-new-2"),
    ]
    resp = await sched.SubmitTaskGroup(pb.SubmitTaskGroupRequest(items=items))
    kinds = [o.WhichOneof("outcome") for o in resp.outcomes]
    assert kinds == ["response", "response", "status", "response", "status", "status", "response"]
    new1, dup, reused, cap1, capped2, invalid, new2 = resp.outcomes
    assert not new1.response.deduplicated
    assert new1.response.task.request_id == "grp-new-1"
    assert dup.response.deduplicated
    assert dup.response.task.task_id == first.response.task.task_id
    assert cap1.response.task.tenant_id == "grp-capped"

    def status(outcome: Any) -> tuple[int, dict[str, Any]]:
        st = status_pb2.Status.FromString(outcome.status)
        return st.code, unpack_details(st)

    code, details = status(reused)
    assert code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert details["ErrorInfo"].reason == "IDEMPOTENCY_KEY_REUSED"
    code, details = status(capped2)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert details["QuotaFailure"].violations[0].subject == "tenant:grp-capped/waiting"
    assert details["RetryInfo"].retry_delay.seconds >= 1
    code, details = status(invalid)
    assert code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert [v.field for v in details["BadRequest"].field_violations] == ["request.spec.target"]
    # FIFO within the tenant: the group's items are enqueued in request order.
    assert new1.response.task.created_at.ToDatetime() <= new2.response.task.created_at.ToDatetime()
    async with app.engine.connect() as conn:
        rows = (
            await conn.execute(
                text("SELECT request_id FROM tasks WHERE request_id = ANY(:r) ORDER BY request_id"),
                {"r": ["cap-2", "grp-bad", "grp-new-1", "grp-new-2", "cap-1", "grp-dup"]},
            )
        ).all()
        keys = (
            await conn.execute(
                text(
                    "SELECT count(*) FROM idempotency_keys WHERE request_id IN ('cap-2', 'grp-bad')"
                )
            )
        ).scalar_one()
    assert [r[0] for r in rows] == ["cap-1", "grp-dup", "grp-new-1", "grp-new-2"]
    assert keys == 0


async def test_submit_task_group_refuses_an_oversized_group(stubs: Any) -> None:
    sched, _ = stubs
    items = [_submit(f"big-{i}") for i in range(10_001)]
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await sched.SubmitTaskGroup(pb.SubmitTaskGroupRequest(items=items), timeout=30)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in _details(exc.value)["BadRequest"].field_violations] == ["items"]


async def test_a_database_outage_answers_unavailable_never_internal(
    stubs: Any, app: SchedulerApp, devstack_postgres: PostgresServer
) -> None:
    """While PostgreSQL is down every RPC answers UNAVAILABLE with RetryInfo (safe to retry with
    the same request id); after the restart the same submit goes through once."""
    sched, _ = stubs
    before = await sched.SubmitTask(_submit("outage-before"), timeout=10)
    task_id = before.response.task.task_id
    await devstack_postgres.stop_async("immediate")
    try:
        calls: dict[str, Callable[[], Awaitable[Any]]] = {
            "SubmitTask": lambda: sched.SubmitTask(_submit("outage-1"), timeout=10),
            "SubmitTaskGroup": lambda: sched.SubmitTaskGroup(
                pb.SubmitTaskGroupRequest(items=[_submit("outage-2")]), timeout=10
            ),
            "GetTask": lambda: sched.GetTask(
                pb.SchedulerServiceGetTaskRequest(
                    principal=TENANT, request=task_service_pb2.GetTaskRequest(task_id=task_id)
                ),
                timeout=10,
            ),
            "GetTaskEvents": lambda: sched.GetTaskEvents(
                pb.GetTaskEventsRequest(principal=TENANT, task_id=task_id), timeout=10
            ),
            "CancelTask": lambda: sched.CancelTask(
                pb.SchedulerServiceCancelTaskRequest(
                    principal=TENANT,
                    request=task_service_pb2.CancelTaskRequest(task_id=task_id),
                ),
                timeout=10,
            ),
        }
        for name, call in calls.items():
            if name == "SubmitTaskGroup":  # per-item outcomes: the item carries its status
                response = await call()
                item = status_pb2.Status.FromString(response.outcomes[0].status)
                assert item.code == grpc.StatusCode.UNAVAILABLE.value[0], item.message
                assert "RetryInfo" in unpack_details(item)
                continue
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, (name, info.value.details())
            assert "RetryInfo" in _details(info.value), name
    finally:
        await devstack_postgres.start_async()
    for _ in range(50):  # the pool notices the restart on its next checkout (pre-ping)
        try:
            again = await sched.SubmitTask(_submit("outage-1"), timeout=10)
            break
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            await asyncio.sleep(0.2)
    else:
        raise AssertionError("the scheduler did not recover after the restart")
    assert again.response.task.task_id
    repeat = await sched.SubmitTask(_submit("outage-1"), timeout=10)
    assert repeat.response.task.task_id == again.response.task.task_id
