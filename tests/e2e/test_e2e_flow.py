"""End to end through every service: gateway -> scheduler -> Kafka -> adapter -> fake Replicate -> signed
webhooks -> adapter -> Kafka -> scheduler -> Kafka -> notifier -> gateway watch and client webhooks.

Each test has its own tenant(s); what happened at the provider is read from the fake's ledger.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any
from urllib.parse import urlparse

import grpc
import pytest

from conveyor.tasks.v1 import admin_service_pb2 as admin_pb2
from conveyor.tasks.v1 import task_pb2
from conveyor_client import TERMINAL_EVENTS, ConveyorError, build_spec
from fake_replicate.testing import Delivery, WebhookReceiver
from tests.e2e.harness import E2E, creates, follow, types_of, wait_for_event, wait_terminal
from tests.e2e.otlp import OtlpReceiver

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.slow]

S = task_pb2
ALL_EVENT_TYPES = [
    t for t in task_pb2.TaskEventType.values() if t != task_pb2.TASK_EVENT_TYPE_UNSPECIFIED
]


async def test_happy_path_with_progress_and_outputs(e2e: E2E) -> None:
    _, client = await e2e.tenant("happy", tier="premium")
    seq = await e2e.ledger_seq()
    image_spec = build_spec(
        "image",
        model="e2e/sdxl",
        input={"prompt": "a lighthouse", "__fake_duration_s": 1.5, "__fake_output_count": 2},
        priority="high",
        labels={"suite": "e2e"},
    )
    image = await client.submit(spec=image_spec)
    text = await client.submit(
        "text",
        model="e2e/llm",
        input={"prompt": "hello", "__fake_output_kind": "text", "__fake_duration_s": 0.5},
    )
    assert image.task.status == S.TASK_STATUS_QUEUED
    assert not image.deduplicated
    events, text_events = await asyncio.gather(
        follow(client, image.task.task_id), follow(client, text.task.task_id)
    )

    names = types_of(events)
    assert names[0] == "submitted"
    assert names[-1] == "succeeded"
    assert {"dispatched", "started"} <= set(names)
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    progress = [e.task.progress for e in events if e.type == S.TASK_EVENT_TYPE_PROGRESS]
    assert progress, f"no progress events: {names}"
    assert progress == sorted(progress)
    assert any(0 < p < 100 for p in progress), progress

    done = await client.get(image.task.task_id)
    assert done.status == S.TASK_STATUS_SUCCEEDED
    assert done.progress == 100
    assert done.attempt == 1
    assert done.tier == S.TIER_PREMIUM
    assert dict(done.spec.labels) == {"suite": "e2e"}
    assert len(done.result.files) == 2
    for f in done.result.files:
        size = os.path.getsize(urlparse(f.url).path)  # noqa: ASYNC240 - a local file, once
        assert size == f.size_bytes > 0, f.url
        assert f.source_url.startswith(e2e.system.fake_url)
    assert types_of(text_events)[-1] == "succeeded"
    text_done = await client.get(text.task.task_id)
    assert text_done.result.output.list_value.values  # the tokens, as Replicate returns them

    ledger = await e2e.ledger(seq)
    assert sorted(creates(ledger)) == sorted([image.task.task_id, text.task.task_id])
    create = next(e for e in ledger if e["kind"] == "create" and e["task"] == done.task_id)
    assert create["model"] == "e2e/sdxl"
    assert create["input"]["prompt"] == "a lighthouse"
    assert create["prediction_id"] == done.prediction_id
    finish = [
        e for e in ledger if e["kind"] == "finish" and e["prediction_id"] == done.prediction_id
    ]
    assert [f["status"] for f in finish] == ["succeeded"]

    # The same request id returns the same task and creates nothing; with another spec it is refused.
    again = await client.submit(spec=image_spec, request_id=image.task.request_id)
    assert again.deduplicated
    assert again.task.task_id == image.task.task_id
    with pytest.raises(ConveyorError) as refused:
        await client.submit("image", model="e2e/sdxl", request_id=image.task.request_id)
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert creates(await e2e.ledger(seq), [image.task.task_id]) == [image.task.task_id]


async def test_retry_then_success(e2e: E2E) -> None:
    """The provider refuses the first create with a retryable 408: attempt 2 succeeds."""
    _, client = await e2e.tenant("retry")
    seq = await e2e.ledger_seq()
    await e2e.fake.configure(create_script=[408])
    task = (
        await client.submit(
            "image", model="e2e/flaky", input={"prompt": "p"}, max_attempts=3, priority="urgent"
        )
    ).task
    events = await follow(client, task.task_id)
    names = types_of(events)
    assert names[-1] == "succeeded", names
    assert "retry_scheduled" in names
    retry = next(e for e in events if e.type == S.TASK_EVENT_TYPE_RETRY_SCHEDULED)
    assert retry.task.error.retryable
    final = await client.get(task.task_id)
    assert final.attempt == 2

    ledger = await e2e.ledger(seq)
    rejected = [e for e in ledger if e["kind"] == "create_rejected" and e["task"] == task.task_id]
    assert [(e["status"], str(e["attempt"])) for e in rejected] == [(408, "1")]
    created = [e for e in ledger if e["kind"] == "create" and e["task"] == task.task_id]
    assert [str(e["attempt"]) for e in created] == ["2"]


async def test_retry_then_dead_letter_then_redrive(e2e: E2E) -> None:
    """A task that fails retryably on every attempt is dead-lettered; an operator redrives it."""
    tenant, client = await e2e.tenant("deadletter")
    seq = await e2e.ledger_seq()

    # Runs that fail retryably ("Prediction interrupted"): 2 attempts, then the dead-letter queue.
    doomed = (
        await client.submit(
            "video",
            model="e2e/always-interrupted",
            input={"__fake_outcome": "failed_retryable", "__fake_duration_s": 0.3},
            max_attempts=2,
        )
    ).task
    events = await follow(client, doomed.task_id)
    names = types_of(events)
    assert names.count("retry_scheduled") == 1, names
    assert names[-1] == "dead_lettered", names
    ledger = await e2e.ledger(seq)
    runs = [e for e in ledger if e["kind"] == "create" and e["task"] == doomed.task_id]
    assert [str(e["attempt"]) for e in runs] == ["1", "2"]
    finishes = {e["prediction_id"]: e["status"] for e in ledger if e["kind"] == "finish"}
    assert [finishes.get(e["prediction_id"]) for e in runs] == ["failed", "failed"]

    # Creates refused twice (retryable 408), dead-lettered; once redriven it succeeds.
    await e2e.fake.configure(create_script=[408, 408])
    task = (
        await client.submit("image", model="e2e/refused", input={"prompt": "p"}, max_attempts=2)
    ).task
    dead = (await wait_terminal(client, [task.task_id]))[task.task_id]
    assert dead.status == S.TASK_STATUS_DEAD_LETTERED
    assert dead.error.retryable

    listed = await e2e.admin.list_dead_letters(tenant_id=tenant)
    assert {t.task_id for t in listed.tasks} == {doomed.task_id, task.task_id}

    redriven = await e2e.admin.redrive(admin_pb2.BulkSelector(task_ids=[task.task_id]))
    assert redriven == [task.task_id]
    events = await follow(client, task.task_id, after=dead.last_sequence)
    names = types_of(events)
    assert names[0] == "redriven", names
    assert names[-1] == "succeeded", names
    assert events[0].sequence == dead.last_sequence + 1
    before = await follow(client, task.task_id)  # a watch from the start ends at the first terminal
    assert types_of(before)[-1] == "dead_lettered"
    assert before[-1].sequence == dead.last_sequence
    final = await client.get(task.task_id)
    assert final.attempt == 3
    after = await e2e.admin.list_dead_letters(tenant_id=tenant)
    assert {t.task_id for t in after.tasks} == {doomed.task_id}
    ledger = await e2e.ledger(seq)
    assert creates(ledger, [task.task_id]) == [task.task_id]  # only the redriven attempt ran


async def test_cancel_while_queued_and_while_running(e2e: E2E) -> None:
    _, client = await e2e.tenant("cancel", max_concurrency=1)
    seq = await e2e.ledger_seq()
    running = (
        await client.submit("image", model="e2e/long", input={"__fake_outcome": "hang"})
    ).task
    await wait_for_event(client, running.task_id, [S.TASK_EVENT_TYPE_STARTED])
    queued = (await client.submit("image", model="e2e/long", input={"prompt": "q"})).task

    # Queued (the tenant's only slot is taken): taken off at once, never reaches the provider.
    await asyncio.sleep(0.3)
    assert (await client.get(queued.task_id)).status == S.TASK_STATUS_QUEUED
    canceled = await client.cancel(queued.task_id, reason="changed my mind")
    assert canceled.status == S.TASK_STATUS_CANCELED

    # Running: the cancel reaches the provider, and the slot comes back once it is canceled there.
    await client.cancel(running.task_id, reason="too slow")
    final = (await wait_terminal(client, [running.task_id]))[running.task_id]
    assert final.status == S.TASK_STATUS_CANCELED
    names = types_of(await follow(client, running.task_id))
    assert names[-2:] == ["cancel_requested", "canceled"], names
    assert types_of(await follow(client, queued.task_id)) == ["submitted", "canceled"]

    ledger = await e2e.ledger(seq)
    assert creates(ledger) == [running.task_id]
    cancels = [e for e in ledger if e["kind"] == "cancel"]
    assert [(c["prediction_id"], c["by"]) for c in cancels] == [(final.prediction_id, "api")]
    finish = [e for e in ledger if e["kind"] == "finish"]
    assert [(f["prediction_id"], f["status"]) for f in finish] == [
        (final.prediction_id, "canceled")
    ]

    # The slot is free again: a new task of the same tenant runs.
    after = (await client.submit("image", model="e2e/long", input={"prompt": "r"})).task
    assert (await wait_terminal(client, [after.task_id]))[after.task_id].status == (
        S.TASK_STATUS_SUCCEEDED
    )


async def test_watch_and_client_webhooks_agree(e2e: E2E) -> None:
    _, client = await e2e.tenant("hooks")
    receiver = WebhookReceiver(secrets=[])
    url = await receiver.start()
    try:
        endpoint = await client.create_webhook_endpoint(f"{url}/hooks", events=ALL_EVENT_TYPES)
        assert endpoint.signing_secret.startswith("whsec_")
        receiver.secrets.append(endpoint.signing_secret)
        tasks = [
            (
                await client.submit(
                    "image", model="e2e/hooked", input={"prompt": str(i), "__fake_duration_s": 1}
                )
            ).task
            for i in range(2)
        ]
        watched = dict(
            zip(
                [t.task_id for t in tasks],
                await asyncio.gather(*(follow(client, t.task_id) for t in tasks)),
                strict=True,
            )
        )

        def terminal_seen(deliveries: list[Delivery]) -> bool:
            seen = {
                d.payload["data"]["task_id"]
                for d in deliveries
                if d.verified and d.payload["type"] in ("task.succeeded", "task.failed")
            }
            return seen >= set(watched)

        await receiver.wait_for(terminal_seen, within_s=30)
        await asyncio.sleep(0.5)  # any straggler
        assert all(d.verified for d in receiver.deliveries), [
            d.reject_reason for d in receiver.deliveries
        ]
        for task_id, events in watched.items():
            first_seen: dict[str, dict[str, Any]] = {}
            order: list[int] = []
            for d in receiver.deliveries:
                doc = d.payload
                if doc["data"]["task_id"] != task_id:
                    continue
                if d.msg_id not in first_seen:
                    first_seen[d.msg_id] = doc
                    order.append(int(doc["data"]["sequence"]))
            hooks = sorted(
                (int(doc["data"]["sequence"]), str(doc["type"]), str(doc["data"]["event_id"]))
                for doc in first_seen.values()
            )
            watch = [(e.sequence, "task." + types_of([e])[0], e.event_id) for e in events]
            assert hooks == watch
            assert order == sorted(order), "deliveries of one task out of order"
            assert events[-1].type in TERMINAL_EVENTS
    finally:
        await receiver.stop()


async def test_internal_services_refuse_callers_without_an_allowed_certificate(e2e: E2E) -> None:
    """With internal mutual TLS on, the scheduler answers only the services that call it: no
    plaintext, no certificate of another CA, and a certificate of the system's own CA that names
    no allowed peer is PERMISSION_DENIED (a tenant token would change nothing: it is not looked at)."""
    from conveyor.scheduler.v1 import scheduler_service_pb2 as sched_pb2
    from conveyor.scheduler.v1 import scheduler_service_pb2_grpc as sched_grpc
    from conveyor_common.tls import open_channel

    system = e2e.system
    assert system.client_tls is not None
    port = system.by_role("scheduler")[0].grpc_port
    request = sched_pb2.SchedulerServiceGetQueueStatsRequest(
        principal=sched_pb2.Principal(tenant_id="intruder", role=sched_pb2.ROLE_ADMIN)
    )

    async def call(channel: grpc.aio.Channel) -> grpc.StatusCode:
        try:
            await sched_grpc.SchedulerServiceStub(channel).GetQueueStats(request, timeout=5)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as plain:
        assert await call(plain) == grpc.StatusCode.UNAVAILABLE
    async with open_channel(f"127.0.0.1:{port}", system.client_tls, []) as certified:
        assert await call(certified) == grpc.StatusCode.PERMISSION_DENIED


async def test_one_trace_holds_the_task_in_all_four_services(
    e2e: E2E, otlp_receiver: OtlpReceiver
) -> None:
    """The spans of a task, exported over OTLP by every service, share one trace: the gateway's
    submit, the scheduler's RPCs and relay, the adapter's consume, Replicate calls and webhook,
    the notifier's consume."""
    _, client = await e2e.tenant("traced")
    task = (await client.submit("text", model="e2e/llm", input={"prompt": "trace me"})).task
    await wait_terminal(client, [task.task_id])
    wanted = {
        "conveyor-gateway",
        "conveyor-scheduler",
        "conveyor-provider-adapter",
        "conveyor-notifier",
    }
    trace_id: str | None = None
    for _ in range(100):  # spans are exported in batches (200 ms here)
        trace_id = otlp_receiver.trace_of("conveyor.task_id", task.task_id)
        if trace_id is not None and wanted <= otlp_receiver.services(trace_id):
            break
        await asyncio.sleep(0.1)
    assert trace_id is not None, "no span names the task"
    assert wanted <= otlp_receiver.services(trace_id), otlp_receiver.services(trace_id)
    names = {span.name for _, span in otlp_receiver.spans[trace_id]}
    print(f"\ntrace {trace_id}: {sorted(names)}")
    assert "/conveyor.tasks.v1.TaskService/SubmitTask" in names
    assert any(n.startswith("HTTP POST") for n in names), names  # the create at Replicate
    assert any(n.endswith("process") for n in names), names  # Kafka consumers
