"""Settings fail fast without secrets; shutdown steps run once, in phase order."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import SecretStr
from pydantic_settings import SettingsConfigDict

from conveyor_common import lifecycle as phases
from conveyor_common.lifecycle import Lifecycle
from conveyor_common.settings import ServiceSettings, load_settings


class DemoSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="DEMO_", frozen=True, extra="ignore")
    api_token: SecretStr
    limit: int = 5


def test_missing_secret_exits_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("DEMO_API_TOKEN", raising=False)
    with pytest.raises(SystemExit) as exc:
        load_settings(DemoSettings)
    assert exc.value.code == 2
    assert "DEMO_API_TOKEN" in capsys.readouterr().err


def test_bad_value_exits_and_good_env_loads(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DEMO_API_TOKEN", "s3cret")
    monkeypatch.setenv("DEMO_LIMIT", "many")
    with pytest.raises(SystemExit):
        load_settings(DemoSettings)
    assert "DEMO_LIMIT" in capsys.readouterr().err
    monkeypatch.setenv("DEMO_LIMIT", "7")
    settings = load_settings(DemoSettings)
    assert settings.limit == 7
    assert settings.api_token.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)


async def test_shutdown_runs_steps_in_phase_order_once() -> None:
    order: list[str] = []
    life = Lifecycle()

    def step(name: str) -> phases.Step:
        async def run() -> None:
            order.append(name)

        return run

    async def broken() -> None:
        raise RuntimeError("boom")

    async def slow() -> None:
        await asyncio.sleep(10)

    life.on_shutdown("producer", step("producer"), phase=phases.PRODUCERS)
    life.on_shutdown("metrics", step("metrics"), phase=phases.METRICS)
    life.on_shutdown("broken", broken, phase=phases.CONSUMERS)
    life.on_shutdown("slow", slow, phase=phases.WORKERS, timeout=0.05)
    life.on_shutdown("health", step("health"), phase=phases.HEALTH_OFF)
    life.on_shutdown("grpc", step("grpc"), phase=phases.GRPC_STOP)
    life.request_stop()
    await life.wait()
    await life.shutdown()
    await life.shutdown()
    assert order == ["health", "grpc", "producer", "metrics"]


def test_settle_gc_freezes_the_startup_heap_and_raises_the_young_threshold() -> None:
    import gc

    from conveyor_common.service import GC_THRESHOLDS, settle_gc

    before = gc.get_threshold()
    try:
        settle_gc()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert gc.get_freeze_count() > 1000  # modules, classes, functions...
        assert gc.get_count()[2] == 0  # nothing left in the oldest generation to scan
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
