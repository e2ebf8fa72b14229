"""Unit tests of the adapter's pure parts: targets, error parsing, progress, classification,
the token bucket, webhook tokens, output URL policy, input normalisation and settings."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from conveyor_provider_adapter.classify import classify_error, classify_status, parse_progress
from conveyor_provider_adapter.matching import matches, normalize_input
from conveyor_provider_adapter.replicate import (
    Ambiguous,
    ClientError,
    Prediction,
    RateLimited,
    ServerError,
    cancel_after_value,
    error_from_response,
    parse_target,
)
from conveyor_provider_adapter.settings import AdapterSettings
from conveyor_provider_adapter.state import LRU, AttemptInfo
from conveyor_provider_adapter.storage import host_allowed, output_urls
from conveyor_provider_adapter.webhook_token import check_token, make_token, webhook_url

VERSION = "5c7d5dc6dd8bf75c1acaa8565735e7986bc5b66206b55cca93cb72c9bf15ccaa"


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


def _response(
    status: int, body: Any = None, headers: dict[str, str] | None = None
) -> httpx.Response:
    request = httpx.Request("POST", "https://api.replicate.com/v1/predictions")
    return httpx.Response(
        status,
        json=body,
        headers={"content-type": "application/problem+json", **(headers or {})},
        request=request,
    )


def test_429_retry_after_from_body_then_header_then_default() -> None:
    body = {"detail": "Request was throttled.", "status": 429, "retry_after": 7}
    e1 = error_from_response(_response(429, body), create=True, default_retry_after=5)
    assert isinstance(e1, RateLimited)
    assert e1.retry_after == 7
    e2 = error_from_response(
        _response(429, {"detail": "throttled"}, {"Retry-After": "3"}),
        create=True,
        default_retry_after=5,
    )
    assert isinstance(e2, RateLimited)
    assert e2.retry_after == 3
    e3 = error_from_response(_response(429, {"detail": "x"}), create=True, default_retry_after=5)
    assert isinstance(e3, RateLimited)
    assert e3.retry_after == 5
    e4 = error_from_response(
        _response(402, {"detail": "credit"}), create=True, default_retry_after=9
    )
    assert isinstance(e4, RateLimited)


def test_problem_json_4xx_is_a_definite_client_error_with_invalid_fields() -> None:
    body = {
        "title": "Input validation failed",
        "detail": "- input: prompt is required",
        "status": 422,
        "invalid_fields": [{"type": "required", "field": "input.prompt", "description": "x"}],
    }
    err = error_from_response(_response(422, body), create=True, default_retry_after=5)
    assert isinstance(err, ClientError)
    assert err.status == 422
    assert err.title == "Input validation failed"
    assert err.invalid_fields[0]["field"] == "input.prompt"


def test_5xx_is_ambiguous_on_create_and_a_server_error_elsewhere() -> None:
    r = _response(503, {"detail": "unavailable"})
    assert isinstance(error_from_response(r, create=True, default_retry_after=5), Ambiguous)
    assert isinstance(error_from_response(r, create=False, default_retry_after=5), ServerError)
    text = httpx.Response(
        500, text="<html>oops</html>", request=httpx.Request("GET", "https://x/v1/predictions/1")
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


# ---- progress and classification ------------------------------------------------------------


def test_progress_is_the_last_tqdm_percentage() -> None:
    logs = (
        "Using seed: 1234\n"
        "  0%|          | 0/50 [00:00<?, ?it/s]\n"
        " 24%|██▍       | 12/50 [00:01<00:03, 10.1it/s]\r"
        " 48%|████▊     | 24/50 [00:02<00:02, 10.2it/s]\n"
        "some other line\n"
    )
    assert parse_progress(logs) == 48
    assert parse_progress("100%|██████████| 50/50 [00:05<00:00]") == 100
    assert parse_progress(" 33%|###3      |") == 33
    assert parse_progress("no progress here, 50% of nothing") is None
    assert parse_progress("") is None
    assert parse_progress(None) is None


@pytest.mark.parametrize(
    ("error", "code", "retryable"),
    [
        ("CUDA out of memory. Tried to allocate 2.00 GiB", "capacity", True),
        ("Prediction timed out", "timeout", True),
        ("NSFW content detected. Try running it again, or try a different prompt.", "nsfw", False),
        ("Invalid input: width must be a multiple of 8", "invalid_input", False),
        ("Unauthenticated", "auth", False),
        ("Internal server error", "provider_error", True),
        ("ValueError: something in the model", "model_error", False),
        (None, "model_error", False),
    ],
)
def test_failures_are_classified(error: str | None, code: str, retryable: bool) -> None:
    assert classify_error(error) == (code, retryable)


def test_create_statuses_are_classified() -> None:
    assert classify_status(401) == ("auth", False)
    assert classify_status(404) == ("not_found", False)
    assert classify_status(422) == ("invalid_input", False)
    assert classify_status(429) == ("rate_limited", True)
    assert classify_status(400) == ("invalid_input", False)
    assert classify_status(413) == ("invalid_input", False)
    assert classify_status(403) == ("auth", False)
    assert classify_status(408) == ("timeout", True)
    assert classify_status(409) == ("conflict", True)
    assert classify_status(425) == ("timeout", True)


@pytest.mark.parametrize("status", [408, 409, 425])
def test_passing_4xx_on_create_is_a_definite_answer_that_allows_a_new_attempt(status: int) -> None:
    err = error_from_response(
        _response(status, {"detail": "x"}), create=True, default_retry_after=5
    )
    assert isinstance(err, ClientError)  # nothing was created: never ambiguous
    assert classify_status(err.status)[1] is True


# ---- token bucket ----------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# ---- webhook tokens --------------------------------------------------------------------------


def test_webhook_url_carries_task_attempt_and_a_verifiable_token() -> None:
    key = b"k" * 32
    url = httpx.URL(webhook_url("https://hooks.example.com/", key, "t 1/é", 3))
    assert url.path == "/webhooks/replicate"
    assert url.params["task"] == "t 1/é"
    assert url.params["attempt"] == "3"
    token = url.params["token"]
    assert check_token(key, "t 1/é", 3, token)
    assert not check_token(key, "t 1/é", 4, token)
    assert not check_token(b"x" * 32, "t 1/é", 3, token)
    assert token == make_token(key, "t 1/é", 3)


# ---- outputs ---------------------------------------------------------------------------------


def test_output_urls_in_strings_lists_and_dicts() -> None:
    assert output_urls("https://replicate.delivery/a.png") == ["https://replicate.delivery/a.png"]
    assert output_urls(["https://x/1.png", "text", 3, None, "http://y/2.mp4"]) == [
        "https://x/1.png",
        "http://y/2.mp4",
    ]
    assert output_urls({"image": "https://x/1.png", "meta": {"mask": "https://x/m.png"}}) == [
        "https://x/1.png",
        "https://x/m.png",
    ]
    assert output_urls("just text") == []
    assert output_urls(None) == []


def test_output_hosts_allow_list() -> None:
    allowed = ["replicate.delivery", "*.replicate.delivery"]
    assert host_allowed("replicate.delivery", allowed)
    assert host_allowed("pbxt.replicate.delivery", allowed)
    assert host_allowed("PBXT.Replicate.Delivery.", allowed)
    assert not host_allowed("replicate.delivery.evil.com", allowed)
    assert not host_allowed("evilreplicate.delivery", allowed)
    assert not host_allowed("169.254.169.254", allowed)
    assert not host_allowed("localhost", allowed)


# ---- matching --------------------------------------------------------------------------------


def test_integral_floats_from_a_struct_become_ints() -> None:
    assert normalize_input({"steps": 30.0, "cfg": 7.5, "seeds": [1.0, 2.5], "n": {"x": 2.0}}) == {
        "steps": 30,
        "cfg": 7.5,
        "seeds": [1, 2.5],
        "n": {"x": 2},
    }
    assert isinstance(normalize_input(30.0), int)


def test_list_matching_needs_same_model_input_and_window() -> None:
    since = datetime(2026, 1, 1, tzinfo=UTC)
    info = AttemptInfo(task_id="t", attempt=1, model="acme/flux", input={"prompt": "a", "n": 2})

    def pred(**kw: Any) -> Prediction:
        base: dict[str, Any] = {
            "id": "p",
            "status": "starting",
            "model": "acme/flux",
            "version": "hidden",
            "input": {"prompt": "a", "n": 2.0},
            "created_at": "2026-01-01T00:00:05Z",
        }
        base.update(kw)
        return Prediction.from_json(base)

    assert matches(pred(), info, since)
    assert not matches(pred(model="acme/other"), info, since)
    assert not matches(pred(input={"prompt": "b", "n": 2}), info, since)
    assert not matches(pred(created_at="2025-12-31T23:59:59Z"), info, since)
    assert not matches(pred(), AttemptInfo(task_id="t", attempt=1, model="acme/flux"), since)


# ---- LRU and settings ------------------------------------------------------------------------


def test_lru_forgets_the_least_recently_used() -> None:
    lru: LRU[str, int] = LRU(2)
    lru.put("a", 1)
    lru.put("b", 2)
    assert lru.get("a") == 1
    lru.put("c", 3)
    assert "b" not in lru
    assert "a" in lru
    assert len(lru) == 2


def test_settings_require_secrets_and_parse_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("ADAPTER_REPLICATE_API_TOKEN", "ADAPTER_WEBHOOK_TOKEN_KEY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("ADAPTER_WEBHOOK_PUBLIC_BASE_URL", "https://hooks.example.com/")
    from_env: Any = AdapterSettings  # fields come from the environment
    with pytest.raises(ValidationError) as info:
        from_env()
    missing = {str(e["loc"][0]) for e in info.value.errors()}
    assert {"replicate_api_token", "webhook_token_key"} <= missing
    monkeypatch.setenv("ADAPTER_REPLICATE_API_TOKEN", "r8_x")
    monkeypatch.setenv("ADAPTER_WEBHOOK_TOKEN_KEY", "key")
    monkeypatch.setenv("ADAPTER_OUTPUT_ALLOWED_HOSTS", "replicate.delivery, *.replicate.delivery")
    s = from_env()
    assert s.output_allowed_hosts == ["replicate.delivery", "*.replicate.delivery"]
    assert s.webhook_public_base_url == "https://hooks.example.com"
    assert s.replicate_webhook_secret is None
    assert "r8_x" not in repr(s)
    monkeypatch.setenv("ADAPTER_STORAGE_BACKEND", "s3")
    with pytest.raises(ValidationError, match="S3_BUCKET"):
        from_env()


async def test_a_requested_cancel_reaches_the_provider_once() -> None:
    """The command handler, the observer and the reconciler may all notice a requested cancel at once:
    one cancel call per prediction; a failed call can be tried again."""
    from prometheus_client import CollectorRegistry

    from conveyor_provider_adapter.metrics import AdapterMetrics
    from conveyor_provider_adapter.replicate import Prediction, ReplicateError
    from conveyor_provider_adapter.results import Observer

    calls: list[str] = []
    fail = [True]

    class Provider:
        async def cancel(self, prediction_id: str) -> Prediction:
            calls.append(prediction_id)
            await asyncio.sleep(0.05)
            if fail[0]:
                fail[0] = False
                raise ReplicateError("boom", status=503)
            return Prediction(id=prediction_id, status="canceled")

    stub: Any = None
    observer = Observer(
        state=stub,
        coordinator=stub,
        replicate=Provider(),  # type: ignore[arg-type]
        copier=stub,
        publisher=stub,
        metrics=AdapterMetrics(CollectorRegistry()),
    )
    info = AttemptInfo(task_id="t", attempt=1)
    first = await asyncio.gather(*(observer.cancel_once(info, "p1") for _ in range(3)))
    assert calls == ["p1"]  # concurrent callers: one call
    assert first == [None, None, None]  # it failed: nothing recorded
    again = await asyncio.gather(*(observer.cancel_once(info, "p1") for _ in range(3)))
    assert calls == ["p1", "p1"]
    assert [p.status if p else None for p in again] == ["canceled", None, None]
    assert await observer.cancel_once(info, "p1") is None  # accepted before: not repeated
    assert calls == ["p1", "p1"]
