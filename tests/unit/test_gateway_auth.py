"""Unit tests of token verification (alg pinning, claims) and the per-tenant rate limiter."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path

import pytest

from conveyor.scheduler.v1 import scheduler_service_pb2 as sched_pb2
from conveyor.tasks.v1 import task_pb2
from conveyor_common.errors import Unauthenticated
from conveyor_gateway.auth import RateLimiter, TokenVerifier
from conveyor_testkit.tokens import AUDIENCE, ISSUER, Keys


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys.generate()


@pytest.fixture
def verifier(keys: Keys) -> TokenVerifier:
    return TokenVerifier(
        hs256_secrets=[keys.hs_secret],
        rs256_public_keys=[keys.rsa_public_pem],
        issuer=ISSUER,
        audience=AUDIENCE,
        leeway_seconds=5,
    )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(claims: dict[str, object]) -> str:
    header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{_b64(json.dumps(claims).encode())}."


def test_hs256_and_rs256_tokens_verify(verifier: TokenVerifier, keys: Keys) -> None:
    p = verifier.verify(keys.token("acme", role="admin", tier="pro"))
    assert (p.tenant_id, p.tier, p.role) == ("acme", task_pb2.TIER_PRO, sched_pb2.ROLE_ADMIN)
    p = verifier.verify(keys.token("beta", alg="RS256"))
    assert (p.tenant_id, p.role) == ("beta", sched_pb2.ROLE_TENANT)


def test_tid_claim_is_accepted(verifier: TokenVerifier, keys: Keys) -> None:
    token = keys.token("x", drop=("tenant_id",), extra={"tid": "from-tid"})
    assert verifier.verify(token).tenant_id == "from-tid"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda k: k.token(ttl=-60), "token expired"),
        (lambda k: k.token(audience="someone-else"), "wrong audience"),
        (lambda k: k.token(issuer="evil"), "wrong issuer"),
        (lambda k: k.token(key=b"another-secret-another-secret-0123456789"), "bad signature"),
        (lambda k: k.token(alg="RS256", key=Keys.generate().rsa_private_pem), "bad signature"),
        (lambda k: k.token(drop=("exp",)), "invalid token"),
        (lambda k: k.token(drop=("tenant_id",)), "tenant_id"),
        (lambda k: k.token(role="root"), "role"),
        (lambda k: k.token(tier="gold"), "tier"),
        (lambda k: k.token("bad tenant id"), "tenant_id"),
        (lambda k: "not-a-jwt", "invalid token"),
        (lambda k: k.token(alg="HS512", key=k.hs_secret + b"x" * 40), "algorithm"),
    ],
)
def test_bad_tokens(verifier: TokenVerifier, keys: Keys, make: object, message: str) -> None:
    with pytest.raises(Unauthenticated) as exc:
        verifier.verify(make(keys))  # type: ignore[operator]
    assert message in exc.value.message


def test_alg_none_is_refused(verifier: TokenVerifier) -> None:
    now = int(time.time())
    token = unsigned(
        {"iss": ISSUER, "aud": AUDIENCE, "sub": "s", "tenant_id": "t", "exp": now + 60}
    )
    with pytest.raises(Unauthenticated):
        verifier.verify(token)


def test_hs256_signed_with_the_rsa_public_key_is_refused(
    verifier: TokenVerifier, keys: Keys
) -> None:
    # Classic key confusion: sign HS256 using the (public) RSA PEM as the HMAC secret.
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "s", "tenant_id": "t", "exp": now + 60}
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = _b64(json.dumps(claims).encode())
    sig = hmac.new(keys.rsa_public_pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    with pytest.raises(Unauthenticated):
        verifier.verify(f"{header}.{payload}.{_b64(sig)}")


def test_metadata_forms(verifier: TokenVerifier, keys: Keys) -> None:
    with pytest.raises(Unauthenticated, match="missing"):
        verifier.verify_metadata([])
    with pytest.raises(Unauthenticated):
        verifier.verify_metadata([("authorization", "Basic abc")])
    p = verifier.verify_metadata([("authorization", "Bearer " + keys.token("m"))])
    assert p.tenant_id == "m"


def test_cached_token_still_expires(keys: Keys) -> None:
    now = [time.time()]
    v = TokenVerifier(
        hs256_secrets=[keys.hs_secret], issuer=ISSUER, audience=AUDIENCE,
        leeway_seconds=0, clock=lambda: now[0],
    )  # fmt: skip
    token = keys.token(ttl=10)
    assert v.verify(token).tenant_id == "tenant-a"
    now[0] += 60
    with pytest.raises(Unauthenticated, match="expired"):
        v.verify(token)


def test_short_hs_secret_and_no_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        TokenVerifier(hs256_secrets=[b"short"], issuer="i", audience="a")
    with pytest.raises(ValueError, match="at least one"):
        TokenVerifier(issuer="i", audience="a")


def test_rate_limiter_token_bucket() -> None:
    now = [0.0]
    limiter = RateLimiter(rate_per_second=10, burst=3, clock=lambda: now[0])
    assert [limiter.acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.acquire("a")
    assert wait == pytest.approx(0.1)
    assert limiter.acquire("b") == 0.0  # per tenant
    now[0] += 0.1
    assert limiter.acquire("a") == 0.0


def test_settings_require_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from conveyor_gateway.settings import GatewaySettings

    for name in ("HS256_SECRET", "HS256_SECRET_FILE", "RS256_PUBLIC_KEY", "RS256_PUBLIC_KEY_FILE"):
        monkeypatch.delenv(f"GATEWAY_JWT_{name}", raising=False)
    with pytest.raises(ValidationError, match="no JWT verification key"):
        GatewaySettings(scheduler_address="127.0.0.1:1")
    ok = GatewaySettings(scheduler_address="127.0.0.1:1", jwt_hs256_secret="x" * 32)  # type: ignore[arg-type]
    assert ok.jwt_hs256_secret is not None


def test_allowed_hosts_from_env_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from conveyor_gateway.settings import GatewaySettings

    monkeypatch.setenv("GATEWAY_SCHEDULER_ADDRESS", "127.0.0.1:1")
    monkeypatch.setenv("GATEWAY_JWT_HS256_SECRET", "s" * 32)
    monkeypatch.setenv("GATEWAY_URL_ALLOWED_HOSTS", '["127.0.0.1", "localhost"]')
    assert GatewaySettings().url_allowed_hosts == ["127.0.0.1", "localhost"]  # type: ignore[call-arg]
    monkeypatch.setenv("GATEWAY_URL_ALLOWED_HOSTS", "127.0.0.0/8, receiver.test")
    assert GatewaySettings().url_allowed_hosts == ["127.0.0.0/8", "receiver.test"]  # type: ignore[call-arg]
    monkeypatch.setenv("GATEWAY_URL_ALLOWED_HOSTS", "not a host!")
    with pytest.raises(ValidationError):
        GatewaySettings()  # type: ignore[call-arg]


def test_key_rotation_verifies_the_new_and_the_old_secret(tmp_path: Path) -> None:
    """The README's rotation: the new HS256 secret in the variable, the old one in the file."""
    from pydantic import SecretStr

    from conveyor_gateway.app import build_verifier
    from conveyor_gateway.settings import GatewaySettings

    new, old, other = (Keys.generate(hs_secret=bytes([i]) * 32) for i in (1, 2, 3))
    old_file = tmp_path / "old-secret"
    old_file.write_bytes(old.hs_secret + b"\n")
    settings = GatewaySettings(
        scheduler_address="127.0.0.1:1",
        jwt_hs256_secret=SecretStr(new.hs_secret.decode()),
        jwt_hs256_secret_file=old_file,
        jwt_issuer=ISSUER,
        jwt_audience=AUDIENCE,
    )
    verifier = build_verifier(settings)
    assert verifier.verify(new.token("t-new")).tenant_id == "t-new"
    assert verifier.verify(old.token("t-old")).tenant_id == "t-old"
    with pytest.raises(Unauthenticated):
        verifier.verify(other.token("t-other"))
