"""The gateway's checks of unstorable text (NUL, surrogates) and JSON bounds, without a scheduler."""

from __future__ import annotations

from typing import Any

from conveyor.tasks.v1 import task_pb2
from conveyor.tasks.v1 import task_service_pb2 as svc_pb2
from conveyor_common.textcheck import NUL_MESSAGE, SURROGATE_MESSAGE, text_problem
from conveyor_gateway.validation import Limits, Validator


def submit(**input_doc: Any) -> svc_pb2.SubmitTaskRequest:
    spec = task_pb2.TaskSpec(kind=task_pb2.TASK_KIND_IMAGE, model="acme/sdxl")
    spec.input.update(input_doc or {"prompt": "ok"})
    return svc_pb2.SubmitTaskRequest(request_id="r-1", spec=spec)


def fields(request: Any, validator: Validator | None = None) -> dict[str, str]:
    violations, _ = (validator or Validator()).violations(request)
    return {v.field: v.description for v in violations}


def test_text_problem() -> None:
    assert text_problem("fine \t\n ünïcode 😀") is None
    assert text_problem("a\x00b") == NUL_MESSAGE
    assert text_problem("a\ud800b") == SURROGATE_MESSAGE


def test_nul_in_input_value_and_key_is_named() -> None:
    assert fields(submit(prompt="a\x00b")) == {"spec.input.prompt": NUL_MESSAGE}
    assert fields(submit(**{"a\x00b": 1})) == {'spec.input["a\\u0000b"]': NUL_MESSAGE}


def test_a_nul_is_called_a_nul_once_not_also_a_bad_format() -> None:
    request = submit()
    request.request_id = "r\x00"
    request.spec.model = "acme/\x00"
    assert fields(request) == {"request_id": NUL_MESSAGE, "spec.model": NUL_MESSAGE}


def test_a_url_with_a_nul_is_not_resolved() -> None:
    request = submit(image="https://exa\x00mple.org/a.png")
    violations, urls = Validator().violations(request)
    assert [v.field for v in violations] == ["spec.input.image"]
    assert urls == []


def test_input_bounds_are_settings() -> None:
    tight = Validator(Limits(max_input_depth=2, max_input_nodes=5))
    assert fields(submit(a={"b": {"c": 1}}), tight) == {}  # objects at depth 1 and 2
    deep = fields(submit(a={"b": {"c": {"d": 1}}}), tight)
    assert "nested deeper than 2" in deep["spec.input.a.b.c"]
    assert "more than 5" in fields(submit(a=[1, 2, 3, 4, 5]), tight)["spec.input"]
    assert fields(submit(a=[1, 2, 3, 4]), tight) == {}


def _deep_input(levels: int) -> dict[str, Any]:
    doc: dict[str, Any] = {"x": 1}
    for _ in range(levels):
        doc = {"a": doc}
    return doc


def test_input_that_parses_here_but_not_once_wrapped_is_refused() -> None:
    # 32 object levels parse inside a SubmitTaskRequest but not inside a SubmitTaskGroupRequest.
    request = svc_pb2.SubmitTaskRequest.FromString(submit(**_deep_input(32)).SerializeToString())
    assert any("nested deeper than 20" in d for d in fields(request).values())


async def test_an_item_that_cannot_be_grouped_fails_alone() -> None:
    import asyncio
    import time

    from conveyor.scheduler.v1 import scheduler_service_pb2 as s
    from conveyor_common.errors import InvalidArgument
    from conveyor_gateway.coalesce import SubmitCoalescer, _Pending

    loop = asyncio.get_running_loop()
    good = _Pending(
        s.SchedulerServiceSubmitTaskRequest(request=submit()),
        time.monotonic() + 5,
        loop.create_future(),
    )
    deep = svc_pb2.SubmitTaskRequest.FromString(submit(**_deep_input(32)).SerializeToString())
    bad = _Pending(
        s.SchedulerServiceSubmitTaskRequest(request=deep),
        time.monotonic() + 5,
        loop.create_future(),
    )
    group = SubmitCoalescer._group_request([good, bad])
    assert len(group.items) == 1
    assert not good.future.done()
    assert isinstance(bad.future.exception(), InvalidArgument)
