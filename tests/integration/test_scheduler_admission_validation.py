"""conveyor_scheduler.admission.validation on real gRPC and PostgreSQL: webhook URLs the SSRF policy
refuses are refused before anything is written; public and allow-listed ones pass.
"""

from __future__ import annotations

import uuid
from typing import Any

import grpc
import pytest
from sqlalchemy import text

from conveyor.scheduler.v1 import scheduler_service_pb2 as pb
from conveyor.tasks.v1 import task_service_pb2
from conveyor_scheduler.api.servicer import SchedulerServicer
from conveyor_scheduler.app import SchedulerApp
from conveyor_scheduler.client_webhooks.settings import WebhookPolicy, WebhookSettings
from conveyor_testkit import scheduler as kit
from tests.integration.scheduler_env import TENANT, details


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
    fields = [v.field for v in details(exc.value)["BadRequest"].field_violations]
    assert fields == ["spec.webhook.url"]

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
    fields = [v.field for v in details(bexc.value)["BadRequest"].field_violations]
    assert fields == ["items[1].spec.webhook.url"]
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
