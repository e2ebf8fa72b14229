"""JWKS and OIDC discovery for the gateway (issue 16, point 3).

A local HTTP server inside the test serves a discovery document and a JWKS whose keys the test
rotates; the gateway runs in-process (build_gateway) in front of the fake scheduler.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from conveyor.tasks.v1 import task_service_pb2 as svc_pb2
from conveyor.tasks.v1 import task_service_pb2_grpc as svc_grpc
from conveyor_gateway.app import Gateway, build_gateway
from conveyor_gateway.jwks import JwksKeys, parse_jwks
from conveyor_gateway.settings import GatewaySettings
from conveyor_testkit.gateway import FakeScheduler, scheduler_binding, serve
from conveyor_testkit.tokens import AUDIENCE, HS_SECRET, ISSUER, Keys, metadata


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# -- the identity provider -------------------------------------------------------------------


@dataclass
class SigningKey:
    kid: str
    alg: str
    private: Any

    @classmethod
    def rsa(cls, kid: str | None = None) -> SigningKey:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return cls(kid or f"rsa-{uuid.uuid4().hex[:8]}", "RS256", key)

    @classmethod
    def ec(cls, kid: str | None = None) -> SigningKey:
        return cls(
            kid or f"ec-{uuid.uuid4().hex[:8]}", "ES256", ec.generate_private_key(ec.SECP256R1())
        )

    def jwk(self) -> dict[str, Any]:
        algo = jwt.get_algorithm_by_name(self.alg)
        data: dict[str, Any] = json.loads(algo.to_jwk(self.private.public_key()))
        data.update(kid=self.kid, use="sig", alg=self.alg)
        return data

    def token(self, tenant: str = "tenant-a", *, kid: str | None = None, **claims: Any) -> str:
        now = int(time.time())
        body: dict[str, Any] = {
            "iss": ISSUER, "aud": AUDIENCE, "sub": f"svc-{tenant}", "tenant_id": tenant,
            "iat": now, "exp": now + 600,
        }  # fmt: skip
        body.update(claims)
        return jwt.encode(body, self.private, algorithm=self.alg, headers={"kid": kid or self.kid})


@dataclass
class IdentityProvider:
    """Serves /.well-known/openid-configuration and /jwks.json; counts JWKS fetches."""

    keys: list[SigningKey] = field(default_factory=list)
    fetches: int = 0
    fail: bool = False
    issuer_override: str | None = None
    changed: threading.Condition = field(default_factory=threading.Condition)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> None:
        idp = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/.well-known/openid-configuration":
                    body: Any = {
                        "issuer": idp.issuer_override or idp.url,
                        "jwks_uri": f"{idp.url}/jwks.json",
                    }
                elif self.path == "/jwks.json":
                    with idp.changed:
                        idp.fetches += 1
                        idp.changed.notify_all()
                    if idp.fail:
                        self.send_response(503)
                        self.end_headers()
                        return
                    body = {"keys": [k.jwk() for k in idp.keys]}
                else:
                    self.send_response(404)
                    self.end_headers()
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def wait_fetches(self, count: int, timeout: float = 10.0) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: self.fetches >= count, timeout)


@pytest.fixture
def idp() -> Iterator[IdentityProvider]:
    provider = IdentityProvider()
    provider.start()
    try:
        yield provider
    finally:
        provider.stop()


# -- the gateway ------------------------------------------------------------------------------


@dataclass
class Env:
    gateway: Gateway
    channel: grpc.aio.Channel
    tasks: Any

    async def call(self, token: str) -> grpc.StatusCode:
        try:
            await self.tasks.GetQueueStats(
                svc_pb2.GetQueueStatsRequest(), metadata=metadata(token), timeout=10
            )
        except grpc.aio.AioRpcError as exc:
            code: grpc.StatusCode = exc.code()
            return code
        return grpc.StatusCode.OK


@pytest.fixture
async def gateway_env(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    started: list[tuple[Env, Any]] = []

    async def start(**kw: Any) -> Env:
        fakes = await serve(scheduler_binding(FakeScheduler()))
        values: dict[str, Any] = {
            "grpc_host": "127.0.0.1", "grpc_port": 0,
            "scheduler_address": f"127.0.0.1:{fakes.port}",
            "jwt_issuer": ISSUER, "jwt_audience": AUDIENCE,
        }  # fmt: skip
        values.update(kw)
        gateway = build_gateway(GatewaySettings(**values), CollectorRegistry())
        await gateway.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}")
        env = Env(gateway, channel, svc_grpc.TaskServiceStub(channel))
        started.append((env, fakes))
        return env

    yield start
    for env, fakes in started:
        await env.channel.close()
        await env.gateway.stop(0.1)
        await fakes.stop(0)


async def test_oidc_discovery_then_rs256_and_es256_tokens_are_accepted(
    idp: IdentityProvider, gateway_env: Any
) -> None:
    rsa_key, ec_key = SigningKey.rsa(), SigningKey.ec()
    idp.keys = [rsa_key, ec_key]
    env: Env = await gateway_env(jwt_oidc_issuer_url=idp.url)
    assert env.gateway.jwks is not None
    assert env.gateway.jwks.kids == {rsa_key.kid, ec_key.kid}
    assert await env.call(rsa_key.token()) == grpc.StatusCode.OK
    assert await env.call(ec_key.token("tenant-ec")) == grpc.StatusCode.OK


async def test_key_rotation_is_accepted_without_restart(
    idp: IdentityProvider, gateway_env: Any
) -> None:
    old, new = SigningKey.rsa("2026-old"), SigningKey.ec("2026-new")
    idp.keys = [old]
    env: Env = await gateway_env(
        jwt_jwks_url=f"{idp.url}/jwks.json", jwt_jwks_min_refresh_seconds=0
    )
    old_token = old.token()
    assert await env.call(old_token) == grpc.StatusCode.OK
    assert await env.call(new.token()) == grpc.StatusCode.UNAUTHENTICATED
    # The provider rotates: the new key appears, the old one is removed.
    idp.keys = [new]
    assert await env.call(new.token()) == grpc.StatusCode.OK
    assert env.gateway.jwks is not None
    assert env.gateway.jwks.kids == {"2026-new"}
    # A token of the removed key is refused, also one the gateway had verified (and cached) before.
    assert await env.call(old_token) == grpc.StatusCode.UNAUTHENTICATED
    assert await env.call(old.token()) == grpc.StatusCode.UNAUTHENTICATED


async def test_unknown_kid_is_refused_and_refreshes_are_rate_limited(
    idp: IdentityProvider, gateway_env: Any
) -> None:
    known = SigningKey.rsa()
    idp.keys = [known]
    env: Env = await gateway_env(
        jwt_jwks_url=f"{idp.url}/jwks.json", jwt_jwks_min_refresh_seconds=3600
    )
    fetched = idp.fetches
    # An attacker's key with made-up kids (and a known kid on a token signed by another key).
    attacker = SigningKey.rsa()
    codes = await asyncio.gather(
        *(env.call(attacker.token(kid=f"made-up-{i}")) for i in range(40)),
        env.call(attacker.token(kid=known.kid)),
    )
    assert set(codes) == {grpc.StatusCode.UNAUTHENTICATED}
    # At most one fetch in the refresh interval, however many unknown kids arrived.
    assert idp.fetches - fetched <= 1
    assert await env.call(known.token()) == grpc.StatusCode.OK


async def test_unknown_kid_status_details(idp: IdentityProvider, gateway_env: Any) -> None:
    idp.keys = [SigningKey.rsa()]
    env: Env = await gateway_env(jwt_jwks_url=f"{idp.url}/jwks.json")
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await env.tasks.GetQueueStats(
            svc_pb2.GetQueueStatsRequest(),
            metadata=metadata(SigningKey.ec().token()),
            timeout=10,
        )
    assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "unknown key id" in (exc.value.details() or "")


async def test_key_algorithm_is_pinned(idp: IdentityProvider, gateway_env: Any) -> None:
    rsa_key = SigningKey.rsa()
    idp.keys = [rsa_key]
    env: Env = await gateway_env(jwt_jwks_url=f"{idp.url}/jwks.json")
    # HS256 "signed" with the published key as the HMAC secret, naming the RSA kid.
    public_secret = json.dumps(rsa_key.jwk()).encode()
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "s",
        "tenant_id": "t",
        "iat": now,
        "exp": now + 60,
    }
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": rsa_key.kid}).encode())
    body = _b64(json.dumps(claims).encode())
    sig = hmac.new(public_secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    forged = f"{head}.{body}.{_b64(sig)}"
    assert await env.call(forged) == grpc.StatusCode.UNAUTHENTICATED
    # An ES256 token naming the RSA key's kid.
    assert await env.call(SigningKey.ec().token(kid=rsa_key.kid)) == grpc.StatusCode.UNAUTHENTICATED


async def test_static_keys_keep_working_next_to_the_jwks(
    idp: IdentityProvider, gateway_env: Any
) -> None:
    jwks_key = SigningKey.ec()
    idp.keys = [jwks_key]
    static = Keys.generate()
    env: Env = await gateway_env(
        jwt_jwks_url=f"{idp.url}/jwks.json",
        jwt_hs256_secret=HS_SECRET.decode(),
        jwt_rs256_public_key=static.rsa_public_pem.decode(),
    )
    assert await env.call(static.token()) == grpc.StatusCode.OK
    assert await env.call(static.token(alg="RS256")) == grpc.StatusCode.OK
    assert await env.call(jwks_key.token()) == grpc.StatusCode.OK


async def test_periodic_refresh_and_failed_fetches_keep_the_keys(idp: IdentityProvider) -> None:
    first, second = SigningKey.rsa(), SigningKey.rsa()
    idp.keys = [first]
    keys = JwksKeys(jwks_url=f"{idp.url}/jwks.json", refresh_seconds=0.05)
    try:
        await keys.start()
        assert keys.kids == {first.kid}
        idp.keys = [first, second]
        assert await asyncio.to_thread(idp.wait_fetches, idp.fetches + 2)
        assert keys.kids == {first.kid, second.kid}
        idp.fail = True
        assert await asyncio.to_thread(idp.wait_fetches, idp.fetches + 2)
        assert keys.kids == {first.kid, second.kid}  # a failed fetch keeps the previous set
    finally:
        await keys.close()


async def test_discovery_issuer_must_match(idp: IdentityProvider) -> None:
    idp.keys = [SigningKey.rsa()]
    idp.issuer_override = "https://evil.example"
    keys = JwksKeys(issuer_url=idp.url, refresh_seconds=3600)
    try:
        await keys.start()  # logged, not raised: the gateway still serves static keys
        assert keys.kids == frozenset()
        assert idp.fetches == 0
    finally:
        await keys.close()


def test_unusable_keys_are_skipped() -> None:
    good = SigningKey.ec("good").jwk()
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    weak = json.loads(jwt.get_algorithm_by_name("RS256").to_jwk(small.public_key()))
    weak.update(kid="weak")
    p384 = json.loads(
        jwt.get_algorithm_by_name("ES384").to_jwk(
            ec.generate_private_key(ec.SECP384R1()).public_key()
        )
    )
    p384.update(kid="p384")
    enc = SigningKey.rsa("enc").jwk() | {"use": "enc"}
    no_kid = {k: v for k, v in SigningKey.rsa().jwk().items() if k != "kid"}
    hmac_key = {"kty": "oct", "k": "c2VjcmV0", "kid": "oct", "alg": "HS256"}
    keys = parse_jwks({"keys": [good, weak, p384, enc, no_kid, hmac_key, "junk"]})
    assert set(keys) == {"good"}
    assert keys["good"].algorithm == "ES256"


def test_settings() -> None:
    base: dict[str, Any] = {"scheduler_address": "s:1"}
    s = GatewaySettings(**base, jwt_jwks_url="https://idp.example/jwks.json")
    assert s.jwt_max_lifetime_seconds == 24 * 3600
    with pytest.raises(ValidationError, match="not both"):
        GatewaySettings(
            **base, jwt_jwks_url="https://a.example/j", jwt_oidc_issuer_url="https://a.example"
        )
    with pytest.raises(ValidationError, match="https"):
        GatewaySettings(**base, jwt_jwks_url="http://idp.example/jwks.json")
    with pytest.raises(ValidationError, match="no JWT verification key"):
        GatewaySettings(**base)
