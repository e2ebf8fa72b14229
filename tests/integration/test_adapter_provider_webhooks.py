"""conveyor_provider_adapter.provider_webhooks: forged, stale, tampered, replayed and retargeted deliveries change nothing."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
import uuid
from datetime import UTC, datetime

import httpx
import pytest
from prometheus_client import CollectorRegistry

from conveyor_common.standard_webhooks import generate_secret, sign_headers
from conveyor_provider_adapter.app import Adapter
from conveyor_provider_adapter.binding import UNBOUND_REASONS
from conveyor_provider_adapter.webhook_token import webhook_url
from conveyor_testkit.adapter import (
    has_terminal,
    outcomes,
)
from tests.integration.adapter_env import SECRET, TOKEN, Env, S, second_replica, task_id, wait_until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.kafka,
    pytest.mark.usefixtures("fresh_fake_config"),
]


# --------------------------------------------------------------------------------------------------
# Webhook security: forged, stale, tampered and replayed deliveries change nothing.


def _hook_url(env: Env, task: str, attempt: int = 1) -> str:
    settings = env.adapter.settings
    url = webhook_url(
        f"http://127.0.0.1:{env.adapter.webhook_port}",
        settings.webhook_token_key.get_secret_value().encode(),
        task,
        attempt,
    )
    return url


def _rejected(env: Env) -> dict[str, float]:
    reasons = (
        "bad_signature",
        "missing_headers",
        "stale",
        "future",
        "bad_token",
        "malformed_signature",
    )
    return {r: env.metric("conveyor_adapter_webhooks_rejected_total", reason=r) for r in reasons}


async def test_forged_stale_tampered_and_replayed_webhooks_change_nothing(env: Env) -> None:
    task = task_id()
    pid = f"pforged{uuid.uuid4().hex[:10]}"
    record = env.coordination.dispatched(task)
    record.state = S.SUBMIT_STATE_SUBMITTED
    record.prediction_id = pid
    body = json.dumps(
        {
            "id": pid,
            "status": "processing",
            "model": "acme/flux",
            "input": {"prompt": "x"},
            "logs": "Using seed: 1\n 40%|####      | 4/10 [00:01<00:01,  3.00it/s]\n",
            "created_at": datetime.now(UTC).isoformat(),
        }
    ).encode()
    url = _hook_url(env, task)
    valid = sign_headers([SECRET], body)
    now = int(time.time())
    flipped = bytearray(body)
    flipped[len(flipped) // 2] ^= 0x01
    forged: list[tuple[str, dict[str, str], bytes]] = [
        (
            "bad_signature",
            {**valid, "webhook-signature": "v1," + base64.b64encode(os.urandom(32)).decode()},
            body,
        ),
        ("bad_signature", sign_headers([generate_secret()], body), body),  # wrong secret
        ("bad_signature", valid, bytes(flipped)),  # one flipped body byte
        ("missing_headers", {k: v for k, v in valid.items() if k != "webhook-id"}, body),
        ("missing_headers", {k: v for k, v in valid.items() if k != "webhook-timestamp"}, body),
        ("missing_headers", {k: v for k, v in valid.items() if k != "webhook-signature"}, body),
        # A minute past the 300 s tolerance: the requests before them may take seconds on a
        # loaded machine (now + 301 was once verified 1 s later, inside the tolerance).
        ("stale", sign_headers([SECRET], body, timestamp=now - 360), body),
        ("future", sign_headers([SECRET], body, timestamp=now + 360), body),
    ]
    before = _rejected(env)
    dup_before = env.metric("conveyor_adapter_webhooks_total", outcome="duplicate")
    async with httpx.AsyncClient(timeout=5) as client:
        for reason, headers, content in forged:
            resp = await client.post(url, content=content, headers=headers)
            assert resp.status_code == 401, (reason, resp.text)
            assert resp.json()["error"] == reason
        # Signed by Replicate, but not a URL we issued (token of another attempt).
        wrong_token = url.replace("attempt=1", "attempt=7")
        resp = await client.post(wrong_token, content=body, headers=valid)
        assert resp.status_code == 200
        assert resp.json()["error"] == "bad_token"
        # The genuine delivery, then its replay.
        started = time.perf_counter()
        resp = await client.post(url, content=body, headers=valid)
        answer_s = time.perf_counter() - started
        assert resp.status_code == 200
        assert resp.json() == {"status": "accepted"}
        resp = await client.post(url, content=body, headers=valid)
        assert resp.status_code == 200
        assert resp.json() == {"status": "duplicate"}
    assert answer_s < 5.0  # "within milliseconds" in practice; generous for a loaded CI machine
    results = await env.collector.wait_for(lambda rs: "progress" in outcomes(rs), task)
    await asyncio.sleep(1.0)  # anything a forgery or the replay caused would be here by now
    results = env.collector.for_task(task)
    msg_id = valid["webhook-id"]
    assert outcomes(results) == ["started", "progress"]
    assert [r.result_id for r in results] == [f"wh:{msg_id}", f"wh:{msg_id}:progress"]
    assert results[1].progress.percent == 40
    after = _rejected(env)
    delta = {k: after[k] - before[k] for k in after}
    assert delta == {
        "bad_signature": 3,
        "missing_headers": 3,
        "stale": 1,
        "future": 1,
        "bad_token": 1,
        "malformed_signature": 0,
    }
    assert env.metric("conveyor_adapter_webhooks_total", outcome="duplicate") - dup_before == 1


async def test_signed_webhook_of_a_prediction_not_recorded_for_its_attempt_changes_nothing(
    env: Env,
) -> None:
    """A delivery's word is not enough to cancel: a prediction the scheduler never recorded for
    the attempt of the URL (here a stale attempt) is neither adopted nor canceled; the orphan ends
    at its Cancel-After deadline."""
    task = task_id()
    env.coordination.dispatched(task, attempt=2)
    async with httpx.AsyncClient(
        base_url=env.fake.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5
    ) as api:
        resp = await api.post(
            "/v1/models/acme/flux/predictions",
            json={"input": {"prompt": "stale", "__fake_duration_s": 30}},
            headers={"Cancel-After": "20s"},
        )
        assert resp.status_code == 201
        pid = resp.json()["id"]
        body = (await api.get(f"/v1/predictions/{pid}")).content
    before = env.metric("conveyor_adapter_webhooks_unbound_total", reason="not_in_flight")
    async with httpx.AsyncClient(timeout=5) as client:
        resp = await client.post(
            _hook_url(env, task, 1), content=body, headers=sign_headers([SECRET], body)
        )
        assert resp.status_code == 200
    await wait_until(
        lambda: (
            env.metric("conveyor_adapter_webhooks_unbound_total", reason="not_in_flight") > before
        )
    )
    assert not any(e["prediction_id"] == pid for e in await env.ledger_all("cancel"))
    assert not [c for c in env.coordination.calls if c[1] == task and c[0] == "CompleteSubmit"]
    assert env.collector.for_task(task) == []


async def _running_pair(env: Env) -> tuple[str, str, str, str]:
    """Two running tasks (T2, T4) and their prediction ids."""
    t2, t4 = task_id(), task_id()
    for t in (t2, t4):
        env.coordination.dispatched(t)
        await env.commands.dispatch(t, inputs={"prompt": f"{t} long", "__fake_duration_s": 6})
    p: dict[str, str] = {}
    await wait_until(lambda: all(env.coordination.tasks[t].prediction_id for t in (t2, t4)))
    for t in (t2, t4):
        p[t] = env.coordination.tasks[t].prediction_id
    return t2, p[t2], t4, p[t4]


def _unbound(registry: CollectorRegistry) -> float:
    return sum(
        registry.get_sample_value("conveyor_adapter_webhooks_unbound_total", {"reason": r}) or 0.0
        for r in UNBOUND_REASONS
    )


@pytest.mark.parametrize("replica", ["same", "other"])
@pytest.mark.parametrize("webhook_id", ["original", "fresh"])
async def test_retargeted_genuine_delivery_changes_nothing_and_cancels_nothing(
    env: Env, kafka_bootstrap: str, replica: str, webhook_id: str
) -> None:
    """#15: T4's genuine delivery posted to T2's webhook URL (same or another replica, original or
    fresh webhook-id) is not bound to T2's attempt: no adoption, no result, no cancel; counted."""
    t2, p2, t4, p4 = await _running_pair(env)
    async with httpx.AsyncClient(
        base_url=env.fake.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5
    ) as api:
        body = (await api.get(f"/v1/predictions/{p4}")).content
    genuine = sign_headers([SECRET], body)
    second: Adapter | None = None
    registry = env.registry
    try:
        if replica == "other":
            second, registry = await second_replica(env, kafka_bootstrap)
        port = env.adapter.webhook_port if second is None else second.webhook_port
        key = env.adapter.settings.webhook_token_key.get_secret_value().encode()
        before = _unbound(registry)
        t2_results = list(env.collector.for_task(t2))
        t4_results = list(env.collector.for_task(t4))
        async with httpx.AsyncClient(timeout=5) as client:
            if webhook_id == "original":
                # The genuine delivery at T4's own URL first, then the same one re-targeted.
                resp = await client.post(
                    webhook_url(f"http://127.0.0.1:{port}", key, t4, 1),
                    content=body,
                    headers=genuine,
                )
                assert resp.status_code == 200
                headers = genuine
            else:
                headers = sign_headers([SECRET], body)  # re-signed under a fresh webhook-id
            resp = await client.post(
                webhook_url(f"http://127.0.0.1:{port}", key, t2, 1), content=body, headers=headers
            )
            assert resp.status_code == 200
            assert resp.json() == {"status": "accepted"}
        await wait_until(lambda: _unbound(registry) > before)
        # Nothing changed for T2: no result about P4, nothing canceled, P2 still recorded.
        assert all(r.prediction_id == p2 for r in env.collector.for_task(t2))
        assert env.collector.for_task(t2)[: len(t2_results)] == t2_results
        assert env.coordination.tasks[t2].prediction_id == p2
        assert env.coordination.tasks[t4].prediction_id == p4
        assert not [
            c
            for c in env.coordination.calls
            if c[0] == "CompleteSubmit" and c[1] == t2 and c[3] == "False"
        ]
        cancels = {e["prediction_id"] for e in await env.ledger_all("cancel")}
        assert p4 not in cancels
        assert p2 not in cancels
        # T4 itself finishes normally, and its results are only about P4.
        final4 = await env.collector.wait_for(has_terminal, t4, wait_s=20)
        assert outcomes(final4)[-1] == "succeeded"
        assert all(r.prediction_id == p4 for r in final4)
        assert final4[: len(t4_results)] == t4_results
        final2 = await env.collector.wait_for(has_terminal, t2, wait_s=20)
        assert outcomes(final2)[-1] == "succeeded"
        assert all(r.prediction_id == p2 for r in final2)
    finally:
        if second is not None:
            await second.stop()
