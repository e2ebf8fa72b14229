"""Helpers of the provider adapter's unit tests (test_adapter_*.py)."""

from __future__ import annotations

from typing import Any

import httpx

VERSION = "5c7d5dc6dd8bf75c1acaa8565735e7986bc5b66206b55cca93cb72c9bf15ccaa"


def response_of(
    status: int, body: Any = None, headers: dict[str, str] | None = None
) -> httpx.Response:
    request = httpx.Request("POST", "https://api.replicate.com/v1/predictions")
    return httpx.Response(
        status,
        json=body,
        headers={"content-type": "application/problem+json", **(headers or {})},
        request=request,
    )
