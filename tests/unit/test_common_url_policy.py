"""One URL policy (conveyor_common.ssrf.UrlPolicy): the gateway at submit and the scheduler for
webhook endpoints give the same answer for the same URL and DNS."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

import grpc
import pytest

from conveyor.tasks.v1 import task_pb2
from conveyor.tasks.v1 import task_service_pb2 as svc_pb2
from conveyor_common.errors import RpcError
from conveyor_common.ssrf import Resolver, UrlPolicy
from conveyor_gateway.validation import Validator
from conveyor_scheduler.client_webhooks.rpcs import check_callback_url
from conveyor_scheduler.client_webhooks.settings import WebhookPolicy, WebhookSettings


async def public(host: str, port: int) -> list[str]:
    return ["93.184.216.34"]


async def private(host: str, port: int) -> list[str]:
    return ["10.0.0.7"]


async def nxdomain(host: str, port: int) -> list[str]:
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


async def dns_down(host: str, port: int) -> list[str]:
    raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")


async def slow(host: str, port: int) -> list[str]:
    await asyncio.sleep(5)
    return ["93.184.216.34"]


async def at_gateway(url: str, resolver: Resolver) -> grpc.StatusCode:
    spec = task_pb2.TaskSpec(kind=task_pb2.TASK_KIND_IMAGE, model="acme/sdxl")
    spec.input.update({"prompt": "a cat"})
    spec.webhook.url = url
    validator = Validator(url_policy=UrlPolicy(dns_timeout=0.05, resolver=resolver))
    try:
        await validator.check(svc_pb2.SubmitTaskRequest(request_id="r", spec=spec))
    except RpcError as exc:
        return exc.code
    return grpc.StatusCode.OK


async def at_scheduler(url: str, resolver: Resolver) -> grpc.StatusCode:
    policy = WebhookPolicy(WebhookSettings(dns_timeout_seconds=0.05), resolver)
    try:
        await check_callback_url(url, policy)
    except RpcError as exc:
        return exc.code
    return grpc.StatusCode.OK


SIDES: list[Callable[[str, Resolver], Awaitable[grpc.StatusCode]]] = [at_gateway, at_scheduler]


@pytest.mark.parametrize(
    ("resolver", "expected"),
    [
        (public, grpc.StatusCode.OK),
        (private, grpc.StatusCode.INVALID_ARGUMENT),
        (nxdomain, grpc.StatusCode.INVALID_ARGUMENT),
        (dns_down, grpc.StatusCode.UNAVAILABLE),
        (slow, grpc.StatusCode.UNAVAILABLE),
    ],
)
async def test_both_sides_answer_alike(resolver: Resolver, expected: grpc.StatusCode) -> None:
    answers = [await side("https://hooks.example.com/h", resolver) for side in SIDES]
    assert answers == [expected, expected]
