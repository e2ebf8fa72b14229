"""conveyor_scheduler.settings: a database URL is required and every knob is validated."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from conveyor_scheduler.settings import SchedulerSettings, to_sqlalchemy_url
from conveyor_testkit import scheduler as kit

URL = "postgresql://u@127.0.0.1:1/db"


def test_settings_require_database_url_and_validate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SCHEDULER_DATABASE_URL", raising=False)
    with pytest.raises(ValidationError):
        SchedulerSettings()  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        kit.make_settings(URL, tier_concurrency={"free": 1})
    with pytest.raises(ValidationError):
        kit.make_settings(URL, kind_cost={"hologram": 3})
    monkeypatch.setenv("SCHEDULER_DATABASE_URL", URL)
    monkeypatch.setenv("SCHEDULER_GLOBAL_CONCURRENCY", "7")
    monkeypatch.setenv("SCHEDULER_KIND_LIMITS", '{"video": 4}')
    s = SchedulerSettings()  # type: ignore[call-arg]
    assert s.global_concurrency == 7
    assert s.kind_limits == {"video": 4}
    assert s.sqlalchemy_url == "postgresql+psycopg://u@127.0.0.1:1/db"
    assert to_sqlalchemy_url("postgresql+asyncpg://h/d") == "postgresql+psycopg://h/d"
    with pytest.raises(ValueError, match="postgresql"):
        to_sqlalchemy_url("mysql://h/d")
