"""The fake's webhooks over real loopback HTTP: Standard Webhooks signatures a receiver verifies, the
events filter and throttling, retries without redirects, rotation, and every webhook fault knob."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from conveyor_common.standard_webhooks import (
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    WebhookVerificationError,
    generate_secret,
    verify,
)
from fake_replicate import FakeConfig, FakeReplicate
from fake_replicate.testing import Delivery, WebhookReceiver

pytestmark = pytest.mark.integration

TOKEN = "r8_hooks"
SECRET = generate_secret()


@pytest.fixture(scope="module")
async def fake() -> AsyncIterator[FakeReplicate]:
    cfg = FakeConfig(
        token=TOKEN,
        webhook_secret=SECRET,
        seed=11,
        min_duration_s=0.2,
        max_duration_s=0.3,
        webhook_retry_base_s=0.05,
        webhook_retries=2,
        webhook_throttle_s=0.2,
    )
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


async def create(
    api: httpx.AsyncClient,
    receiver: WebhookReceiver,
    *,
    task: str = "t1",
    events: list[str] | None = None,
    inputs: dict[str, Any] | None = None,
) -> str:
    body: dict[str, Any] = {
        "input": inputs or {},
        "webhook": f"{receiver.url}/hooks/replicate?task={task}&attempt=1&tok=abc",
    }
    if events is not None:
        body["webhook_events_filter"] = events
    resp = await api.post("/v1/models/acme/img/predictions", json=body)
    assert resp.status_code == 201, resp.text
    pid: str = resp.json()["id"]
    return pid


def completed(pid: str) -> Any:
    def check(ds: list[Delivery]) -> bool:
        return any(d.verified and d.payload["id"] == pid and d.status == "succeeded" for d in ds)

    return check


async def settle(fake: FakeReplicate, within_s: float = 5.0) -> None:
    """Wait until every prediction is terminal and every webhook has a ledger outcome."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        events = fake.engine.ledger.events()
        finished = sum(1 for e in events if e["kind"] == "finish")
        if finished == len(fake.engine.predictions) and not [
            t for t in fake.engine._tasks if not t.done()
        ]:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("fake did not settle")


async def test_start_and_completed_signed_and_verifiable(
    api: httpx.AsyncClient, fake: FakeReplicate, receiver: WebhookReceiver
) -> None:
    secret = (await api.get("/v1/webhooks/default/secret")).json()["key"]
    assert secret.startswith("whsec_")
    pid = await create(api, receiver, events=["start", "completed"])
    await receiver.wait_for(completed(pid))
    await settle(fake)
    got = receiver.for_prediction(pid)
    assert [d.status for d in got] == ["starting", "succeeded"]
    for d in got:
        assert d.verified
        assert d.path == "/hooks/replicate"
        assert d.query == {"task": "t1", "attempt": "1", "tok": "abc"}
        assert d.headers["content-type"] == "application/json"
        assert abs(int(d.headers[HEADER_TIMESTAMP]) - time.time()) < 5
        assert verify(secret, d.headers, d.body).msg_id == d.msg_id  # independent re-verification
        flipped = bytearray(d.body)
        flipped[3] ^= 1
        with pytest.raises(WebhookVerificationError, match="bad_signature"):
            verify(secret, d.headers, bytes(flipped))
    assert got[0].msg_id != got[1].msg_id
    final = got[1].payload
    assert final == (await api.get(f"/v1/predictions/{pid}")).json()  # body = the prediction object
    assert final["output"].startswith(f"{fake.url}/files/{pid}/")
    # no logs/output events were requested
    assert len(receiver.deliveries) == 2


async def test_default_filter_is_output_and_completed(
    api: httpx.AsyncClient, fake: FakeReplicate, receiver: WebhookReceiver
) -> None:
    pid = await create(api, receiver, events=None)
    await receiver.wait_for(completed(pid))
    await settle(fake)
    kinds = [e["event"] for e in fake.engine.ledger.events(kind="webhook")]
    assert sorted(kinds) == ["completed", "output"]
    statuses = [d.status for d in receiver.for_prediction(pid)]
    assert statuses == ["processing", "succeeded"]
    assert receiver.for_prediction(pid)[0].payload["output"] is not None


async def test_logs_events_are_throttled(
    api: httpx.AsyncClient, fake: FakeReplicate, receiver: WebhookReceiver
) -> None:
    fake.configure(progress_steps=20)
    pid = await create(
        api, receiver, events=["logs"], inputs={"__fake_duration_s": 1.0, "__fake_starting_s": 0}
    )
    await asyncio.sleep(1.1)
    await settle(fake)
    got = receiver.for_prediction(pid)
    # 21 log updates (seed line + 20 tqdm lines) in 1 s, throttled to one per 0.2 s. Arrival gaps
    # are not asserted: on a loaded machine throttled deliveries can arrive back to back.
    assert 2 <= len(got) <= 8
    assert all(d.status == "processing" for d in got)
    assert "%|" in got[-1].payload["logs"]
    assert len(got[-1].payload["logs"]) > len(got[0].payload["logs"])
    assert not [e for e in fake.engine.ledger.events(kind="webhook") if e["event"] != "logs"]


async def test_progress_waits_out_the_throttle_window_of_the_start_webhook(
    api: httpx.AsyncClient, fake: FakeReplicate, receiver: WebhookReceiver
) -> None:
    """One throttle window per prediction for every non-terminal update, the sent ``start``
    included (cog's webhook caller): a prediction ending within the window after its ``start``
    sends no ``logs`` webhook, a longer one its first a window after ``start``."""
    events = ["start", "logs", "completed"]
    quick, slow = [
        await create(
            api,
            receiver,
            task=task,
            events=events,
            inputs={"__fake_duration_s": run_s, "__fake_starting_s": 0},  # logs at once
        )
        for task, run_s in (("quick", 0.05), ("slow", 0.7))
    ]
    await asyncio.sleep(0.9)
    await settle(fake)
    sent = fake.engine.ledger.events(kind="webhook")
    assert sorted(e["event"] for e in sent if e["prediction_id"] == quick) == ["completed", "start"]
    assert "logs" in [e["event"] for e in sent if e["prediction_id"] == slow]
    got = receiver.for_prediction(slow)
    [start] = [d for d in got if d.status == "starting"]
    first_logs = min(d.received_at for d in got if d.status == "processing")
    assert first_logs - start.received_at >= 0.1  # the window is 0.2 s; at once before


async def test_retries_on_non_2xx_keep_the_webhook_id(
    api: httpx.AsyncClient, fake: FakeReplicate, receiver: WebhookReceiver
) -> None:
    receiver.responses = [500, 503]
    pid = await create(api, receiver, events=["completed"])
    await receiver.wait_for(completed(pid))
    await settle(fake)
    attempts = [d for d in receiver.deliveries if d.payload["id"] == pid]
    assert [d.answered for d in attempts] == [500, 503, 200]
    assert len({d.msg_id for d in attempts}) == 1
    (entry,) = fake.engine.ledger.events(kind="webhook")
    assert (entry["outcome"], entry["attempts"], entry["http_status"]) == ("delivered", 3, 200)


async def test_redirects_are_not_followed(
    api: httpx.AsyncClient, fake: FakeReplicate, receiver: WebhookReceiver
) -> None:
    other = WebhookReceiver(secrets=[SECRET])
    await other.start()
    try:
        receiver.redirect_to = f"{other.url}/elsewhere"
        await create(api, receiver, events=["completed"])
        await settle(fake)
        assert other.deliveries == []
        assert [d.answered for d in receiver.deliveries] == [307, 307, 307]  # 1 + 2 retries
        (entry,) = fake.engine.ledger.events(kind="webhook")
        assert (entry["outcome"], entry["http_status"]) == ("failed", 307)
    finally:
        await other.stop()


async def test_unreachable_receiver_fails_after_retries(
    api: httpx.AsyncClient, fake: FakeReplicate
) -> None:
    body = {
        "input": {},
        "webhook": "http://127.0.0.1:9/none",
        "webhook_events_filter": ["completed"],
    }
    assert (await api.post("/v1/models/a/b/predictions", json=body)).status_code == 201
    await settle(fake)
    (entry,) = fake.engine.ledger.events(kind="webhook")
    assert (entry["outcome"], entry["attempts"], entry["http_status"]) == ("failed", 3, None)


async def test_rotation_signs_with_every_secret(
    api: httpx.AsyncClient, fake: FakeReplicate, receiver: WebhookReceiver
) -> None:
    new = generate_secret()
    fake.configure(webhook_secret=new, webhook_extra_secrets=[SECRET])
    pid = await create(api, receiver, events=["completed"])
    await receiver.wait_for(completed(pid))  # the receiver only knows the old SECRET
    (d,) = receiver.for_prediction(pid)
    assert len(d.headers[HEADER_SIGNATURE].split(" ")) == 2
    assert verify(new, d.headers, d.body).msg_id == d.msg_id
    assert (await api.get("/v1/webhooks/default/secret")).json() == {"key": new}


async def test_duplicate_delivery_fault(
    api: httpx.AsyncClient, fake: FakeReplicate, receiver: WebhookReceiver
) -> None:
    fake.configure(webhook_duplicate_rate=1.0)
    pid = await create(api, receiver, events=["start", "completed"])
    await settle(fake)
    got = receiver.for_prediction(pid)
    assert [d.status for d in got] == ["starting", "starting", "succeeded", "succeeded"]
    assert got[0].msg_id == got[1].msg_id
    assert got[2].msg_id == got[3].msg_id
    assert got[0].body == got[1].body
    assert all(e["duplicated"] for e in fake.engine.ledger.events(kind="webhook"))


async def test_delayed_webhook_fault(
    api: httpx.AsyncClient, fake: FakeReplicate, receiver: WebhookReceiver
) -> None:
    fake.configure(webhook_delay_rate=1.0, webhook_delay_s=0.8)
    t0 = time.time()
    pid = await create(api, receiver, events=["start"], inputs={"__fake_duration_s": 0.2})
    await asyncio.sleep(0.4)
    assert receiver.deliveries == []
    assert (await api.get(f"/v1/predictions/{pid}")).json()["status"] == "succeeded"
    await receiver.wait_for(lambda ds: len(ds) == 1, within_s=3)
    (d,) = receiver.for_prediction(pid)
    assert d.received_at - t0 >= 0.75
    assert d.status == "starting"  # the body is the state at event time, not delivery time
    await settle(fake)
    assert fake.engine.ledger.events(kind="webhook")[0]["delayed_s"] == 0.8


async def test_dropped_webhook_fault_by_event_kind(
    api: httpx.AsyncClient, fake: FakeReplicate, receiver: WebhookReceiver
) -> None:
    fake.configure(webhook_drop_rate=1.0, webhook_drop_events=["completed"])
    pid = await create(api, receiver, events=["start", "completed"])
    await settle(fake)
    assert [d.status for d in receiver.for_prediction(pid)] == ["starting"]
    outcomes = {e["event"]: e["outcome"] for e in fake.engine.ledger.events(kind="webhook")}
    assert outcomes == {"start": "delivered", "completed": "dropped"}
    # The prediction itself still finished: a reconciler polling GET sees it.
    assert (await api.get(f"/v1/predictions/{pid}")).json()["status"] == "succeeded"
    fake.configure(webhook_drop_events=[])
    pid2 = await create(api, receiver, events=["start", "completed"])
    await settle(fake)
    assert receiver.for_prediction(pid2) == []


async def test_completed_before_start_fault(
    api: httpx.AsyncClient, fake: FakeReplicate, receiver: WebhookReceiver
) -> None:
    fake.configure(completed_before_start_rate=1.0)
    pid = await create(api, receiver, events=["start", "completed"])
    await settle(fake)
    assert [d.status for d in receiver.for_prediction(pid)] == ["succeeded", "starting"]


async def test_stale_timestamp_fault_then_fresh_retry(
    api: httpx.AsyncClient, fake: FakeReplicate, receiver: WebhookReceiver
) -> None:
    fake.configure(webhook_stale_rate=1.0)
    pid = await create(api, receiver, events=["completed"])
    await settle(fake)
    attempts = [d for d in receiver.deliveries if d.payload["id"] == pid]
    assert [(d.verified, d.reject_reason, d.answered) for d in attempts] == [
        (False, "stale", 400),
        (True, None, 200),
    ]


async def test_per_input_webhook_knobs(
    api: httpx.AsyncClient, fake: FakeReplicate, receiver: WebhookReceiver
) -> None:
    ev = ["start", "completed"]
    dropped = await create(
        api, receiver, task="d", events=ev, inputs={"__fake_webhook_drop": "completed"}
    )
    dup = await create(
        api, receiver, task="u", events=ev, inputs={"__fake_webhook_duplicate": ["start"]}
    )
    cbs = await create(
        api, receiver, task="c", events=ev, inputs={"__fake_completed_before_start": True}
    )
    none = await create(api, receiver, task="n", events=ev, inputs={"__fake_webhook_drop": "all"})
    late = await create(
        api,
        receiver,
        task="l",
        events=["completed"],
        inputs={"__fake_webhook_delay_s": {"completed": 0.6}},
    )
    await settle(fake)
    assert [d.status for d in receiver.for_prediction(dropped)] == ["starting"]
    assert [d.status for d in receiver.for_prediction(dup)] == ["starting", "starting", "succeeded"]
    assert [d.status for d in receiver.for_prediction(cbs)] == ["succeeded", "starting"]
    assert receiver.for_prediction(none) == []
    (d,) = receiver.for_prediction(late)
    completed_at = fake.engine.predictions[late].completed_at
    assert completed_at is not None
    assert d.received_at - completed_at >= 0.55
