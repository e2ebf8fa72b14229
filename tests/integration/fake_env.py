"""Fixtures of the fake Replicate's tests: the server (``fake``) and an authenticated HTTP client on it
(``api``; import the ``*_fixture`` names), and prediction helpers.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import httpx
import pytest

from conveyor_common.standard_webhooks import generate_secret
from fake_replicate import FakeConfig, FakeReplicate
from fake_replicate.openapi import OpenApiChecker

TOKEN = "r8_test_token"


SECRET = generate_secret()


VERSION = "a" * 64


TQDM = re.compile(r"^\s*(\d+)%\|[█▏▎▍▌▋▊▉ ]{10}\| (\d+)/(\d+) \[\d\d:\d\d<\d\d:\d\d, [\d.]+it/s\]$")


@pytest.fixture(scope="module", name="fake")
async def fake_fixture() -> AsyncIterator[FakeReplicate]:
    cfg = FakeConfig(
        token=TOKEN,
        webhook_secret=SECRET,
        seed=7,
        min_duration_s=0.2,
        max_duration_s=0.3,
        list_page_size=3,
    )
    async with FakeReplicate(cfg) as server:
        yield server


@pytest.fixture(name="api")
async def api_fixture(fake: FakeReplicate) -> AsyncIterator[httpx.AsyncClient]:
    await fake.reset()
    async with httpx.AsyncClient(
        base_url=fake.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10.0
    ) as client:
        yield client


async def wait_terminal(api: httpx.AsyncClient, pid: str, within_s: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        body: dict[str, Any] = (await api.get(f"/v1/predictions/{pid}")).json()
        if body["status"] in ("succeeded", "failed", "canceled", "aborted"):
            return body
        await asyncio.sleep(0.05)
    raise AssertionError(f"{pid} not terminal after {within_s}s")


def assert_prediction_shape(body: dict[str, Any], base: str) -> None:
    # The OpenAPI document's required fields and types (optional timestamps appear once known).
    schema = {"$ref": "#/components/schemas/schemas_prediction_response"}
    assert OpenApiChecker.load().validate(body, schema, "prediction") == []
    for key in ("logs", "metrics"):
        assert key in body, key
    assert re.fullmatch(r"[a-z2-7]{26}", body["id"])
    assert body["urls"]["get"] == f"{base}/v1/predictions/{body['id']}"
    assert body["urls"]["cancel"] == f"{base}/v1/predictions/{body['id']}/cancel"
    datetime.fromisoformat(body["created_at"])
