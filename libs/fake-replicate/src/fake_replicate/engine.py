"""The fake provider's state machine: predictions, their scripted runs, webhooks, rate limits, faults.

HTTP-agnostic: ``server.py`` maps requests onto this. Everything runs on one asyncio loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Literal

import aiohttp

from conveyor_common.ratelimit import TokenBucket
from fake_replicate.config import FakeConfig
from fake_replicate.files import OutputFile
from fake_replicate.ledger import Ledger
from fake_replicate.model import (
    _EXT,
    DEFAULT_ERROR,
    RETRYABLE_ERROR,
    TIMEOUT_ERROR,
    CreateRequest,
    Prediction,
    Rejection,
    Script,
    Status,
    iso,
    new_prediction_id,
    tqdm_line,
    webhook_params,
)
from fake_replicate.openapi import Exchange
from fake_replicate.webhook_sender import WebhookSender

logger = logging.getLogger(__name__)


class Engine(WebhookSender):
    """State of one fake Replicate account."""

    def __init__(self, config: FakeConfig) -> None:
        self.initial_config = config.model_copy(deep=True)
        self.config = config.model_copy(deep=True)
        self.base_url = config.public_url or ""
        self.ledger = Ledger()
        self.predictions: dict[str, Prediction] = {}
        self.versions: dict[str, str] = {}  # version id -> owner/name, learned from creates
        self._order: list[Prediction] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._client: aiohttp.ClientSession | None = None
        self.recorder: Callable[[Exchange], None] | None = None
        """Called with every /v1 exchange and webhook delivery (tests check them against the
        OpenAPI document)."""
        self._reset_runtime()

    # --- lifecycle -----------------------------------------------------------------------
    def _reset_runtime(self) -> None:
        cfg = self.config
        self.rng = random.Random(cfg.seed)
        self._index = 0
        self.create_bucket = (
            TokenBucket.per_minute(6, 1)
            if cfg.low_credit
            else TokenBucket.per_minute(cfg.create_rate_per_min, cfg.create_burst)
        )
        self.other_bucket = TokenBucket.per_minute(cfg.other_rate_per_min, cfg.other_burst)

    async def start(self) -> None:
        self._client = aiohttp.ClientSession(
            trust_env=False, connector=aiohttp.TCPConnector(limit=100)
        )

    async def stop(self) -> None:
        await self._cancel_all()
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def _cancel_all(self) -> None:
        for p in self._order:
            if p.progress_handle is not None:
                p.progress_handle.cancel()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()

    async def reset(self) -> None:
        """Forget every prediction and ledger event; restore the start-up configuration."""
        await self._cancel_all()
        self.predictions.clear()
        self._order.clear()
        self.ledger.clear()
        self.config = self.initial_config.model_copy(deep=True)
        self._reset_runtime()

    def update_config(self, changes: Mapping[str, Any]) -> FakeConfig:
        """Apply a partial update (validated as a whole). ``force_429_next: N`` appends N 429s."""
        data = self.config.model_dump()
        extra = dict(changes)
        force = extra.pop("force_429_next", None)
        data.update(extra)
        if force is not None:
            if isinstance(force, bool) or not isinstance(force, int) or force < 0:
                raise ValueError("force_429_next must be a non-negative integer")
            data["create_script"] = [*data["create_script"], *([429] * force)]
        new = FakeConfig.model_validate(data)
        old = self.config
        self.config = new
        if "seed" in changes:  # (re)seeding restarts the fault/duration sequence
            self.rng = random.Random(new.seed)
        if (new.create_rate_per_min, new.create_burst, new.low_credit) != (
            old.create_rate_per_min,
            old.create_burst,
            old.low_credit,
        ):
            self.create_bucket = (
                TokenBucket.per_minute(6, 1)
                if new.low_credit
                else TokenBucket.per_minute(new.create_rate_per_min, new.create_burst)
            )
        if (new.other_rate_per_min, new.other_burst) != (old.other_rate_per_min, old.other_burst):
            self.other_bucket = TokenBucket.per_minute(new.other_rate_per_min, new.other_burst)
        if new.public_url:
            self.base_url = new.public_url
        logger.info(
            "config updated", extra={"action": "config_updated", "changes": sorted(changes)}
        )
        return new

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- create --------------------------------------------------------------------------
    def pre_create(self) -> Rejection | Literal["drop"] | None:
        """Scripted answers and the create rate limit, before the body is even read."""
        cfg = self.config
        if cfg.create_script:
            item = cfg.create_script[0]
            self.config.create_script = cfg.create_script[1:]
            if item == "drop":
                return "drop"
            retry = cfg.script_429_retry_after_s if item == 429 else None
            return Rejection(int(item), "scripted", retry)
        wait = self.create_bucket.try_take()
        allowed = wait <= 0
        if not allowed:
            retry = 60 if math.isinf(wait) else max(1, math.ceil(wait))
            return Rejection(429, "rate_limited", retry)
        return None

    def roll_create_faults(self) -> Rejection | Literal["drop"] | None:
        """Seeded per-create fault rolls (both drawn every time, so the sequence is stable)."""
        r500, rdrop = self.rng.random(), self.rng.random()
        if r500 < self.config.create_500_rate:
            return Rejection(500, "fault_500")
        if rdrop < self.config.create_drop_rate:
            return "drop"
        return None

    def record_rejection(
        self,
        rejection: Rejection,
        webhook: str | None = None,
        inputs: Mapping[str, Any] | None = None,
    ) -> None:
        params, task, attempt = webhook_params(webhook)
        self.ledger.record(
            "create_rejected",
            status=rejection.status,
            reason=rejection.reason,
            task=task,
            attempt=attempt,
            params=params,
            input=dict(inputs) if inputs is not None else None,
        )
        logger.info(
            "create rejected",
            extra={
                "action": "create_rejected",
                "status": rejection.status,
                "reason": rejection.reason,
            },
        )

    def create(self, req: CreateRequest, script: Script, *, response_dropped: bool) -> Prediction:
        now = time.time()
        self._index += 1
        pid = new_prediction_id()
        rng = random.Random(f"{self.config.seed}:{self._index}")
        p = Prediction(
            id=pid,
            index=self._index,
            model=req.model,
            version=req.version,
            deployment=req.deployment,
            input=req.input,
            webhook=req.webhook,
            events_filter=req.events_filter,
            created_at=now,
            deadline=None if req.cancel_after_s is None else now + req.cancel_after_s,
            script=script,
            rng=rng,
        )
        cbs = script.completed_before_start
        roll = rng.random()
        if cbs is None:
            cbs = roll < self.config.completed_before_start_rate
        p.hold_start = cbs and {"start", "completed"} <= p.events_filter
        self.predictions[pid] = p
        self._order.append(p)
        params, task, attempt = webhook_params(req.webhook)
        self.ledger.record(
            "create",
            prediction_id=pid,
            task=task,
            attempt=attempt,
            params=params,
            model=req.model,
            version=req.version,
            deployment=req.deployment,
            input=req.input,
            webhook=req.webhook,
            events_filter=sorted(req.events_filter),
            deadline=iso(p.deadline),
            response_dropped=response_dropped,
        )
        logger.info(
            "prediction created",
            extra={"action": "prediction_created", "prediction_id": pid, "task_id": task},
        )
        self._emit(p, "start")
        p.task = self._spawn(self._run(p))
        return p

    # --- the scripted run ----------------------------------------------------------------
    async def _run(self, p: Prediction) -> None:
        loop = asyncio.get_running_loop()
        when = None if p.deadline is None else loop.time() + (p.deadline - time.time())
        try:
            async with asyncio.timeout_at(when):
                await self._lifecycle(p)
        except TimeoutError:
            if not p.terminal:
                self.ledger.record("cancel", prediction_id=p.id, by="deadline", effective=True)
                self.finish(p, "aborted" if p.started_at is None else "canceled")

    async def _lifecycle(self, p: Prediction) -> None:
        s = p.script
        await asyncio.sleep(s.starting_s)
        if s.outcome == "aborted":
            self.finish(p, "aborted")
            return
        p.status = "processing"
        p.started_at = time.time()
        self.ledger.record("start", prediction_id=p.id)
        p.logs = f"Using seed: {p.rng.randrange(1, 2**16)}\n"
        self._progress(p, "logs")
        processing = math.inf if s.outcome == "hang" else max(0.0, s.duration_s - s.starting_s)
        limit = max(0.0, self.config.max_run_s)
        timed_out = processing > limit
        run = min(processing, limit)
        if math.isinf(processing) or timed_out:
            await asyncio.sleep(run)
        else:
            steps = self.config.progress_steps
            total = 100
            for i in range(1, steps + 1):
                await asyncio.sleep(run / steps)
                n = round(total * i / steps)
                elapsed = time.time() - (p.started_at or time.time())
                p.logs += tqdm_line(n, total, elapsed) + "\n"
                self._progress(p, "logs")
        if timed_out:
            self.finish(p, "failed", TIMEOUT_ERROR)
            return
        if s.outcome == "succeeded":
            p.output = self._make_output(p)
            self._progress(p, "output")
            await asyncio.sleep(0)
            self.finish(p, "succeeded")
        elif s.outcome == "failed":
            p.logs += f"Traceback (most recent call last):\n{s.error or DEFAULT_ERROR}\n"
            self.finish(p, "failed", s.error or DEFAULT_ERROR)
        elif s.outcome == "failed_retryable":
            self.finish(p, "failed", s.error or RETRYABLE_ERROR)
        elif s.outcome == "canceled":
            self.ledger.record("cancel", prediction_id=p.id, by="script", effective=True)
            self.finish(p, "canceled")

    def _make_output(self, p: Prediction) -> Any:
        s = p.script
        if s.has_output_value:
            return s.output_value
        if s.output_kind == "text":
            words = ["The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog."]
            return words[: s.output_count] if s.output_count is not None else words
        if s.output_kind == "json":
            return {"result": "ok", "prediction": p.id}
        names = (
            [f"output.{_EXT[s.output_kind]}"]
            if s.output_count is None
            else [f"output_{i}.{_EXT[s.output_kind]}" for i in range(s.output_count)]
        )
        urls: list[str] = []
        for name in names:
            kind: Literal["png", "mp4"] = "png" if s.output_kind == "png" else "mp4"
            p.files[name] = OutputFile(
                name=name, kind=kind, size=s.output_bytes, seed=f"{p.id}/{name}"
            )
            urls.append(f"{self.base_url}/files/{p.id}/{name}")
        return urls[0] if s.output_count is None else urls

    def finish(self, p: Prediction, status: Status, error: str | None = None) -> bool:
        """Move to a terminal state (no-op if already terminal); emits `completed`."""
        if p.terminal:
            return False
        if p.progress_handle is not None:
            # A throttled event is pending. A pending `output` event goes out now (with the last
            # non-terminal state) rather than be lost; a logs-only one is superseded by `completed`.
            p.progress_handle.cancel()
            p.progress_handle = None
            if "output" in p.progress_pending:
                self._flush_progress(p)
            p.progress_pending.clear()
        p.status = status
        p.completed_at = time.time()
        if status == "failed":
            p.error = error or DEFAULT_ERROR
        self.ledger.record(
            "finish", prediction_id=p.id, status=status, started=p.started_at is not None
        )
        logger.info(
            "prediction finished",
            extra={"action": "prediction_finished", "prediction_id": p.id, "status": status},
        )
        p.done.set()
        self._emit(p, "completed")
        return True

    def cancel(self, p: Prediction) -> bool:
        effective = not p.terminal
        self.ledger.record("cancel", prediction_id=p.id, by="api", effective=effective)
        if effective:
            self.finish(p, "canceled")
            if p.task is not None and p.task is not asyncio.current_task():
                p.task.cancel()
        return effective

    # --- views ---------------------------------------------------------------------------
    def data_removed(self, p: Prediction, now: float | None = None) -> bool:
        if p.completed_at is None:
            return False
        return (now or time.time()) >= p.completed_at + self.config.data_removed_after_s

    def to_json(self, p: Prediction, *, listing: bool = False) -> dict[str, Any]:
        removed = self.data_removed(p)
        base = self.base_url
        metrics: dict[str, float] = {}
        if p.completed_at is not None:
            metrics["total_time"] = round(p.completed_at - p.created_at, 6)
            if p.started_at is not None:
                metrics["predict_time"] = round(p.completed_at - p.started_at, 6)
        obj: dict[str, Any] = {
            "id": p.id,
            "model": p.model,
            "version": p.version,
            "input": {} if removed else p.input,
            "logs": "" if removed else p.logs,
            "output": None if removed else p.output,
            "data_removed": removed,
            "error": p.error,
            "status": p.status,
            "created_at": iso(p.created_at),
            "urls": {
                "get": f"{base}/v1/predictions/{p.id}",
                "cancel": f"{base}/v1/predictions/{p.id}/cancel",
                "web": f"{base}/p/{p.id}",
            },
            "metrics": metrics,
        }
        # Optional timestamps are omitted until known (the OpenAPI document types them as
        # non-nullable strings).
        for key, ts in (
            ("started_at", p.started_at),
            ("completed_at", p.completed_at),
            ("deadline", p.deadline),
        ):
            if ts is not None:
                obj[key] = iso(ts)
        if p.deployment is not None:
            obj["deployment"] = p.deployment
        if listing:
            obj["source"] = "api"
        return obj

    def listing(self) -> list[Prediction]:
        """Newest first."""
        return list(reversed(self._order))

    def file(self, pid: str, name: str) -> OutputFile | None:
        p = self.predictions.get(pid)
        if p is None or self.data_removed(p):
            return None
        return p.files.get(name)
