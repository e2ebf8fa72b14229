"""Helpers of the gateway's bad-request and fuzz tests: method paths, valid specs and submits, and a raw
call of any method (streaming or unary) that decodes nothing."""

from __future__ import annotations

import uuid
from typing import Any

import grpc
from google.protobuf.message import Message

from conveyor.tasks.v1 import task_pb2
from conveyor.tasks.v1 import task_service_pb2 as svc_pb2

TASKS = "/conveyor.tasks.v1.TaskService/"


ADMIN = "/conveyor.tasks.v1.AdminService/"


HOOKS = "/conveyor.tasks.v1.WebhookService/"


HEX64 = "0123456789abcdef" * 4


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


STREAMING = {TASKS + "WatchTask", TASKS + "WatchTasks"}


def call(channel: grpc.aio.Channel, method: str, request: Message, md: Any) -> Any:
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
