"""One source for the limits the gateway and the scheduler share (conveyor_common.limits).

Whatever the gateway is configured to accept (up to each knob's ceiling), the scheduler's defensive
checks accept too; policy the scheduler owns (the max_attempts cap) is enforced by the scheduler.
"""

from __future__ import annotations

import pydantic
import pytest

from conveyor.tasks.v1 import task_pb2
from conveyor.tasks.v1 import task_service_pb2 as svc_pb2
from conveyor_common import limits
from conveyor_gateway.settings import GatewaySettings
from conveyor_gateway.validation import Limits, Validator
from conveyor_scheduler.admission.validation import validate_item

WIDEST = {
    "max_input_bytes": limits.INPUT_BYTES_CEILING,
    "max_labels": limits.LABELS_CEILING,
    "max_batch_items": limits.BATCH_ITEMS_CEILING,
    "max_group_children": limits.GROUP_CHILDREN_CEILING,
    "max_label_key_length": limits.LABEL_KEY_LENGTH_CEILING,
    "max_label_value_length": limits.LABEL_VALUE_LENGTH_CEILING,
    "max_message_bytes": limits.MESSAGE_BYTES_CEILING,
}


def big_spec(max_attempts: int = 0) -> task_pb2.TaskSpec:
    """2 MiB of input and a thousand labels: beyond the old scheduler's 256 KiB and 32."""
    s = task_pb2.TaskSpec(
        kind=task_pb2.TASK_KIND_IMAGE, model="acme/sdxl", max_attempts=max_attempts
    )
    s.input.update({f"p{i}": "x" * 1024 for i in range(2048)})
    for i in range(limits.LABELS_CEILING):
        s.labels[f"k{i}"] = "v"
    return s


def gateway_env(monkeypatch: pytest.MonkeyPatch, **values: int) -> GatewaySettings:
    monkeypatch.setenv("GATEWAY_SCHEDULER_ADDRESS", "127.0.0.1:1")
    monkeypatch.setenv("GATEWAY_JWT_HS256_SECRET", "s" * 32)
    for name, value in values.items():
        monkeypatch.setenv(f"GATEWAY_{name.upper()}", str(value))
    return GatewaySettings()  # type: ignore[call-arg]


def test_gateway_knobs_reach_their_ceiling_and_no_further(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = gateway_env(monkeypatch, **WIDEST)
    for name, ceiling in WIDEST.items():
        assert getattr(settings, name) == ceiling
    for name, ceiling in WIDEST.items():
        with pytest.raises(pydantic.ValidationError):
            gateway_env(monkeypatch, **{name: ceiling + 1})
        monkeypatch.delenv(f"GATEWAY_{name.upper()}")


async def test_what_the_widest_gateway_accepts_the_scheduler_accepts() -> None:
    spec = big_spec(max_attempts=limits.MAX_ATTEMPTS_CEILING)
    gateway = Validator(
        Limits(max_input_bytes=limits.INPUT_BYTES_CEILING, max_labels=limits.LABELS_CEILING)
    )
    await gateway.check(svc_pb2.SubmitTaskRequest(request_id="r" * limits.ID_MAX_LENGTH, spec=spec))
    assert validate_item("", "r" * limits.ID_MAX_LENGTH, spec, limits.MAX_ATTEMPTS_CEILING) == []


def test_the_scheduler_owns_the_attempts_cap() -> None:
    spec = task_pb2.TaskSpec(kind=task_pb2.TASK_KIND_IMAGE, model="acme/sdxl", max_attempts=50)
    assert validate_item("", "r1", spec, max_attempts_cap=50) == []
    refused = validate_item("", "r1", spec, max_attempts_cap=10)
    assert [v.field for v in refused] == ["spec.max_attempts"]


async def test_the_gateway_checks_only_the_attempts_ceiling() -> None:
    spec = task_pb2.TaskSpec(kind=task_pb2.TASK_KIND_IMAGE, model="acme/sdxl", max_attempts=50)
    spec.input.update({"prompt": "a cat"})
    await Validator().check(svc_pb2.SubmitTaskRequest(request_id="r1", spec=spec))
