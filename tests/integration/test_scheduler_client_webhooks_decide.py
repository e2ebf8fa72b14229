"""conveyor_scheduler.client_webhooks.decide on real PostgreSQL: a task event's client webhook
deliveries are written in the transaction that writes the event (ADR 0007), to exactly the endpoints
that want it, and the event's Kafka record carries the notifier's wake-up hint."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

from sqlalchemy import text

from conveyor.events.v1 import events_pb2
from conveyor.tasks.v1 import task_pb2
from conveyor_scheduler.admission.submit import NewTask, fingerprint
from conveyor_scheduler.client_webhooks.decide import PRESENCE
from conveyor_testkit import scheduler as kit
from tests.integration.scheduler_env import Env

E = task_pb2


async def _endpoint(env: Env, tenant: str, url: str, types: list[int], **extra: object) -> None:
    async with env.core.engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO webhook_endpoints (id, tenant_id, url, event_types, enabled,"
                " disabled_at) VALUES (:id, :t, :u, CAST(:e AS smallint[]), :on,"
                " CASE WHEN :on THEN NULL ELSE now() END)"
            ),
            {"id": uuid.uuid4(), "t": tenant, "u": url, "e": types, "on": extra.get("on", True)},
        )


async def test_deliveries_are_written_with_the_events(
    make_env: Callable[..., Awaitable[Env]],
) -> None:
    env = await make_env(lead=True)
    await _endpoint(env, "a", "https://terminal.example/h", [])
    await _endpoint(env, "a", "https://submitted.example/h", [E.TASK_EVENT_TYPE_SUBMITTED])
    await _endpoint(env, "a", "https://off.example/h", [], on=False)
    await _endpoint(env, "b", "https://other-tenant.example/h", [])
    hooked = kit.spec(prompt="hooked")
    hooked.webhook.url = "https://own.example/task"
    hooked.webhook.events.extend([E.TASK_EVENT_TYPE_DISPATCHED, E.TASK_EVENT_TYPE_SUCCEEDED])
    [(plain, _), (own, _)] = await env.core.submit(
        "a", 1, [kit.item("plain"), NewTask("own", hooked, fingerprint(hooked))]
    )
    assert await env.dispatch() == 2
    for row in (plain, own):
        await env.core.apply_results([kit.result(row["id"], 1, "succeeded")])

    got = sorted(
        (url, task, E.TaskEventType.Name(t))
        for url, task, t in await env.rows(
            "SELECT e.url, d.task_id, d.event_type FROM webhook_deliveries d"
            " JOIN webhook_endpoints e ON e.id = d.endpoint_id"
        )
    )
    p, o = str(plain["id"]), str(own["id"])
    assert got == sorted(
        [
            ("https://submitted.example/h", p, "TASK_EVENT_TYPE_SUBMITTED"),
            ("https://submitted.example/h", o, "TASK_EVENT_TYPE_SUBMITTED"),
            ("https://terminal.example/h", p, "TASK_EVENT_TYPE_SUCCEEDED"),
            ("https://terminal.example/h", o, "TASK_EVENT_TYPE_SUCCEEDED"),
            ("https://own.example/task", o, "TASK_EVENT_TYPE_DISPATCHED"),
            ("https://own.example/task", o, "TASK_EVENT_TYPE_SUCCEEDED"),
        ]
    )
    # Each delivery carries its event as written, and the per-task endpoint is no registered one.
    [(payload, sequence)] = await env.rows(
        "SELECT d.event, d.sequence FROM webhook_deliveries d JOIN webhook_endpoints e"
        " ON e.id = d.endpoint_id WHERE e.url = 'https://own.example/task'"
        " AND d.event_type = :t",
        t=E.TASK_EVENT_TYPE_SUCCEEDED,
    )
    event = E.TaskEvent.FromString(payload)
    assert (event.task_id, event.sequence, event.type) == (o, sequence, E.TASK_EVENT_TYPE_SUCCEEDED)
    assert event.task.status == E.TASK_STATUS_SUCCEEDED
    await env.check()


async def test_the_record_hints_the_notifier(make_env: Callable[..., Awaitable[Env]]) -> None:
    env = await make_env(lead=True)
    await _endpoint(env, "with-hooks", "https://terminal.example/h", [])
    async with env.core.engine.connect() as conn:
        await PRESENCE.refresh(conn)
    assert "with-hooks" in PRESENCE.tenants
    [(hooked, _)] = await env.core.submit("with-hooks", 1, [kit.item()])
    [(quiet, _)] = await env.core.submit("without", 1, [kit.item()])
    assert await env.dispatch() == 2

    def hints(task_id: object) -> set[bool]:
        return {
            events_pb2.TaskStateChanged.FromString(bytes(p)).webhook_deliveries
            for (p,) in records
            if events_pb2.TaskStateChanged.FromString(bytes(p)).event.task_id == str(task_id)
        }

    records = await env.rows(
        "SELECT payload FROM outbox WHERE ce_type = 'conveyor.events.v1.TaskStateChanged'"
    )
    assert hints(hooked["id"]) == {True}  # SUBMITTED and DISPATCHED
    assert hints(quiet["id"]) == {False}
    PRESENCE.tenants = frozenset()
