"""Helpers of the provider adapter's unit tests (test_adapter_*.py)."""

from __future__ import annotations

import json
from typing import Any

from multidict import CIMultiDict
from yarl import URL

from conveyor_provider_adapter.web_client import Answer

VERSION = "5c7d5dc6dd8bf75c1acaa8565735e7986bc5b66206b55cca93cb72c9bf15ccaa"


def response_of(
    status: int,
    body: Any = None,
    headers: dict[str, str] | None = None,
    *,
    raw: bytes | None = None,
    method: str = "POST",
    url: str = "https://api.replicate.com/v1/predictions",
) -> Answer:
    """An answer of Replicate's API as the client reads it (``raw``: a body that is not JSON)."""
    return Answer(
        status,
        CIMultiDict({"content-type": "application/problem+json", **(headers or {})}),
        json.dumps(body).encode() if raw is None else raw,
        method,
        URL(url),
    )
