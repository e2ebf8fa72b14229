"""Internal mutual TLS: only certified peers reach an internal server, the allow-list narrows them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from conveyor.tasks.v1 import task_pb2, task_service_pb2, task_service_pb2_grpc
from conveyor_common.grpc_server import GrpcService, ServiceBinding, create_server
from conveyor_common.metrics import RpcMetrics
from conveyor_common.settings import ServiceSettings
from conveyor_common.tls import InternalTlsSettings, TlsFiles, open_channel
from conveyor_devstack.pki import LocalCA

SERVICE = "conveyor.tasks.v1.TaskService"


class Servicer(task_service_pb2_grpc.TaskServiceServicer):
    async def GetTask(
        self, request: task_service_pb2.GetTaskRequest, context: Any
    ) -> task_service_pb2.GetTaskResponse:
        return task_service_pb2.GetTaskResponse(task=task_pb2.Task(task_id=request.task_id))


class Pki:
    def __init__(self, root: Path) -> None:
        self.ca = LocalCA.create(root / "ca")
        self.rogue = LocalCA.create(root / "rogue", name="rogue-ca")

    def files(
        self, name: str, *, ca: LocalCA | None = None, peers: tuple[str, ...] = ()
    ) -> TlsFiles:
        authority = ca or self.ca
        issued = authority.issue(name)
        return TlsFiles(issued.cert, issued.key, self.ca.cert_path, peers)


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[GrpcService, Pki]]:
    pki = Pki(tmp_path)
    server_tls = pki.files("scheduler", peers=("gateway", "notifier"))
    servicer = Servicer()  # type: ignore[abstract]  # only GetTask is called
    svc = create_server(
        [
            ServiceBinding(
                task_service_pb2_grpc.add_TaskServiceServicer_to_server, servicer, SERVICE
            )
        ],
        host="127.0.0.1",
        port=0,
        metrics=RpcMetrics(CollectorRegistry(), "test"),
        credentials=server_tls.server_credentials(),
        extra_interceptors=server_tls.interceptors(),
    )
    await svc.start()
    yield svc, pki
    await svc.stop(0)


async def get(channel: grpc.aio.Channel) -> grpc.StatusCode:
    stub = task_service_pb2_grpc.TaskServiceStub(channel)
    try:
        await stub.GetTask(task_service_pb2.GetTaskRequest(task_id="t"), timeout=5)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_an_allowed_certified_peer_is_served(served: tuple[GrpcService, Pki]) -> None:
    svc, pki = served
    async with open_channel(f"localhost:{svc.port}", pki.files("gateway"), []) as ch:
        assert await get(ch) == grpc.StatusCode.OK


async def test_a_certified_peer_outside_the_allow_list_is_denied_but_may_check_health(
    served: tuple[GrpcService, Pki],
) -> None:
    svc, pki = served
    async with open_channel(f"localhost:{svc.port}", pki.files("intruder"), []) as ch:
        assert await get(ch) == grpc.StatusCode.PERMISSION_DENIED
        health = health_pb2_grpc.HealthStub(ch)
        resp = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


async def test_callers_without_a_certificate_of_the_ca_are_refused(
    served: tuple[GrpcService, Pki],
) -> None:
    svc, pki = served
    target = f"localhost:{svc.port}"
    async with grpc.aio.insecure_channel(target) as plain:
        assert await get(plain) == grpc.StatusCode.UNAVAILABLE
    no_cert = grpc.ssl_channel_credentials(root_certificates=pki.ca.cert_path.read_bytes())
    async with grpc.aio.secure_channel(target, no_cert) as anonymous:
        assert await get(anonymous) == grpc.StatusCode.UNAVAILABLE
    async with open_channel(target, pki.files("gateway", ca=pki.rogue), []) as forged:
        assert await get(forged) == grpc.StatusCode.UNAVAILABLE


async def test_the_server_name_override_verifies_an_ip_address_target(
    served: tuple[GrpcService, Pki],
) -> None:
    svc, pki = served
    files = pki.files("notifier")
    named = TlsFiles(files.cert, files.key, files.ca, server_name="scheduler")
    async with open_channel(f"127.0.0.1:{svc.port}", named, []) as ch:
        assert await get(ch) == grpc.StatusCode.OK


class Settings(ServiceSettings, InternalTlsSettings):
    pass


def test_tls_settings_go_together_and_must_exist(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    issued = pki.ca.issue("scheduler")
    assert Settings().internal_tls is None
    full = Settings(
        tls_cert_file=issued.cert,
        tls_key_file=issued.key,
        tls_ca_file=pki.ca.cert_path,
        tls_allowed_peers=["gateway"],
    )
    assert full.internal_tls is not None
    assert full.internal_tls.allowed_peers == ("gateway",)
    with pytest.raises(ValidationError, match="go together"):
        Settings(tls_cert_file=issued.cert, tls_key_file=issued.key)
    with pytest.raises(ValidationError, match="does not exist"):
        Settings(
            tls_cert_file=tmp_path / "nope.pem", tls_key_file=issued.key, tls_ca_file=issued.cert
        )


@pytest.mark.parametrize("raw", ["gateway, notifier", '["gateway", "notifier"]'])
def test_allowed_peers_from_the_environment(
    raw: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    class Prefixed(ServiceSettings, InternalTlsSettings):
        model_config = ServiceSettings.model_config | {"env_prefix": "SCHEDULER_"}

    monkeypatch.setenv("SCHEDULER_TLS_ALLOWED_PEERS", raw)
    assert Prefixed().tls_allowed_peers == ["gateway", "notifier"]
