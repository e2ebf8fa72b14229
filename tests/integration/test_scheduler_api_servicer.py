"""conveyor_scheduler.api.servicer over real loopback gRPC and PostgreSQL: statuses with details,
tenant scoping, admin calls, metrics, the mounted webhook and delivery services, and a database
outage answered UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.rpc import status_pb2

from conveyor.scheduler.v1 import delivery_coordination_service_pb2 as delivery_pb2
from conveyor.scheduler.v1 import delivery_coordination_service_pb2_grpc as delivery_grpc
from conveyor.scheduler.v1 import provider_coordination_service_pb2 as provider_pb2
from conveyor.scheduler.v1 import scheduler_service_pb2 as pb
from conveyor.tasks.v1 import admin_service_pb2, task_pb2, task_service_pb2
from conveyor_common.errors import unpack_details
from conveyor_devstack.postgres import PostgresServer
from conveyor_scheduler.app import SchedulerApp
from conveyor_testkit import scheduler as kit
from tests.integration.scheduler_env import ADMIN, OTHER, TENANT, details, submit_request

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


async def test_submit_dispatches_at_once_and_protocol(stubs: Any, app: SchedulerApp) -> None:
    sched, coord = stubs
    started = time.perf_counter()
    got: Any = None
    resp = await sched.SubmitTask(submit_request("g-1"))
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
    again = await sched.SubmitTask(submit_request("g-1"))
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
    fields = {v.field for v in details(exc.value)["BadRequest"].field_violations}
    assert {"request_id", "spec.kind", "spec.target"} <= fields

    own = await sched.SubmitTask(submit_request(f"own-{uuid.uuid4()}"))
    for principal, task_id in ((OTHER, own.response.task.task_id), (TENANT, str(uuid.uuid4()))):
        with pytest.raises(grpc.aio.AioRpcError) as nf:
            await sched.GetTask(
                pb.SchedulerServiceGetTaskRequest(
                    principal=principal, request=task_service_pb2.GetTaskRequest(task_id=task_id)
                )
            )
        assert nf.value.code() == grpc.StatusCode.NOT_FOUND
        assert details(nf.value)["ResourceInfo"].resource_type == "task"

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
            principal=ADMIN,
            request=admin_service_pb2.PauseModelRequest(model="acme/hold", allow_unknown=True),
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
    refusal = details(exc.value)
    assert refusal["QuotaFailure"].violations[0].subject == "tenant:capped/waiting"
    assert refusal["RetryInfo"].retry_delay.seconds >= 1
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


async def test_a_database_outage_answers_unavailable_never_internal(
    stubs: Any, app: SchedulerApp, devstack_postgres: PostgresServer
) -> None:
    """While PostgreSQL is down every RPC answers UNAVAILABLE with RetryInfo (safe to retry with
    the same request id); after the restart the same submit goes through once."""
    sched, _ = stubs
    before = await sched.SubmitTask(submit_request("outage-before"), timeout=10)
    task_id = before.response.task.task_id
    await devstack_postgres.stop_async("immediate")
    try:
        calls: dict[str, Callable[[], Awaitable[Any]]] = {
            "SubmitTask": lambda: sched.SubmitTask(submit_request("outage-1"), timeout=10),
            "SubmitTaskGroup": lambda: sched.SubmitTaskGroup(
                pb.SubmitTaskGroupRequest(items=[submit_request("outage-2")]), timeout=10
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
            assert "RetryInfo" in details(info.value), name
    finally:
        await devstack_postgres.start_async()
    for _ in range(50):  # the pool notices the restart on its next checkout (pre-ping)
        try:
            again = await sched.SubmitTask(submit_request("outage-1"), timeout=10)
            break
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            await asyncio.sleep(0.2)
    else:
        raise AssertionError("the scheduler did not recover after the restart")
    assert again.response.task.task_id
    repeat = await sched.SubmitTask(submit_request("outage-1"), timeout=10)
    assert repeat.response.task.task_id == again.response.task.task_id
