"""Client webhooks end to end: real Kafka, the scheduler's webhook side on a real PostgreSQL, the
notifier in-process, and real HTTP receivers on 127.0.0.1 that verify our signatures."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from aiohttp import web
from google.rpc import status_pb2
from grpc_status import rpc_status

from conveyor.events.v1 import events_pb2
from conveyor.scheduler.v1 import scheduler_service_pb2 as spb
from conveyor.tasks.v1 import task_pb2, webhook_service_pb2
from conveyor_common.errors import unpack_details
from conveyor_common.kafka import EventProducer
from conveyor_common.standard_webhooks import WebhookVerifier
from conveyor_notifier.app import Notifier
from tests.integration.notifier_support import (
    LIFECYCLE,
    Receiver,
    SchedulerSide,
    create_endpoint,
    eventually,
    eventually_async,
    lifecycle,
    list_deliveries,
    make_event,
    make_topics,
    notifier_settings,
    principal,
    publish,
    receiver,
    settled_deliveries,
    start_producer,
    start_scheduler_side,
)

pytestmark = [pytest.mark.integration, pytest.mark.kafka, pytest.mark.postgres]

ALL_TYPES = sorted(set(LIFECYCLE))
DISABLE_AFTER = 5


@pytest.fixture(scope="module")
async def side(database_url: str) -> AsyncIterator[SchedulerSide]:
    s = await start_scheduler_side(database_url, allow_hosts=["127.0.0.1"])
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture(scope="module")
async def topics(kafka_bootstrap: str) -> dict[str, str]:
    return await make_topics(kafka_bootstrap, "notifier-webhooks")


@pytest.fixture(scope="module")
async def ops() -> AsyncIterator[Receiver]:
    async with receiver() as rec:
        yield rec


@pytest.fixture(scope="module")
async def notifier(
    kafka_bootstrap: str, side: SchedulerSide, topics: dict[str, str], ops: Receiver
) -> AsyncIterator[Notifier]:
    settings = notifier_settings(
        kafka_bootstrap,
        side.address,
        topics,
        endpoint_disable_after_failures=DISABLE_AFTER,
        endpoint_disable_after_seconds=0,
        ops_webhook_url=ops.url + "/ops",
        throttle_alert_after_seconds=1.0,
    )
    app = Notifier(settings)
    await app.start(serve_metrics=False)
    try:
        yield app
    finally:
        await app.stop()


@pytest.fixture(scope="module")
async def producer(kafka_bootstrap: str) -> AsyncIterator[EventProducer]:
    p = await start_producer(kafka_bootstrap)
    try:
        yield p
    finally:
        await p.stop()


def tenant() -> str:
    return f"tenant-{uuid.uuid4().hex[:8]}"


def metric(app: Notifier, name: str, labels: dict[str, str] | None = None) -> float:
    value = app.registry.get_sample_value(name, labels or {})
    return float(value or 0.0)


async def test_signed_events_arrive_in_order_per_task(
    side: SchedulerSide, notifier: Notifier, producer: EventProducer, topics: dict[str, str]
) -> None:
    t = tenant()
    async with receiver() as all_events, receiver() as terminal_only:
        created = await create_endpoint(side, t, all_events.url + "/hooks", ALL_TYPES)
        secret = created.signing_secret
        assert secret.startswith("whsec_")
        all_events.secrets = [secret]
        second = await create_endpoint(side, t, terminal_only.url + "/done")
        assert second.signing_secret == secret  # one secret per tenant
        terminal_only.secrets = [secret]

        task_a, task_b = str(uuid.uuid4()), str(uuid.uuid4())
        events_a, events_b = lifecycle(t, task_a), lifecycle(t, task_b)
        interleaved = [e for pair in zip(events_a, events_b, strict=True) for e in pair]
        await publish(producer, topics["events"], interleaved)

        await eventually(lambda: len(all_events.delivered()) == 12, what="12 deliveries")
        await eventually(lambda: len(terminal_only.delivered()) == 2, what="2 terminal deliveries")

        assert all(r.verified for r in all_events.received)
        for task_id, events in ((task_a, events_a), (task_b, events_b)):
            got = [
                r.document
                for r in all_events.delivered()
                if r.document["data"]["task_id"] == task_id
            ]
            assert [d["data"]["sequence"] for d in got] == [1, 2, 3, 4, 5, 6]
            assert [d["type"] for d in got] == [
                "task.submitted",
                "task.dispatched",
                "task.started",
                "task.progress",
                "task.progress",
                "task.succeeded",
            ]
            assert [d["data"]["event_id"] for d in got] == [e.event_id for e in events]
            assert got[-1]["data"]["task"]["status"] == "TASK_STATUS_SUCCEEDED"
            assert got[-1]["data"]["tenant_id"] == t
        # webhook-id is the delivery id: unique per (endpoint, event).
        assert len({r.webhook_id for r in all_events.received}) == 12
        assert [r.document["type"] for r in terminal_only.delivered()] == ["task.succeeded"] * 2
        assert all(r.verified for r in terminal_only.received)

        log = await settled_deliveries(side, t, 14)
        assert len(log) == 14
        assert {d.state for d in log} == {webhook_service_pb2.DELIVERY_STATE_DELIVERED}
        assert all(d.attempts == 1 and d.last_status_code == 200 for d in log)
        assert {d.delivery_id for d in log} >= {r.webhook_id for r in all_events.received}

    # A redelivered Kafka record (same event id) creates no second delivery: once a later event
    # of the same task (same partition, so handled after it) has its delivery, count again.
    sentinel = make_event(t, task_a, 7, task_pb2.TASK_EVENT_TYPE_PROGRESS)
    await publish(producer, topics["events"], [events_a[-1], sentinel])

    async def sentinel_enqueued() -> bool:
        return any(d.sequence == 7 for d in await list_deliveries(side, t, task_a))

    await eventually_async(sentinel_enqueued, what="sentinel delivery")
    assert len(await list_deliveries(side, t)) == 15
    assert metric(notifier, "conveyor_notifier_deliveries_total", {"outcome": "delivered"}) >= 14


async def test_failing_receiver_gets_retries_with_the_same_webhook_id(
    side: SchedulerSide, notifier: Notifier, producer: EventProducer, topics: dict[str, str]
) -> None:
    t = tenant()

    async def flaky(rec: Receiver, request: web.Request, body: bytes) -> web.StreamResponse:
        wid = request.headers["webhook-id"]
        return web.Response(status=500 if rec.counts[wid] <= 3 else 200)

    async with receiver(responder=flaky) as rec:
        created = await create_endpoint(side, t, rec.url + "/flaky", ALL_TYPES)
        rec.secrets = [created.signing_secret]
        task_id = str(uuid.uuid4())
        first = make_event(t, task_id, 1, task_pb2.TASK_EVENT_TYPE_SUBMITTED)
        second = make_event(t, task_id, 2, task_pb2.TASK_EVENT_TYPE_SUCCEEDED)
        await publish(producer, topics["events"], [first, second])
        await eventually(lambda: len(rec.delivered()) == 2, what="both delivered")

        ids = [r.webhook_id for r in rec.received]
        # Each delivery: three 500s, then a 200, all with one webhook-id; the second event is not
        # attempted before the first was delivered (per-task order).
        assert len(ids) == 8
        assert len(set(ids[:4])) == 1
        assert len(set(ids[4:])) == 1
        assert ids[0] != ids[4]
        assert [r.status for r in rec.received] == [500, 500, 500, 200] * 2
        assert all(r.verified for r in rec.received)
        assert [r.document["data"]["sequence"] for r in rec.delivered()] == [1, 2]

    log = {d.sequence: d for d in await settled_deliveries(side, t, 2, task_id)}
    assert log[1].attempts == 4
    assert log[1].state == webhook_service_pb2.DELIVERY_STATE_DELIVERED
    assert log[1].delivery_id == ids[0]
    assert log[2].delivery_id == ids[4]
    assert log[1].last_status_code == 200
    assert not log[1].last_error


async def test_rotation_signs_with_both_secrets_during_the_overlap(
    side: SchedulerSide, notifier: Notifier, producer: EventProducer, topics: dict[str, str]
) -> None:
    t = tenant()
    async with receiver() as rec:
        created = await create_endpoint(side, t, rec.url + "/rot")
        old = created.signing_secret
        request = spb.SchedulerServiceRotateWebhookSecretRequest(
            principal=principal(t),
            request=webhook_service_pb2.RotateWebhookSecretRequest(
                request_id="rot-1", overlap_seconds=3600
            ),
        )
        rotated = (await side.scheduler.RotateWebhookSecret(request)).response
        new = rotated.signing_secret
        assert new.startswith("whsec_")
        assert new != old
        until = rotated.previous_valid_until.ToDatetime(tzinfo=UTC)
        assert timedelta(minutes=59) < until - datetime.now(UTC) <= timedelta(hours=1)
        replay = (await side.scheduler.RotateWebhookSecret(request)).response
        assert replay.signing_secret == new  # same request id: not rotated twice

        rec.secrets = [new]
        task_id = str(uuid.uuid4())
        await publish(
            producer, topics["events"], [make_event(t, task_id, 1, task_pb2.TASK_EVENT_TYPE_FAILED)]
        )
        await eventually(lambda: len(rec.delivered()) == 1, what="delivery")
        got = rec.received[0]
        assert len(got.signature.split()) == 2
        headers = {
            "webhook-id": got.webhook_id,
            "webhook-timestamp": got.timestamp,
            "webhook-signature": got.signature,
        }
        WebhookVerifier([old]).verify(headers, got.body)  # receivers not switched yet still verify
        WebhookVerifier([new]).verify(headers, got.body)


async def test_per_task_webhook_from_the_task_spec(
    side: SchedulerSide, notifier: Notifier, producer: EventProducer, topics: dict[str, str]
) -> None:
    t = tenant()
    rotate = spb.SchedulerServiceRotateWebhookSecretRequest(
        principal=principal(t), request=webhook_service_pb2.RotateWebhookSecretRequest()
    )
    secret = (await side.scheduler.RotateWebhookSecret(rotate)).response.signing_secret
    async with receiver(secrets=[secret]) as rec:
        task_id = str(uuid.uuid4())
        hook = task_pb2.TaskWebhook(url=rec.url + f"/task/{task_id}")
        await publish(producer, topics["events"], lifecycle(t, task_id, webhook=hook))
        refused_task = str(uuid.uuid4())
        bad_hook = task_pb2.TaskWebhook(url=f"http://[::1]:{rec.port}/nope")
        await publish(producer, topics["events"], lifecycle(t, refused_task, webhook=bad_hook))
        await eventually(lambda: len(rec.delivered()) == 1, what="terminal delivery")
        await asyncio.sleep(0.5)
        assert [r.document["type"] for r in rec.received] == ["task.succeeded"]
        assert rec.received[0].verified
        assert rec.received[0].document["data"]["task_id"] == task_id
    assert [d.task_id for d in await list_deliveries(side, t)] == [task_id]


async def test_an_endpoint_that_keeps_failing_is_disabled_with_a_notice(
    side: SchedulerSide,
    notifier: Notifier,
    producer: EventProducer,
    topics: dict[str, str],
    ops: Receiver,
) -> None:
    t = tenant()

    async def down(rec: Receiver, request: web.Request, body: bytes) -> web.StreamResponse:
        return web.Response(status=503)

    async with receiver(responder=down) as rec:
        created = await create_endpoint(side, t, rec.url + "/down", ALL_TYPES)
        endpoint_id = created.endpoint.endpoint_id
        task_id = str(uuid.uuid4())
        await publish(producer, topics["events"], lifecycle(t, task_id)[:3])

        def disabled_notice() -> bool:
            return any(endpoint_id in r.document.get("text", "") for r in ops.received)

        await eventually(disabled_notice, what="ops notice")
        assert len(rec.received) == DISABLE_AFTER
        listed = await side.scheduler.ListWebhookEndpoints(
            spb.SchedulerServiceListWebhookEndpointsRequest(principal=principal(t))
        )
        (endpoint,) = listed.response.endpoints
        assert not endpoint.enabled
        assert "consecutive failed deliveries" in endpoint.disabled_reason
        log = await list_deliveries(side, t, task_id)
        assert {d.state for d in log} == {webhook_service_pb2.DELIVERY_STATE_FAILED}
        # New events are not delivered to a disabled endpoint.
        await publish(producer, topics["events"], lifecycle(t, task_id)[3:])
        await asyncio.sleep(0.5)
        assert len(rec.received) == DISABLE_AFTER
    await eventually(
        lambda: metric(notifier, "conveyor_notifier_disabled_endpoints") >= 1, what="gauge"
    )


async def test_tenancy_and_bad_input(side: SchedulerSide, notifier: Notifier) -> None:
    owner, other = tenant(), tenant()
    created = await create_endpoint(side, owner, "http://127.0.0.1:9/x", [])
    endpoint_id = created.endpoint.endpoint_id

    async def code_of(call: Any) -> tuple[grpc.StatusCode, dict[str, object]]:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        status: status_pb2.Status | None = rpc_status.from_call(info.value)
        return info.value.code(), unpack_details(status) if status is not None else {}

    delete = spb.SchedulerServiceDeleteWebhookEndpointRequest(
        principal=principal(other),
        request=webhook_service_pb2.DeleteWebhookEndpointRequest(endpoint_id=endpoint_id),
    )
    code, _ = await code_of(side.scheduler.DeleteWebhookEndpoint(delete))
    assert code == grpc.StatusCode.NOT_FOUND
    missing = spb.SchedulerServiceDeleteWebhookEndpointRequest(
        principal=principal(other),
        request=webhook_service_pb2.DeleteWebhookEndpointRequest(endpoint_id=str(uuid.uuid4())),
    )
    assert (await code_of(side.scheduler.DeleteWebhookEndpoint(missing)))[
        0
    ] == grpc.StatusCode.NOT_FOUND
    listed = await side.scheduler.ListWebhookEndpoints(
        spb.SchedulerServiceListWebhookEndpointsRequest(principal=principal(other))
    )
    assert list(listed.response.endpoints) == []

    bad = spb.SchedulerServiceCreateWebhookEndpointRequest(
        principal=principal(owner),
        request=webhook_service_pb2.CreateWebhookEndpointRequest(url="https://10.1.2.3/hook"),
    )
    code, details = await code_of(side.scheduler.CreateWebhookEndpoint(bad))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    violations = details["BadRequest"].field_violations  # type: ignore[attr-defined]
    assert [v.field for v in violations] == ["url"]
    listed = await side.scheduler.ListWebhookEndpoints(
        spb.SchedulerServiceListWebhookEndpointsRequest(principal=principal(owner))
    )
    assert [e.endpoint_id for e in listed.response.endpoints] == [endpoint_id]  # nothing written

    page = spb.SchedulerServiceListWebhookDeliveriesRequest(
        principal=principal(owner),
        request=webhook_service_pb2.ListWebhookDeliveriesRequest(page_token="garbage!"),
    )
    assert (await code_of(side.scheduler.ListWebhookDeliveries(page)))[
        0
    ] == grpc.StatusCode.INVALID_ARGUMENT

    own_delete = spb.SchedulerServiceDeleteWebhookEndpointRequest(
        principal=principal(owner),
        request=webhook_service_pb2.DeleteWebhookEndpointRequest(endpoint_id=endpoint_id),
    )
    await side.scheduler.DeleteWebhookEndpoint(own_delete)
    listed = await side.scheduler.ListWebhookEndpoints(
        spb.SchedulerServiceListWebhookEndpointsRequest(principal=principal(owner))
    )
    assert list(listed.response.endpoints) == []


async def test_ops_alerts_for_dead_letters_and_persistent_throttling(
    notifier: Notifier, producer: EventProducer, topics: dict[str, str], ops: Receiver
) -> None:
    t = tenant()
    task_id = str(uuid.uuid4())
    dead = make_event(t, task_id, 7, task_pb2.TASK_EVENT_TYPE_DEAD_LETTERED)
    dead.task.error.code = "provider_error"
    dead.task.error.message = "upstream exploded"
    await publish(producer, topics["dead_letter"], [dead])

    now = datetime.now(UTC)
    result = events_pb2.ProviderResult(result_id=str(uuid.uuid4()), task_id=task_id, tenant_id=t)
    result.observed_at.FromDatetime(now - timedelta(seconds=3))
    result.throttled.provider = "replicate"
    result.throttled.retry_at.FromDatetime(now + timedelta(seconds=30))
    await producer.send(topics["results"], result, key=task_id)

    def texts() -> list[str]:
        return [str(r.document.get("text", "")) for r in ops.received]

    await eventually(lambda: any(task_id in x for x in texts()), what="dead-letter alert")
    await eventually(lambda: any("Provider replicate" in x for x in texts()), what="throttle alert")
    dead_alert = next(x for x in texts() if task_id in x)
    assert "dead-lettered" in dead_alert
    assert "upstream exploded" in dead_alert
    assert t in dead_alert
