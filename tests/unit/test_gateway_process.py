"""``python -m conveyor_gateway`` as a process: settings errors, serving, graceful SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conveyor.tasks.v1 import task_service_pb2 as svc_pb2
from conveyor.tasks.v1 import task_service_pb2_grpc as svc_grpc
from conveyor_testkit.gateway import FakeScheduler, scheduler_binding, serve
from conveyor_testkit.tokens import AUDIENCE, HS_SECRET, ISSUER, Keys, metadata


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_missing_key_stops_the_start_with_a_clear_message() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "conveyor_gateway",
        env=_env(GATEWAY_SCHEDULER_ADDRESS="127.0.0.1:1"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2
    assert b"GATEWAY_JWT_HS256_SECRET" in err
    assert b"Traceback" not in err


async def test_serves_then_stops_gracefully_on_sigterm() -> None:
    fakes = await serve(scheduler_binding(FakeScheduler()))
    port = _free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "conveyor_gateway",
        env=_env(
            GATEWAY_SCHEDULER_ADDRESS=f"127.0.0.1:{fakes.port}",
            GATEWAY_GRPC_HOST="127.0.0.1",
            GATEWAY_GRPC_PORT=str(port),
            GATEWAY_METRICS_PORT="0",
            GATEWAY_JWT_HS256_SECRET=HS_SECRET.decode(),
            GATEWAY_JWT_ISSUER=ISSUER,
            GATEWAY_JWT_AUDIENCE=AUDIENCE,
            GATEWAY_SHUTDOWN_GRACE_SECONDS="2",
        ),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            health: Any = health_pb2_grpc.HealthStub(ch)
            for _ in range(150):
                try:
                    resp = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.1)
            tasks: Any = svc_grpc.TaskServiceStub(ch)
            stats = await tasks.GetQueueStats(
                svc_pb2.GetQueueStatsRequest(),
                metadata=metadata(Keys.generate().token()),
                timeout=5,
            )
            assert len(stats.stats) == 1
        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, out.decode()[-2000:]
        assert b'"action": "shutdown_step", "step": "grpc_stop"' in out
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await fakes.stop(0)
