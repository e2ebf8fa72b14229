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

import asyncio
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from conveyor_testkit.stack import Stack, start_stack
from conveyor_testkit.tokens import metadata
from google.protobuf import descriptor as d
from google.protobuf import struct_pb2
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conveyor.tasks.v1 import admin_service_pb2 as admin_pb2
from conveyor.tasks.v1 import task_pb2
from conveyor.tasks.v1 import task_service_pb2 as svc_pb2
from conveyor.tasks.v1 import webhook_service_pb2 as hook_pb2
from conveyor_client import ConveyorError
from conveyor_common import limits

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

TASKS = "/conveyor.tasks.v1.TaskService/"
ADMIN = "/conveyor.tasks.v1.AdminService/"
HOOKS = "/conveyor.tasks.v1.WebhookService/"
HEX64 = "0123456789abcdef" * 4


@pytest.fixture(scope="module")
async def stack(database_url: str) -> AsyncIterator[Stack]:
    # 127.0.0.2 stands for "a public host" (allow-listed); every other non-public address is refused.
    s = await start_stack(database_url, gateway={"url_allowed_hosts": ["127.0.0.2/32"]})
    try:
        yield s
    finally:
        await s.stop()


def spec(**fields: Any) -> task_pb2.TaskSpec:
    s = task_pb2.TaskSpec(kind=task_pb2.TASK_KIND_IMAGE, model="acme/sdxl")
    s.input.update({"prompt": "a lighthouse at dusk"})
    for key, value in fields.items():
        setattr(s, key, value)
    return s


def submit(request_id: str | None = None, **fields: Any) -> svc_pb2.SubmitTaskRequest:
    return svc_pb2.SubmitTaskRequest(
        request_id=str(uuid.uuid4()) if request_id is None else request_id, spec=spec(**fields)
    )


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

STREAMING = {TASKS + "WatchTask", TASKS + "WatchTasks"}


def _call(channel: grpc.aio.Channel, method: str, request: Message, md: Any) -> Any:
    if method in STREAMING:
        stream: Any = channel.unary_stream(
            method, request_serializer=type(request).SerializeToString, response_deserializer=None
        )

        async def drain() -> None:
            async for _ in stream(request, metadata=md, timeout=10):
                pass

        return drain()
    unary: Any = channel.unary_unary(
        method, request_serializer=type(request).SerializeToString, response_deserializer=None
    )
    return unary(request, metadata=md, timeout=10)


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
            await _call(channel, case.method, case.request(), metadata(token))
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
            await _call(channel, S, req, metadata(stack.keys.token()))
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

URLISH = st.sampled_from(
    [
        "https://localhost/x.png",
        "https://127.0.0.1/",
        "http://example.org/",
        "https://[::1]:8443/",
        "https://169.254.169.254/latest/meta-data/",
        "https://u:p@example.org/",
        "https://no-such-host.invalid/a",
        "ftp://example.org/x",
        "https://",
    ]
)
SCALARS: dict[int, st.SearchStrategy[Any]] = {
    d.FieldDescriptor.TYPE_INT32: st.integers(-(2**31), 2**31 - 1),
    d.FieldDescriptor.TYPE_SINT32: st.integers(-(2**31), 2**31 - 1),
    d.FieldDescriptor.TYPE_SFIXED32: st.integers(-(2**31), 2**31 - 1),
    d.FieldDescriptor.TYPE_INT64: st.integers(-(2**63), 2**63 - 1),
    d.FieldDescriptor.TYPE_SINT64: st.integers(-(2**63), 2**63 - 1),
    d.FieldDescriptor.TYPE_SFIXED64: st.integers(-(2**63), 2**63 - 1),
    d.FieldDescriptor.TYPE_UINT32: st.integers(0, 2**32 - 1),
    d.FieldDescriptor.TYPE_FIXED32: st.integers(0, 2**32 - 1),
    d.FieldDescriptor.TYPE_UINT64: st.integers(0, 2**64 - 1),
    d.FieldDescriptor.TYPE_FIXED64: st.integers(0, 2**64 - 1),
    d.FieldDescriptor.TYPE_DOUBLE: st.floats(allow_nan=True, allow_infinity=True),
    d.FieldDescriptor.TYPE_FLOAT: st.floats(width=32, allow_nan=True, allow_infinity=True),
    d.FieldDescriptor.TYPE_BOOL: st.booleans(),
    d.FieldDescriptor.TYPE_STRING: st.one_of(st.text(max_size=40), URLISH),
    d.FieldDescriptor.TYPE_BYTES: st.binary(max_size=40),
}

# Hostile text. MARKER's four UTF-8 bytes become an unpaired surrogate (CESU-8 "\ud800") plus one
# byte in the serialized request: Python cannot encode a lone surrogate into a protobuf string.
MARKER = "\U000f0000"
MARKER_BYTES = MARKER.encode()
SURROGATE_BYTES = b"\xed\xa0\x80x"
HOSTILE_TEXT = st.one_of(
    st.text(max_size=40),
    st.tuples(st.text(max_size=12), st.sampled_from(["\x00", MARKER]), st.text(max_size=12)).map(
        "".join
    ),
    URLISH.map(lambda u: u + "\x00"),
)
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=False), HOSTILE_TEXT)


def _deep(depth: int, as_list: bool) -> Any:
    doc: Any = "leaf"
    for _ in range(depth):
        doc = [doc] if as_list else {"k": doc}
    return doc


JSON_DOCS: st.SearchStrategy[dict[str, Any]] = st.one_of(
    st.dictionaries(
        HOSTILE_TEXT,
        st.recursive(
            JSON_SCALARS,
            lambda children: (
                st.lists(children, max_size=4) | st.dictionaries(HOSTILE_TEXT, children, max_size=4)
            ),
            max_leaves=12,
        ),
        max_size=4,
    ),
    st.builds(lambda n, lst: {"deep": _deep(n, lst)}, st.integers(25, 60), st.booleans()),
    st.integers(9_990, 10_010).map(lambda n: {"wide": {f"k{i}": i for i in range(n)}}),
)


def _json_struct(doc: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(doc)
    return out


def _surrogates(payload: bytes) -> bytes:
    return payload.replace(MARKER_BYTES, SURROGATE_BYTES)


def _field(message: Any, name: str, payload: bytes) -> bytes:
    """``payload`` as the length-delimited field ``name`` of ``message``: appended to a serialized
    message it merges there (built on the wire, since the client's own protobuf refuses to nest a
    document as deep as the ones the gateway must refuse)."""
    number = message.DESCRIPTOR.fields_by_name[name].number

    def varint(value: int) -> bytes:
        out = bytearray()
        while True:
            byte, value = value & 0x7F, value >> 7
            out.append(byte | (0x80 if value else 0))
            if not value:
                return bytes(out)

    return varint(number << 3 | 2) + varint(len(payload)) + payload


def _with_input(req: Any, doc_bytes: bytes) -> bytes:
    """A serialized SubmitTaskRequest with ``doc_bytes`` (a Struct) merged into spec.input."""
    spec_patch = _field(task_pb2.TaskSpec, "input", doc_bytes)
    return bytes(req.SerializeToString() + _field(svc_pb2.SubmitTaskRequest, "spec", spec_patch))


def _value(field: Any, depth: int) -> st.SearchStrategy[Any]:
    if field.type == d.FieldDescriptor.TYPE_STRING:
        return st.one_of(SCALARS[field.type], HOSTILE_TEXT)
    if (
        field.type == d.FieldDescriptor.TYPE_MESSAGE
        and field.message_type.full_name == "google.protobuf.Struct"
    ):
        return JSON_DOCS.map(_json_struct)
    if field.type == d.FieldDescriptor.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-5, 200))
    if field.type == d.FieldDescriptor.TYPE_MESSAGE:
        return messages(field.message_type, depth + 1)
    return SCALARS[field.type]


@st.composite
def _message(draw: st.DrawFn, desc: Any, depth: int) -> Message:
    from google.protobuf import message_factory

    msg = message_factory.GetMessageClass(desc)()
    for field in desc.fields:
        if not draw(st.booleans()):
            continue  # sparse: each field set with probability 1/2
        is_map = (
            field.type == d.FieldDescriptor.TYPE_MESSAGE
            and field.message_type.GetOptions().map_entry
        )
        if is_map:
            key_f = field.message_type.fields_by_name["key"]
            val_f = field.message_type.fields_by_name["value"]
            if depth >= 2 and val_f.type == d.FieldDescriptor.TYPE_MESSAGE:
                continue
            entries = draw(st.dictionaries(_value(key_f, depth), _value(val_f, depth), max_size=3))
            target = getattr(msg, field.name)
            for k, v in entries.items():
                if val_f.type == d.FieldDescriptor.TYPE_MESSAGE:
                    target[k].CopyFrom(v)
                else:
                    target[k] = v
            continue
        if field.type == d.FieldDescriptor.TYPE_MESSAGE and depth >= 2:
            continue
        if field.is_repeated:
            values = draw(st.lists(_value(field, depth), max_size=3))
            if field.type == d.FieldDescriptor.TYPE_MESSAGE:
                getattr(msg, field.name).extend(values)
            else:
                getattr(msg, field.name).extend(values)
        elif field.type == d.FieldDescriptor.TYPE_MESSAGE:
            getattr(msg, field.name).CopyFrom(draw(_value(field, depth)))
        else:
            setattr(msg, field.name, draw(_value(field, depth)))
    return msg


def messages(desc: Any, depth: int = 0) -> st.SearchStrategy[Message]:
    """Random messages of ``desc`` (nested messages to depth 2, maps, repeated, open enums)."""
    return _message(desc, depth)


# Method -> (request type, tenant or admin token).
TARGETS: list[tuple[str, type[Message], bool]] = [
    (TASKS + "SubmitTask", svc_pb2.SubmitTaskRequest, False),
    (TASKS + "BatchSubmitTasks", svc_pb2.BatchSubmitTasksRequest, False),
    (TASKS + "GetTask", svc_pb2.GetTaskRequest, False),
    (TASKS + "ListTasks", svc_pb2.ListTasksRequest, False),
    (TASKS + "CancelTask", svc_pb2.CancelTaskRequest, False),
    (TASKS + "GetQueueStats", svc_pb2.GetQueueStatsRequest, False),
    (ADMIN + "PauseModel", admin_pb2.PauseModelRequest, True),
    (ADMIN + "BulkCancelTasks", admin_pb2.BulkCancelTasksRequest, True),
    (ADMIN + "ListDeadLetters", admin_pb2.ListDeadLettersRequest, True),
    (HOOKS + "CreateWebhookEndpoint", hook_pb2.CreateWebhookEndpointRequest, False),
    (ADMIN + "GetTenant", admin_pb2.GetTenantRequest, True),
    (ADMIN + "UpsertTenant", admin_pb2.UpsertTenantRequest, True),
    (ADMIN + "ResumeModel", admin_pb2.ResumeModelRequest, True),
    (ADMIN + "RedriveTasks", admin_pb2.RedriveTasksRequest, True),
    (HOOKS + "DeleteWebhookEndpoint", hook_pb2.DeleteWebhookEndpointRequest, False),
    (HOOKS + "RotateWebhookSecret", hook_pb2.RotateWebhookSecretRequest, False),
    (HOOKS + "ListWebhookDeliveries", hook_pb2.ListWebhookDeliveriesRequest, False),
]


@dataclass
class Outcome:
    codes: dict[str, int]
    accepted_submits: int = 0


def _blocking(address: str, method: str, payload: bytes, md: Any) -> grpc.StatusCode:
    """One raw call with a blocking channel (the gateway runs on the test's event loop)."""
    with grpc.insecure_channel(address) as channel:
        call: Any = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        try:
            call(payload, metadata=md, timeout=10)
        except grpc.RpcError as exc:
            code: grpc.StatusCode = exc.code()
            return code
        return grpc.StatusCode.OK


def _record(outcome: Outcome, method: str, code: grpc.StatusCode, payload: bytes) -> None:
    outcome.codes[code.name] = outcome.codes.get(code.name, 0) + 1
    assert code != grpc.StatusCode.UNKNOWN, (method, payload[:200])
    assert code != grpc.StatusCode.INTERNAL, (method, payload[:200])
    if code == grpc.StatusCode.OK and method.endswith("SubmitTask"):
        outcome.accepted_submits += 1
    if code == grpc.StatusCode.OK and method.endswith("BatchSubmitTasks"):
        outcome.accepted_submits += len(svc_pb2.BatchSubmitTasksRequest.FromString(payload).items)


def _fuzz(stack: Stack, outcome: Outcome) -> None:
    tenant = metadata(stack.keys.token("fuzz"))
    admin = metadata(stack.keys.token("fuzz-ops", role="admin"))
    quick = settings(
        max_examples=120,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )

    @quick
    @given(st.data())
    def structured(data: st.DataObject) -> None:
        method, cls, is_admin = data.draw(st.sampled_from(TARGETS))
        msg = data.draw(messages(cls.DESCRIPTOR))
        payload = _surrogates(msg.SerializeToString())
        _record(
            outcome,
            method,
            _blocking(stack.address, method, payload, admin if is_admin else tenant),
            payload,
        )

    @quick
    @given(messages(task_pb2.TaskSpec.DESCRIPTOR), st.text(max_size=3))
    def near_valid(patch: Any, rid_suffix: str) -> None:
        req = submit()
        req.request_id = req.request_id[: 128 - len(rid_suffix)] + rid_suffix
        # A valid seed with a few fields replaced by random values (merged on the wire).
        payload = req.SerializeToString() + _field(
            svc_pb2.SubmitTaskRequest, "spec", patch.SerializeToString()
        )
        payload = _surrogates(payload)
        method = TASKS + "SubmitTask"
        _record(outcome, method, _blocking(stack.address, method, payload, tenant), payload)

    @quick
    @given(JSON_DOCS, st.integers(0, 2), st.booleans())
    def hostile_input(doc: dict[str, Any], bad_item: int, batch: bool) -> None:
        # A valid submit (or batch of three) whose spec.input (or one item's) is hostile JSON.
        doc_bytes = _json_struct(doc).SerializeToString()
        if batch:
            batch_req = svc_pb2.BatchSubmitTasksRequest(request_id=str(uuid.uuid4()))
            payload = batch_req.SerializeToString()
            for i in range(3):
                item = svc_pb2.SubmitTaskRequest(request_id=f"h{i}-{uuid.uuid4()}", spec=spec())
                item_bytes = (
                    _with_input(item, doc_bytes) if i == bad_item else item.SerializeToString()
                )
                payload += _field(svc_pb2.BatchSubmitTasksRequest, "items", item_bytes)
            method = TASKS + "BatchSubmitTasks"
        else:
            payload = _with_input(submit(), doc_bytes)
            method = TASKS + "SubmitTask"
        payload = _surrogates(payload)
        _record(outcome, method, _blocking(stack.address, method, payload, tenant), payload)

    @quick
    @given(st.sampled_from(TARGETS), st.binary(max_size=300))
    def raw_bytes(target: tuple[str, type[Message], bool], payload: bytes) -> None:
        method, _, is_admin = target
        _record(
            outcome,
            method,
            _blocking(stack.address, method, payload, admin if is_admin else tenant),
            payload,
        )

    structured()
    near_valid()
    raw_bytes()
    hostile_input()


async def test_fuzzed_requests_never_crash_or_write(stack: Stack) -> None:
    before = await stack.count_tasks()
    outcome = Outcome(codes={})
    await asyncio.to_thread(_fuzz, stack, outcome)
    print("fuzz outcome:", outcome.codes, "accepted submits:", outcome.accepted_submits)
    assert "UNKNOWN" not in outcome.codes
    assert outcome.codes.get("INVALID_ARGUMENT", 0) > 0
    # Rows only for submits the gateway accepted (valid near-valid mutations), none for rejects.
    assert await stack.count_tasks() == before + outcome.accepted_submits
    # The gateway still serves normally afterwards.
    async with grpc.aio.insecure_channel(stack.address) as channel:
        ok = channel.unary_unary(
            S, request_serializer=svc_pb2.SubmitTaskRequest.SerializeToString,
            response_deserializer=svc_pb2.SubmitTaskResponse.FromString,
        )  # fmt: skip
        resp = await ok(submit(), metadata=metadata(stack.keys.token("fuzz")), timeout=10)
        assert resp.task.task_id
