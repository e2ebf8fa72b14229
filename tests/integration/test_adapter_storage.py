"""Output copies land in both storage backends: the filesystem and an S3-compatible server (moto in
server mode on loopback), streamed, size-limited, from allow-listed hosts only, never via redirects.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from aiohttp import web
from moto.server import ThreadedMotoServer
from prometheus_client import CollectorRegistry

from conveyor_common.standard_webhooks import generate_secret
from conveyor_provider_adapter.metrics import AdapterMetrics
from conveyor_provider_adapter.storage import (
    FilesystemStorage,
    OutputCopier,
    S3Storage,
    Storage,
)
from fake_replicate import FakeConfig, FakeReplicate

pytestmark = pytest.mark.integration

TOKEN = "r8_storage"
BUCKET = "conveyor-outputs"
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = s3_client(endpoint)
    client.create_bucket(Bucket=BUCKET)
    try:
        yield endpoint
    finally:
        server.stop()


def s3_client(endpoint: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def s3_storage(endpoint: str, **kw: Any) -> S3Storage:
    return S3Storage(
        BUCKET,
        endpoint_url=endpoint,
        access_key_id="testing",
        secret_access_key="testing",
        **kw,
    )


@pytest.fixture(scope="module")
async def fake() -> AsyncIterator[FakeReplicate]:
    server = FakeReplicate(
        FakeConfig(
            token=TOKEN, webhook_secret=generate_secret(), min_duration_s=0.1, max_duration_s=0.1
        )
    )
    await server.start()
    yield server
    await server.stop()


async def finished_output(fake: FakeReplicate, inputs: dict[str, Any]) -> Any:
    async with httpx.AsyncClient(
        base_url=fake.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5
    ) as api:
        resp = await api.post("/v1/models/acme/flux/predictions", json={"input": inputs})
        assert resp.status_code == 201
        pid = resp.json()["id"]
        async with asyncio.timeout(10):
            while True:
                body = (await api.get(f"/v1/predictions/{pid}")).json()
                if body["status"] == "succeeded":
                    return body["output"]
                await asyncio.sleep(0.05)


def copier(storage: Storage, registry: CollectorRegistry, **kw: Any) -> OutputCopier:
    return OutputCopier(
        storage,
        allowed_hosts=["127.0.0.1"],
        allow_http=True,
        metrics=AdapterMetrics(registry),
        **kw,
    )


async def test_outputs_land_in_the_filesystem(fake: FakeReplicate, tmp_path: Path) -> None:
    output = await finished_output(
        fake,
        {"__fake_output_count": 2, "__fake_output_bytes": 300_000, "__fake_output_kind": "mp4"},
    )
    assert isinstance(output, list)
    assert len(output) == 2
    registry = CollectorRegistry()
    c = copier(FilesystemStorage(tmp_path, public_base_url="https://cdn.example.com/o"), registry)
    files = await c.copy_all(output, "task/../x", 1)
    await c.close()
    assert [f.source_url for f in files] == output
    async with httpx.AsyncClient() as client:
        for f in files:
            assert f.url.startswith("https://cdn.example.com/o/outputs/task_.._x/1/")
            key = f.url.removeprefix("https://cdn.example.com/o/")
            data = await asyncio.to_thread((tmp_path / key).read_bytes)
            assert data == (await client.get(f.source_url)).content
            assert f.size_bytes == len(data) == 300_000
            assert f.content_type == "video/mp4"
    assert (
        registry.get_sample_value(
            "conveyor_adapter_output_copy_bytes_total", {"backend": "filesystem"}
        )
        == 600_000
    )
    leftovers = await asyncio.to_thread(lambda: list(tmp_path.rglob(".part-*")))
    assert leftovers == []


async def test_outputs_land_in_s3(fake: FakeReplicate, s3_endpoint: str) -> None:
    output = await finished_output(fake, {"__fake_output_bytes": 200_000})
    assert isinstance(output, str)
    registry = CollectorRegistry()
    c = copier(s3_storage(s3_endpoint), registry)
    (f,) = await c.copy_all({"image": output, "caption": "a fox"}, "task-s3", 2)
    await c.close()
    assert f.url.startswith(f"s3://{BUCKET}/outputs/task-s3/2/000-")
    key = f.url.removeprefix(f"s3://{BUCKET}/")
    obj = await asyncio.to_thread(s3_client(s3_endpoint).get_object, Bucket=BUCKET, Key=key)
    body = obj["Body"].read()
    async with httpx.AsyncClient() as client:
        assert body == (await client.get(output)).content
    assert obj["ContentType"] == "image/png"
    assert f.size_bytes == 200_000


async def test_large_streams_use_multipart_and_the_size_limit_aborts(s3_endpoint: str) -> None:
    storage = s3_storage(s3_endpoint, part_size=5 * MiB)
    chunk = os.urandom(MiB)

    async def stream(n: int) -> AsyncIterator[bytes]:
        for _ in range(n):
            yield chunk

    stored = await storage.put("big/eleven.bin", stream(11), "application/octet-stream")
    assert stored.size == 11 * MiB
    client = s3_client(s3_endpoint)
    head = await asyncio.to_thread(client.head_object, Bucket=BUCKET, Key="big/eleven.bin")
    assert head["ContentLength"] == 11 * MiB
    assert head["ETag"].strip('"').endswith("-3")  # three parts: 5 + 5 + 1 MiB

    class Boom(Exception):
        pass

    async def failing() -> AsyncIterator[bytes]:
        for _ in range(6):
            yield chunk
        raise Boom

    with pytest.raises(Boom):
        await storage.put("big/failed.bin", failing(), None)
    uploads = await asyncio.to_thread(client.list_multipart_uploads, Bucket=BUCKET)
    assert uploads.get("Uploads", []) == []  # the half-done upload was aborted
    listed = await asyncio.to_thread(client.list_objects_v2, Bucket=BUCKET, Prefix="big/")
    assert [o["Key"] for o in listed["Contents"]] == ["big/eleven.bin"]
    await storage.close()


async def test_oversized_disallowed_and_redirected_outputs_are_not_copied(
    fake: FakeReplicate, tmp_path: Path
) -> None:
    output = await finished_output(fake, {"__fake_output_bytes": 50_000})

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(output)

    app = web.Application()
    app.router.add_get("/r.png", redirect)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    registry = CollectorRegistry()
    c = copier(FilesystemStorage(tmp_path), registry, max_bytes=10_000, attempts=1)
    try:
        files = await c.copy_all(
            [
                output,  # too large for max_bytes
                f"http://127.0.0.1:{port}/r.png",  # a redirect (to an allowed host, still refused)
                "http://169.254.169.254/latest/meta-data/x.png",  # not allow-listed
                "ftp://127.0.0.1/x.png",  # not a URL we collect at all
            ],
            "task-bad",
            1,
        )
    finally:
        await c.close()
        await runner.cleanup()
    assert [(f.url, f.error) for f in files] == [
        ("", "too_large"),
        ("", "redirect"),
        ("", "host_not_allowed"),
    ]
    stored = await asyncio.to_thread(lambda: [p for p in tmp_path.rglob("*") if p.is_file()])
    assert stored == []
    for reason in ("too_large", "redirect", "host_not_allowed"):
        assert (
            registry.get_sample_value(
                "conveyor_adapter_output_copy_failures_total", {"reason": reason}
            )
            == 1
        )


async def test_a_storyboards_images_are_copied_side_by_side_in_order(tmp_path: Path) -> None:
    """Six images, three at a time: the copies overlap (never more than the limit) and the
    files come back in the output's order."""
    in_flight = 0
    peak = 0

    async def image(request: web.Request) -> web.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            await asyncio.sleep(0.2)
            return web.Response(
                body=request.match_info["n"].encode() * 100, content_type="image/png"
            )
        finally:
            in_flight -= 1

    app = web.Application()
    app.router.add_get("/img/{n}.png", image)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    urls = [f"http://127.0.0.1:{port}/img/{n}.png" for n in range(6)]
    c = copier(FilesystemStorage(tmp_path), CollectorRegistry(), parallel=3)
    try:
        started = asyncio.get_running_loop().time()
        files = await c.copy_all({"frames": urls}, "board", 1)
        took = asyncio.get_running_loop().time() - started
    finally:
        await c.close()
        await runner.cleanup()
    assert [f.source_url for f in files] == urls
    assert [f.error for f in files] == [""] * 6
    for n, f in enumerate(files):
        assert f.url.endswith(f"/board/1/{n:03d}-{n}.png")
        path = tmp_path / "outputs" / "board" / "1" / f"{n:03d}-{n}.png"
        assert await asyncio.to_thread(path.read_bytes) == str(n).encode() * 100
    assert peak == 3
    assert took < 1.0  # two rounds of 0.2 s, not six
