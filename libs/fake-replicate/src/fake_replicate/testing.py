"""Test helpers: a loopback webhook receiver that verifies signatures, and an admin client for the fake.

``WebhookReceiver`` answers each delivery with the next status of ``responses`` (default 200), records
every delivery (raw body, headers, verification outcome) and lets tests wait for a condition.
``FakeAdmin`` wraps the ``/_fake`` endpoints over HTTP (for a fake running in another process).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from aiohttp import web

from conveyor_common.standard_webhooks import (
    HEADER_ID,
    WebhookVerificationError,
    WebhookVerifier,
)


@dataclass(frozen=True, slots=True)
class Delivery:
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    received_at: float
    verified: bool
    reject_reason: str | None
    answered: int

    @property
    def msg_id(self) -> str:
        return self.headers.get(HEADER_ID, "")

    @property
    def payload(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data

    @property
    def status(self) -> str:
        return str(self.payload.get("status"))


@dataclass
class WebhookReceiver:
    """An aiohttp server on 127.0.0.1 collecting webhook deliveries."""

    secrets: list[str]
    deliveries: list[Delivery] = field(default_factory=list)
    responses: list[int] = field(default_factory=list)  # next answers (consumed), then 200
    redirect_to: str | None = None  # answer 307 to this location instead (consumes nothing)
    _runner: web.AppRunner | None = None
    _url: str | None = None
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("receiver not started")
        return self._url

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self._runner = runner
        self._url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        return self._url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def clear(self) -> None:
        self.deliveries.clear()
        self.responses.clear()
        self.redirect_to = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        reason: str | None = None
        try:
            WebhookVerifier(self.secrets).verify(headers, body)
        except WebhookVerificationError as exc:
            reason = exc.reason.value
        if self.redirect_to is not None:
            answer = 307
        elif reason is not None:
            answer = 400
        else:
            answer = self.responses.pop(0) if self.responses else 200
        self.deliveries.append(
            Delivery(
                path=request.path,
                query=dict(request.query),
                headers=headers,
                body=body,
                received_at=time.time(),
                verified=reason is None,
                reject_reason=reason,
                answered=answer,
            )
        )
        async with self._changed:
            self._changed.notify_all()
        if answer == 307 and self.redirect_to is not None:
            return web.Response(status=307, headers={"Location": self.redirect_to})
        return web.Response(status=answer)

    def for_prediction(self, prediction_id: str, *, accepted_only: bool = True) -> list[Delivery]:
        return [
            d
            for d in self.deliveries
            if d.verified
            and (not accepted_only or 200 <= d.answered < 300)
            and d.payload.get("id") == prediction_id
        ]

    async def wait_for(
        self, predicate: Callable[[list[Delivery]], bool], within_s: float = 5.0
    ) -> list[Delivery]:
        """Wait until ``predicate(deliveries)`` holds; TimeoutError after ``within_s``."""
        async with asyncio.timeout(within_s), self._changed:
            await self._changed.wait_for(lambda: predicate(self.deliveries))
        return list(self.deliveries)


class FakeAdmin:
    """Client for the fake's ``/_fake`` admin API."""

    def __init__(self, base_url: str, client: httpx.AsyncClient | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = client or httpx.AsyncClient(timeout=10.0, trust_env=False)
        self._own = client is None

    async def aclose(self) -> None:
        if self._own:
            await self._client.aclose()

    async def _json(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        resp = await self._client.request(method, self.base_url + path, **kw)
        resp.raise_for_status()
        data: dict[str, Any] = resp.json()
        return data

    async def configure(self, **changes: Any) -> dict[str, Any]:
        return await self._json("POST", "/_fake/config", json=changes)

    async def config(self) -> dict[str, Any]:
        return await self._json("GET", "/_fake/config")

    async def reset(self) -> None:
        await self._json("POST", "/_fake/reset")

    async def ledger(self, **filters: Any) -> list[dict[str, Any]]:
        data = await self._json("GET", "/_fake/ledger", params=filters)
        events: list[dict[str, Any]] = data["events"]
        return events

    async def summary(self, *, group_by: str | None = None, since: str = "start") -> dict[str, Any]:
        params = {"since": since} | ({"group_by": group_by} if group_by else {})
        return await self._json("GET", "/_fake/ledger/summary", params=params)
