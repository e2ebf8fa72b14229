"""The fake's model: prediction statuses and outcomes, the scripted behaviour knobs a prediction's
input may carry, predictions themselves, create requests and rejections."""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import math
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

from fake_replicate.config import EVENT_KINDS, FakeConfig, OutputKind
from fake_replicate.files import OutputFile

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
    return _iso(to_us(ts))


@functools.lru_cache(maxsize=4096)
def _iso(us: int) -> str:
    """RFC 3339 in UTC with microseconds; cached, since a prediction's few timestamps are shown in
    every answer and webhook about it (``strftime`` was ~4% of the fake's CPU, profiled)."""
    return (EPOCH + timedelta(microseconds=us)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


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
        params = dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))
    except (ValueError, TypeError):
        return {}, None, None
    attempt_raw = params.get("attempt", params.get("a"))
    attempt: int | str | None = attempt_raw
    if attempt_raw is not None and attempt_raw.lstrip("-").isdigit():
        attempt = int(attempt_raw)
    return params, params.get("task"), attempt
