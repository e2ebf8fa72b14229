"""The fake's create-side fault knobs and its ledger over real loopback HTTP: 500 without executing,
execute-then-drop, scripted answers, seeded determinism, GET 500s, reset, and the concurrency
reconstruction a checker relies on."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from conveyor_common.standard_webhooks import generate_secret
from fake_replicate import FakeConfig, FakeReplicate, max_concurrency, predictions_per_task
from fake_replicate.ledger import intervals, summary
from fake_replicate.testing import FakeAdmin, WebhookReceiver

pytestmark = pytest.mark.integration

TOKEN = "r8_faults"
SECRET = generate_secret()


@pytest.fixture(scope="module")
async def fake() -> AsyncIterator[FakeReplicate]:
    cfg = FakeConfig(
        token=TOKEN, webhook_secret=SECRET, seed=5, min_duration_s=0.2, max_duration_s=0.3,
        webhook_retry_base_s=0.05,
    )  # fmt: skip
    async with FakeReplicate(cfg) as server:
        yield server


@pytest.fixture(scope="module")
async def receiver() -> AsyncIterator[WebhookReceiver]:
    rx = WebhookReceiver(secrets=[SECRET])
    await rx.start()
    yield rx
    await rx.stop()


@pytest.fixture
async def api(fake: FakeReplicate, receiver: WebhookReceiver) -> AsyncIterator[httpx.AsyncClient]:
    await fake.reset()
    receiver.clear()
    async with httpx.AsyncClient(
        base_url=fake.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10.0
    ) as client:
        yield client


@pytest.fixture
async def admin(fake: FakeReplicate) -> AsyncIterator[FakeAdmin]:
    client = FakeAdmin(fake.url)
    yield client
    await client.aclose()


def body(receiver: WebhookReceiver, task: str, attempt: int = 1, **inputs: Any) -> dict[str, Any]:
    return {
        "input": inputs,
        "webhook": f"{receiver.url}/hook?task={task}&attempt={attempt}",
        "webhook_events_filter": ["start", "completed"],
    }


async def test_create_500_does_not_execute(
    api: httpx.AsyncClient, admin: FakeAdmin, receiver: WebhookReceiver
) -> None:
    await admin.configure(create_500_rate=1.0)
    resp = await api.post("/v1/models/a/b/predictions", json=body(receiver, "t500"))
    assert resp.status_code == 500
    assert resp.headers["content-type"].startswith("application/problem+json")
    await asyncio.sleep(0.4)
    assert (await api.get("/v1/predictions")).json()["results"] == []
    assert receiver.deliveries == []
    ledger = await admin.ledger()
    assert [(e["kind"], e["status"], e["task"], e["attempt"]) for e in ledger] == [
        ("create_rejected", 500, "t500", 1)
    ]


async def test_execute_then_drop_connection(
    api: httpx.AsyncClient, admin: FakeAdmin, fake: FakeReplicate, receiver: WebhookReceiver
) -> None:
    await admin.configure(create_drop_rate=1.0)
    with pytest.raises(httpx.RemoteProtocolError):
        await api.post("/v1/models/a/b/predictions", json=body(receiver, "tdrop", 3))
    (create,) = await admin.ledger(kind="create")
    assert (create["task"], create["attempt"], create["response_dropped"]) == ("tdrop", 3, True)
    pid = create["prediction_id"]
    # The prediction proceeds: the start webhook (always sent) lets the caller adopt it...
    deliveries = await receiver.wait_for(lambda ds: len(ds) == 2, within_s=5)
    assert [(d.payload["id"], d.status, d.query["task"]) for d in deliveries] == [
        (pid, "starting", "tdrop"),
        (pid, "succeeded", "tdrop"),
    ]
    # ...and the list endpoint reconciles it.
    listed = (await api.get("/v1/predictions")).json()["results"]
    assert [p["id"] for p in listed] == [pid]
    assert (await admin.summary())["dropped_responses"] == 1
    # A held drop (simulated client timeout) still executes.
    await admin.configure(create_drop_delay_s=0.3)
    t0 = time.monotonic()
    with pytest.raises(httpx.RemoteProtocolError):
        await api.post("/v1/models/a/b/predictions", json=body(receiver, "tdrop2"))
    assert time.monotonic() - t0 >= 0.25
    assert predictions_per_task(await admin.ledger()) == {"tdrop": 1, "tdrop2": 1}


async def test_create_script_answers_in_order(
    api: httpx.AsyncClient, admin: FakeAdmin, receiver: WebhookReceiver
) -> None:
    await admin.configure(create_script=[503, "drop", 401, 429])
    answers: list[int | str] = []
    for i in range(5):
        try:
            answers.append(
                (
                    await api.post("/v1/models/a/b/predictions", json=body(receiver, f"s{i}"))
                ).status_code
            )
        except httpx.RemoteProtocolError:
            answers.append("dropped")
    assert answers == [503, "dropped", 401, 429, 201]
    assert predictions_per_task(await admin.ledger()) == {"s1": 1, "s4": 1}
    rejected = await admin.ledger(kind="create_rejected")
    assert [(e["task"], e["status"]) for e in rejected] == [("s0", 503), ("s2", 401), ("s3", 429)]
    assert (await admin.config())["create_script"] == []


async def test_input_knob_create_status(api: httpx.AsyncClient, admin: FakeAdmin) -> None:
    resp = await api.post(
        "/v1/models/a/b/predictions", json={"input": {"__fake_create_status": 402}}
    )
    assert resp.status_code == 402
    assert resp.json()["status"] == 402
    assert await admin.ledger(kind="create") == []


async def test_fault_rolls_are_seeded(
    api: httpx.AsyncClient, admin: FakeAdmin, fake: FakeReplicate
) -> None:
    async def run() -> list[int]:
        await fake.reset()
        await admin.configure(seed=1234, create_500_rate=0.5)
        return [
            (await api.post("/v1/models/a/b/predictions", json={"input": {}})).status_code
            for _ in range(12)
        ]

    first, second = await run(), await run()
    assert first == second
    assert set(first) == {201, 500}


async def test_get_500_injection(api: httpx.AsyncClient, admin: FakeAdmin) -> None:
    pid = (await api.post("/v1/models/a/b/predictions", json={"input": {}})).json()["id"]
    await admin.configure(get_500_rate=1.0)
    assert (await api.get(f"/v1/predictions/{pid}")).status_code == 500
    assert (await api.get("/v1/predictions")).status_code == 500
    await admin.configure(get_500_rate=0.0)
    assert (await api.get(f"/v1/predictions/{pid}")).status_code == 200


async def test_reset_clears_state_and_restores_config(
    api: httpx.AsyncClient, admin: FakeAdmin, fake: FakeReplicate
) -> None:
    await admin.configure(create_500_rate=0.3, force_429_next=2)
    pid = (
        await api.post("/v1/models/a/b/predictions", json={"input": {"__fake_outcome": "hang"}})
    ).status_code
    assert pid == 429
    await admin.reset()
    cfg = await admin.config()
    assert (cfg["create_500_rate"], cfg["create_script"]) == (0.0, [])
    assert await admin.ledger() == []
    assert fake.engine.predictions == {}
    assert (await api.post("/v1/models/a/b/predictions", json={"input": {}})).status_code == 201


async def test_ledger_reconstructs_concurrency_of_a_scripted_run(
    api: httpx.AsyncClient, admin: FakeAdmin, fake: FakeReplicate, receiver: WebhookReceiver
) -> None:
    """Tenant a: two 0.6 s runs together, then one 0.3 s run after both ended; tenant b: one 1.0 s run
    alongside the first two. Expected peaks: global 3, a 2, b 1."""

    async def create(task: str, tenant: str, duration: float) -> str:
        payload = body(receiver, task, __fake_duration_s=duration, __fake_starting_s=0.0)
        payload["webhook"] += f"&tenant={tenant}"
        resp = await api.post("/v1/models/a/b/predictions", json=payload)
        assert resp.status_code == 201
        return str(resp.json()["id"])

    await asyncio.gather(create("a1", "a", 0.6), create("a2", "a", 0.6), create("b1", "b", 1.0))
    await asyncio.sleep(0.75)
    await create("a3", "a", 0.3)
    await asyncio.sleep(0.55)
    events = await admin.ledger()
    assert all(e["kind"] != "create" or e["params"]["tenant"] in "ab" for e in events)
    peak = max_concurrency(events, group_by="tenant")
    assert (peak.global_max, peak.by_group) == (3, {"a": 2, "b": 1})
    assert predictions_per_task(events) == {"a1": 1, "a2": 1, "b1": 1, "a3": 1}
    remote = await admin.summary(group_by="tenant")
    assert remote["max_concurrency"] == {"global": 3, "by_group": {"a": 2, "b": 1}}
    assert remote["status_counts"] == {"succeeded": 4}
    assert remote["in_flight"] == 0
    assert remote["tasks_with_several_predictions"] == {}
    spans = intervals(events)
    assert len(spans) == 4
    assert all(iv.end is not None and iv.end > iv.begin for iv in spans)


def test_concurrency_helpers_on_a_synthetic_ledger() -> None:
    def create(pid: str, t: float, task: str, **params: str) -> dict[str, Any]:
        return {"kind": "create", "t": t, "prediction_id": pid, "task": task, "attempt": 1,
                "params": {"task": task, **params}, "input": {"tenant": params.get("tenant", "x"), "region": "eu"}}  # fmt: skip

    def mark(kind: str, pid: str, t: float) -> dict[str, Any]:
        return {"kind": kind, "t": t, "prediction_id": pid, "status": "succeeded"}

    events = [
        create("p1", 0.0, "t1", tenant="a"), mark("start", "p1", 1.0), mark("finish", "p1", 3.0),
        create("p2", 0.5, "t2", tenant="a"), mark("start", "p2", 3.0), mark("finish", "p2", 4.0),
        create("p3", 0.5, "t3", tenant="b"), mark("start", "p3", 2.0), mark("finish", "p3", 5.0),
        create("p4", 0.6, "t1", tenant="b"), mark("start", "p4", 2.5),  # still running
        create("p5", 0.7, "t5", tenant="b"), mark("finish", "p5", 0.9),  # aborted: never started
    ]  # fmt: skip
    # Touching intervals (p1 ends at 3.0 when p2 starts) do not overlap.
    by_start = max_concurrency(events, group_by="tenant", now=10.0)
    assert (by_start.global_max, by_start.by_group) == (3, {"a": 1, "b": 2})
    by_create = max_concurrency(events, group_by="param:tenant", since="create", now=10.0)
    assert (by_create.global_max, by_create.by_group) == (5, {"a": 2, "b": 3})
    by_input = max_concurrency(events, group_by="input:region", now=10.0)
    assert by_input.by_group == {"eu": 3}
    assert predictions_per_task(events) == {"t1": 2, "t2": 1, "t3": 1, "t5": 1}
    s = summary(events, group_by="tenant")
    assert s["tasks_with_several_predictions"] == {"t1": 2}
    assert s["in_flight"] == 1
    assert max_concurrency([]).global_max == 0
