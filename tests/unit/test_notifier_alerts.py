"""Operations alerts: token bucket, summaries of suppressed alerts (posted to a real Slack-style
receiver on loopback), dead-letter alerts and the provider-throttling monitor."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from conveyor.events.v1 import events_pb2
from conveyor.tasks.v1 import task_pb2
from conveyor_common.kafka import Envelope
from conveyor_common.ratelimit import TokenBucket
from conveyor_notifier.alerts import DeadLetterAlerts, OpsAlerter, ThrottleMonitor
from conveyor_notifier.metrics import NotifierMetrics


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def slack() -> AsyncIterator[tuple[str, list[str]]]:
    texts: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        texts.append(json.loads(await request.read())["text"])
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/hook", texts
    finally:
        await runner.cleanup()


async def test_alerts_are_rate_limited_and_suppressed_ones_summarized(
    slack: tuple[str, list[str]],
) -> None:
    url, texts = slack
    clock = Clock()
    registry = CollectorRegistry()
    alerter = OpsAlerter(url, TokenBucket(1 / 60, 2, clock=clock), NotifierMetrics(registry))
    try:
        results = [await alerter.alert("dead_letter", f"task {i} dead") for i in range(5)]
        assert results == [True, True, False, False, False]
        assert texts == ["task 0 dead", "task 1 dead"]
        assert not await alerter.flush()  # no token yet
        clock.now += 60
        await alerter.alert("provider_throttled", "replicate throttled")
        assert texts[2].startswith("replicate throttled")
        assert "3 more alerts suppressed" in texts[2]
        assert "dead_letter: 3" in texts[2]
        await alerter.alert("dead_letter", "again")
        clock.now += 60
        assert await alerter.flush()
        assert "1 more alerts suppressed" in texts[3]
        sent = registry.get_sample_value(
            "conveyor_notifier_ops_alerts_total", {"kind": "dead_letter", "outcome": "sent"}
        )
        assert sent == 2
    finally:
        await alerter.aclose()


async def test_alerts_without_a_channel_only_log() -> None:
    registry = CollectorRegistry()
    alerter = OpsAlerter(None, TokenBucket(1.0, 1), NotifierMetrics(registry))
    assert await alerter.alert("dead_letter", "x")
    assert (
        registry.get_sample_value(
            "conveyor_notifier_ops_alerts_total", {"kind": "dead_letter", "outcome": "logged"}
        )
        == 1
    )
    await alerter.aclose()


def envelope(message: events_pb2.TaskStateChanged | events_pb2.ProviderResult) -> Envelope:
    return Envelope(
        id="id-1",
        type="",
        source="",
        subject="",
        time="",
        traceparent=None,
        key="k",
        message=message,
    )


async def test_dead_letter_alert_once_per_event(slack: tuple[str, list[str]]) -> None:
    url, texts = slack
    alerter = OpsAlerter(url, TokenBucket(1.0, 10), NotifierMetrics(CollectorRegistry()))
    handler = DeadLetterAlerts(alerter)
    event = task_pb2.TaskEvent(event_id="e9", task_id="t9", tenant_id="acme", sequence=4)
    event.task.attempt = 3
    event.task.spec.kind = task_pb2.TASK_KIND_VIDEO
    event.task.spec.model = "owner/video"
    event.task.error.code = "timeout"
    message = events_pb2.TaskStateChanged(event=event)
    try:
        await handler.handle(envelope(message))
        await handler.handle(envelope(message))
    finally:
        await alerter.aclose()
    assert len(texts) == 1
    assert "t9" in texts[0]
    assert "acme" in texts[0]
    assert "3 attempt" in texts[0]
    assert "video" in texts[0]
    assert "owner/video" in texts[0]
    assert "timeout" in texts[0]


def throttled(observed: datetime, retry_at: datetime) -> Envelope:
    result = events_pb2.ProviderResult(result_id="r", task_id="t")
    result.observed_at.FromDatetime(observed)
    result.throttled.provider = "replicate"
    result.throttled.retry_at.FromDatetime(retry_at)
    return envelope(result)


async def test_throttle_monitor_alerts_on_persistence_and_recovery(
    slack: tuple[str, list[str]],
) -> None:
    url, texts = slack
    now = [datetime(2026, 1, 1, tzinfo=UTC)]
    registry = CollectorRegistry()
    metrics = NotifierMetrics(registry)
    alerter = OpsAlerter(url, TokenBucket(1.0, 10), metrics)
    monitor = ThrottleMonitor(
        alerter, metrics, threshold_seconds=120, quiet_seconds=30, clock=lambda: now[0]
    )
    start = now[0]
    try:
        # Old throttling replayed from the topic: a long-finished streak raises nothing.
        await monitor.handle(throttled(start - timedelta(hours=2), start - timedelta(hours=1)))
        assert texts == []
        # Short throttling: no alert.
        await monitor.handle(throttled(start, start + timedelta(seconds=10)))
        assert texts == []
        # It persists: results keep coming within the quiet period; past 120 s we alert once.
        for step in range(1, 8):
            now[0] = start + timedelta(seconds=20 * step)
            await monitor.handle(throttled(now[0], now[0] + timedelta(seconds=10)))
        assert len(texts) == 1
        assert "Provider replicate has been rate-limited" in texts[0]
        throttled_for = registry.get_sample_value(
            "conveyor_notifier_provider_throttled_seconds", {"provider": "replicate"}
        )
        assert throttled_for is not None
        assert throttled_for >= 120
        # Quiet for longer than the quiet period past retry_at: recovered.
        now[0] += timedelta(seconds=100)
        await monitor.tick()
        assert len(texts) == 2
        assert "no longer rate-limited" in texts[1]
        assert monitor.streaks == {}
    finally:
        await alerter.aclose()
