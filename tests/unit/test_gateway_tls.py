"""Optional mutual TLS on the gateway port: certificates from files named in the settings."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client import CollectorRegistry

from conveyor.tasks.v1 import task_service_pb2 as svc_pb2
from conveyor.tasks.v1 import task_service_pb2_grpc as svc_grpc
from conveyor_gateway.app import Gateway, build_gateway
from conveyor_gateway.settings import GatewaySettings
from conveyor_testkit.gateway import FakeScheduler, scheduler_binding, serve
from conveyor_testkit.tokens import AUDIENCE, HS_SECRET, ISSUER, Keys, metadata


@dataclass
class Pki:
    ca: bytes
    server_cert: Path
    server_key: Path
    ca_file: Path
    client_cert: bytes
    client_key: bytes


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    san: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    import ipaddress

    root = tmp_path_factory.mktemp("pki")
    ca_key = _key()
    ca = _cert("test-ca", ca_key, None, ca_key, ca=True)
    server_key = _key()
    server = _cert(
        "gateway", server_key, ca.subject, ca_key,
        san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )  # fmt: skip
    client_key = _key()
    client = _cert("svc-client", client_key, ca.subject, ca_key)
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    (root / "ca.pem").write_bytes(ca_pem)
    (root / "server.pem").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    (root / "server.key").write_bytes(_pem_key(server_key))
    return Pki(
        ca=ca_pem,
        server_cert=root / "server.pem",
        server_key=root / "server.key",
        ca_file=root / "ca.pem",
        client_cert=client.public_bytes(serialization.Encoding.PEM),
        client_key=_pem_key(client_key),
    )


@pytest.fixture
async def gateway(pki: Pki) -> AsyncIterator[Gateway]:
    fakes = await serve(scheduler_binding(FakeScheduler()))
    settings = GatewaySettings(
        grpc_host="127.0.0.1",
        grpc_port=0,
        scheduler_address=f"127.0.0.1:{fakes.port}",
        jwt_hs256_secret=HS_SECRET.decode(),  # type: ignore[arg-type]
        jwt_issuer=ISSUER,
        jwt_audience=AUDIENCE,
        tls_cert_file=pki.server_cert,
        tls_key_file=pki.server_key,
        tls_client_ca_file=pki.ca_file,
        tls_require_client_auth=True,
    )
    gw = build_gateway(settings, CollectorRegistry())
    await gw.start()
    try:
        yield gw
    finally:
        await gw.stop(0.2)
        await fakes.stop(0.2)


async def _stats(port: int, creds: grpc.ChannelCredentials) -> Any:
    options = [("grpc.ssl_target_name_override", "localhost")]
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options=options) as ch:
        stub: Any = svc_grpc.TaskServiceStub(ch)
        return await stub.GetQueueStats(
            svc_pb2.GetQueueStatsRequest(), metadata=metadata(Keys.generate().token()), timeout=5
        )


async def test_client_certificate_required(pki: Pki, gateway: Gateway) -> None:
    with_cert = grpc.ssl_channel_credentials(
        root_certificates=pki.ca, private_key=pki.client_key, certificate_chain=pki.client_cert
    )
    resp = await _stats(gateway.port, with_cert)
    assert len(resp.stats) == 1
    without_cert = grpc.ssl_channel_credentials(root_certificates=pki.ca)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await _stats(gateway.port, without_cert)
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_settings_must_be_consistent(pki: Pki) -> None:
    from pydantic import ValidationError

    base: dict[str, Any] = {"scheduler_address": "x:1", "jwt_hs256_secret": "s" * 32}
    with pytest.raises(ValidationError, match="go together"):
        GatewaySettings(**base, tls_cert_file=pki.server_cert)
    with pytest.raises(ValidationError, match="REQUIRE_CLIENT_AUTH"):
        GatewaySettings(
            **base,
            tls_cert_file=pki.server_cert,
            tls_key_file=pki.server_key,
            tls_require_client_auth=True,
        )
