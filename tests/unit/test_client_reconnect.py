"""The SDK's channel connects again to a gateway that went away at least every second, so a call
retrying through a gateway restart is answered soon after the gateway is back.

gRPC's default reconnect backoff (1 s, then 1.6 times longer each time, up to 120 s) left a call
started at a 6 s outage waiting until ~9.5 s, while its retries (failing at once as long as the
channel waits) ran out: the chaos test's SDK once surfaced UNAVAILABLE after a gateway kill on CI.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import grpc

from conveyor.tasks.v1 import task_pb2
from conveyor.tasks.v1 import task_service_pb2 as svc_pb2
from conveyor_client import AsyncConveyorClient
from conveyor_common.channels import client_options

REFUSING_S = 6.5
"""Long enough for gRPC's default pace to reach a 2.56 s wait (its 4th attempt, by 6.2 s)."""


async def _get_task(request: svc_pb2.GetTaskRequest, _context: Any) -> svc_pb2.GetTaskResponse:
    return svc_pb2.GetTaskResponse(task=task_pb2.Task(task_id=request.task_id))


GATEWAY = grpc.method_handlers_generic_handler(
    "conveyor.tasks.v1.TaskService",
    {
        "GetTask": grpc.unary_unary_rpc_method_handler(
            _get_task,
            request_deserializer=svc_pb2.GetTaskRequest.FromString,
            response_serializer=svc_pb2.GetTaskResponse.SerializeToString,
        )
    },
)
"""A gateway answering GetTask with the task of that id."""


async def _refusing_gateway() -> tuple[asyncio.Server, int, list[float]]:
    """A port that accepts TCP connections and closes them at once: every connection attempt
    fails its HTTP/2 handshake, as against a gateway still starting, and is recorded."""
    attempts: list[float] = []

    async def refuse(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        attempts.append(time.monotonic())
        writer.close()

    listener = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port: int = listener.sockets[0].getsockname()[1]
    return listener, port, attempts


async def test_a_call_retrying_through_an_outage_is_answered_soon_after_the_gateway_is_back() -> (
    None
):
    listener, port, attempts = await _refusing_gateway()
    server: grpc.aio.Server | None = None
    async with AsyncConveyorClient(
        f"127.0.0.1:{port}", None, retries=10_000, backoff_base=0.05, backoff_max=0.1
    ) as client:
        try:
            call = asyncio.create_task(client.get("t-1", rpc_timeout=30))
            await asyncio.sleep(REFUSING_S)
            assert not call.done()
            listener.close()
            await listener.wait_closed()
            server = grpc.aio.server()
            server.add_generic_rpc_handlers((GATEWAY,))
            server.add_insecure_port(f"127.0.0.1:{port}")
            await server.start()
            back = time.monotonic()
            task = await call
            answered_after = time.monotonic() - back
        finally:
            if server is not None:
                await server.stop(0)
    assert task.task_id == "t-1"
    gaps = [later - earlier for earlier, later in itertools.pairwise(attempts)]
    assert len(attempts) >= 6, attempts  # gRPC's default makes 4 in 6.5 s
    assert max(gaps) < 1.5, gaps  # the default's 4th wait is 2.05-3.07 s
    assert answered_after < 1.5


def test_service_channels_connect_again_at_least_every_second() -> None:
    options = dict(client_options())
    assert int(options["grpc.max_reconnect_backoff_ms"]) <= 1_000
    assert int(options["grpc.initial_reconnect_backoff_ms"]) <= 1_000
