"""The fake provider's state machine: predictions, their scripted runs, webhooks, rate limits, faults.

HTTP-agnostic: ``server.py`` maps requests onto this. Everything runs on one asyncio loop.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import httpx

from conveyor_common.ratelimit import TokenBucket
from conveyor_common.standard_webhooks import new_message_id, sign_headers
from fake_replicate.config import EVENT_KINDS, EventKind, FakeConfig, OutputKind
from fake_replicate.files import OutputFile
from fake_replicate.ledger import Ledger
from fake_replicate.openapi import Exchange

logger = logging.getLogger(__name__)

Status = Literal["starting", "processing", "succeeded", "failed", "canceled", "aborted"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "canceled", "aborted"})
Outcome = Literal["succeeded", "failed", "failed_retryable", "canceled", "aborted", "hang"]
OUTCOMES: tuple[str, ...] = (
    "succeeded",
    "failed",
    "failed_retryable",
    "canceled",
    "aborted",
    "hang",
)
DEFAULT_EVENTS: frozenset[str] = frozenset({"output", "completed"})
RETRYABLE_ERROR = "Prediction interrupted; please retry (code: PA)"
TIMEOUT_ERROR = "Prediction timed out"
DEFAULT_ERROR = "Fake model error: the model raised an exception"
KNOB_PREFIX = "__fake_"
_EXT: dict[str, str] = {"png": "png", "mp4": "mp4"}


class KnobError(ValueError):
    """An ``__fake_*`` input knob has an invalid value (answered as 422)."""

    def __init__(self, field_name: str, description: str) -> None:
        super().__init__(description)
        self.field_name = field_name
        self.description = description


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_us(ts: float) -> int:
    """Unix seconds -> integer microseconds (the precision of every timestamp the fake shows)."""
    return round(ts * 1_000_000)


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return (EPOCH + timedelta(microseconds=to_us(ts))).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_prediction_id() -> str:
    """26 lowercase base32 characters, like Replicate's ids."""
    return base64.b32encode(os.urandom(20)).decode("ascii").lower()[:26]


def version_id(seed: str) -> str:
    return hashlib.sha256(seed.encode()).hexdigest()


@dataclass(slots=True)
class Script:
    """How one prediction will run: config defaults overridden by ``__fake_*`` input keys."""

    duration_s: float
    starting_s: float
    outcome: Outcome
    error: str | None
    output_kind: OutputKind
    output_count: int | None  # None: a single URL (or value), not a list
    output_bytes: int
    output_value: Any
    has_output_value: bool
    webhook_drop: frozenset[str]
    webhook_duplicate: frozenset[str]
    webhook_delay: dict[str, float]
    completed_before_start: bool | None  # None: roll the configured rate
    create_status: int | None


def _num(inputs: Mapping[str, Any], key: str, *, lo: float = 0.0) -> float | None:
    if key not in inputs:
        return None
    value = inputs[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise KnobError(key, f"{key} must be a number")
    if value < lo:
        raise KnobError(key, f"{key} must be >= {lo}")
    return float(value)


def _events(inputs: Mapping[str, Any], key: str) -> frozenset[str]:
    if key not in inputs:
        return frozenset()
    value = inputs[key]
    if value is True or value == "all":
        return frozenset(EVENT_KINDS)
    if value is False or value is None:
        return frozenset()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(v in EVENT_KINDS for v in value):
        raise KnobError(key, f"{key} must be true, 'all' or a list of {list(EVENT_KINDS)}")
    return frozenset(value)


def parse_script(inputs: Mapping[str, Any], cfg: FakeConfig, rng: random.Random) -> Script:
    """Build the run script; raises KnobError for a bad knob. Consumes rng draws in a fixed order."""
    known = {
        "__fake_duration_s",
        "__fake_starting_s",
        "__fake_outcome",
        "__fake_error",
        "__fake_output_kind",
        "__fake_output_count",
        "__fake_output_bytes",
        "__fake_output",
        "__fake_webhook_drop",
        "__fake_webhook_duplicate",
        "__fake_webhook_delay_s",
        "__fake_completed_before_start",
        "__fake_create_status",
    }
    for key in inputs:
        if key.startswith(KNOB_PREFIX) and key not in known:
            raise KnobError(key, f"unknown fake knob {key}; known: {sorted(known)}")
    rolled_duration = rng.uniform(cfg.min_duration_s, cfg.max_duration_s)
    duration = _num(inputs, "__fake_duration_s")
    duration = rolled_duration if duration is None else duration
    starting = _num(inputs, "__fake_starting_s")
    starting = duration * cfg.starting_fraction if starting is None else min(starting, duration)
    outcome = inputs.get("__fake_outcome", "succeeded")
    if outcome not in OUTCOMES:
        raise KnobError("__fake_outcome", f"__fake_outcome must be one of {list(OUTCOMES)}")
    error = inputs.get("__fake_error")
    if error is not None and not isinstance(error, str):
        raise KnobError("__fake_error", "__fake_error must be a string")
    kind = inputs.get("__fake_output_kind", cfg.output_kind)
    if kind not in ("png", "mp4", "text", "json"):
        raise KnobError("__fake_output_kind", "__fake_output_kind must be png, mp4, text or json")
    count_raw = _num(inputs, "__fake_output_count")
    size = _num(inputs, "__fake_output_bytes")
    if count_raw is not None and (count_raw != int(count_raw) or count_raw > 100):
        raise KnobError("__fake_output_count", "__fake_output_count must be an integer 0..100")
    delay_raw = inputs.get("__fake_webhook_delay_s")
    delay: dict[str, float] = {}
    if isinstance(delay_raw, int | float) and not isinstance(delay_raw, bool) and delay_raw >= 0:
        delay = dict.fromkeys(EVENT_KINDS, float(delay_raw))
    elif isinstance(delay_raw, dict) and all(
        k in EVENT_KINDS and isinstance(v, int | float) and not isinstance(v, bool) and v >= 0
        for k, v in delay_raw.items()
    ):
        delay = {str(k): float(v) for k, v in delay_raw.items()}
    elif delay_raw is not None:
        raise KnobError(
            "__fake_webhook_delay_s", "__fake_webhook_delay_s must be seconds or {event: seconds}"
        )
    cbs = inputs.get("__fake_completed_before_start")
    if cbs is not None and not isinstance(cbs, bool):
        raise KnobError("__fake_completed_before_start", "__fake_completed_before_start: bool")
    status = inputs.get("__fake_create_status")
    if status is not None and (
        isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599
    ):
        raise KnobError("__fake_create_status", "__fake_create_status must be a 4xx/5xx status")
    return Script(
        duration_s=duration,
        starting_s=starting,
        outcome=outcome,
        error=error,
        output_kind=kind,
        output_count=None if count_raw is None else int(count_raw),
        output_bytes=cfg.output_bytes if size is None else int(size),
        output_value=inputs.get("__fake_output"),
        has_output_value="__fake_output" in inputs,
        webhook_drop=_events(inputs, "__fake_webhook_drop"),
        webhook_duplicate=_events(inputs, "__fake_webhook_duplicate"),
        webhook_delay=delay,
        completed_before_start=cbs,
        create_status=status,
    )


@dataclass(eq=False)
class Prediction:
    id: str
    index: int
    model: str
    version: str
    deployment: str | None
    input: dict[str, Any]
    webhook: str | None
    events_filter: frozenset[str]
    created_at: float
    deadline: float | None
    script: Script
    rng: random.Random
    status: Status = "starting"
    started_at: float | None = None
    completed_at: float | None = None
    logs: str = ""
    output: Any = None
    error: str | None = None
    files: dict[str, OutputFile] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    completed_sent: asyncio.Event = field(default_factory=asyncio.Event)
    hold_start: bool = False
    progress_handle: asyncio.TimerHandle | None = None
    progress_pending: set[str] = field(default_factory=set)
    last_progress_sent: float = 0.0

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


def tqdm_line(n: int, total: int, elapsed: float) -> str:
    """A tqdm-style progress line, e.g. `` 45%|████▌     | 45/100 [00:01<00:01, 40.00it/s]``."""
    frac = n / total
    width = 10
    filled = frac * width
    full = int(filled)
    bar = "█" * full
    if full < width:
        partial = int((filled - full) * 8)
        bar = (bar + (" ▏▎▍▌▋▊▉"[partial] if partial else "")).ljust(width)
    rate = n / elapsed if elapsed > 0 else 0.0
    remaining = (total - n) / rate if rate > 0 else 0.0
    pct = f"{frac * 100:3.0f}%"
    return f"{pct}|{bar}| {n}/{total} [{_mmss(elapsed)}<{_mmss(remaining)}, {rate:.2f}it/s]"


def _mmss(seconds: float) -> str:
    return f"{int(seconds) // 60:02d}:{int(seconds) % 60:02d}"


@dataclass(frozen=True, slots=True)
class CreateRequest:
    model: str
    version: str
    deployment: str | None
    input: dict[str, Any]
    webhook: str | None
    events_filter: frozenset[str]
    cancel_after_s: float | None


@dataclass(frozen=True, slots=True)
class Rejection:
    status: int
    reason: str
    retry_after_s: int | None = None


def webhook_params(url: str | None) -> tuple[dict[str, str], str | None, int | str | None]:
    """(query params, task id, attempt) from a webhook URL; attempt from ``attempt`` or ``a``."""
    if not url:
        return {}, None, None
    try:
        params = dict(httpx.URL(url).params.multi_items())
    except (httpx.InvalidURL, ValueError, TypeError):
        return {}, None, None
    attempt_raw = params.get("attempt", params.get("a"))
    attempt: int | str | None = attempt_raw
    if attempt_raw is not None and attempt_raw.lstrip("-").isdigit():
        attempt = int(attempt_raw)
    return params, params.get("task"), attempt


class Engine:
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
        self._client: httpx.AsyncClient | None = None
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
        self._client = httpx.AsyncClient(follow_redirects=False, trust_env=False)

    async def stop(self) -> None:
        await self._cancel_all()
        if self._client is not None:
            await self._client.aclose()
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
                resp = await client.post(
                    url, content=body, headers=headers, timeout=cfg.webhook_timeout_s
                )
                status = resp.status_code
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
            except httpx.HTTPError as exc:
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
