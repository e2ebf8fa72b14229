"""Standard Webhooks signing and verification (the scheme Replicate uses for its webhooks).

Spec: https://www.standardwebhooks.com/ (``standard-webhooks/standard-webhooks: spec/standard-webhooks.md``).

* Headers ``webhook-id`` (stable across redeliveries: use it as the dedup key), ``webhook-timestamp``
  (Unix seconds, new on every delivery attempt) and ``webhook-signature`` (space-separated ``v1,<base64>``
  entries; several entries let a sender sign with old and new secrets during a rotation).
* Signed content: ``f"{id}.{timestamp}.".encode() + raw_body``; signature: base64(HMAC-SHA256(key, content)).
* Secret: ``whsec_<base64 key>`` (the prefix is optional on input); the HMAC key is the decoded bytes.
* Verification compares in constant time against every ``v1`` entry and every configured secret, and
  rejects timestamps more than ``tolerance_s`` (default 300 s) in the past or the future.

This is a small self-contained implementation with hmac/base64 rather than a wrapper of the PyPI
``standardwebhooks`` package, which behaves the same but pulls in several runtime dependencies.

Replay protection is NOT part of verification: a valid delivery stays valid for the whole tolerance
window, so receivers must deduplicate by ``webhook-id`` themselves.

Usage::

    headers = sign_headers(["whsec_..."], body)               # sender
    verifier = WebhookVerifier(["whsec_new", "whsec_old"])    # receiver
    try:
        verified = verifier.verify(request.headers, raw_body)
    except WebhookVerificationError as exc:
        metrics_rejected.labels(reason=exc.reason).inc()
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

__all__ = [
    "DEFAULT_TOLERANCE_S",
    "HEADER_ID",
    "HEADER_SIGNATURE",
    "HEADER_TIMESTAMP",
    "SECRET_PREFIX",
    "RejectReason",
    "VerifiedWebhook",
    "WebhookVerificationError",
    "WebhookVerifier",
    "decode_secret",
    "generate_secret",
    "new_message_id",
    "sign",
    "sign_headers",
    "verify",
]

SECRET_PREFIX = "whsec_"
DEFAULT_TOLERANCE_S = 300
HEADER_ID = "webhook-id"
HEADER_TIMESTAMP = "webhook-timestamp"
HEADER_SIGNATURE = "webhook-signature"
_SCHEME = "v1"


class RejectReason(StrEnum):
    """Machine-readable reason a delivery was rejected (use it as a metrics label)."""

    MISSING_HEADERS = "missing_headers"  # one of the three headers absent or empty
    BAD_TIMESTAMP = "bad_timestamp"  # webhook-timestamp is not an integer
    STALE = "stale"  # timestamp older than now - tolerance
    FUTURE = "future"  # timestamp newer than now + tolerance
    MALFORMED_SIGNATURE = "malformed_signature"  # no parseable ``v1,<base64>`` entry at all
    BAD_SIGNATURE = "bad_signature"  # well-formed, but no entry matches any secret


class WebhookVerificationError(Exception):
    """A delivery failed verification; ``reason`` says why."""

    def __init__(self, reason: RejectReason, message: str) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class VerifiedWebhook:
    """What a successful verification established."""

    msg_id: str
    timestamp: int


@functools.lru_cache(maxsize=256)
def decode_secret(secret: str) -> bytes:
    """Return the HMAC key of a ``whsec_<base64>`` secret (prefix optional). ValueError if invalid.

    Cached by the secret's text (a pure function of it): every signature and verification decoded
    the same few secrets again."""
    raw = secret.strip()
    if raw.startswith(SECRET_PREFIX):
        raw = raw[len(SECRET_PREFIX) :]
    try:
        key = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("webhook secret is not valid base64 (expected whsec_<base64>)") from exc
    if not key:
        raise ValueError("webhook secret is empty")
    return key


def generate_secret(nbytes: int = 32) -> str:
    """A fresh random secret in ``whsec_<base64>`` form (24..64 bytes per the spec)."""
    if not 24 <= nbytes <= 64:
        raise ValueError("secret length must be 24..64 bytes")
    return SECRET_PREFIX + base64.b64encode(os.urandom(nbytes)).decode("ascii")


def new_message_id() -> str:
    """A fresh ``msg_...`` id (unique per event; keep it for every redelivery of that event)."""
    return "msg_" + base64.b32encode(os.urandom(15)).decode("ascii").lower()


def _signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> bytes:
    content = f"{msg_id}.{timestamp}.".encode() + body
    return hmac.new(key, content, hashlib.sha256).digest()


def _keys(secrets: str | Iterable[str]) -> list[bytes]:
    items = [secrets] if isinstance(secrets, str) else list(secrets)
    if not items:
        raise ValueError("at least one webhook secret is required")
    return [decode_secret(s) for s in items]


def sign(secrets: str | Iterable[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value: one ``v1,<base64>`` entry per secret, space-separated."""
    return " ".join(
        f"{_SCHEME},{base64.b64encode(_signature(key, msg_id, timestamp, body)).decode('ascii')}"
        for key in _keys(secrets)
    )


def sign_headers(
    secrets: str | Iterable[str],
    body: bytes,
    *,
    msg_id: str | None = None,
    timestamp: int | None = None,
) -> dict[str, str]:
    """The three Standard Webhooks headers for ``body`` (new id and current time unless given)."""
    mid = msg_id if msg_id is not None else new_message_id()
    ts = timestamp if timestamp is not None else int(time.time())
    return {
        HEADER_ID: mid,
        HEADER_TIMESTAMP: str(ts),
        HEADER_SIGNATURE: sign(secrets, mid, ts, body),
    }


def _parse_signatures(header: str) -> list[bytes]:
    out: list[bytes] = []
    for entry in header.split():
        scheme, sep, value = entry.partition(",")
        if not sep or scheme != _SCHEME:
            continue
        try:
            out.append(base64.b64decode(value, validate=True))
        except (binascii.Error, ValueError):
            continue
    return out


class WebhookVerifier:
    """Verifies deliveries against any of several secrets (e.g. the current and the previous one)."""

    def __init__(
        self,
        secrets: str | Sequence[str],
        *,
        tolerance_s: int = DEFAULT_TOLERANCE_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if tolerance_s < 0:
            raise ValueError("tolerance_s must be >= 0")
        self._keys = _keys(secrets)
        self._tolerance_s = tolerance_s
        self._clock = clock

    def verify(
        self, headers: Mapping[str, str], body: bytes, *, now: float | None = None
    ) -> VerifiedWebhook:
        """Check headers + raw body; return the verified id/timestamp or raise WebhookVerificationError."""
        lower = {k.lower(): v for k, v in headers.items()}
        msg_id = lower.get(HEADER_ID, "").strip()
        ts_raw = lower.get(HEADER_TIMESTAMP, "").strip()
        sig_raw = lower.get(HEADER_SIGNATURE, "").strip()
        if not msg_id or not ts_raw or not sig_raw:
            missing = [
                name
                for name, value in (
                    (HEADER_ID, msg_id),
                    (HEADER_TIMESTAMP, ts_raw),
                    (HEADER_SIGNATURE, sig_raw),
                )
                if not value
            ]
            raise WebhookVerificationError(
                RejectReason.MISSING_HEADERS, f"missing {', '.join(missing)}"
            )
        if not ts_raw.isascii() or not ts_raw.isdigit():
            raise WebhookVerificationError(
                RejectReason.BAD_TIMESTAMP, "timestamp is not an integer"
            )
        timestamp = int(ts_raw)
        current = self._clock() if now is None else now
        if timestamp < current - self._tolerance_s:
            raise WebhookVerificationError(RejectReason.STALE, "timestamp too old")
        if timestamp > current + self._tolerance_s:
            raise WebhookVerificationError(RejectReason.FUTURE, "timestamp too far in the future")
        candidates = _parse_signatures(sig_raw)
        if not candidates:
            raise WebhookVerificationError(
                RejectReason.MALFORMED_SIGNATURE, "no v1 signature entry"
            )
        matched = False
        for key in self._keys:
            expected = _signature(key, msg_id, timestamp, body)
            for candidate in candidates:
                # No early exit: every comparison runs, each in constant time.
                matched |= hmac.compare_digest(expected, candidate)
        if not matched:
            raise WebhookVerificationError(RejectReason.BAD_SIGNATURE, "no signature matches")
        return VerifiedWebhook(msg_id=msg_id, timestamp=timestamp)


def verify(
    secrets: str | Sequence[str],
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance_s: int = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> VerifiedWebhook:
    """One-shot form of :meth:`WebhookVerifier.verify`."""
    return WebhookVerifier(secrets, tolerance_s=tolerance_s).verify(headers, body, now=now)
