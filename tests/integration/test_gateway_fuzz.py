"""Hypothesis fuzzing of every public method through the real gateway and scheduler: hostile text,
deep and odd JSON, URL-ish strings; nothing crashes (never INTERNAL) and a refused request writes
nothing."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor as d
from google.protobuf import struct_pb2
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conveyor.tasks.v1 import admin_service_pb2 as admin_pb2
from conveyor.tasks.v1 import task_pb2
from conveyor.tasks.v1 import task_service_pb2 as svc_pb2
from conveyor.tasks.v1 import webhook_service_pb2 as hook_pb2
from conveyor_testkit.stack import Stack, start_stack
from conveyor_testkit.tokens import metadata
from tests.integration.gateway_requests import ADMIN, HOOKS, TASKS, spec, submit

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


@pytest.fixture(scope="module")
async def stack(database_url: str) -> AsyncIterator[Stack]:
    # 127.0.0.2 stands for "a public host" (allow-listed); every other non-public address is refused.
    s = await start_stack(database_url, gateway={"url_allowed_hosts": ["127.0.0.2/32"]})
    try:
        yield s
    finally:
        await s.stop()


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
            TASKS + "SubmitTask", request_serializer=svc_pb2.SubmitTaskRequest.SerializeToString,
            response_deserializer=svc_pb2.SubmitTaskResponse.FromString,
        )  # fmt: skip
        resp = await ok(submit(), metadata=metadata(stack.keys.token("fuzz")), timeout=10)
        assert resp.task.task_id
