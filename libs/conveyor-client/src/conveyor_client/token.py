"""Development helper: mint an HS256 bearer token from an explicitly given secret."""

from __future__ import annotations

import time
import uuid

import jwt

DEFAULT_ISSUER = "conveyor"
DEFAULT_AUDIENCE = "conveyor-gateway"


def mint_token(
    secret: str | bytes,
    tenant_id: str,
    *,
    subject: str | None = None,
    tier: str = "free",
    role: str = "tenant",
    issuer: str = DEFAULT_ISSUER,
    audience: str = DEFAULT_AUDIENCE,
    ttl_seconds: int = 3600,
    now: float | None = None,
) -> str:
    """An HS256 JWT the gateway accepts when configured with the same secret, issuer and audience."""
    issued = int(now if now is not None else time.time())
    claims = {
        "iss": issuer,
        "aud": audience,
        "sub": subject or f"{tenant_id}-cli",
        "tenant_id": tenant_id,
        "tier": tier,
        "role": role,
        "iat": issued,
        "nbf": issued,
        "exp": issued + ttl_seconds,
        "jti": uuid.uuid4().hex,
    }
    key = secret.encode() if isinstance(secret, str) else secret
    return jwt.encode(claims, key, algorithm="HS256")
