"""conveyor_provider_adapter.settings: secrets are required, lists are parsed."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from conveyor_provider_adapter.settings import AdapterSettings


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
