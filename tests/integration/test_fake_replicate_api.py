"""The fake Replicate's HTTP API over real loopback HTTP: create forms, validation, get, cancel,
deadlines, list with cursors, Prefer: wait, output files, progress logs, rate limits, CLI."""

from __future__ import annotations

import asyncio
import re
import struct
import time
import zlib
from datetime import datetime
from typing import Any

import httpx
import pytest

from fake_replicate import FakeReplicate
from tests.integration.fake_env import (  # noqa: F401 (fixtures)
    TOKEN,
    TQDM,
    VERSION,
    api_fixture,
    assert_prediction_shape,
    fake_fixture,
    wait_terminal,
)

pytestmark = pytest.mark.integration


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


@pytest.mark.parametrize("size", [16_384, 200_000])
async def test_a_file_is_served_whole_small_or_streamed(
    api: httpx.AsyncClient, fake: FakeReplicate, size: int
) -> None:
    """A file of one piece (up to 64 KiB) is answered in one response, a larger one streamed: both
    give the same headers, the whole body, and an empty HEAD with the length."""
    resp = await api.post(
        "/v1/models/a/img/predictions", json={"input": {"__fake_output_bytes": size}}
    )
    done = await wait_terminal(api, resp.json()["id"])
    url = done["output"][0] if isinstance(done["output"], list) else done["output"]
    async with httpx.AsyncClient() as anon:
        got, head = await anon.get(url), await anon.head(url)
    assert got.status_code == head.status_code == 200
    assert got.headers["content-length"] == head.headers["content-length"] == str(size)
    assert got.headers["content-type"] == head.headers["content-type"] == "image/png"
    assert len(got.content) == size
    assert got.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert head.content == b""


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
