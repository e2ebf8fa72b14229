"""The gateway's table-driven forwarding (conveyor_gateway.forwarding)."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf.message import Message

from conveyor.scheduler.v1 import scheduler_service_pb2 as s
from conveyor.scheduler.v1 import scheduler_service_pb2 as sched_pb2
from conveyor.tasks.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    group_service_pb2_grpc,
    task_pb2,
    task_service_pb2,
    task_service_pb2_grpc,
    webhook_service_pb2_grpc,
)
from conveyor_gateway import auth
from conveyor_gateway.forwarding import handler
from conveyor_gateway.groups import GroupServicer
from conveyor_gateway.servicers import AdminServicer, TaskServicer, WebhookServicer

SERVICES = [
    (TaskServicer, task_service_pb2_grpc.TaskServiceServicer, "TaskService"),
    (AdminServicer, admin_service_pb2_grpc.AdminServiceServicer, "AdminService"),
    (WebhookServicer, webhook_service_pb2_grpc.WebhookServiceServicer, "WebhookService"),
    (GroupServicer, group_service_pb2_grpc.GroupServiceServicer, "GroupService"),
]


@pytest.mark.parametrize(("servicer", "generated", "service"), SERVICES)
def test_every_public_method_is_served(servicer: type, generated: type, service: str) -> None:
    from conveyor.tasks.v1 import (
        group_service_pb2,
        task_service_pb2,
        webhook_service_pb2,
    )

    files = [task_service_pb2, admin_service_pb2, webhook_service_pb2, group_service_pb2]
    descriptor = next(
        f.DESCRIPTOR.services_by_name[service]
        for f in files
        if service in f.DESCRIPTOR.services_by_name
    )
    for method in descriptor.methods:
        assert getattr(servicer, method.name) is not getattr(generated, method.name), method.name


class Recorder:
    """Stands in for the SchedulerClient and the validator; records what is forwarded."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Message]] = []
        self.checked: list[Message] = []
        self.scheduler = self
        self.validator = self

    async def check(self, request: Message) -> None:
        self.checked.append(request)

    async def call(self, method: Any, request: Message, context: Any, **_: Any) -> Any:
        class Stub:
            def __getattr__(self, name: str) -> str:
                return name

        self.calls.append((method(Stub()), request))
        answer: Any = type("Answer", (), {"response": "the public response"})()
        return answer


@pytest.fixture
def principal() -> Any:
    who = auth.Principal("acme", task_pb2.TIER_PRO, sched_pb2.ROLE_TENANT, "svc")
    token = auth._principal_var.set(who)
    yield who
    auth._principal_var.reset(token)


async def test_a_mutating_call_gets_a_request_id_and_the_principal(principal: Any) -> None:
    rec = Recorder()
    forward = handler(s, "SchedulerService", "CancelTask", mint_request_id=True)
    request = task_service_pb2.CancelTaskRequest(task_id="t-1")
    assert await forward(rec, request, None) == "the public response"
    [(method, wrapped)] = rec.calls
    assert method == "CancelTask"
    assert isinstance(wrapped, s.SchedulerServiceCancelTaskRequest)
    assert wrapped.principal.tenant_id == "acme"
    assert wrapped.request.task_id == "t-1"
    assert wrapped.request.request_id
    assert rec.checked == [request]


async def test_a_caller_key_is_never_minted(principal: Any) -> None:
    rec = Recorder()
    forward = handler(s, "SchedulerService", "SubmitTask")
    await forward(rec, task_service_pb2.SubmitTaskRequest(), None)
    [(_, wrapped)] = rec.calls
    assert isinstance(wrapped, s.SchedulerServiceSubmitTaskRequest)
    assert wrapped.request.request_id == ""  # left for the validator to refuse


def test_minting_needs_a_request_id_field() -> None:
    with pytest.raises(TypeError):
        handler(s, "SchedulerService", "GetTask", mint_request_id=True)


def test_tiers_follow_the_proto() -> None:
    assert set(auth.TIERS) == {"free", "premium", "pro"}
    assert auth.TIERS["pro"] == task_pb2.TIER_PRO
