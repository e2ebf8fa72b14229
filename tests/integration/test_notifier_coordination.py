"""DeliveryCoordinationService on a real PostgreSQL: idempotent enqueue, per-(endpoint, task) order,
lease exclusivity under concurrent claims, lease expiry (a dead notifier's delivery is resent with
the same id), stale reports, disabling, secrets in force, backlog counts."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import timestamp_pb2

from conveyor.scheduler.v1 import delivery_coordination_service_pb2 as delivery_pb2
from conveyor.scheduler.v1 import scheduler_service_pb2 as spb
from conveyor.tasks.v1 import task_pb2, webhook_service_pb2
from conveyor_common.standard_webhooks import WebhookVerifier, sign_headers
from tests.integration.notifier_support import (
    SchedulerSide,
    create_endpoint,
    list_deliveries,
    make_event,
    principal,
    start_scheduler_side,
)

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

ALL = [
    task_pb2.TASK_EVENT_TYPE_SUBMITTED,
    task_pb2.TASK_EVENT_TYPE_PROGRESS,
    task_pb2.TASK_EVENT_TYPE_SUCCEEDED,
]


@pytest.fixture(scope="module")
async def side(database_url: str) -> AsyncIterator[SchedulerSide]:
    s = await start_scheduler_side(database_url, allow_hosts=["127.0.0.1"])
    try:
        yield s
    finally:
        await s.close()


def tenant() -> str:
    return f"c-{uuid.uuid4().hex[:8]}"


async def enqueue(side: SchedulerSide, events: list[task_pb2.TaskEvent]) -> int:
    response = await side.coordination.EnqueueDeliveries(
        delivery_pb2.EnqueueDeliveriesRequest(events=events)
    )
    return response.created


async def claim(
    side: SchedulerSide, worker: str, n: int = 100, lease: int = 60
) -> list[delivery_pb2.LeasedDelivery]:
    response = await side.coordination.ClaimDeliveries(
        delivery_pb2.ClaimDeliveriesRequest(worker_id=worker, max_deliveries=n, lease_seconds=lease)
    )
    return list(response.deliveries)


async def report(side: SchedulerSide, worker: str, *outcomes: delivery_pb2.DeliveryOutcome) -> int:
    response = await side.coordination.ReportDeliveries(
        delivery_pb2.ReportDeliveriesRequest(worker_id=worker, outcomes=outcomes)
    )
    return response.applied


def delivered(delivery_id: str) -> delivery_pb2.DeliveryOutcome:
    return delivery_pb2.DeliveryOutcome(delivery_id=delivery_id, delivered=True, status_code=200)


def retry_now(delivery_id: str) -> delivery_pb2.DeliveryOutcome:
    outcome = delivery_pb2.DeliveryOutcome(
        delivery_id=delivery_id, status_code=500, error="HTTP 500"
    )
    outcome.retry_at.CopyFrom(timestamp_pb2.Timestamp())
    outcome.retry_at.GetCurrentTime()
    return outcome


async def test_enqueue_is_idempotent_and_claims_keep_per_task_order(side: SchedulerSide) -> None:
    t = tenant()
    await create_endpoint(side, t, "http://127.0.0.1:9/a", ALL)
    await create_endpoint(side, t, "http://127.0.0.1:9/b")  # terminal events only
    task_x, task_y = str(uuid.uuid4()), str(uuid.uuid4())
    events = [make_event(t, task_x, i + 1, kind) for i, kind in enumerate(ALL)]
    events += [make_event(t, task_y, 1, task_pb2.TASK_EVENT_TYPE_SUBMITTED)]
    assert await enqueue(side, events) == 3 + 1 + 1  # a: 3 of x + 1 of y; b: x's terminal
    assert await enqueue(side, events) == 0  # redelivered records: nothing new
    other = make_event(tenant(), str(uuid.uuid4()), 1, task_pb2.TASK_EVENT_TYPE_SUCCEEDED)
    assert await enqueue(side, [other]) == 0  # a tenant without endpoints

    seen: list[tuple[str, str, int]] = []
    for _ in range(3):
        leases = await claim(side, "w1")
        pairs = [(d.endpoint_id, d.event.task_id) for d in leases]
        assert len(pairs) == len(set(pairs))  # at most one per (endpoint, task)
        for d in leases:
            seen.append((d.url, d.event.task_id, d.event.sequence))
            assert await report(side, "w1", delivered(d.delivery_id)) == 1
    assert await claim(side, "w1") == []
    by_a_x = [s for u, task, s in seen if u.endswith("/a") and task == task_x]
    assert by_a_x == [1, 2, 3]
    assert sorted((u[-1], task == task_x, s) for u, task, s in seen) == sorted(
        [("a", True, 1), ("a", True, 2), ("a", True, 3), ("a", False, 1), ("b", True, 3)]
    )


async def test_concurrent_claims_never_share_a_delivery(side: SchedulerSide) -> None:
    t = tenant()
    await create_endpoint(side, t, "http://127.0.0.1:9/c", ALL)
    tasks = [str(uuid.uuid4()) for _ in range(40)]
    await enqueue(
        side, [make_event(t, task, 1, task_pb2.TASK_EVENT_TYPE_SUBMITTED) for task in tasks]
    )
    results = await asyncio.gather(*(claim(side, f"w{i}", n=10) for i in range(6)))
    ids = [d.delivery_id for leases in results for d in leases]
    assert len(ids) == len(set(ids))  # never one delivery to two workers
    assert len(ids) >= 10  # at least one full batch
    late = await claim(side, "late")
    assert not set(ids) & {d.delivery_id for d in late}
    assert len(ids) + len(late) == 40
    for i, leases in enumerate([*results, late]):
        worker = f"w{i}" if i < len(results) else "late"
        for d in leases:
            assert await report(side, worker, delivered(d.delivery_id)) == 1


async def test_a_dead_workers_lease_expires_and_the_delivery_keeps_its_id(
    side: SchedulerSide,
) -> None:
    t = tenant()
    created = await create_endpoint(side, t, "http://127.0.0.1:9/d", ALL)
    task_id = str(uuid.uuid4())
    await enqueue(
        side,
        [
            make_event(t, task_id, 1, task_pb2.TASK_EVENT_TYPE_SUBMITTED),
            make_event(t, task_id, 2, task_pb2.TASK_EVENT_TYPE_SUCCEEDED),
        ],
    )
    (first,) = await claim(side, "dead", lease=5)
    assert first.event.sequence == 1
    assert first.signing_secrets == [created.signing_secret]
    assert await claim(side, "alive") == []  # leased, and sequence 2 waits behind it
    await asyncio.sleep(5.5)
    (again,) = await claim(side, "alive")
    assert again.delivery_id == first.delivery_id  # same webhook-id on the resend
    assert await report(side, "dead", delivered(first.delivery_id)) == 0  # stale lease
    assert await report(side, "alive", retry_now(again.delivery_id)) == 1
    (third,) = await claim(side, "alive")
    assert (third.delivery_id, third.attempts) == (first.delivery_id, 1)
    assert third.endpoint_consecutive_failures == 1
    assert third.HasField("endpoint_failing_since")
    assert await report(side, "alive", delivered(third.delivery_id)) == 1
    (second,) = await claim(side, "alive")
    assert second.event.sequence == 2
    assert second.endpoint_consecutive_failures == 0  # reset by the success
    log = {d.sequence: d for d in await list_deliveries(side, t, task_id)}
    assert log[1].attempts == 2
    assert log[1].state == webhook_service_pb2.DELIVERY_STATE_DELIVERED
    assert log[2].state == webhook_service_pb2.DELIVERY_STATE_PENDING
    assert await report(side, "alive", delivered(second.delivery_id)) == 1


async def test_disable_fails_pending_deliveries_and_gives_up_without_retry_at(
    side: SchedulerSide,
) -> None:
    t = tenant()
    created = await create_endpoint(side, t, "http://127.0.0.1:9/e", ALL)
    tasks = [str(uuid.uuid4()) for _ in range(3)]
    await enqueue(
        side, [make_event(t, task, 1, task_pb2.TASK_EVENT_TYPE_SUBMITTED) for task in tasks]
    )
    leases = await claim(side, "w")
    assert len(leases) == 3
    give_up = delivery_pb2.DeliveryOutcome(
        delivery_id=leases[0].delivery_id, status_code=410, error="gone"
    )
    assert await report(side, "w", give_up) == 1
    disable = delivery_pb2.DeliveryOutcome(
        delivery_id=leases[1].delivery_id,
        status_code=500,
        disable_endpoint=True,
        disabled_reason="kept failing",
    )
    assert await report(side, "w", disable) == 1
    assert await report(side, "w", delivered(leases[2].delivery_id)) == 0  # failed by the disable
    states = {d.state for d in await list_deliveries(side, t)}
    assert states == {webhook_service_pb2.DELIVERY_STATE_FAILED}
    listed = await side.scheduler.ListWebhookEndpoints(
        spb.SchedulerServiceListWebhookEndpointsRequest(principal=principal(t))
    )
    (endpoint,) = listed.response.endpoints
    assert endpoint.endpoint_id == created.endpoint.endpoint_id
    assert not endpoint.enabled
    assert endpoint.disabled_reason == "kept failing"
    backlog = await side.coordination.GetDeliveryBacklog(delivery_pb2.GetDeliveryBacklogRequest())
    assert backlog.disabled_endpoints >= 1
    await enqueue(side, [make_event(t, tasks[0], 2, task_pb2.TASK_EVENT_TYPE_SUCCEEDED)])
    assert len(await list_deliveries(side, t)) == 3  # a disabled endpoint gets no new deliveries


async def test_rotation_puts_both_secrets_in_the_lease(side: SchedulerSide) -> None:
    t = tenant()
    created = await create_endpoint(side, t, "http://127.0.0.1:9/f", ALL)
    rotated = await side.scheduler.RotateWebhookSecret(
        spb.SchedulerServiceRotateWebhookSecretRequest(
            principal=principal(t),
            request=webhook_service_pb2.RotateWebhookSecretRequest(overlap_seconds=60),
        )
    )
    new = rotated.response.signing_secret
    await enqueue(side, [make_event(t, str(uuid.uuid4()), 1, task_pb2.TASK_EVENT_TYPE_SUBMITTED)])
    (lease,) = await claim(side, "w")
    assert list(lease.signing_secrets) == [new, created.signing_secret]
    headers = sign_headers(lease.signing_secrets, b"{}", msg_id=lease.delivery_id)
    WebhookVerifier([created.signing_secret]).verify(headers, b"{}")
    assert await report(side, "w", delivered(lease.delivery_id)) == 1


async def test_backlog_and_paging(side: SchedulerSide) -> None:
    t = tenant()
    await create_endpoint(side, t, "http://127.0.0.1:9/g", ALL)
    tasks = [str(uuid.uuid4()) for _ in range(7)]
    await enqueue(
        side, [make_event(t, task, 1, task_pb2.TASK_EVENT_TYPE_SUBMITTED) for task in tasks]
    )
    backlog = await side.coordination.GetDeliveryBacklog(delivery_pb2.GetDeliveryBacklogRequest())
    assert backlog.pending >= 7
    assert backlog.due >= 7
    assert backlog.HasField("oldest_due_at")
    seen: list[str] = []
    token = ""
    while True:
        page = await side.scheduler.ListWebhookDeliveries(
            spb.SchedulerServiceListWebhookDeliveriesRequest(
                principal=principal(t),
                request=webhook_service_pb2.ListWebhookDeliveriesRequest(
                    page_size=3, page_token=token
                ),
            )
        )
        seen += [d.delivery_id for d in page.response.deliveries]
        token = page.response.next_page_token
        if not token:
            break
    assert len(seen) == len(set(seen)) == 7
    for d in await claim(side, "w"):
        assert await report(side, "w", delivered(d.delivery_id)) == 1


async def test_concurrent_endpoint_creates_keep_the_limit_and_the_idempotency_key(
    side: SchedulerSide,
) -> None:
    t = tenant()
    limit = 20  # WebhookSettings.max_endpoints_per_tenant default
    for _ in range(limit - 2):
        await create_endpoint(side, t, "http://127.0.0.1:9/hook")

    async def create(request_id: str) -> grpc.StatusCode:
        try:
            await side.scheduler.CreateWebhookEndpoint(
                spb.SchedulerServiceCreateWebhookEndpointRequest(
                    principal=principal(t),
                    request=webhook_service_pb2.CreateWebhookEndpointRequest(
                        request_id=request_id, url="http://127.0.0.1:9/hook"
                    ),
                )
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    codes = await asyncio.gather(*(create(str(uuid.uuid4())) for _ in range(10)))
    assert codes.count(grpc.StatusCode.OK) == 2
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 8
    listed = await side.scheduler.ListWebhookEndpoints(
        spb.SchedulerServiceListWebhookEndpointsRequest(
            principal=principal(t), request=webhook_service_pb2.ListWebhookEndpointsRequest()
        )
    )
    assert len(listed.response.endpoints) == limit

    # One idempotency key sent concurrently by a fresh tenant: one endpoint, every answer OK.
    fresh = tenant()
    key = str(uuid.uuid4())
    answers = await asyncio.gather(
        *(
            side.scheduler.CreateWebhookEndpoint(
                spb.SchedulerServiceCreateWebhookEndpointRequest(
                    principal=principal(fresh),
                    request=webhook_service_pb2.CreateWebhookEndpointRequest(
                        request_id=key, url="http://127.0.0.1:9/hook"
                    ),
                )
            )
            for _ in range(6)
        )
    )
    assert len({a.response.endpoint.endpoint_id for a in answers}) == 1
    assert len({a.response.signing_secret for a in answers}) == 1
