"""Bearer-token authentication, tenancy and the per-tenant edge rate limit.

Tokens are JWTs in the ``authorization: Bearer <jwt>`` metadata. Each configured key carries its own
algorithm allow-list of exactly one algorithm (HS256 secrets only verify HS256 tokens, RSA public keys
only RS256 tokens), so ``alg: none`` and HS/RS key confusion are refused (RFC 8725). Keys from a
JWKS (:mod:`conveyor_gateway.jwks`) are found by the token's ``kid`` and pinned to RS256 or ES256;
a ``kid`` the set lacks triggers one rate-limited refresh before the token is refused.
``iss``, ``aud``, ``sub``, ``exp`` and ``iat`` are required; ``exp``, ``iat`` and ``nbf`` (optional)
must be JSON numbers (not strings, not booleans, finite), checked with a small leeway, and
``exp - iat`` must not exceed the configured maximum lifetime. Claims: ``sub``, ``tenant_id`` (or
``tid``), ``tier`` (``free``/``premium``/``pro``), ``role`` (``tenant``/``admin``).

:class:`AuthInterceptor` runs after the common interceptor (so its errors are rich statuses and show in
the metrics) and before the handler; health and reflection need no token. The authenticated
:class:`Principal` reaches handlers through a context variable (:func:`current_principal`).
"""

from __future__ import annotations

import contextvars
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from conveyor.scheduler.v1 import scheduler_service_pb2 as sched_pb2
from conveyor.tasks.v1 import task_pb2
from conveyor_common.context import tenant_id_var
from conveyor_common.errors import (
    FieldViolation,
    InvalidArgument,
    PermissionDenied,
    QuotaViolation,
    ResourceExhausted,
    RpcError,
    Unauthenticated,
)
from conveyor_common.vocabulary import TIER_BY_NAME
from conveyor_gateway.jwks import JwksKeys

logger = logging.getLogger(__name__)

TENANT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
"""Shape of a tenant id (from a token claim or an admin request)."""

TIERS: dict[str, task_pb2.Tier.ValueType] = {
    name: task_pb2.Tier.ValueType(number) for name, number in TIER_BY_NAME.items()
}
"""Tier claim values (from conveyor_common.vocabulary, derived from the proto)."""
ROLES: dict[str, sched_pb2.Role.ValueType] = {
    "tenant": sched_pb2.ROLE_TENANT,
    "admin": sched_pb2.ROLE_ADMIN,
}

PUBLIC_PREFIX = "/conveyor.tasks.v1."
"""Methods under this prefix need a token; everything else (health, reflection) does not."""
ADMIN_PREFIX = "/conveyor.tasks.v1.AdminService/"
"""Methods under this prefix need the admin role."""


@dataclass(frozen=True)
class Principal:
    """Who the token says the caller is."""

    tenant_id: str
    tier: task_pb2.Tier.ValueType
    role: sched_pb2.Role.ValueType
    subject: str

    @property
    def is_admin(self) -> bool:
        """Whether the caller has the admin role."""
        return self.role == sched_pb2.ROLE_ADMIN

    def to_proto(self) -> sched_pb2.Principal:
        """The principal as the scheduler receives it."""
        return sched_pb2.Principal(
            tenant_id=self.tenant_id, tier=self.tier, role=self.role, subject=self.subject
        )


_principal_var: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "conveyor_gateway_principal", default=None
)


def current_principal() -> Principal:
    """The principal of the RPC being handled (set by :class:`AuthInterceptor`)."""
    principal = _principal_var.get()
    if principal is None:
        raise Unauthenticated("missing bearer token")
    return principal


class UnknownKeyId(Unauthenticated):
    """The token names a ``kid`` the JWKS does not hold (yet): worth one rate-limited refresh."""

    def __init__(self, kid: str) -> None:
        super().__init__("invalid token: unknown key id")
        self.kid = kid


DEFAULT_MAX_LIFETIME_SECONDS = 24 * 3600.0
_TIME_LIMIT = 1e12
"""Larger numeric dates (beyond year 33000) are refused as malformed."""


def _numeric_date(claims: dict[str, Any], name: str) -> float | None:
    """A NumericDate claim (RFC 7519): a finite JSON number; strings and booleans are refused."""
    if name not in claims:
        return None
    value = claims[name]
    if type(value) not in (int, float):
        raise Unauthenticated(f"invalid token: {name} must be a number")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number) or abs(number) > _TIME_LIMIT:
        raise Unauthenticated(f"invalid token: {name} is out of range")
    return number


class TokenVerifier:
    """Verifies bearer JWTs against the configured keys; caches verified tokens until expiry."""

    def __init__(
        self,
        *,
        hs256_secrets: Sequence[bytes] = (),
        rs256_public_keys: Sequence[bytes] = (),
        issuer: str,
        audience: str,
        leeway_seconds: float = 30.0,
        max_lifetime_seconds: float = DEFAULT_MAX_LIFETIME_SECONDS,
        jwks: JwksKeys | None = None,
        cache_size: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        for secret in hs256_secrets:
            if len(secret) < 32:
                raise ValueError("an HS256 secret must be at least 32 bytes")
        rsa_keys: list[RSAPublicKey] = []
        for pem in rs256_public_keys:
            key = load_pem_public_key(pem)
            if not isinstance(key, RSAPublicKey):
                raise ValueError("the RS256 verification key must be an RSA public key")
            rsa_keys.append(key)
        if not hs256_secrets and not rsa_keys and jwks is None:
            raise ValueError("at least one verification key is required")
        # Each key is pinned to one algorithm: the token's header only selects among them.
        self._keys: dict[str, list[Any]] = {"HS256": list(hs256_secrets), "RS256": rsa_keys}
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway_seconds
        self.max_lifetime = max_lifetime_seconds
        self.jwks = jwks
        self._cache: dict[str, tuple[Principal, float, str | None]] = {}
        self._cache_size = cache_size
        self._clock = clock

    def verify_metadata(self, metadata: Iterable[tuple[str, str | bytes]]) -> Principal:
        """The principal of ``authorization: Bearer <jwt>`` or :class:`Unauthenticated`."""
        header: str | None = None
        for key, value in metadata:
            if key == "authorization" and isinstance(value, str):
                header = value
                break
        if header is None:
            raise Unauthenticated("missing bearer token")
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("authorization must be 'Bearer <token>'")
        return self.verify(token.strip())

    def verify(self, token: str) -> Principal:
        """Verify one token; raise :class:`Unauthenticated` with a short reason when it is bad."""
        now = self._clock()
        cached = self._cache.get(token)
        if cached is not None:
            principal, exp, kid = cached
            if kid is not None and self.jwks is not None and self.jwks.get(kid) is None:
                del self._cache[token]  # its key left the JWKS: verify again (and refuse)
            elif now <= exp + self.leeway:
                return principal
            else:
                del self._cache[token]
                raise Unauthenticated("token expired")
        if len(token) > 8192:
            raise Unauthenticated("invalid token")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated("invalid token") from None
        alg = header.get("alg")
        alg_name = alg if isinstance(alg, str) else ""
        kid_claim = header.get("kid")
        kid = kid_claim if isinstance(kid_claim, str) and kid_claim else None
        keys, jwks_kid = self._candidates(alg_name, kid)
        claims: dict[str, Any] | None = None
        for key in keys:
            try:
                # Dates are checked below: PyJWT takes "exp": "123" and coerces floats.
                claims = jwt.decode(
                    token,
                    key,
                    algorithms=[alg_name],
                    audience=self.audience,
                    issuer=self.issuer,
                    leeway=self.leeway,
                    options={
                        "require": ["exp", "iat", "iss", "aud", "sub"],
                        "verify_exp": False,
                        "verify_iat": False,
                        "verify_nbf": False,
                    },
                )
                break
            except jwt.InvalidSignatureError:
                continue
            except jwt.ExpiredSignatureError:
                raise Unauthenticated("token expired") from None
            except jwt.InvalidAudienceError:
                raise Unauthenticated("invalid token: wrong audience") from None
            except jwt.InvalidIssuerError:
                raise Unauthenticated("invalid token: wrong issuer") from None
            except jwt.MissingRequiredClaimError as exc:
                raise Unauthenticated(f"invalid token: missing {exc.claim} claim") from None
            except (jwt.PyJWTError, ValueError, TypeError, OverflowError):
                raise Unauthenticated("invalid token") from None
        if claims is None:
            if kid is not None and jwks_kid is None and self.jwks is not None:
                raise UnknownKeyId(kid)
            raise Unauthenticated("invalid token: bad signature")
        expires = self._check_dates(claims, now)
        principal = self._principal(claims)
        if len(self._cache) >= self._cache_size:
            self._cache.clear()
        self._cache[token] = (principal, expires, jwks_kid)
        return principal

    def _candidates(self, alg: str, kid: str | None) -> tuple[list[Any], str | None]:
        """The keys that may verify a token of ``alg`` naming ``kid``, and the JWKS kid used."""
        if self.jwks is not None and kid is not None:
            found = self.jwks.get(kid)
            if found is not None:
                if found.algorithm != alg:
                    raise Unauthenticated("invalid token: algorithm not accepted for this key")
                return [found.key], kid
        keys = list(self._keys.get(alg, ()))
        if self.jwks is not None and kid is None:
            keys.extend(k.key for k in self.jwks.by_algorithm(alg))
        if not keys:
            if kid is not None and self.jwks is not None and alg in ("RS256", "ES256"):
                raise UnknownKeyId(kid)
            raise Unauthenticated("invalid token: algorithm not accepted")
        return keys, None

    def _check_dates(self, claims: dict[str, Any], now: float) -> float:
        """Numeric ``exp``/``iat``(/``nbf``), in force now, lifetime within the maximum; ``exp``."""
        expires = _numeric_date(claims, "exp")
        issued = _numeric_date(claims, "iat")
        not_before = _numeric_date(claims, "nbf")
        if expires is None or issued is None:
            raise Unauthenticated("invalid token: exp and iat are required")
        if now > expires + self.leeway:
            raise Unauthenticated("token expired")
        if expires <= issued:
            raise Unauthenticated("invalid token: exp must be after iat")
        if expires - issued > self.max_lifetime:
            raise Unauthenticated(
                f"invalid token: lifetime (exp - iat) exceeds {self.max_lifetime:g} s"
            )
        if issued > now + self.leeway:
            raise Unauthenticated("invalid token: issued in the future")
        if not_before is not None and not_before > now + self.leeway:
            raise Unauthenticated("invalid token: not yet valid")
        return expires

    @staticmethod
    def _principal(claims: dict[str, Any]) -> Principal:
        tenant = claims.get("tenant_id", claims.get("tid"))
        if not isinstance(tenant, str) or not TENANT_ID_RE.match(tenant):
            raise Unauthenticated("invalid token: missing or bad tenant_id claim")
        subject = claims.get("sub")
        if (
            not isinstance(subject, str)
            or not subject
            or len(subject) > 256
            or any(ord(c) < 32 or 0xD800 <= ord(c) <= 0xDFFF for c in subject)
        ):
            raise Unauthenticated("invalid token: bad sub claim")
        tier_claim = claims.get("tier", "free")
        role_claim = claims.get("role", "tenant")
        if not isinstance(tier_claim, str) or tier_claim.lower() not in TIERS:
            raise Unauthenticated("invalid token: bad tier claim")
        if not isinstance(role_claim, str) or role_claim.lower() not in ROLES:
            raise Unauthenticated("invalid token: bad role claim")
        return Principal(
            tenant_id=tenant,
            tier=TIERS[tier_claim.lower()],
            role=ROLES[role_claim.lower()],
            subject=subject,
        )


class RateLimiter:
    """In-memory token bucket per tenant."""

    def __init__(
        self,
        rate_per_second: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_tenants: int = 100_000,
    ) -> None:
        self.rate = rate_per_second
        self.burst = float(burst)
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._max_tenants = max_tenants

    def acquire(self, tenant_id: str, cost: float = 1.0) -> float:
        """Take ``cost`` tokens: 0.0 when allowed, else the seconds until they would be available."""
        now = self._clock()
        tokens, last = self._buckets.get(tenant_id, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens >= cost:
            if len(self._buckets) >= self._max_tenants and tenant_id not in self._buckets:
                self._buckets.clear()
            self._buckets[tenant_id] = (tokens - cost, now)
            return 0.0
        self._buckets[tenant_id] = (tokens, now)
        return (cost - tokens) / self.rate


@dataclass(frozen=True)
class Undecodable:
    """Stands in for a request whose bytes are not a valid message (answered INVALID_ARGUMENT)."""

    type_name: str
    error: str


def safe_deserializer(deserializer: Any) -> Any:
    """Wrap a request deserializer so malformed bytes never become UNKNOWN.

    grpc.aio answers UNKNOWN when the deserializer raises; this returns an :class:`Undecodable`
    instead, which the wrapped handler turns into INVALID_ARGUMENT.
    """
    if deserializer is None:
        return None
    type_name = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    name = type_name.full_name if type_name is not None else "request"

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:
            return Undecodable(name, type(exc).__name__)

    return deserialize


def _undecodable(request: Undecodable) -> InvalidArgument:
    return InvalidArgument(
        [FieldViolation("", f"the request is not a valid {request.type_name} message")],
        message="malformed request",
    )


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates public calls, enforces the admin role and the per-tenant rate limit."""

    def __init__(self, verifier: TokenVerifier, limiter: RateLimiter | None = None) -> None:
        self.verifier = verifier
        self.limiter = limiter

    def authorize(self, method: str, metadata: Iterable[tuple[str, str | bytes]]) -> Principal:
        """The principal allowed to call ``method``, or the RpcError to answer with."""
        principal = self.verifier.verify_metadata(metadata)
        if method.startswith(ADMIN_PREFIX) and not principal.is_admin:
            raise PermissionDenied("the admin role is required")
        if self.limiter is not None:
            wait = self.limiter.acquire(principal.tenant_id)
            if wait > 0:
                raise ResourceExhausted(
                    [
                        QuotaViolation(
                            subject=f"tenant:{principal.tenant_id}",
                            description="request rate limit exceeded",
                        )
                    ],
                    retry_after_seconds=wait,
                    message="request rate limit exceeded",
                )
        return principal

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler: Any = await continuation(handler_call_details)
        method: str = getattr(handler_call_details, "method", "")
        if handler is None or not method.startswith(PUBLIC_PREFIX):
            return handler
        metadata: Any = getattr(handler_call_details, "invocation_metadata", None) or ()
        principal: Principal | None = None
        error: RpcError | None = None
        try:
            try:
                principal = self.authorize(method, metadata)
            except UnknownKeyId as unknown:
                jwks = self.verifier.jwks
                if jwks is None or not await jwks.refresh_for_unknown(unknown.kid):
                    raise
                principal = self.authorize(method, metadata)
        except RpcError as exc:
            error = exc

        if handler.unary_unary is not None:
            inner_uu: Any = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                if error is not None:
                    raise error
                if isinstance(request, Undecodable):
                    raise _undecodable(request)
                token = _principal_var.set(principal)
                tenant_token = tenant_id_var.set(principal.tenant_id if principal else None)
                try:
                    return await inner_uu(request, context)
                finally:
                    tenant_id_var.reset(tenant_token)
                    _principal_var.reset(token)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary,
                request_deserializer=safe_deserializer(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            inner_us: Any = handler.unary_stream

            async def unary_stream(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                if error is not None:
                    raise error
                if isinstance(request, Undecodable):
                    raise _undecodable(request)
                _principal_var.set(principal)
                tenant_id_var.set(principal.tenant_id if principal else None)
                async for item in inner_us(request, context):
                    yield item

            return grpc.unary_stream_rpc_method_handler(
                unary_stream,
                request_deserializer=safe_deserializer(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        # No client-streaming methods exist on the public API; refuse rather than pass unchecked.
        if error is not None:
            return None
        return handler
