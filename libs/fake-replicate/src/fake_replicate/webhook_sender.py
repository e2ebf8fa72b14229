"""The fake's webhook sender: Replicate's webhook events for a prediction (start, output, logs,
completed, honouring ``webhook_events_filter``), coalesced progress, signed deliveries with retries.

One throttle window per prediction, as in cog's webhook caller (``cog/server/webhook.py``: one
``ResponseThrottler`` for all of a prediction's non-terminal updates, the sent ``start`` included):
an ``output``/``logs`` event comes at the earliest ``webhook_throttle_s`` after the previous
delivery of any non-terminal event, so a prediction that ends within the window after its ``start``
webhook sends no progress webhook at all. Held progress goes out at the window's end with the
latest state; ``start`` and ``completed`` are never held.

Deliveries go out through an ``aiohttp`` session: the fake's CPU is reported apart from the system
under test but shares the machine, and httpx's pool cost about twice as much per webhook.

A mixin of :class:`~fake_replicate.engine.Engine`, which owns the state it reads.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp

from conveyor_common.standard_webhooks import new_message_id, sign_headers
from fake_replicate.config import EventKind, FakeConfig
from fake_replicate.ledger import Ledger
from fake_replicate.model import Prediction
from fake_replicate.openapi import Exchange

logger = logging.getLogger("fake_replicate.engine")


class WebhookSender:
    """The webhook half of :class:`~fake_replicate.engine.Engine`."""

    config: FakeConfig
    ledger: Ledger
    recorder: Callable[[Exchange], None] | None
    _client: aiohttp.ClientSession | None

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        raise NotImplementedError

    def to_json(self, p: Prediction, *, listing: bool = False) -> dict[str, Any]:
        raise NotImplementedError

    # --- webhooks ------------------------------------------------------------------------
    def _progress(self, p: Prediction, event: EventKind) -> None:
        """output/logs events: at most one per webhook_throttle_s, carrying the latest state."""
        if p.webhook is None or event not in p.events_filter or p.terminal:
            return
        p.progress_pending.add(event)
        if p.progress_handle is not None:
            return
        now = time.monotonic()
        delay = max(0.0, p.last_progress_sent + self.config.webhook_throttle_s - now)
        loop = asyncio.get_running_loop()
        p.progress_handle = loop.call_later(delay, self._flush_progress, p)

    def _flush_progress(self, p: Prediction) -> None:
        p.progress_handle = None
        if p.terminal or not p.progress_pending:
            return
        event: EventKind = "output" if "output" in p.progress_pending else "logs"
        p.progress_pending.clear()
        p.last_progress_sent = time.monotonic()
        self._emit(p, event)

    def _emit(self, p: Prediction, event: EventKind) -> None:
        if p.webhook is None or event not in p.events_filter:
            if event == "completed":
                p.completed_sent.set()
            return
        if event == "start":  # opens the throttle window of the progress events
            p.last_progress_sent = time.monotonic()
        body = json.dumps(self.to_json(p), separators=(",", ":")).encode()
        cfg = self.config
        rng = p.rng
        r_drop, r_dup, r_delay, r_stale = rng.random(), rng.random(), rng.random(), rng.random()
        s = p.script
        drop = event in s.webhook_drop or (
            r_drop < cfg.webhook_drop_rate
            and (not cfg.webhook_drop_events or event in cfg.webhook_drop_events)
        )
        duplicate = event in s.webhook_duplicate or r_dup < cfg.webhook_duplicate_rate
        delay = s.webhook_delay.get(event, 0.0)
        if not delay and r_delay < cfg.webhook_delay_rate:
            delay = cfg.webhook_delay_s
        stale = r_stale < cfg.webhook_stale_rate
        self._spawn(
            self._deliver(
                p, event, p.webhook, body, drop=drop, duplicate=duplicate, delay=delay, stale=stale
            )
        )

    async def _deliver(
        self,
        p: Prediction,
        event: EventKind,
        url: str,
        body: bytes,
        *,
        drop: bool,
        duplicate: bool,
        delay: float,
        stale: bool,
    ) -> None:
        msg_id = new_message_id()
        outcome = "dropped"
        attempts = 0
        http_status: int | None = None
        try:
            if event == "start" and p.hold_start:
                await p.completed_sent.wait()
            if drop:
                return
            if delay > 0:
                await asyncio.sleep(delay)
            ok, attempts, http_status = await self._send(url, body, msg_id, stale=stale)
            outcome = "delivered" if ok else "failed"
            if ok and duplicate:
                await asyncio.sleep(0.05)
                await self._send(url, body, msg_id, stale=False)
        finally:
            self.ledger.record(
                "webhook",
                prediction_id=p.id,
                event=event,
                msg_id=msg_id,
                outcome=outcome,
                attempts=attempts,
                http_status=http_status,
                duplicated=duplicate and outcome == "delivered",
                delayed_s=delay,
                stale=stale,
            )
            if event == "completed":
                p.completed_sent.set()

    async def _send(
        self, url: str, body: bytes, msg_id: str, *, stale: bool
    ) -> tuple[bool, int, int | None]:
        """POST with retries; returns (delivered, attempts, last HTTP status)."""
        cfg = self.config
        client = self._client
        if client is None:
            raise RuntimeError("engine not started")
        status: int | None = None
        attempts = 0
        for attempt in range(cfg.webhook_retries + 1):
            attempts += 1
            ts = int(time.time()) - (600 if stale and attempt == 0 else 0)
            headers = sign_headers(cfg.signing_secrets(), body, msg_id=msg_id, timestamp=ts)
            headers["content-type"] = "application/json"
            headers["user-agent"] = "fake-replicate-webhooks/0.1"
            try:
                async with client.post(
                    url,
                    data=body,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=cfg.webhook_timeout_s),
                    allow_redirects=False,
                ) as resp:
                    status = resp.status
                    await resp.read()
                if self.recorder is not None:
                    self.recorder(
                        Exchange(
                            kind="webhook",
                            method="POST",
                            path=url,
                            request_headers={k.lower(): v for k, v in headers.items()},
                            request_body=body,
                            status=status,
                            response_headers={},
                            response_body=b"",
                        )
                    )
                if 200 <= status < 300:
                    return True, attempts, status
            except (aiohttp.ClientError, TimeoutError) as exc:
                status = None
                logger.debug(
                    "webhook attempt failed",
                    extra={"action": "webhook_attempt_failed", "error": type(exc).__name__},
                )
            if attempt < cfg.webhook_retries:
                backoff = cfg.webhook_retry_base_s * (2**attempt)
                await asyncio.sleep(backoff * (0.75 + 0.5 * random.random()))
        logger.warning(
            "webhook delivery failed",
            extra={"action": "webhook_failed", "msg_id": msg_id, "status": status},
        )
        return False, attempts, status
