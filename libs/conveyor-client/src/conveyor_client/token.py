"""Development helper: mint an HS256 bearer token from an explicitly given secret."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

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
    try:
        import jwt  # optional: the [cli] extra
    except ImportError:
        raise RuntimeError(
            "minting tokens needs PyJWT: pip install 'conveyor-client[cli]'"
        ) from None
    key = secret.encode() if isinstance(secret, str) else secret
    return jwt.encode(claims, key, algorithm="HS256")


def minting_provider(
    secret: str | bytes, tenant_id: str, *, ttl_seconds: int = 3600, **claims: str
) -> Callable[[], str]:
    """A token provider (for ``token=``) that mints a fresh HS256 token whenever one is asked for.

    The client asks again shortly before the previous token expires. Development and tests only:
    production services get tokens from their identity provider.
    """
    return lambda: mint_token(secret, tenant_id, ttl_seconds=ttl_seconds, **claims)  # type: ignore[arg-type]
