"""Notifier and scheduler-webhook settings from the environment."""

from __future__ import annotations

import pytest

from conveyor_common.settings import load_settings
from conveyor_notifier.settings import NotifierSettings
from conveyor_scheduler.client_webhooks.settings import WebhookSettings


def test_required_settings_stop_the_service(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("NOTIFIER_KAFKA_BOOTSTRAP_SERVERS", raising=False)
    monkeypatch.delenv("NOTIFIER_SCHEDULER_ADDRESS", raising=False)
    with pytest.raises(SystemExit) as info:
        load_settings(NotifierSettings)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "NOTIFIER_KAFKA_BOOTSTRAP_SERVERS" in err
    assert "NOTIFIER_SCHEDULER_ADDRESS" in err


def test_allow_hosts_are_comma_separated_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFIER_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    monkeypatch.setenv("NOTIFIER_SCHEDULER_ADDRESS", "127.0.0.1:50051")
    monkeypatch.setenv("NOTIFIER_WEBHOOK_ALLOW_HOSTS", "127.0.0.1, localhost,10.0.0.0/8")
    settings = NotifierSettings()  # type: ignore[call-arg]
    assert settings.webhook_allow_hosts == ["127.0.0.1", "localhost", "10.0.0.0/8"]
    assert settings.allow_list.permits_host("localhost")
    assert settings.ops_webhook_url is None
    assert settings.retry_period_seconds == 86_400
    monkeypatch.setenv("NOTIFIER_WEBHOOK_ALLOW_HOSTS", "https://bad/")
    with pytest.raises(ValueError, match="allow-list entry"):
        NotifierSettings()  # type: ignore[call-arg]
    monkeypatch.setenv("NOTIFIER_OPS_WEBHOOK_URL", "https://hooks.slack.test/T/B/secret")
    monkeypatch.setenv("NOTIFIER_WEBHOOK_ALLOW_HOSTS", "")
    settings = NotifierSettings()  # type: ignore[call-arg]
    assert "secret" not in repr(settings)
    assert settings.allow_list.hosts == frozenset()


def test_default_allow_list_is_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SCHEDULER_WEBHOOK_ALLOW_HOSTS", raising=False)
    assert WebhookSettings().allow_hosts == []
    monkeypatch.setenv("SCHEDULER_WEBHOOK_ALLOW_HOSTS", "127.0.0.1")
    assert WebhookSettings().allow_hosts == ["127.0.0.1"]
