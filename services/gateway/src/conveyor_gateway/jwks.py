"""Verification keys from a JWKS document, found directly or through OIDC discovery.

An identity provider (or the Kubernetes API server for service-account tokens) publishes its signing
keys as a JSON Web Key Set and rotates them by ``kid``. :class:`JwksKeys` keeps the set in memory:

* the set comes from ``jwks_url``, or from ``jwks_uri`` of ``{issuer}/.well-known/openid-configuration``
  (whose ``issuer`` must equal the configured one, as OpenID Connect Discovery requires);
* it is fetched at start (a failure is logged and retried; the gateway still serves static keys),
  every ``refresh_seconds`` in the background, and when a token names a ``kid`` the set lacks, at most
  once per ``min_refresh_seconds`` (so a stream of made-up ``kid`` values cannot turn into a stream of
  fetches) and single-flight (concurrent misses share one fetch);
* only signing keys usable as RS256 (RSA, at least 2048 bits) or ES256 (EC P-256) are kept, each pinned
  to that one algorithm; a failed or malformed fetch keeps the previous set;
* fetches use httpx with a time limit and a size cap, over https (http only to a loopback host).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

logger = logging.getLogger(__name__)

MAX_DOCUMENT_BYTES = 512 * 1024
"""Largest discovery or JWKS document read."""
MIN_RSA_BITS = 2048
ALGORITHMS = ("RS256", "ES256")


class JwksError(Exception):
    """A discovery or JWKS document could not be fetched or used."""


@dataclass(frozen=True)
class JwksKey:
    """One verification key of the set, pinned to its algorithm."""

    kid: str
    algorithm: str
    key: Any


def check_url(url: str, what: str) -> str:
    """``url`` when it is https (or http to a loopback host); else ValueError naming ``what``."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.scheme == "https" and host:
        return url
    if parts.scheme == "http" and host:
        if host == "localhost":
            return url
        try:
            if ipaddress.ip_address(host).is_loopback:
                return url
        except ValueError:
            pass
    raise ValueError(f"{what} must be an https URL (http only to a loopback host)")


def parse_jwks(document: Any) -> dict[str, JwksKey]:
    """The usable signing keys of a JWKS document by ``kid`` (others are skipped)."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise JwksError("not a JWKS document (no 'keys' list)")
    keys: dict[str, JwksKey] = {}
    for entry in document["keys"]:
        parsed = _parse_key(entry)
        if parsed is not None and parsed.kid not in keys:
            keys[parsed.kid] = parsed
    return keys


def _parse_key(entry: Any) -> JwksKey | None:
    if not isinstance(entry, dict):
        return None
    kid = entry.get("kid")
    if not isinstance(kid, str) or not kid or len(kid) > 256:
        return None
    if entry.get("use", "sig") != "sig":
        return None
    ops = entry.get("key_ops")
    if isinstance(ops, list) and "verify" not in ops:
        return None
    kty, alg = entry.get("kty"), entry.get("alg")
    if alg is None:
        alg = {"RSA": "RS256", "EC": "ES256"}.get(str(kty))
    if alg not in ALGORITHMS:
        return None
    try:
        key = jwt.PyJWK(entry, algorithm=alg).key
    except (jwt.PyJWTError, ValueError, TypeError, KeyError):
        return None
    if alg == "RS256" and not (isinstance(key, RSAPublicKey) and key.key_size >= MIN_RSA_BITS):
        return None
    if alg == "ES256" and not (
        isinstance(key, EllipticCurvePublicKey) and isinstance(key.curve, SECP256R1)
    ):
        return None
    return JwksKey(kid=kid, algorithm=alg, key=key)


class JwksKeys:
    """The cached key set with background, unknown-``kid`` and start-up refreshes."""

    def __init__(
        self,
        *,
        jwks_url: str | None = None,
        issuer_url: str | None = None,
        refresh_seconds: float = 300.0,
        min_refresh_seconds: float = 10.0,
        timeout_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        if (jwks_url is None) == (issuer_url is None):
            raise ValueError("set exactly one of the JWKS URL and the OIDC issuer URL")
        self.jwks_url = check_url(jwks_url, "the JWKS URL") if jwks_url else None
        self.issuer_url = check_url(issuer_url, "the OIDC issuer URL") if issuer_url else None
        self.refresh_seconds = refresh_seconds
        self.min_refresh_seconds = min_refresh_seconds
        self._clock = clock
        self._client = client or httpx.AsyncClient(
            timeout=timeout_seconds, follow_redirects=False, trust_env=False
        )
        self._owns_client = client is None
        self._keys: dict[str, JwksKey] = {}
        self._discovered_url: str | None = None
        self._lock = asyncio.Lock()
        self._last_attempt: float | None = None
        self._generation = 0
        self._task: asyncio.Task[None] | None = None
        self.fetches = 0
        """Fetches of the JWKS document so far (successful or not)."""

    # -- lookups (synchronous, on the request path) ----------------------------------------------

    def get(self, kid: str) -> JwksKey | None:
        """The key named ``kid``, if the set holds it."""
        return self._keys.get(kid)

    def by_algorithm(self, algorithm: str) -> list[JwksKey]:
        """Every key pinned to ``algorithm`` (for tokens without a ``kid``)."""
        return [k for k in self._keys.values() if k.algorithm == algorithm]

    @property
    def kids(self) -> frozenset[str]:
        """The ``kid`` values of the current set."""
        return frozenset(self._keys)

    # -- refreshes -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Fetch the set once (failures are logged) and start the periodic refresh."""
        try:
            await self.refresh()
        except JwksError as exc:
            logger.warning(
                "JWKS fetch failed at start; retrying in the background",
                extra={"action": "jwks_fetch_failed", "error": str(exc)},
            )
        if self._task is None and self.refresh_seconds > 0:
            self._task = asyncio.create_task(self._periodic(), name="jwks-refresh")

    async def close(self) -> None:
        """Stop the periodic refresh and close the HTTP client."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._owns_client:
            await self._client.aclose()

    async def _periodic(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_seconds)
            try:
                await self.refresh()
            except JwksError as exc:
                logger.warning(
                    "JWKS refresh failed; keeping the previous keys",
                    extra={"action": "jwks_fetch_failed", "error": str(exc)},
                )

    async def refresh_for_unknown(self, kid: str) -> bool:
        """Refresh because a token names ``kid``; rate limited and single-flight.

        True when the set holds ``kid`` afterwards.
        """
        if kid in self._keys:
            return True
        generation = self._generation
        async with self._lock:
            if kid in self._keys:
                return True
            if self._generation != generation:
                return False  # a refresh finished while we waited: kid is not in the new set
            now = self._clock()
            if (
                self._last_attempt is not None
                and now - self._last_attempt < self.min_refresh_seconds
            ):
                return False
            try:
                await self._refresh_locked()
            except JwksError as exc:
                logger.warning(
                    "JWKS refresh for an unknown kid failed",
                    extra={"action": "jwks_fetch_failed", "error": str(exc)},
                )
                return False
        return kid in self._keys

    async def refresh(self) -> None:
        """Fetch the set now; raises :class:`JwksError` (the previous set stays)."""
        async with self._lock:
            await self._refresh_locked()

    async def _refresh_locked(self) -> None:
        self._last_attempt = self._clock()
        url = self.jwks_url or self._discovered_url
        if url is None:
            url = await self._discover()
        self.fetches += 1
        try:
            keys = parse_jwks(await self._get_json(url))
        except JwksError:
            self._discovered_url = None  # discover again next time: jwks_uri may have moved
            raise
        if not keys:
            raise JwksError("the JWKS holds no usable RS256/ES256 signing key")
        added, removed = keys.keys() - self._keys.keys(), self._keys.keys() - keys.keys()
        self._keys = keys
        self._generation += 1
        if added or removed:
            logger.info(
                "JWKS keys updated",
                extra={
                    "action": "jwks_updated",
                    "kids": sorted(keys),
                    "added": sorted(added),
                    "removed": sorted(removed),
                },
            )

    async def _discover(self) -> str:
        assert self.issuer_url is not None
        base = self.issuer_url.rstrip("/")
        doc = await self._get_json(f"{base}/.well-known/openid-configuration")
        if not isinstance(doc, dict):
            raise JwksError("the OIDC discovery document is not a JSON object")
        issuer = doc.get("issuer")
        if not isinstance(issuer, str) or issuer.rstrip("/") != base:
            raise JwksError(f"the discovery document names issuer {issuer!r}, not {base!r}")
        jwks_uri = doc.get("jwks_uri")
        if not isinstance(jwks_uri, str):
            raise JwksError("the discovery document has no jwks_uri")
        try:
            self._discovered_url = check_url(jwks_uri, "jwks_uri")
        except ValueError as exc:
            raise JwksError(str(exc)) from None
        return self._discovered_url

    async def _get_json(self, url: str) -> Any:
        try:
            async with self._client.stream(
                "GET", url, headers={"accept": "application/json"}
            ) as resp:
                if resp.status_code != 200:
                    raise JwksError(f"GET {url}: HTTP {resp.status_code}")
                body = bytearray()
                async for chunk in resp.aiter_bytes():
                    body.extend(chunk)
                    if len(body) > MAX_DOCUMENT_BYTES:
                        raise JwksError(f"GET {url}: larger than {MAX_DOCUMENT_BYTES} bytes")
        except httpx.HTTPError as exc:
            raise JwksError(f"GET {url}: {type(exc).__name__}") from None
        try:
            return json.loads(body)
        except ValueError:
            raise JwksError(f"GET {url}: not JSON") from None
