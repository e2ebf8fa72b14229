"""conveyor_scheduler.admission.group_submit through SchedulerService.SubmitTaskGroup on real gRPC and
PostgreSQL: each item decided alone, an oversized group refused.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.rpc import status_pb2
from sqlalchemy import text

from conveyor.scheduler.v1 import scheduler_service_pb2 as pb
from conveyor.tasks.v1 import admin_service_pb2, task_pb2, task_service_pb2
from conveyor_common.errors import unpack_details
from conveyor_scheduler.app import SchedulerApp
from conveyor_testkit import scheduler as kit
from tests.integration.scheduler_env import ADMIN, details, submit_request


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
    first = await sched.SubmitTask(submit_request("grp-dup"))
    bad = submit_request("grp-bad")
    bad.request.spec.model = "no-owner"
    items = [
        submit_request("grp-new-1"),
        submit_request("grp-dup"),  # same body: the earlier task, deduplicated
        submit_request("grp-dup", prompt="another body"),  # same key, other body: refused
        pb.SchedulerServiceSubmitTaskRequest(
            principal=capped,
            request=task_service_pb2.SubmitTaskRequest(request_id="cap-1", spec=kit.spec()),
        ),
        pb.SchedulerServiceSubmitTaskRequest(
            principal=capped,
            request=task_service_pb2.SubmitTaskRequest(request_id="cap-2", spec=kit.spec()),
        ),
        bad,
        submit_request("grp-new-2"),
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
    assert [v.field for v in details["BadRequest"].field_violations] == ["spec.target"]
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
    items = [submit_request(f"big-{i}") for i in range(10_001)]
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await sched.SubmitTaskGroup(pb.SubmitTaskGroupRequest(items=items), timeout=30)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in details(exc.value)["BadRequest"].field_violations] == ["items"]
