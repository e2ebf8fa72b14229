"""conveyor_provider_adapter.webhook_token: the webhook URL carries the task, the attempt and a verifiable token."""

from __future__ import annotations

import httpx

from conveyor_provider_adapter.webhook_token import check_token, make_token, webhook_url

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
