"""The fake Replicate's other routes and its CLI: refusals as Replicate refuses, model, version and
deployment routes, the secret and account, Prefer: wait, list pagination, UTC timestamps.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from datetime import UTC, datetime

import httpx
import pytest

from fake_replicate import FakeReplicate
from tests.integration.fake_env import SECRET, TOKEN, api_fixture, fake_fixture  # noqa: F401 (fixtures)

pytestmark = pytest.mark.integration


async def test_prefer_wait(api: httpx.AsyncClient) -> None:
    quick = await api.post(
        "/v1/models/a/b/predictions",
        json={"input": {"__fake_duration_s": 0.2}},
        headers={"Prefer": "wait"},
    )
    assert quick.status_code == 201
    assert quick.json()["status"] == "succeeded"
    t0 = time.monotonic()
    slow = await api.post(
        "/v1/models/a/b/predictions",
        json={"input": {"__fake_duration_s": 5}},
        headers={"Prefer": "wait=1"},
    )
    assert 0.9 <= time.monotonic() - t0 < 2.5
    assert slow.json()["status"] in ("starting", "processing")
    assert slow.headers["Location"] == slow.json()["urls"]["get"]


async def test_list_cursor_pagination_and_created_filters(api: httpx.AsyncClient) -> None:
    ids: list[str] = []
    stamps: list[str] = []
    for i in range(7):
        r = await api.post("/v1/models/a/b/predictions", json={"input": {"i": i}})
        ids.append(r.json()["id"])
        stamps.append(r.json()["created_at"])
        await asyncio.sleep(0.01)
    page1 = (await api.get("/v1/predictions")).json()
    assert [p["id"] for p in page1["results"]] == ids[::-1][:3]  # newest first, page size 3
    assert page1["previous"] is None
    assert all(p["source"] == "api" for p in page1["results"])
    page2 = (await api.get(page1["next"])).json()
    assert [p["id"] for p in page2["results"]] == ids[::-1][3:6]
    page3 = (await api.get(page2["next"])).json()
    assert [p["id"] for p in page3["results"]] == ids[::-1][6:]
    assert page3["next"] is None
    back = (await api.get(page3["previous"])).json()
    assert [p["id"] for p in back["results"]] == ids[::-1][3:6]
    after = (await api.get("/v1/predictions", params={"created_after": stamps[4]})).json()
    assert [p["id"] for p in after["results"]] == [ids[6], ids[5], ids[4]]
    assert after["next"] is None
    window = (
        await api.get(
            "/v1/predictions", params={"created_after": stamps[1], "created_before": stamps[3]}
        )
    ).json()
    assert [p["id"] for p in window["results"]] == [ids[2], ids[1]]
    assert (await api.get("/v1/predictions", params={"cursor": "garbage!"})).status_code == 400
    assert (
        await api.get("/v1/predictions", params={"created_after": "yesterday"})
    ).status_code == 400


async def test_secret_and_account(api: httpx.AsyncClient) -> None:
    assert (await api.get("/v1/webhooks/default/secret")).json() == {"key": SECRET}
    assert (await api.get("/v1/account")).json()["username"] == "fake"


async def test_cli_prints_url_and_serves() -> None:
    env = {**os.environ, "FAKE_REPLICATE_WEBHOOK_SECRET": SECRET}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fake_replicate", "--token", TOKEN, "--seed", "3",
        "--force-429-next", "1", "--webhook-drop-events", "start,logs",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        info = json.loads(await asyncio.wait_for(proc.stdout.readline(), timeout=15))
        assert info["pid"] == proc.pid
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with httpx.AsyncClient(base_url=info["url"], headers=headers) as c:
            assert (
                await c.post("/v1/models/a/b/predictions", json={"input": {}})
            ).status_code == 429
            assert (
                await c.post("/v1/models/a/b/predictions", json={"input": {}})
            ).status_code == 201
            cfg = (await c.get("/_fake/config")).json()
            assert (cfg["seed"], cfg["webhook_drop_events"]) == (3, ["start", "logs"])
    finally:
        proc.terminate()
        _, err_bytes = await asyncio.wait_for(proc.communicate(), timeout=10)
    err = err_bytes.decode()
    assert proc.returncode == 0, err
    logs = [json.loads(ln) for ln in err.splitlines() if ln.startswith("{")]
    assert any(entry.get("action") == "listening" for entry in logs)


async def test_cli_fails_without_secrets() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_REPLICATE_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fake_replicate", "--token", TOKEN,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout=15)
    assert proc.returncode == 2
    assert b"webhook_secret" in err
    assert out == b""


def test_iso_timestamps_are_utc_z() -> None:
    from fake_replicate.model import iso

    assert iso(0.5) == "1970-01-01T00:00:00.500000Z"
    assert datetime.fromisoformat(iso(time.time()) or "").tzinfo == UTC


def _invalid_fields(resp: httpx.Response) -> list[str]:
    assert resp.status_code == 422, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    body = resp.json()
    assert body["status"] == 422
    assert body["title"]
    assert body["detail"]
    return [f["field"] for f in body["invalid_fields"]]


async def test_refuses_what_replicate_refuses(api: httpx.AsyncClient, fake: FakeReplicate) -> None:
    """Cancel-After under Replicate's 5 s minimum, a Prefer outside ``wait``/``wait=1..60``, and
    malformed version ids are refused with 422 problem+json and create nothing."""
    path = "/v1/models/a/b/predictions"
    for value in ("4s", "4999ms", "1", "0.5"):
        resp = await api.post(path, json={"input": {}}, headers={"Cancel-After": value})
        assert _invalid_fields(resp) == ["Cancel-After"], value
    for value in ("5s", "5", "1m", "1h30m"):
        resp = await api.post(path, json={"input": {}}, headers={"Cancel-After": value})
        assert resp.status_code == 201, (value, resp.text)
    for value in ("wait=0", "wait=61", "wait=100", "wait=abc", "wait=", "respond-async"):
        resp = await api.post(path, json={"input": {}}, headers={"Prefer": value})
        assert _invalid_fields(resp) == ["Prefer"], value
    for version in (
        "b" * 63,
        "B" * 64,
        "acme/x:" + "z" * 64,
        "acme/x:" + "a" * 63,
        "not a version",
    ):
        resp = await api.post("/v1/predictions", json={"version": version, "input": {}})
        assert _invalid_fields(resp) == ["version"], version
    creates = fake.engine.ledger.events(kind="create")
    assert len(creates) == 4  # only the four valid Cancel-After values created something


async def test_model_version_and_deployment_routes(api: httpx.AsyncClient) -> None:
    version = "c" * 64
    resp = await api.post("/v1/predictions", json={"version": f"acme/flux:{version}", "input": {}})
    assert resp.status_code == 201
    got = await api.get(f"/v1/models/acme/flux/versions/{version}")
    assert got.status_code == 200
    body = got.json()
    assert body["id"] == version
    assert body["openapi_schema"]["components"]["schemas"]["Output"]
    assert (await api.get(f"/v1/models/other/model/versions/{version}")).status_code == 404
    assert (await api.get("/v1/models/acme/flux/versions/nothex")).status_code == 404
    listing = (await api.get("/v1/models/acme/flux/versions")).json()
    assert version in [v["id"] for v in listing["results"]]
    assert listing["next"] is None
    dep = (await api.get("/v1/deployments/acme/flux-prod")).json()
    assert (dep["owner"], dep["name"]) == ("acme", "flux-prod")
    created = await api.post("/v1/deployments/acme/flux-prod/predictions", json={"input": {}})
    assert created.json()["version"] == dep["current_release"]["version"]
