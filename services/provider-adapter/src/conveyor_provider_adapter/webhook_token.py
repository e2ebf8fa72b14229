"""Our own HMAC token in webhook URLs: ``token = HMAC-SHA256(key, "<task>:<attempt>")``.

Replicate's signature proves Replicate sent a delivery; the token proves the URL (and so the task
id and attempt it names) was issued by us for that prediction, so a valid signature on a delivery
for a prediction someone else created with our endpoint cannot be attributed to one of our tasks.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from urllib.parse import urlencode

WEBHOOK_PATH = "/webhooks/replicate"


def make_token(key: bytes, task_id: str, attempt: int) -> str:
    """URL-safe base64 (no padding) HMAC-SHA256 of ``task:attempt``."""
    digest = hmac.new(key, f"{task_id}:{attempt}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def check_token(key: bytes, task_id: str, attempt: int, token: str) -> bool:
    """Constant-time comparison of ``token`` with the expected one."""
    return hmac.compare_digest(make_token(key, task_id, attempt).encode(), token.encode())


def webhook_url(
    base_url: str, key: bytes, task_id: str, attempt: int, traceparent: str = ""
) -> str:
    """``<base>/webhooks/replicate?task=<id>&attempt=<n>&token=<hmac>`` (and ``tp=``, the task's
    trace context, so the deliveries' spans join the task's trace; not covered by the token: it
    only names a trace)."""
    params = {"task": task_id, "attempt": str(attempt), "token": make_token(key, task_id, attempt)}
    if traceparent:
        params["tp"] = traceparent
    return f"{base_url.rstrip('/')}{WEBHOOK_PATH}?{urlencode(params)}"
