"""conveyor_provider_adapter.replicate: create forms from targets, cancel_after from the deadline, 429 Retry-After, problem+json, 5xx on create, tolerant prediction parsing."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from conveyor_provider_adapter.replicate import (
    Ambiguous,
    ClientError,
    CreateRequest,
    Prediction,
    RateLimited,
    ReplicateClient,
    ServerError,
    Target,
    Unreachable,
    cancel_after_value,
    error_from_response,
    parse_target,
)
from tests.unit.adapter_support import VERSION, response_of

# ---- targets -------------------------------------------------------------------------------


def test_targets_pick_the_create_form() -> None:
    v = parse_target(f"stability-ai/sdxl:{VERSION}", None)
    assert (v.form, v.model, v.version) == ("version", "stability-ai/sdxl", VERSION)
    m = parse_target("black-forest-labs/flux-schnell", None)
    assert (m.form, m.owner, m.name) == ("model", "black-forest-labs", "flux-schnell")
    d = parse_target(None, "acme/flux-prod")
    assert (d.form, d.model) == ("deployment", "acme/flux-prod")
    bare = parse_target(VERSION, None)
    assert (bare.form, bare.version, bare.owner) == ("version", VERSION, "")


@pytest.mark.parametrize(
    ("model", "deployment"),
    [(None, None), ("", ""), ("nope", None), ("a/b:short", None), ("a/b/c", None), (None, "x")],
)
def test_bad_targets_are_rejected(model: str | None, deployment: str | None) -> None:
    with pytest.raises(ValueError, match=r"must be|neither"):
        parse_target(model, deployment)


def test_cancel_after_is_whole_seconds_from_the_deadline_never_below_replicates_minimum() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert cancel_after_value(None) is None
    assert cancel_after_value(now + timedelta(minutes=30), now) == "1800s"
    assert cancel_after_value(now + timedelta(seconds=30, milliseconds=200), now) == "31s"
    # "The minimum allowed duration is 5 seconds" (the OpenAPI document's Cancel-After).
    assert cancel_after_value(now + timedelta(seconds=5), now) == "5s"
    assert cancel_after_value(now + timedelta(seconds=3), now) == "5s"
    assert cancel_after_value(now + timedelta(milliseconds=200), now) == "5s"
    assert cancel_after_value(now - timedelta(seconds=5), now) == "5s"


# ---- errors ----------------------------------------------------------------------------------


def test_429_retry_after_from_body_then_header_then_default() -> None:
    body = {"detail": "Request was throttled.", "status": 429, "retry_after": 7}
    e1 = error_from_response(response_of(429, body), create=True, default_retry_after=5)
    assert isinstance(e1, RateLimited)
    assert e1.retry_after == 7
    e2 = error_from_response(
        response_of(429, {"detail": "throttled"}, {"Retry-After": "3"}),
        create=True,
        default_retry_after=5,
    )
    assert isinstance(e2, RateLimited)
    assert e2.retry_after == 3
    e3 = error_from_response(response_of(429, {"detail": "x"}), create=True, default_retry_after=5)
    assert isinstance(e3, RateLimited)
    assert e3.retry_after == 5
    e4 = error_from_response(
        response_of(402, {"detail": "credit"}), create=True, default_retry_after=9
    )
    assert isinstance(e4, RateLimited)


def test_problem_json_4xx_is_a_definite_client_error_with_invalid_fields() -> None:
    body = {
        "title": "Input validation failed",
        "detail": "- input: prompt is required",
        "status": 422,
        "invalid_fields": [{"type": "required", "field": "input.prompt", "description": "x"}],
    }
    err = error_from_response(response_of(422, body), create=True, default_retry_after=5)
    assert isinstance(err, ClientError)
    assert err.status == 422
    assert err.title == "Input validation failed"
    assert err.invalid_fields[0]["field"] == "input.prompt"


def test_5xx_is_ambiguous_on_create_and_a_server_error_elsewhere() -> None:
    r = response_of(503, {"detail": "unavailable"})
    assert isinstance(error_from_response(r, create=True, default_retry_after=5), Ambiguous)
    assert isinstance(error_from_response(r, create=False, default_retry_after=5), ServerError)
    text = response_of(
        500, raw=b"<html>oops</html>", method="GET", url="https://x/v1/predictions/1"
    )
    err = error_from_response(text, create=False, default_retry_after=5)
    assert isinstance(err, ServerError)
    assert "oops" in err.detail


def test_prediction_parsing_tolerates_unknown_statuses_and_missing_fields() -> None:
    p = Prediction.from_json(
        {"id": "abc", "status": "aborted", "created_at": "2026-01-01T00:00:00Z"}
    )
    assert p.terminal
    assert p.created_at == datetime(2026, 1, 1, tzinfo=UTC)
    weird = Prediction.from_json({"id": "abc", "status": "queued-somewhere", "logs": None})
    assert not weird.terminal
    assert weird.logs == ""
    with pytest.raises(ValueError, match="id"):
        Prediction.from_json({"status": "starting"})


# ---- transport failures, against real sockets ----------------------------------------------


async def _server(handle: Any) -> tuple[asyncio.AbstractServer, str]:
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


async def _closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")  # the request reached the server; no answer
    writer.close()


async def _silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    await asyncio.sleep(5)
    writer.close()


CREATE = CreateRequest(Target("model", "acme", "flux"), {"prompt": "x"})


async def test_a_refused_connection_is_unreachable_nothing_was_sent() -> None:
    server, url = await _server(_closing)
    server.close()
    await server.wait_closed()  # the port now refuses connections
    client = ReplicateClient(url, "r8_x", connect_timeout=1.0)
    try:
        with pytest.raises(Unreachable):
            await client.create(CREATE)
        with pytest.raises(Unreachable):
            await client.get("p1")
    finally:
        await client.close()


async def test_a_connection_closed_after_the_request_is_ambiguous_on_create() -> None:
    server, url = await _server(_closing)
    client = ReplicateClient(url, "r8_x")
    try:
        with pytest.raises(Ambiguous):
            await client.create(CREATE)
        with pytest.raises(ServerError):  # not a create: a plain server error
            await client.get("p1")
    finally:
        await client.close()
        server.close()


async def test_no_answer_within_the_create_timeout_is_ambiguous() -> None:
    server, url = await _server(_silent)
    client = ReplicateClient(url, "r8_x", create_timeout=0.3, request_timeout=0.3)
    try:
        with pytest.raises(Ambiguous, match="after sending"):
            await client.create(CREATE)
        with pytest.raises(ServerError):
            await client.cancel("p1")
    finally:
        await client.close()
        server.close()
