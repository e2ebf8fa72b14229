"""Test keys and tokens: an RSA key pair and an HS256 secret, token minting, call metadata."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

ISSUER = "conveyor-test"


AUDIENCE = "conveyor-gateway-test"


HS_SECRET = b"unit-test-secret-unit-test-secret-0123456789"


@dataclass
class Keys:
    """Key material of a test: an HS256 secret and an RSA key pair."""

    hs_secret: bytes
    rsa_private_pem: bytes
    rsa_public_pem: bytes

    @classmethod
    def generate(cls, hs_secret: bytes = HS_SECRET) -> Keys:
        """Fresh keys (RSA 2048)."""
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return cls(
            hs_secret=hs_secret,
            rsa_private_pem=private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            rsa_public_pem=private.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        )

    def token(
        self,
        tenant_id: str = "tenant-a",
        *,
        alg: str = "HS256",
        role: str = "tenant",
        tier: str = "free",
        issuer: str = ISSUER,
        audience: str = AUDIENCE,
        ttl: float = 3600,
        key: bytes | None = None,
        extra: dict[str, Any] | None = None,
        drop: tuple[str, ...] = (),
    ) -> str:
        """A signed token; ``key`` overrides the signing key (for bad-signature tests)."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": issuer,
            "aud": audience,
            "sub": f"svc-{tenant_id}",
            "tenant_id": tenant_id,
            "tier": tier,
            "role": role,
            "iat": now,
            "exp": now + int(ttl),
            "jti": uuid.uuid4().hex,
        }
        claims.update(extra or {})
        for name in drop:
            claims.pop(name, None)
        signing = (
            key if key is not None else (self.hs_secret if alg == "HS256" else self.rsa_private_pem)
        )
        return jwt.encode(claims, signing, algorithm=alg)


def metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying a bearer token."""
    return (("authorization", f"Bearer {token}"),)
