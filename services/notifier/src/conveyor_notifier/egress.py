"""Outbound HTTP to client-supplied URLs with SSRF protection at connect time and DNS pinning.

The scheduler checked the URL when it was registered; DNS can change since, so every new connection
is checked again *here*, inside the connection itself: :class:`PinnedNetworkBackend` (an httpcore
network backend) resolves the host once, applies :mod:`conveyor_common.ssrf` to every address and
opens the TCP connection to an address it just approved. No second lookup happens between the check
and the connect, so a rebinding name cannot slip a private address in. TLS still verifies the
certificate against the URL's host name (SNI and hostname checking are httpcore's usual ones).

The client never follows redirects, ignores proxy environment variables, and the sender caps time
and response bytes.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import socket
import ssl
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import certifi
import httpcore
import httpx

from conveyor_common.ssrf import (
    AllowList,
    RefusalReason,
    Resolver,
    UrlRefused,
    check_addresses,
    parse_url,
    system_resolver,
)

logger = logging.getLogger(__name__)

_scheme: contextvars.ContextVar[str] = contextvars.ContextVar("egress_scheme", default="https")
"""Scheme of the request being connected (plain http is allowed to allow-listed hosts only)."""


class PinnedNetworkBackend(httpcore.AsyncNetworkBackend):
    """Resolves, checks and connects to an approved address; refuses with :class:`UrlRefused`."""

    def __init__(
        self,
        allow: AllowList,
        *,
        resolver: Resolver = system_resolver,
        inner: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        self.allow = allow
        self.resolver = resolver
        self.inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's signature)
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """Connect to ``host:port`` only through addresses that pass the policy."""
        bracketed = f"[{host}]" if ":" in host else host
        target = parse_url(f"{_scheme.get()}://{bracketed}:{port}/")
        if target.literal is not None:
            addresses: list[str] = [str(target.literal)]
        else:
            try:
                async with asyncio.timeout(timeout):
                    addresses = list(await self.resolver(target.host, port))
            except TimeoutError:
                raise httpcore.ConnectTimeout(f"resolving {target.host} timed out") from None
            except socket.gaierror:
                raise UrlRefused(
                    RefusalReason.UNRESOLVABLE, f"{target.host} does not resolve"
                ) from None
        approved = check_addresses(target, addresses, self.allow)
        last: Exception | None = None
        for address in approved.addresses:
            try:
                return await self.inner.connect_tcp(
                    str(address),
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None  # approved.addresses is never empty
        raise last

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's signature)
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """Never: webhooks go over TCP only."""
        raise UrlRefused(RefusalReason.SCHEME, "unix sockets are not allowed")

    async def sleep(self, seconds: float) -> None:
        """Delegate."""
        await self.inner.sleep(seconds)


def ssl_context(ca_bundle: str = "") -> ssl.SSLContext:
    """Verifying TLS context: certifi's roots plus ``ca_bundle`` (PEM) when given."""
    context = ssl.create_default_context(cafile=certifi.where())
    if ca_bundle:
        context.load_verify_locations(cafile=ca_bundle)
    return context


class PinnedTransport(httpx.AsyncHTTPTransport):
    """httpx transport whose connections go through :class:`PinnedNetworkBackend`."""

    def __init__(
        self,
        allow: AllowList,
        *,
        resolver: Resolver = system_resolver,
        ca_bundle: str = "",
        limits: httpx.Limits | None = None,
        inner_backend: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        limits = limits or httpx.Limits(max_connections=100, max_keepalive_connections=20)
        super().__init__(trust_env=False, retries=0, limits=limits)
        # Replace the pool httpx built with one that connects through the pinning backend.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context(ca_bundle),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            http1=True,
            http2=False,
            retries=0,
            network_backend=PinnedNetworkBackend(allow, resolver=resolver, inner=inner_backend),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Refuse anything but http(s) without userinfo; connect under the request's scheme."""
        if request.url.scheme not in ("http", "https"):
            raise UrlRefused(RefusalReason.SCHEME, "url must use https")
        if request.url.userinfo:
            raise UrlRefused(RefusalReason.USERINFO, "url must not contain userinfo")
        token = _scheme.set(request.url.scheme)
        try:
            return await super().handle_async_request(request)
        finally:
            _scheme.reset(token)


def webhook_client(
    allow: AllowList,
    *,
    resolver: Resolver = system_resolver,
    ca_bundle: str = "",
    connect_timeout: float = 5.0,
    timeout: float = 15.0,
    inner_backend: httpcore.AsyncNetworkBackend | None = None,
) -> httpx.AsyncClient:
    """The client for client-supplied URLs: pinned, no redirects, no proxies from the environment."""
    return httpx.AsyncClient(
        transport=PinnedTransport(
            allow, resolver=resolver, ca_bundle=ca_bundle, inner_backend=inner_backend
        ),
        follow_redirects=False,
        trust_env=False,
        timeout=httpx.Timeout(timeout, connect=connect_timeout),
        headers={"user-agent": "Conveyor-Webhooks/1.0"},
    )


@dataclass(frozen=True)
class SendResult:
    """Outcome of one POST."""

    delivered: bool
    status_code: int
    error: str
    refused: bool
    duration_s: float


class WebhookSender:
    """POSTs one signed body to a client URL with a whole-attempt deadline and a response cap."""

    def __init__(
        self, client: httpx.AsyncClient, *, timeout_s: float, max_response_bytes: int
    ) -> None:
        self.client = client
        self.timeout_s = timeout_s
        self.max_response_bytes = max_response_bytes

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> SendResult:
        """One attempt; never raises for network or policy failures (they are the result)."""
        started = time.perf_counter()

        def result(delivered: bool, code: int, error: str, refused: bool = False) -> SendResult:
            return SendResult(delivered, code, error[:500], refused, time.perf_counter() - started)

        try:
            target = parse_url(url)
            parsed = httpx.URL(url)
            if parsed.host.lower().rstrip(".") != target.host or parsed.userinfo:
                raise UrlRefused(RefusalReason.SYNTAX, "url parses ambiguously")
        except (UrlRefused, httpx.InvalidURL) as exc:
            return result(False, 0, f"refused: {exc}", refused=True)
        try:
            async with (
                asyncio.timeout(self.timeout_s),
                self.client.stream(
                    "POST",
                    url,
                    content=body,
                    headers={**headers, "content-type": "application/json"},
                ) as response,
            ):
                read = 0
                async for chunk in response.aiter_raw():
                    read += len(chunk)
                    if read >= self.max_response_bytes:
                        break
                code = response.status_code
        except UrlRefused as exc:
            logger.warning(
                "webhook connection refused by policy",
                extra={"action": "webhook_refused", "reason": exc.reason.value, "error": str(exc)},
            )
            return result(False, 0, f"refused: {exc}", refused=True)
        except TimeoutError:
            return result(False, 0, f"timeout after {self.timeout_s:g}s")
        except httpx.HTTPError as exc:
            return result(False, 0, f"{type(exc).__name__}: {exc}")
        if 200 <= code < 300:
            return result(True, code, "")
        if 300 <= code < 400:
            return result(False, code, f"HTTP {code}: redirects are not followed")
        return result(False, code, f"HTTP {code}")
