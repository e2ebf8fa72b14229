"""The adapter's outbound HTTP (Replicate's API, output downloads) on one aiohttp session.

aiohttp, not httpx: the adapter sends two requests per task (the create, the output download), and
httpx spent about 0.45 ms of CPU per request against aiohttp's 0.05 on this machine, the same
server answering (httpx over an aiohttp transport: 0.2). httpx-aiohttp's transport is not used: it
maps a server disconnect after the request went out to ``ConnectTimeout``, and a create must
never take "maybe sent" for "not sent".

A failure says what it means for the request:

* :class:`NotSent`: connecting failed or timed out, waiting for a pooled connection included (the
  request never left);
* :class:`MaybeSent`: anything after that (a reset, a disconnect, a read timeout, a broken body): the
  server may have acted on it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from yarl import URL

from conveyor_common import tracing


class NotSent(Exception):
    """The request never left: nothing was done."""


class MaybeSent(Exception):
    """The request may have reached the server: it may have been acted on."""


@dataclass(frozen=True)
class Answer:
    """An HTTP answer read whole, with the request it answers."""

    status: int
    headers: Mapping[str, str]
    """Case-insensitive."""
    body: bytes
    method: str
    url: URL

    @property
    def text(self) -> str:
        """The body decoded (UTF-8, undecodable bytes replaced)."""
        return self.body.decode("utf-8", "replace")


class WebClient:
    """One pooled aiohttp session (created in the running loop on first use), no redirects."""

    def __init__(
        self,
        *,
        connect_timeout: float,
        read_timeout: float,
        headers: Mapping[str, str] | None = None,
        limit: int = 100,
        trace: bool = False,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.headers = dict(headers or {})
        self.limit = limit
        self.trace = trace
        self._session: aiohttp.ClientSession | None = None

    def _timeout(self, read_timeout: float | None) -> aiohttp.ClientTimeout:
        read = self.read_timeout if read_timeout is None else read_timeout
        return aiohttp.ClientTimeout(
            total=self.connect_timeout + read, connect=self.connect_timeout, sock_read=read
        )

    def session(self) -> aiohttp.ClientSession:
        """The session (opened on first use)."""
        if self._session is None or self._session.closed:
            # Idle connections are dropped after 5 s (httpx's expiry): a create sent on a
            # connection the server closed meanwhile fails as MaybeSent and costs a reconcile.
            self._session = aiohttp.ClientSession(
                headers=self.headers,
                connector=aiohttp.TCPConnector(limit=self.limit, keepalive_timeout=5.0),
                timeout=self._timeout(None),
                auto_decompress=True,
            )
        return self._session

    async def request(
        self,
        method: str,
        url: str | URL,
        *,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        read_timeout: float | None = None,
    ) -> Answer:
        """Send and read the whole answer (any status); :class:`NotSent` or :class:`MaybeSent`."""
        target = URL(url) if isinstance(url, str) else url
        attributes = {
            "http.request.method": method,
            "server.address": target.host or "",
            "url.path": target.path,
        }
        with contextlib.ExitStack() as stack:
            span = (
                stack.enter_context(
                    tracing.span(f"HTTP {method}", tracing.SpanKind.CLIENT, attributes=attributes)
                )
                if self.trace
                else None
            )
            with classified():
                async with self.session().request(
                    method,
                    target,
                    json=json,
                    headers=headers,
                    params=params,
                    allow_redirects=False,
                    timeout=self._timeout(read_timeout),
                ) as response:
                    answer = Answer(
                        response.status,
                        response.headers,
                        await response.read(),
                        method,
                        response.url,
                    )
            if span is not None:
                span.set_attribute("http.response.status_code", answer.status)
                if answer.status >= 500:
                    tracing.set_error(span, f"HTTP {answer.status}")
            return answer

    @contextlib.asynccontextmanager
    async def stream(
        self, url: str | URL, *, read_timeout: float | None = None
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """``GET`` with the body left to read from the response (``content.iter_chunked``);
        failures while connecting or reading as in :meth:`request`."""
        with classified():
            async with self.session().get(
                url, allow_redirects=False, timeout=self._timeout(read_timeout)
            ) as response:
                yield response

    async def close(self) -> None:
        """Close the session and its connections."""
        if self._session is not None:
            await self._session.close()
            self._session = None


@contextlib.contextmanager
def classified() -> Any:
    """Turn aiohttp's failures into :class:`NotSent` / :class:`MaybeSent`."""
    try:
        yield
    except (aiohttp.ConnectionTimeoutError, aiohttp.ClientConnectorError) as exc:
        raise NotSent(f"cannot connect: {exc!r}") from exc
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise MaybeSent(repr(exc)) from exc
