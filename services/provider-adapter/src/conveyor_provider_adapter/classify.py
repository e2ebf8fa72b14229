"""Progress from tqdm-style logs and the classification of provider failures."""

from __future__ import annotations

import re

_TQDM = re.compile(r"(\d{1,3}(?:\.\d+)?)%\s*\|")
_FRACTION = re.compile(r"\|\s*(\d+)/(\d+)\b")

_RETRYABLE = (
    ("out of memory", "capacity"),
    ("cuda error", "capacity"),
    ("capacity", "capacity"),
    ("no available", "capacity"),
    ("timed out", "timeout"),
    ("timeout", "timeout"),
    ("deadline exceeded", "timeout"),
    ("rate limit", "rate_limited"),
    ("too many requests", "rate_limited"),
    ("throttl", "rate_limited"),
    ("internal server error", "provider_error"),
    ("service unavailable", "provider_error"),
    ("bad gateway", "provider_error"),
    ("interrupted", "provider_error"),
    ("worker", "provider_error"),
    ("connection", "provider_error"),
)
_PERMANENT = (
    ("nsfw", "nsfw"),
    ("safety", "nsfw"),
    ("unauthenticated", "auth"),
    ("unauthorized", "auth"),
    ("authentication", "auth"),
    ("permission", "auth"),
    ("forbidden", "auth"),
    ("invalid", "invalid_input"),
    ("validation", "invalid_input"),
    ("not found", "not_found"),
)


def parse_progress(logs: str | None) -> int | None:
    """The last tqdm percentage in ``logs`` (0-100), or None when there is none.

    Lines look like ``45%|████▌     | 45/100 [00:01<00:01, 30.00it/s]``; when the ``cur/total``
    part is present it gives the exact fraction.
    """
    if not logs:
        return None
    for line in reversed(re.split(r"[\r\n]+", logs)):
        matches = list(_TQDM.finditer(line))
        if not matches:
            continue
        last = matches[-1]
        frac = _FRACTION.search(line, last.end() - 1)
        if frac is not None:
            cur, total = int(frac.group(1)), int(frac.group(2))
            if total > 0 and 0 <= cur <= total:
                return min(100, (cur * 100) // total)
        return max(0, min(100, int(float(last.group(1)))))
    return None


def classify_error(error: str | None) -> tuple[str, bool]:
    """``(code, retryable)`` for a failed prediction's ``error`` text.

    Retryable: capacity/out of memory, timeouts, rate limits, provider-side 5xx-like failures.
    Not retryable: NSFW, auth, invalid input, and anything unrecognised (a model error that a new
    attempt with the same input would most likely repeat).
    """
    text = (error or "").lower()
    for needle, code in _PERMANENT:
        if needle in text:
            return code, False
    for needle, code in _RETRYABLE:
        if needle in text:
            return code, True
    return "model_error", False


def classify_status(status: int) -> tuple[str, bool]:
    """``(code, retryable)`` for an HTTP error answer to a create.

    Replicate's OpenAPI document declares only 201/202 for the create operations and states the
    request constraints (the body schema with ``additionalProperties: false``, ``Cancel-After`` of at
    least 5 s, ``Prefer: wait=1..60``); breaking one is a 422 with ``invalid_fields``, a verdict on
    the request that a retry repeats. Errors are problem+json (``title``, ``detail``, ``status``).
    So: 400/413/422 and other 4xx -> invalid input, 401/403 -> auth, 404 -> not found, all final;
    402/429 -> throttled (the adapter backs off, keeping the slot); 408/409/425 -> nothing was
    created and the refusal passes: a retryable failure (a new attempt after the scheduler's backoff);
    5xx -> ambiguous (handled before this, never a definite verdict).
    """
    if status in (401, 403):
        return "auth", False
    if status == 404:
        return "not_found", False
    if status in (408, 425):
        return "timeout", True
    if status == 409:
        return "conflict", True
    if status in (402, 429):
        return "rate_limited", True
    if status >= 500:
        return "provider_error", True
    return "invalid_input", False
