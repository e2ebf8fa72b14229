"""Replicate's official Python client (``replicate`` on PyPI) pointed at the fake: every create form
(model version, ``owner/name`` model, deployment), get, cancel, list and paginate, ``Prefer: wait``,
and ``run()`` on ``owner/name:version`` and ``owner/name``. Every exchange is also checked against
Replicate's OpenAPI document (fake_replicate.openapi).

The client is synchronous under ``run()``; it runs in a worker thread while the fake serves on the
test's event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from replicate.client import Client
from replicate.exceptions import ReplicateError
from replicate.helpers import FileOutput
from replicate.pagination import async_paginate
from replicate.version import Versions

from conveyor_common.standard_webhooks import generate_secret
from fake_replicate import FakeConfig, FakeReplicate
from fake_replicate.openapi import Exchange, OpenApiChecker

pytestmark = pytest.mark.integration

TOKEN = "r8_official_client"
VERSION = "d" * 64


@pytest.fixture(scope="module")
async def fake() -> AsyncIterator[FakeReplicate]:
    cfg = FakeConfig(
        token=TOKEN,
        webhook_secret=generate_secret(),
        seed=11,
        min_duration_s=0.2,
        max_duration_s=0.3,
        list_page_size=2,
        output_bytes=256,
    )
    async with FakeReplicate(cfg) as server:
        yield server


@pytest.fixture
async def recorded(fake: FakeReplicate) -> AsyncIterator[list[Exchange]]:
    """Every exchange of the test, checked against the OpenAPI document at the end."""
    await fake.reset()
    exchanges: list[Exchange] = []
    fake.engine.recorder = exchanges.append
    yield exchanges
    fake.engine.recorder = None
    problems = OpenApiChecker.load().check_all(exchanges)
    assert problems == [], problems


@pytest.fixture
def client(fake: FakeReplicate, monkeypatch: pytest.MonkeyPatch) -> Client:
    monkeypatch.setenv("REPLICATE_POLL_INTERVAL", "0.05")
    return Client(api_token=TOKEN, base_url=fake.url)


async def test_every_create_form_then_get(client: Client, recorded: list[Exchange]) -> None:
    by_version = await client.predictions.async_create(version=VERSION, input={"prompt": "v"})
    by_ref = await client.predictions.async_create(
        version=f"acme/flux:{VERSION}", input={"prompt": "r"}
    )
    by_model = await client.models.predictions.async_create(
        model="acme/flux", input={"prompt": "m"}
    )
    by_deployment = await client.deployments.predictions.async_create(
        deployment="acme/flux-prod", input={"prompt": "d"}
    )
    assert by_version.version == VERSION
    assert by_ref.model == "acme/flux"
    assert by_model.model == "acme/flux"
    assert by_deployment.status in ("starting", "processing")
    for p in (by_version, by_ref, by_model, by_deployment):
        got = await client.predictions.async_get(p.id)
        assert got.id == p.id
        await got.async_wait()
        assert got.status == "succeeded"
        assert got.output is not None
    creates = [e for e in recorded if e.method == "POST"]
    assert [e.path for e in creates] == [
        "/v1/predictions",
        "/v1/predictions",
        "/v1/models/acme/flux/predictions",
        "/v1/deployments/acme/flux-prod/predictions",
    ]


async def test_cancel(client: Client, recorded: list[Exchange]) -> None:
    p = await client.models.predictions.async_create(
        model="acme/flux", input={"prompt": "long", "__fake_duration_s": 30}
    )
    await p.async_cancel()
    got = await client.predictions.async_get(p.id)
    assert got.status in ("canceled", "aborted")


async def test_list_and_paginate(client: Client, recorded: list[Exchange]) -> None:
    ids = []
    for i in range(5):
        p = await client.models.predictions.async_create(model="acme/flux", input={"i": i})
        ids.append(p.id)
    first = await client.predictions.async_list()
    assert [p.id for p in first.results] == ids[::-1][:2]  # newest first, page size 2
    assert first.next is not None
    seen = [p.id async for page in async_paginate(client.predictions.async_list) for p in page]
    assert seen == ids[::-1]


async def test_prefer_wait(client: Client, recorded: list[Exchange]) -> None:
    quick = await client.models.predictions.async_create(
        model="acme/flux", input={"__fake_duration_s": 0.2}, wait=True
    )
    assert quick.status == "succeeded"
    held = await client.models.predictions.async_create(
        model="acme/flux", input={"__fake_duration_s": 5}, wait=1
    )
    assert held.status in ("starting", "processing")
    prefers = [e.request_headers.get("prefer") for e in recorded if e.method == "POST"]
    assert prefers == ["wait", "wait=1"]


async def test_run_on_owner_name_version_and_owner_name(
    client: Client, fake: FakeReplicate, recorded: list[Exchange]
) -> None:
    out_version = await asyncio.to_thread(
        client.run, f"acme/flux:{VERSION}", input={"prompt": "run v"}
    )
    out_model = await asyncio.to_thread(client.run, "acme/flux", input={"prompt": "run m"})
    for out in (out_version, out_model):
        items: list[Any] = list(out) if isinstance(out, list) else [out]
        assert items
        # FileOutput wraps https URLs only; the fake serves its files over http.
        urls = [i.url if isinstance(i, FileOutput) else i for i in items]
        assert all(isinstance(u, str) and u.startswith(fake.url) for u in urls), urls
    # run() on owner/name:version reads the version (its output schema).
    assert any(e.path == f"/v1/models/acme/flux/versions/{VERSION}" for e in recorded)
    async_out = await client.async_run(
        f"acme/flux:{VERSION}", input={"prompt": "a"}, use_file_output=False
    )
    assert async_out


async def test_refusals_surface_as_client_errors(client: Client, recorded: list[Exchange]) -> None:
    with pytest.raises(ReplicateError) as info:
        await client.predictions.async_create(version="not-a-version", input={})
    assert info.value.status == 422
    with pytest.raises(ReplicateError) as missing:
        await client.predictions.async_get("doesnotexist")
    assert missing.value.status == 404
    deployment = await client.deployments.async_get("acme/flux-prod")
    assert deployment.owner == "acme"
    assert deployment.current_release is not None
    versions = await Versions(client, model=("acme", "flux")).async_list()
    assert versions.results
    model = await client.models.async_get("acme/flux")
    assert model.owner == "acme"
