"""Bad requests through the gateway in front of the real scheduler on PostgreSQL.

* A table of bad requests, each with its expected status and the field path the BadRequest names.
* Hypothesis: structured random messages from a descriptor-walking strategy, near-valid mutations of a
  valid submit, and raw random bytes through a generic ``unary_unary`` without serializers. Strings
  carry NUL characters and (on the wire) unpaired surrogates; ``spec.input`` documents are random,
  deep (nested past the depth bound and protobuf's parse limit) or wide (around the key bound). Gates:
  never UNKNOWN or INTERNAL, the gateway keeps answering, and no task row is written for a rejected
  request.

Hypothesis runs in a worker thread with a blocking gRPC channel while the gateway and scheduler keep
serving on the test event loop.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from google.protobuf.message import Message

from conveyor.tasks.v1 import admin_service_pb2 as admin_pb2
from conveyor.tasks.v1 import task_pb2
from conveyor.tasks.v1 import task_service_pb2 as svc_pb2
from conveyor.tasks.v1 import webhook_service_pb2 as hook_pb2
from conveyor_client import ConveyorError
from conveyor_common import limits
from conveyor_testkit.stack import Stack, start_stack
from conveyor_testkit.tokens import metadata
from tests.integration.gateway_requests import ADMIN, HEX64, HOOKS, TASKS, call, spec, submit

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


@pytest.fixture(scope="module")
async def stack(database_url: str) -> AsyncIterator[Stack]:
    # 127.0.0.2 stands for "a public host" (allow-listed); every other non-public address is refused.
    s = await start_stack(database_url, gateway={"url_allowed_hosts": ["127.0.0.2/32"]})
    try:
        yield s
    finally:
        await s.stop()


def with_input(doc: dict[str, Any]) -> svc_pb2.SubmitTaskRequest:
    req = submit()
    req.spec.input.update(doc)
    return req


def mutate(req: Message, fn: Callable[[Any], None]) -> Message:
    fn(req)
    return req


def _ts(offset: float) -> Any:
    def set_deadline(r: Any) -> None:
        r.spec.queue_deadline.FromSeconds(int(time.time() + offset))

    return set_deadline


def _run_timeout(seconds: float) -> Any:
    def set_timeout(r: Any) -> None:
        r.spec.run_timeout.FromNanoseconds(int(seconds * 1e9))

    return set_timeout


def _labels(items: dict[str, str]) -> Any:
    def set_labels(r: Any) -> None:
        r.spec.labels.update(items)

    return set_labels


def _webhook(url: str, events: tuple[int, ...] = ()) -> Any:
    def set_webhook(r: Any) -> None:
        r.spec.webhook.url = url
        r.spec.webhook.events.extend(events)

    return set_webhook


def _batch(n: int, bad: dict[int, Callable[[Any], None]] | None = None) -> Message:
    req = svc_pb2.BatchSubmitTasksRequest(request_id=str(uuid.uuid4()))
    for i in range(n):
        item = req.items.add(request_id=f"item-{i}-{uuid.uuid4()}", spec=spec())
        if bad and i in bad:
            bad[i](item)
    return req


def _dup_batch() -> Message:
    req = _batch(2)
    assert isinstance(req, svc_pb2.BatchSubmitTasksRequest)
    req.items[1].request_id = req.items[0].request_id
    return req


def _list(fn: Callable[[Any], None]) -> Message:
    return mutate(svc_pb2.ListTasksRequest(), fn)


def _created_range(r: Any) -> None:
    r.filter.created_after.FromSeconds(2_000_000_000)
    r.filter.created_before.FromSeconds(1_000_000_000)


def _nan_input() -> Message:
    req = submit()
    req.spec.input.fields["strength"].number_value = math.nan
    return req


def _nested_url() -> Message:
    req = submit()
    images = struct_pb2.ListValue()
    images.extend(["https://127.0.0.2/a.png", "https://10.0.0.5/b.png"])
    req.spec.input.fields["images"].list_value.CopyFrom(images)
    return req


def _upsert(fn: Callable[[Any], None]) -> Message:
    return mutate(admin_pb2.UpsertTenantRequest(tenant_id="acme", tier=task_pb2.TIER_PRO), fn)


def _set(path: str, value: Any) -> Callable[[Any], None]:
    def setter(r: Any) -> None:
        *parents, last = path.split(".")
        target = r
        for name in parents:
            target = getattr(target, name)
        setattr(target, last, value)

    return setter


@dataclass(frozen=True)
class Case:
    method: str
    request: Callable[[], Message]
    code: grpc.StatusCode
    field: str | None
    admin: bool = False


INVALID = grpc.StatusCode.INVALID_ARGUMENT
S = TASKS + "SubmitTask"
CASES: dict[str, Case] = {
    # SubmitTask: identity and target
    "request_id_missing": Case(S, lambda: submit(request_id=""), INVALID, "request_id"),
    "request_id_too_long": Case(S, lambda: submit(request_id="r" * 200), INVALID, "request_id"),
    "request_id_bad_chars": Case(S, lambda: submit(request_id="a b"), INVALID, "request_id"),
    "spec_missing": Case(S, lambda: svc_pb2.SubmitTaskRequest(request_id="x"), INVALID, "spec"),
    "kind_unspecified": Case(S, lambda: submit(kind=0), INVALID, "spec.kind"),
    "kind_unknown": Case(S, lambda: submit(kind=99), INVALID, "spec.kind"),
    "target_missing": Case(
        S, lambda: mutate(submit(), lambda r: r.spec.ClearField("model")), INVALID, "spec.model"
    ),
    "model_no_owner": Case(S, lambda: submit(model="sdxl"), INVALID, "spec.model"),
    "model_three_parts": Case(S, lambda: submit(model="a/b/c"), INVALID, "spec.model"),
    "model_bad_version": Case(
        S, lambda: submit(model="acme/sdxl:" + "z" * 64), INVALID, "spec.model"
    ),
    "model_two_versions": Case(S, lambda: submit(model="acme/sdxl:v1:v2"), INVALID, "spec.model"),
    "deployment_with_version": Case(
        S, lambda: submit(deployment="acme/sdxl:" + HEX64), INVALID, "spec.deployment"
    ),
    # SubmitTask: ranges
    "priority_unknown": Case(S, lambda: submit(priority=42), INVALID, "spec.priority"),
    "max_attempts_over_the_ceiling": Case(
        S,
        lambda: submit(max_attempts=limits.MAX_ATTEMPTS_CEILING + 1),
        INVALID,
        "spec.max_attempts",
    ),
    # Over the scheduler's SCHEDULER_MAX_ATTEMPTS_CAP (10 here): refused by the scheduler, relayed.
    "max_attempts_over_the_cap": Case(
        S, lambda: submit(max_attempts=11), INVALID, "spec.max_attempts"
    ),
    "max_attempts_negative": Case(S, lambda: submit(max_attempts=-1), INVALID, "spec.max_attempts"),
    "run_timeout_too_short": Case(
        S, lambda: mutate(submit(), _run_timeout(0.5)), INVALID, "spec.run_timeout"
    ),
    "run_timeout_too_long": Case(
        S, lambda: mutate(submit(), _run_timeout(365 * 86400)), INVALID, "spec.run_timeout"
    ),
    "queue_deadline_past": Case(
        S, lambda: mutate(submit(), _ts(-60)), INVALID, "spec.queue_deadline"
    ),
    "queue_deadline_too_far": Case(
        S, lambda: mutate(submit(), _ts(365 * 86400)), INVALID, "spec.queue_deadline"
    ),
    # SubmitTask: input document
    "input_too_large": Case(S, lambda: with_input({"p": "x" * 300_000}), INVALID, "spec.input"),
    "input_nan": Case(S, _nan_input, INVALID, "spec.input.strength"),
    "input_url_http": Case(
        S, lambda: with_input({"image": "http://example.org/a.png"}), INVALID, "spec.input.image"
    ),
    "input_url_localhost": Case(
        S, lambda: with_input({"image": "https://localhost/a.png"}), INVALID, "spec.input.image"
    ),
    "input_url_metadata_ip": Case(
        S, lambda: with_input({"url": "https://169.254.169.254/latest/"}), INVALID, "spec.input.url"
    ),
    "input_url_credentials": Case(
        S, lambda: with_input({"image": "https://u:p@example.org/"}), INVALID, "spec.input.image"
    ),
    "input_url_nested_private": Case(S, _nested_url, INVALID, "spec.input.images[1]"),
    # SubmitTask: webhook and labels
    "webhook_http": Case(
        S, lambda: mutate(submit(), _webhook("http://example.org/h")), INVALID, "spec.webhook.url"
    ),
    "webhook_loopback_ip": Case(
        S, lambda: mutate(submit(), _webhook("https://127.0.0.1/h")), INVALID, "spec.webhook.url"
    ),
    "webhook_cgnat_ip": Case(
        S, lambda: mutate(submit(), _webhook("https://100.64.1.1/h")), INVALID, "spec.webhook.url"
    ),
    "webhook_unresolvable": Case(
        S,
        lambda: mutate(submit(), _webhook("https://no-such-host.invalid/h")),
        INVALID,
        "spec.webhook.url",
    ),
    "webhook_event_unknown": Case(
        S,
        lambda: mutate(submit(), _webhook("https://127.0.0.2/h", (99,))),
        INVALID,
        "spec.webhook.events[0]",
    ),
    "labels_too_many": Case(
        S,
        lambda: mutate(submit(), _labels({f"k{i}": "v" for i in range(40)})),
        INVALID,
        "spec.labels",
    ),
    "label_key_bad": Case(
        S, lambda: mutate(submit(), _labels({"bad key": "v"})), INVALID, 'spec.labels["bad key"]'
    ),
    "label_value_too_long": Case(
        S, lambda: mutate(submit(), _labels({"env": "v" * 300})), INVALID, 'spec.labels["env"]'
    ),
    # BatchSubmitTasks
    "batch_empty": Case(TASKS + "BatchSubmitTasks", lambda: _batch(0), INVALID, "items"),
    "batch_too_large": Case(TASKS + "BatchSubmitTasks", lambda: _batch(101), INVALID, "items"),
    "batch_item_bad_model": Case(
        TASKS + "BatchSubmitTasks",
        lambda: _batch(3, {2: _set("spec.model", "nope")}),
        INVALID,
        "items[2].spec.model",
    ),
    "batch_duplicate_request_id": Case(
        TASKS + "BatchSubmitTasks", _dup_batch, INVALID, "items[1].request_id"
    ),
    # Reads, cancel, watch
    "get_empty_id": Case(TASKS + "GetTask", svc_pb2.GetTaskRequest, INVALID, "task_id"),
    "get_not_uuid": Case(
        TASKS + "GetTask", lambda: svc_pb2.GetTaskRequest(task_id="42"), INVALID, "task_id"
    ),
    "cancel_reason_too_long": Case(
        TASKS + "CancelTask",
        lambda: svc_pb2.CancelTaskRequest(task_id=str(uuid.uuid4()), reason="r" * 1001),
        INVALID,
        "reason",
    ),
    "watch_negative_sequence": Case(
        TASKS + "WatchTask",
        lambda: svc_pb2.WatchTaskRequest(task_id=str(uuid.uuid4()), after_sequence=-1),
        INVALID,
        "after_sequence",
    ),
    "list_page_size": Case(
        TASKS + "ListTasks", lambda: svc_pb2.ListTasksRequest(page_size=501), INVALID, "page_size"
    ),
    "list_status_unknown": Case(
        TASKS + "ListTasks",
        lambda: _list(lambda r: r.filter.statuses.append(99)),
        INVALID,
        "filter.statuses[0]",
    ),
    "list_created_range": Case(
        TASKS + "ListTasks", lambda: _list(_created_range), INVALID, "filter.created_after"
    ),
    "stats_bad_model": Case(
        TASKS + "GetQueueStats",
        lambda: svc_pb2.GetQueueStatsRequest(model="no model"),
        INVALID,
        "model",
    ),
    # Admin
    "tenant_id_bad": Case(
        ADMIN + "UpsertTenant",
        lambda: _upsert(_set("tenant_id", "a b")),
        INVALID,
        "tenant_id",
        True,
    ),
    "tenant_concurrency_negative": Case(
        ADMIN + "UpsertTenant",
        lambda: _upsert(_set("limits.max_concurrency", -1)),
        INVALID,
        "limits.max_concurrency",
        True,
    ),
    "tenant_rate_nan": Case(
        ADMIN + "UpsertTenant",
        lambda: _upsert(_set("limits.submit_rate_per_second", math.nan)),
        INVALID,
        "limits.submit_rate_per_second",
        True,
    ),
    "pause_without_model": Case(
        ADMIN + "PauseModel", admin_pb2.PauseModelRequest, INVALID, "model", True
    ),
    "bulk_cancel_everything": Case(
        ADMIN + "BulkCancelTasks",
        lambda: admin_pb2.BulkCancelTasksRequest(selector=admin_pb2.BulkSelector()),
        INVALID,
        "selector",
        True,
    ),
    "redrive_bad_task_id": Case(
        ADMIN + "RedriveTasks",
        lambda: admin_pb2.RedriveTasksRequest(selector=admin_pb2.BulkSelector(task_ids=["x"])),
        INVALID,
        "selector.task_ids[0]",
        True,
    ),
    # Webhook endpoints
    "endpoint_http": Case(
        HOOKS + "CreateWebhookEndpoint",
        lambda: hook_pb2.CreateWebhookEndpointRequest(url="http://example.org/h"),
        INVALID,
        "url",
    ),
    "endpoint_private": Case(
        HOOKS + "CreateWebhookEndpoint",
        lambda: hook_pb2.CreateWebhookEndpointRequest(url="https://192.168.1.10/h"),
        INVALID,
        "url",
    ),
    # Transport limit: larger than max_receive_message_length (1 MiB); gRPC refuses it.
    "message_too_large": Case(
        S,
        lambda: with_input({"p": "x" * (1_100_000)}),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        None,
    ),
}


async def test_the_table_has_at_least_30_cases() -> None:
    assert len(CASES) >= 30


@pytest.mark.parametrize("name", list(CASES))
async def test_bad_request(stack: Stack, name: str) -> None:
    case = CASES[name]
    token = stack.keys.token(
        "ops" if case.admin else "bad-input", role="admin" if case.admin else "tenant"
    )
    before = await stack.count_tasks()
    async with grpc.aio.insecure_channel(stack.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await call(channel, case.method, case.request(), metadata(token))
    assert exc.value.code() == case.code, exc.value.details()
    if case.field is not None:
        err = ConveyorError.from_rpc_error(exc.value)
        assert [v.field for v in err.field_violations] == [case.field]
        assert err.field_violations[0].description
    assert await stack.count_tasks() == before


async def test_many_bad_fields_are_all_named(stack: Stack) -> None:
    req = submit(request_id="", kind=0, priority=9, max_attempts=1000, model="x")
    mutate(req, _webhook("http://127.0.0.1/"))
    async with grpc.aio.insecure_channel(stack.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await call(channel, S, req, metadata(stack.keys.token()))
    err = ConveyorError.from_rpc_error(exc.value)
    assert sorted(v.field for v in err.field_violations) == sorted(
        [
            "request_id",
            "spec.kind",
            "spec.model",
            "spec.priority",
            "spec.max_attempts",
            "spec.webhook.url",
        ]
    )


# ---------------------------------------------------------------------------------------------
# Hypothesis: a descriptor-walking strategy (hypothesis-pb does not work with protobuf 7).
