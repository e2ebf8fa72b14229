"""Parsing and validating create requests the way Replicate does: model and version references, the
``Prefer: wait`` header, durations, times and the body's fields."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from urllib.parse import urlsplit

from fake_replicate.config import EVENT_KINDS
from fake_replicate.engine import Engine
from fake_replicate.model import (
    EPOCH,
    version_id,
)

_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]*"


MODEL_RE = re.compile(rf"^({_NAME})/({_NAME})$")


MODEL_VERSION_RE = re.compile(rf"^({_NAME})/({_NAME}):([0-9a-f]{{64}})$")


VERSION_RE = re.compile(r"^[0-9a-f]{64}$")


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


_PREFER_WAIT = re.compile(r"^wait(=([1-9]|[1-9][0-9]|60))?$")
"""The OpenAPI document's pattern of ``Prefer`` (n is also checked to be 1..60, as its text says)."""


COMMON_FIELDS = frozenset(
    {"input", "webhook", "webhook_events_filter", "webhook_completed", "stream"}
)


def parse_duration(value: str) -> float | None:
    """Go-style duration (``1h30m``, ``500ms``, ``30s``) or bare seconds; None if invalid."""
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pos = 0
        seconds = 0.0
        for m in _DURATION_PART.finditer(text):
            if m.start() != pos:
                return None
            seconds += float(m.group(1)) * _UNIT[m.group(2)]
            pos = m.end()
        if pos != len(text):
            return None
    if not math.isfinite(seconds) or seconds <= 0:
        return None
    return seconds


def parse_prefer_wait(value: str | None) -> float | None:
    """Seconds to hold the create open; None without the header; ValueError when Replicate refuses
    it (``wait=0``, over 60, anything outside ``^wait(=n)?$``)."""
    if value is None:
        return None
    m = _PREFER_WAIT.match(value.strip())
    if m is None or (m.group(2) and not 1 <= int(m.group(2)) <= 60):
        raise ValueError(value)
    return float(m.group(2)) if m.group(2) else 60.0


def parse_time_us(value: str) -> int:
    """ISO-8601 (naive = UTC; a ' ' from an unencoded '+' is tolerated) -> Unix microseconds."""
    dt = datetime.fromisoformat(value.strip().replace(" ", "+"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return (dt - EPOCH) // timedelta(microseconds=1)


def validate_create(
    engine: Engine,
    body: dict[str, Any],
    route: Literal["version", "model", "deployment"],
    owner: str,
    name: str,
) -> tuple[tuple[str, str, str | None] | None, list[dict[str, str]]]:
    """((model, version, deployment) | None, invalid_fields)."""
    errors: list[dict[str, str]] = []
    allowed = COMMON_FIELDS | ({"version"} if route == "version" else frozenset())
    errors.extend(
        {
            "type": "additional_property_not_allowed",
            "field": key,
            "description": f"Additional property {key} is not allowed",
        }
        for key in body
        if key not in allowed
    )
    target: tuple[str, str, str | None] | None = None
    if route == "version":
        raw = body.get("version")
        if raw is None:
            errors.append(
                {"type": "required", "field": "version", "description": "version is required"}
            )
        elif not isinstance(raw, str):
            errors.append(
                {"type": "invalid_type", "field": "version", "description": "Expected: string"}
            )
        elif m := MODEL_VERSION_RE.match(raw):
            target = (f"{m.group(1)}/{m.group(2)}", m.group(3), None)
            engine.versions[m.group(3)] = f"{m.group(1)}/{m.group(2)}"
        elif VERSION_RE.match(raw):
            target = (engine.versions.get(raw, f"fake/model-{raw[:8]}"), raw, None)
        elif m := MODEL_RE.match(raw):
            target = (f"{m.group(1)}/{m.group(2)}", "hidden", None)
        else:
            errors.append(
                {
                    "type": "invalid",
                    "field": "version",
                    "description": "Invalid version or not permitted",
                }
            )
    elif route == "model":
        target = (f"{owner}/{name}", "hidden", None)
    else:
        target = (f"{owner}/{name}", version_id(f"deployment:{owner}/{name}"), f"{owner}/{name}")
    if "input" not in body:
        errors.append({"type": "required", "field": "input", "description": "input is required"})
    elif not isinstance(body["input"], dict):
        errors.append({"type": "invalid_type", "field": "input", "description": "Expected: object"})
    webhook = body.get("webhook")
    if webhook is not None and not valid_url(webhook):
        errors.append(
            {"type": "format", "field": "webhook", "description": "Does not match format 'uri'"}
        )
    completed = body.get("webhook_completed")
    if completed is not None and not valid_url(completed):
        errors.append(
            {
                "type": "format",
                "field": "webhook_completed",
                "description": "Does not match format 'uri'",
            }
        )
    filt = body.get("webhook_events_filter")
    if filt is not None and (
        not isinstance(filt, list) or not all(isinstance(e, str) and e in EVENT_KINDS for e in filt)
    ):
        errors.append(
            {
                "type": "enum",
                "field": "webhook_events_filter",
                "description": f"Each item must be one of: {', '.join(EVENT_KINDS)}",
            }
        )
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        errors.append(
            {"type": "invalid_type", "field": "stream", "description": "Expected: boolean"}
        )
    return (None if errors else target), errors


def valid_url(value: Any) -> bool:
    """An absolute http(s) URL with a host (parsed by ``urllib``: httpx's URL parser cost ~4% of
    the fake's CPU per create, profiled)."""
    if not isinstance(value, str) or any(c.isspace() for c in value):
        return False
    try:
        url = urlsplit(value)
        url.port  # noqa: B018 - raises ValueError for a port out of range or not a number
    except ValueError:
        return False
    return url.scheme in ("http", "https") and bool(url.hostname)
