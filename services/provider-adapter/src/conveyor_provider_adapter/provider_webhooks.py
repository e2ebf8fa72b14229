"""Replicate's webhooks: verification, dedup and a fast answer; the work happens in a pipeline.

``POST /webhooks/replicate?task=<id>&attempt=<n>&token=<hmac>``:

1. the raw body (size-limited) is verified with Standard Webhooks (``webhook-id``,
   ``webhook-timestamp`` within the tolerance, a ``v1,`` signature over ``id.timestamp.body``,
   constant-time compare, any of the configured secrets): failures answer 401 and are counted by
   reason (``missing_headers``, ``stale``, ``future``, ``bad_signature``...);
2. a ``webhook-id`` seen before at the same URL (in-memory LRU of this replica, keyed by
   webhook-id, task and attempt) answers 200 and is dropped (``duplicate``). That LRU only saves
   work: the dedup that holds across replicas and restarts is the scheduler's inbox, which applies
   each result id once, and a delivery's result ids derive from its webhook-id (``wh:<id>``), so a
   redelivery to any replica, before or after a restart, is applied once;
3. our ``token`` must be the HMAC of ``task:attempt`` (a signed delivery without our parameters is
   an unknown prediction: logged, answered 200 so Replicate stops retrying);
4. the delivery is queued (a task's deliveries in order, different tasks' side by side); a full
   queue answers 503 so Replicate redelivers later. Only then is the webhook-id remembered. A
   succeeded prediction this replica created for the attempt has its output copy started now
   (``Observer.copy_ahead``), while it waits behind the attempt's earlier deliveries, and a held
   ``started`` of a prediction whose terminal delivery waits here waits for it
   (``Observer.terminal_queued``);
5. the worker binds the body's prediction to the URL's attempt through the scheduler's recorded
   submit (binding.py) before anything acts on it: an unbound delivery changes nothing.

Nothing is published inline: the answer takes well under a millisecond of work.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
from dataclasses import dataclass

from aiohttp import web

from conveyor.events.v1 import events_pb2
from conveyor_common import tracing
from conveyor_common.standard_webhooks import (
    RejectReason,
    WebhookVerificationError,
    WebhookVerifier,
)
from conveyor_provider_adapter.binding import Binder
from conveyor_provider_adapter.metrics import AdapterMetrics
from conveyor_provider_adapter.replicate import Prediction, ReplicateClient
from conveyor_provider_adapter.results import Observer
from conveyor_provider_adapter.state import LRU
from conveyor_provider_adapter.webhook_token import WEBHOOK_PATH, check_token

logger = logging.getLogger(__name__)

WEBHOOK = events_pb2.RESULT_SOURCE_WEBHOOK


@dataclass(frozen=True)
class WebhookJob:
    """A verified delivery waiting to be turned into results."""

    webhook_id: str
    task_id: str
    attempt: int
    prediction: Prediction
    received: float
    traceparent: str = ""
    """The task's trace (the URL's ``tp``), for the spans and records of this delivery."""


class SecretSource:
    """The verifier in force: a configured secret, or one fetched from Replicate (and re-fetched
    after a bad signature, at most every ``refresh_s``, to follow a rotation)."""

    def __init__(
        self,
        *,
        configured: str | None,
        client: ReplicateClient,
        tolerance_s: int = 300,
        refresh_s: float = 60.0,
    ) -> None:
        self.configured = configured
        self.client = client
        self.tolerance_s = tolerance_s
        self.refresh_s = refresh_s
        self._verifier: WebhookVerifier | None = (
            WebhookVerifier([configured], tolerance_s=tolerance_s) if configured else None
        )
        self._secret = configured
        self._last_fetch = 0.0
        self._refresh_task: asyncio.Task[None] | None = None

    @property
    def verifier(self) -> WebhookVerifier:
        """The current verifier (after :meth:`load`)."""
        if self._verifier is None:
            raise RuntimeError("webhook secret not loaded")
        return self._verifier

    async def load(self, *, attempts: int = 10) -> None:
        """Fetch the secret when none is configured (retrying a few times)."""
        if self.configured:
            return
        delay = 0.5
        for n in range(1, attempts + 1):
            try:
                await self._fetch()
                return
            except Exception:
                if n == attempts:
                    raise
                logger.warning(
                    "fetching the webhook secret failed, retrying",
                    extra={"action": "webhook_secret_fetch_retry"},
                    exc_info=True,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10)

    async def _fetch(self) -> None:
        self._last_fetch = time.monotonic()
        secret = await self.client.webhook_secret()
        if secret != self._secret:
            # Keep the previous secret too, for deliveries signed before a rotation.
            secrets = [secret] + ([self._secret] if self._secret else [])
            self._verifier = WebhookVerifier(secrets, tolerance_s=self.tolerance_s)
            self._secret = secret
            logger.info("webhook secret loaded", extra={"action": "webhook_secret_loaded"})

    def bad_signature_seen(self) -> None:
        """Maybe re-fetch a fetched secret in the background (rotation)."""
        if self.configured or time.monotonic() - self._last_fetch < self.refresh_s:
            return
        if self._refresh_task is not None and not self._refresh_task.done():
            return
        self._last_fetch = time.monotonic()

        async def refresh() -> None:
            try:
                await self._fetch()
            except Exception:
                logger.warning(
                    "webhook secret refresh failed",
                    extra={"action": "webhook_secret_refresh_failed"},
                )

        self._refresh_task = asyncio.create_task(refresh())

    async def close(self) -> None:
        if self._refresh_task is not None:
            self._refresh_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresh_task


class Pipeline:
    """Verified deliveries turned into results: each task's deliveries in order, different tasks'
    side by side (at most ``workers`` at once), at most ``queue_size`` waiting or in hand.

    A task's deliveries form a chain handled by one asyncio task while it has any; a delivery never
    waits behind another task's (fixed workers by hash made the deliveries of tasks sharing a worker
    wait for each other: a finished wave's output copies and publishes, one after another)."""

    def __init__(
        self,
        observer: Observer,
        metrics: AdapterMetrics,
        *,
        workers: int = 16,
        queue_size: int = 1000,
        binder: Binder | None = None,
    ) -> None:
        self.observer = observer
        self.metrics = metrics
        self.binder = binder
        self.queue_size = queue_size
        self._slots = asyncio.Semaphore(workers)
        self._chains: dict[str, collections.deque[WebhookJob]] = {}
        self._runners: dict[str, asyncio.Task[None]] = {}
        self._queued = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._started = False
        self._accepting = True

    def start(self) -> None:
        """Start handling (deliveries offered before wait until now)."""
        self._accepting = True
        self._started = True
        for task_id in list(self._chains):
            self._run(task_id)

    def offer(self, job: WebhookJob) -> bool:
        """Queue a job; False when the queue is full or the pipeline is draining."""
        if not self._accepting or self._queued >= self.queue_size:
            return False
        self._queued += 1
        self._idle.clear()
        self.metrics.webhook_queue.inc()
        self._chains.setdefault(job.task_id, collections.deque()).append(job)
        if job.prediction.terminal:
            self.observer.terminal_queued(job.task_id, job.attempt, job.prediction.id)
            self.observer.copy_ahead(job.task_id, job.attempt, job.prediction)
        if self._started:
            self._run(job.task_id)
        return True

    def _run(self, task_id: str) -> None:
        if task_id not in self._runners:
            self._runners[task_id] = asyncio.create_task(
                self._chain(task_id), name=f"webhooks-{task_id}"
            )

    async def _chain(self, task_id: str) -> None:
        chain = self._chains[task_id]
        try:
            while chain:
                job = chain.popleft()
                try:
                    async with self._slots:
                        await self._handle(job)
                finally:
                    self._queued -= 1
                    self.metrics.webhook_queue.dec()
        finally:  # no await since the chain ran dry: an offer now starts a new runner
            del self._chains[task_id]
            del self._runners[task_id]
            if not self._runners:
                self._idle.set()

    async def _handle(self, job: WebhookJob) -> None:
        try:
            if self.binder is not None and not await self.binder.bind(
                job.task_id, job.attempt, job.prediction
            ):
                return
            with tracing.span(
                "replicate webhook process",
                tracing.SpanKind.CONSUMER,
                parent=job.traceparent or "",
                attributes={"conveyor.task_id": job.task_id},
            ):
                await self.observer.observe(
                    job.prediction,
                    job.task_id,
                    job.attempt,
                    source=WEBHOOK,
                    webhook_id=job.webhook_id,
                )
        except Exception:
            logger.exception(
                "webhook delivery not processed (the reconciler will poll it)",
                extra={"action": "webhook_job_failed", "task_id": job.task_id},
            )
        finally:
            if job.prediction.terminal:
                self.observer.drop_copy(job.task_id, job.attempt, job.prediction)
                self.observer.terminal_handled(job.task_id, job.attempt, job.prediction.id)

    async def drain(self, wait_s: float = 30.0) -> None:
        """Stop accepting, finish what is queued (up to ``wait_s``), stop the rest."""
        self._accepting = False
        if self._started:
            try:
                await asyncio.wait_for(self._idle.wait(), timeout=wait_s)
            except TimeoutError:
                logger.warning(
                    "webhook queue not drained in time", extra={"action": "drain_timeout"}
                )
        runners = list(self._runners.values())
        for task in runners:
            task.cancel()
        for task in runners:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.observer.drop_copies()  # of deliveries left unprocessed


class WebhookReceiver:
    """The aiohttp server of ``/webhooks/replicate`` (and ``/healthz``)."""

    def __init__(
        self,
        *,
        secrets: SecretSource,
        token_key: bytes,
        pipeline: Pipeline,
        metrics: AdapterMetrics,
        max_body_bytes: int = 4 * 1024 * 1024,
        dedup_size: int = 100_000,
    ) -> None:
        self.secrets = secrets
        self.token_key = token_key
        self.pipeline = pipeline
        self.metrics = metrics
        self._seen: LRU[tuple[str, str, str], bool] = LRU(dedup_size)
        self.app = web.Application(client_max_size=max_body_bytes)
        self.app.router.add_post(WEBHOOK_PATH, self.handle)
        self.app.router.add_get("/healthz", self.healthz)
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        """Serve on host:port (0 = any free port); returns the bound port."""
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        logger.info(
            "webhook receiver listening", extra={"action": "webhooks_listening", "port": self.port}
        )
        return self.port

    async def stop(self) -> None:
        """Stop accepting deliveries (in-flight requests finish)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    def _reject(self, reason: str, status: int, message: str) -> web.Response:
        self.metrics.webhooks.labels("rejected").inc()
        self.metrics.webhooks_rejected.labels(reason).inc()
        logger.warning(
            "webhook rejected",
            extra={"action": "webhook_rejected", "reason": reason, "detail": message},
        )
        return web.json_response({"error": reason}, status=status)

    async def handle(self, request: web.Request) -> web.Response:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._reject("too_large", 413, "body over the limit")
        try:
            verified = self.secrets.verifier.verify(request.headers, body)
        except WebhookVerificationError as exc:
            if exc.reason == RejectReason.BAD_SIGNATURE:
                self.secrets.bad_signature_seen()
            return self._reject(exc.reason.value, 401, str(exc))
        msg_id = verified.msg_id
        query = request.query
        task_id, attempt_raw, token = (
            query.get("task", ""),
            query.get("attempt", ""),
            query.get("token", ""),
        )
        # Keyed by the URL's attempt too: a delivery re-posted to another task's URL first must not
        # make the genuine one look like a duplicate.
        seen_key = (msg_id, task_id, attempt_raw)
        if seen_key in self._seen:
            self.metrics.webhooks.labels("duplicate").inc()
            return web.json_response({"status": "duplicate"})
        if not task_id or not attempt_raw or not token:
            self.metrics.webhooks.labels("unknown").inc()
            logger.info(
                "signed webhook for a prediction that is not ours",
                extra={"action": "webhook_unknown_prediction", "webhook_id": msg_id},
            )
            return web.json_response({"status": "ignored"})
        if not (attempt_raw.isascii() and attempt_raw.isdigit()) or not check_token(
            self.token_key, task_id, int(attempt_raw), token
        ):
            # Signed by Replicate but not our URL (or our key changed): retrying cannot help.
            resp = self._reject("bad_token", 200, "token does not match task:attempt")
            return resp
        try:
            obj = json.loads(body)
            prediction = Prediction.from_json(obj if isinstance(obj, dict) else {})
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
            return self._reject("bad_body", 200, "body is not a prediction object")
        job = WebhookJob(
            msg_id, task_id, int(attempt_raw), prediction, time.monotonic(), query.get("tp", "")
        )
        if not self.pipeline.offer(job):
            self.metrics.webhooks.labels("overloaded").inc()
            return web.json_response({"error": "overloaded"}, status=503)
        self._seen.put(seen_key, True)
        self.metrics.webhooks.labels("accepted").inc()
        return web.json_response({"status": "accepted"})
