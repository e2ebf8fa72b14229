"""The fake Replicate's HTTP API over real loopback HTTP: create forms, validation, get, cancel,
deadlines, list with cursors, Prefer: wait, output files, progress logs, rate limits, CLI."""

from __future__ import annotations

import asyncio
import json
import os
import re
import struct
import sys
import time
import zlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from conveyor_common.standard_webhooks import generate_secret
from fake_replicate import FakeConfig, FakeReplicate
from fake_replicate.openapi import OpenApiChecker

pytestmark = pytest.mark.integration

TOKEN = "r8_test_token"
SECRET = generate_secret()
VERSION = "a" * 64
TQDM = re.compile(r"^\s*(\d+)%\|[█▏▎▍▌▋▊▉ ]{10}\| (\d+)/(\d+) \[\d\d:\d\d<\d\d:\d\d, [\d.]+it/s\]$")


@pytest.fixture(scope="module")
async def fake() -> AsyncIterator[FakeReplicate]:
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


@pytest.fixture
async def api(fake: FakeReplicate) -> AsyncIterator[httpx.AsyncClient]:
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


async def test_auth_is_required(api: httpx.AsyncClient, fake: FakeReplicate) -> None:
    async with httpx.AsyncClient(base_url=fake.url) as anon:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            resp = await anon.post(
                "/v1/predictions", json={"version": VERSION, "input": {}}, headers=headers
            )
            assert resp.status_code == 401
            assert resp.headers["content-type"].startswith("application/problem+json")
            assert resp.json()["status"] == 401
            assert resp.json()["title"] == "Unauthenticated"
        assert (await anon.get("/v1/predictions")).status_code == 401
    assert fake.engine.ledger.events(kind="create") == []


async def test_three_create_forms(api: httpx.AsyncClient, fake: FakeReplicate) -> None:
    r1 = await api.post(
        "/v1/predictions", json={"version": f"acme/img:{VERSION}", "input": {"p": 1}}
    )
    r2 = await api.post("/v1/predictions", json={"version": VERSION, "input": {"p": 2}})
    r3 = await api.post("/v1/predictions", json={"version": "acme/official", "input": {"p": 3}})
    r4 = await api.post(
        "/v1/models/black-forest-labs/flux-schnell/predictions", json={"input": {"p": 4}}
    )
    r5 = await api.post("/v1/deployments/acme/my-dep/predictions", json={"input": {"p": 5}})
    for r in (r1, r2, r3, r4, r5):
        assert r.status_code == 201, r.text
        body = r.json()
        assert_prediction_shape(body, fake.url)
        assert body["status"] == "starting"
        assert body.get("started_at") is None
        assert body["output"] is None
        assert r.headers["Location"] == body["urls"]["get"]
        assert int(r.headers["ratelimit-remaining"]) >= 0
    assert (r1.json()["model"], r1.json()["version"]) == ("acme/img", VERSION)
    assert (r2.json()["model"], r2.json()["version"]) == ("acme/img", VERSION)  # learned mapping
    assert (r3.json()["model"], r3.json()["version"]) == ("acme/official", "hidden")
    assert r4.json()["model"] == "black-forest-labs/flux-schnell"
    assert r5.json()["deployment"] == "acme/my-dep"
    assert re.fullmatch(r"[0-9a-f]{64}", r5.json()["version"])
    assert [e["input"]["p"] for e in fake.engine.ledger.events(kind="create")] == [1, 2, 3, 4, 5]


async def test_invalid_creates_are_rejected_with_invalid_fields(
    api: httpx.AsyncClient, fake: FakeReplicate
) -> None:
    cases: list[tuple[str, Any, set[tuple[str, str]]]] = [
        ("/v1/predictions", {"input": {}}, {("required", "version")}),
        ("/v1/predictions", {"version": "nope", "input": {}}, {("invalid", "version")}),
        ("/v1/predictions", {"version": VERSION}, {("required", "input")}),
        ("/v1/predictions", {"version": VERSION, "input": [], "extra": 1},
         {("invalid_type", "input"), ("additional_property_not_allowed", "extra")}),
        ("/v1/models/a/b/predictions", {"version": VERSION, "input": {}},
         {("additional_property_not_allowed", "version")}),
        ("/v1/models/a/b/predictions", {"input": {}, "webhook": "ftp://x"}, {("format", "webhook")}),
        ("/v1/models/a/b/predictions", {"input": {}, "webhook_events_filter": ["done"]},
         {("enum", "webhook_events_filter")}),
        ("/v1/models/a/b/predictions", {"input": {"__fake_outcome": "exploded"}},
         {("invalid", "input.__fake_outcome")}),
    ]  # fmt: skip
    for path, body, expected in cases:
        resp = await api.post(path, json=body)
        assert resp.status_code == 422, (body, resp.text)
        assert resp.headers["content-type"].startswith("application/problem+json")
        got = {(f["type"], f["field"]) for f in resp.json()["invalid_fields"]}
        assert got == expected, body
    bad = await api.post(
        "/v1/predictions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert bad.status_code == 400
    bad_deadline = await api.post(
        "/v1/models/a/b/predictions", json={"input": {}}, headers={"Cancel-After": "soon"}
    )
    assert bad_deadline.status_code == 422
    assert fake.engine.ledger.events(kind="create") == []
    assert len(fake.engine.ledger.events(kind="create_rejected")) == len(cases) + 2


async def test_progress_logs_outputs_and_files(api: httpx.AsyncClient, fake: FakeReplicate) -> None:
    resp = await api.post(
        "/v1/models/a/img/predictions",
        json={"input": {"prompt": "cat", "__fake_output_bytes": 5000, "__fake_output_count": 2}},
    )
    pid = resp.json()["id"]
    seen_processing = False
    while True:
        body = (await api.get(f"/v1/predictions/{pid}")).json()
        seen_processing |= body["status"] == "processing"
        if body["status"] == "succeeded":
            break
        await asyncio.sleep(0.02)
    assert seen_processing
    lines = [ln for ln in body["logs"].splitlines() if TQDM.match(ln)]
    percents = [int(TQDM.match(ln).group(1)) for ln in lines]  # type: ignore[union-attr]
    assert percents == [20, 40, 60, 80, 100]
    assert body["started_at"]
    assert body["completed_at"]
    assert body["created_at"] <= body["started_at"] <= body["completed_at"]
    assert body["metrics"]["predict_time"] > 0
    assert body["metrics"]["total_time"] >= body["metrics"]["predict_time"]
    assert isinstance(body["output"], list)
    assert len(body["output"]) == 2
    for url in body["output"]:
        assert url.startswith(f"{fake.url}/files/{pid}/")
        async with httpx.AsyncClient() as anon:  # files need no token, like replicate.delivery
            f1 = await anon.get(url)
            f2 = await anon.get(url)
        assert f1.status_code == 200
        assert f1.headers["content-type"] == "image/png"
        assert len(f1.content) == 5000
        assert f1.content == f2.content
        data = f1.content
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        pos, kinds = 8, []
        while pos < len(data):
            (n,) = struct.unpack(">I", data[pos : pos + 4])
            kind, chunk = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
            assert struct.unpack(">I", data[pos + 8 + n : pos + 12 + n])[0] == zlib.crc32(
                kind + chunk
            )
            kinds.append(kind)
            pos += 12 + n
        assert kinds[0] == b"IHDR"
        assert kinds[-1] == b"IEND"
    # mp4 single output: a URL string, not a list.
    mp4 = await api.post(
        "/v1/models/a/vid/predictions", json={"input": {"__fake_output_kind": "mp4"}}
    )
    done = await wait_terminal(api, mp4.json()["id"])
    assert isinstance(done["output"], str)
    async with httpx.AsyncClient() as anon:
        video = await anon.get(done["output"])
    assert video.headers["content-type"] == "video/mp4"
    assert video.content[4:8] == b"ftyp"
    assert (await api.get(f"{fake.url}/files/{pid}/missing.png")).status_code == 404


async def test_scripted_outcomes(api: httpx.AsyncClient, fake: FakeReplicate) -> None:
    async def run(inputs: dict[str, Any]) -> dict[str, Any]:
        r = await api.post("/v1/models/a/b/predictions", json={"input": inputs})
        assert r.status_code == 201
        return await wait_terminal(api, r.json()["id"])

    fake.configure(max_run_s=0.5)
    t0 = time.monotonic()
    failed, retryable, canceled, aborted, text, literal, timed, too_long = await asyncio.gather(
        run({"__fake_outcome": "failed", "__fake_error": "CUDA out of memory"}),
        run({"__fake_outcome": "failed_retryable"}),
        run({"__fake_outcome": "canceled"}),
        run({"__fake_outcome": "aborted"}),
        run({"__fake_output_kind": "text"}),
        run({"__fake_output": {"answer": 42}}),
        run({"__fake_duration_s": 0.6, "__fake_starting_s": 0.2}),
        run({"__fake_duration_s": 30, "__fake_starting_s": 0.1}),
    )
    assert (failed["status"], failed["error"], failed["output"]) == (
        "failed",
        "CUDA out of memory",
        None,
    )
    assert retryable["status"] == "failed"
    assert "please retry" in retryable["error"]
    assert canceled["status"] == "canceled"
    assert (aborted["status"], aborted.get("started_at")) == ("aborted", None)
    assert isinstance(text["output"], list)
    assert "".join(text["output"]).startswith("The quick")
    assert literal["output"] == {"answer": 42}
    assert time.monotonic() - t0 >= 0.55
    assert timed["metrics"]["total_time"] == pytest.approx(0.6, abs=0.1)
    assert timed["metrics"]["predict_time"] == pytest.approx(0.4, abs=0.1)
    assert (too_long["status"], too_long["error"]) == ("failed", "Prediction timed out")
    assert too_long["metrics"]["predict_time"] == pytest.approx(0.5, abs=0.1)


async def test_cancel_running_and_finished(api: httpx.AsyncClient, fake: FakeReplicate) -> None:
    r = await api.post("/v1/models/a/b/predictions", json={"input": {"__fake_outcome": "hang"}})
    pid = r.json()["id"]
    await asyncio.sleep(0.2)
    c = await api.post(f"/v1/predictions/{pid}/cancel")
    assert c.status_code == 200
    assert c.json()["status"] == "canceled"
    assert c.json()["completed_at"] is not None
    await asyncio.sleep(0.1)
    assert (await api.get(f"/v1/predictions/{pid}")).json()["status"] == "canceled"
    again = await api.post(f"/v1/predictions/{pid}/cancel")
    assert again.json()["status"] == "canceled"
    cancels = fake.engine.ledger.events(kind="cancel")
    assert [(e["by"], e["effective"]) for e in cancels] == [("api", True), ("api", False)]
    assert (await api.post("/v1/predictions/doesnotexist/cancel")).status_code == 404
    missing = await api.get("/v1/predictions/doesnotexist")
    assert missing.status_code == 404
    assert missing.headers["content-type"].startswith("application/problem+json")


async def test_cancel_after_deadline_cancels_or_aborts(
    api: httpx.AsyncClient, fake: FakeReplicate
) -> None:
    fake.configure(cancel_after_min_s=0.1)  # Replicate's 5 s minimum, lowered for a fast test
    running = await api.post(
        "/v1/models/a/b/predictions",
        json={"input": {"__fake_duration_s": 30, "__fake_starting_s": 0.05}},
        headers={"Cancel-After": "400ms"},
    )
    waiting = await api.post(
        "/v1/models/a/b/predictions",
        json={"input": {"__fake_duration_s": 30, "__fake_starting_s": 10}},
        headers={"Cancel-After": "0.3"},
    )
    body = running.json()
    created = datetime.fromisoformat(body["created_at"])
    deadline = datetime.fromisoformat(body["deadline"])
    assert (deadline - created).total_seconds() == pytest.approx(0.4, abs=0.01)
    t0 = time.monotonic()
    r_done = await wait_terminal(api, body["id"])
    w_done = await wait_terminal(api, waiting.json()["id"])
    assert time.monotonic() - t0 < 2
    assert r_done["status"] == "canceled"
    assert r_done["started_at"] is not None
    assert w_done["status"] == "aborted"
    assert w_done.get("started_at") is None
    assert {e["by"] for e in fake.engine.ledger.events(kind="cancel")} == {"deadline"}


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


async def test_token_bucket_429_with_retry_after(
    api: httpx.AsyncClient, fake: FakeReplicate
) -> None:
    fake.configure(create_rate_per_min=60, create_burst=3)
    statuses = []
    for _ in range(5):
        r = await api.post("/v1/models/a/b/predictions", json={"input": {}})
        statuses.append(r.status_code)
        if r.status_code == 429:
            assert r.headers["content-type"].startswith("application/problem+json")
            assert r.json()["retry_after"] == 1
            assert r.json()["status"] == 429
            assert r.headers["Retry-After"] == "1"
    assert statuses == [201, 201, 201, 429, 429]
    await asyncio.sleep(1.05)  # one token per second
    assert (await api.post("/v1/models/a/b/predictions", json={"input": {}})).status_code == 201
    assert len(fake.engine.ledger.events(kind="create")) == 4
    rejected = fake.engine.ledger.events(kind="create_rejected")
    assert [(e["status"], e["reason"]) for e in rejected] == [(429, "rate_limited")] * 2
    # low-credit mode: burst 1, then 429 with a long retry_after.
    fake.configure(low_credit=True)
    assert (await api.post("/v1/models/a/b/predictions", json={"input": {}})).status_code == 201
    low = await api.post("/v1/models/a/b/predictions", json={"input": {}})
    assert low.status_code == 429
    assert low.json()["retry_after"] >= 9
    # other endpoints have their own bucket
    fake.configure(other_rate_per_min=60, other_burst=2)
    gets = [(await api.get("/v1/account")).status_code for _ in range(3)]
    assert gets == [200, 200, 429]


async def test_force_429_next_burst(api: httpx.AsyncClient, fake: FakeReplicate) -> None:
    async with httpx.AsyncClient(base_url=fake.url) as admin:
        cfg = (
            await admin.post(
                "/_fake/config", json={"force_429_next": 3, "script_429_retry_after_s": 2}
            )
        ).json()
        assert cfg["create_script"] == [429, 429, 429]
        bad = await admin.post("/_fake/config", json={"create_500_rate": 2})
        assert bad.status_code == 422
    statuses = [
        (await api.post("/v1/models/a/b/predictions", json={"input": {}})) for _ in range(4)
    ]
    assert [r.status_code for r in statuses] == [429, 429, 429, 201]
    assert statuses[0].json()["retry_after"] == 2
    assert statuses[0].headers["Retry-After"] == "2"
    assert fake.config.create_script == []


async def test_data_removed_after_ttl(api: httpx.AsyncClient, fake: FakeReplicate) -> None:
    fake.configure(data_removed_after_s=0.3)
    r = await api.post("/v1/models/a/b/predictions", json={"input": {"x": 1}})
    done = await wait_terminal(api, r.json()["id"])
    url = done["output"]
    assert done["data_removed"] is False
    await asyncio.sleep(0.35)
    gone = (await api.get(f"/v1/predictions/{done['id']}")).json()
    assert (gone["data_removed"], gone["output"], gone["input"]) == (True, None, {})
    async with httpx.AsyncClient() as anon:
        assert (await anon.get(url)).status_code == 404


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
