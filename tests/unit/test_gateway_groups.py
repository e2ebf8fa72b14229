"""Unit tests of the gateway's validation of task groups and delayed tasks (the GroupService
tables and the new TaskSpec fields): every bad field named, nothing forwarded."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest

from conveyor.tasks.v1 import group_pb2, task_pb2
from conveyor.tasks.v1 import group_service_pb2 as grp_pb2
from conveyor.tasks.v1 import task_service_pb2 as svc_pb2
from conveyor_common.errors import InvalidArgument
from conveyor_gateway import groups as _groups  # registers the GroupService tables
from conveyor_gateway.validation import Limits, Validator

assert _groups.GROUP_SERVICE


def spec(prompt: str = "a cat") -> task_pb2.TaskSpec:
    s = task_pb2.TaskSpec(kind=task_pb2.TASK_KIND_IMAGE, model="acme/sdxl")
    s.input.update({"prompt": prompt})
    return s


def fields(exc: pytest.ExceptionInfo[InvalidArgument]) -> list[str]:
    return sorted(v.field for v in exc.value.violations)


async def test_a_valid_group_passes() -> None:
    g = group_pb2.GroupSpec(children=[spec(str(i)) for i in range(10)])
    g.follow_up.spec.CopyFrom(spec("video"))
    g.follow_up.outputs_field = "frames"
    await Validator().check(grp_pb2.CreateGroupRequest(request_id="g-1", spec=g))


async def test_every_bad_group_field_is_named() -> None:
    bad_child = spec()
    bad_child.kind = 99  # type: ignore[assignment]
    hooked = spec()
    hooked.webhook.url = "ftp://example.com/hook"  # refused by its syntax: no DNS
    g = group_pb2.GroupSpec(children=[spec(), bad_child, hooked], policy=7)  # type: ignore[arg-type]
    g.follow_up.spec.CopyFrom(spec())
    g.follow_up.outputs_field = "prompt"  # the follow-up's own input already sets it
    with pytest.raises(InvalidArgument) as exc:
        await Validator().check(grp_pb2.CreateGroupRequest(request_id="", spec=g))
    assert fields(exc) == [
        "request_id",
        "spec.children[1].kind",
        "spec.children[2].webhook",
        "spec.children[2].webhook.url",
        "spec.follow_up.outputs_field",
        "spec.policy",
    ]


async def test_group_size_is_bounded() -> None:
    validator = Validator(Limits(max_group_children=3))
    too_many = group_pb2.GroupSpec(children=[spec() for _ in range(4)])
    with pytest.raises(InvalidArgument) as exc:
        await validator.check(grp_pb2.CreateGroupRequest(request_id="g", spec=too_many))
    assert fields(exc) == ["spec.children"]
    with pytest.raises(InvalidArgument) as empty:
        await validator.check(
            grp_pb2.CreateGroupRequest(request_id="g", spec=group_pb2.GroupSpec())
        )
    assert fields(empty) == ["spec.children"]


async def test_group_ids_must_be_uuids() -> None:
    for request in (
        grp_pb2.GetGroupRequest(group_id="nope"),
        grp_pb2.CancelGroupRequest(group_id="nope"),
        grp_pb2.WatchGroupRequest(group_id="nope"),
    ):
        with pytest.raises(InvalidArgument) as exc:
            await Validator().check(request)
        assert fields(exc) == ["group_id"]


async def test_delays_and_retry_policies() -> None:
    now = time.time()
    ok = spec()
    ok.delay.FromTimedelta(timedelta(minutes=5))
    ok.retry_policy.backoff = task_pb2.RETRY_BACKOFF_EXPONENTIAL
    ok.retry_policy.delay.FromTimedelta(timedelta(seconds=1))
    ok.retry_policy.max_delay.FromTimedelta(timedelta(minutes=1))
    await Validator().check(svc_pb2.SubmitTaskRequest(request_id="r", spec=ok))

    bad = spec()
    bad.delay.FromTimedelta(timedelta(days=30))
    bad.not_before.FromSeconds(int(now) + 3600)
    bad.queue_deadline.FromSeconds(int(now) + 60)
    bad.retry_policy.backoff = 9  # type: ignore[assignment]
    bad.retry_policy.max_delay.FromTimedelta(timedelta(days=2))
    with pytest.raises(InvalidArgument) as exc:
        await Validator().check(svc_pb2.SubmitTaskRequest(request_id="r", spec=bad))
    assert fields(exc) == [
        "spec.delay",
        "spec.not_before",
        "spec.not_before",
        "spec.retry_policy.backoff",
        "spec.retry_policy.delay",
        "spec.retry_policy.max_delay",
    ]
