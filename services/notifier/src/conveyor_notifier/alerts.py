"""Operations alerts to a Slack-compatible incoming webhook (POST ``{"text": ...}``).

Sources: dead-lettered tasks (``conveyor.tasks.v1.dead-letter``), providers that stay rate-limited
(``ProviderResult.throttled`` on ``conveyor.provider.v1.results``) and disabled client endpoints.
The channel is rate-limited by a token bucket; alerts over the limit are counted by kind and
summarized in the next message (or by the periodic flush), never silently lost from the logs.

The operations URL is operator configuration (trusted), so it is called with a plain client, but
still with a timeout, no redirects and no proxy from the environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter as Tally
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx

from conveyor.events.v1 import events_pb2
from conveyor.tasks.v1 import task_pb2
from conveyor_common.kafka import Envelope
from conveyor_common.ratelimit import TokenBucket
from conveyor_notifier.metrics import NotifierMetrics

logger = logging.getLogger(__name__)


class OpsAlerter:
    """Sends rate-limited alerts; summarizes the suppressed ones."""

    def __init__(
        self,
        url: str | None,
        bucket: TokenBucket,
        metrics: NotifierMetrics,
        *,
        client: httpx.AsyncClient | None = None,
        timeout_seconds: float = 5.0,
    ) -> None:
        self.url = url
        self.bucket = bucket
        self.metrics = metrics
        self.client = client or httpx.AsyncClient(
            follow_redirects=False, trust_env=False, timeout=timeout_seconds
        )
        self.suppressed: Tally[str] = Tally()
        self._lock = asyncio.Lock()

    async def alert(self, kind: str, text: str) -> bool:
        """Send ``text`` now if the bucket allows; else count it for the next summary."""
        logger.warning(text, extra={"action": "ops_alert", "alert_kind": kind})
        if self.bucket.try_take() > 0:
            self.suppressed[kind] += 1
            self.metrics.alerts.labels(kind, "suppressed").inc()
            return False
        return await self._send(kind, text + self._take_summary())

    async def flush(self) -> bool:
        """Send a summary of suppressed alerts when there are some and the bucket allows."""
        if not self.suppressed or self.bucket.try_take() > 0:
            return False
        summary = self._take_summary().strip()
        return await self._send("summary", summary)

    def _take_summary(self) -> str:
        if not self.suppressed:
            return ""
        total = sum(self.suppressed.values())
        kinds = ", ".join(f"{kind}: {n}" for kind, n in sorted(self.suppressed.items()))
        self.suppressed.clear()
        return f"\n({total} more alerts suppressed by the rate limit; {kinds}; see the logs)"

    async def _send(self, kind: str, text: str) -> bool:
        if not self.url:
            self.metrics.alerts.labels(kind, "logged").inc()
            return True
        async with self._lock:
            try:
                response = await self.client.post(self.url, json={"text": text})
            except httpx.HTTPError as exc:
                self.metrics.alerts.labels(kind, "failed").inc()
                logger.error(
                    "ops alert not sent",
                    extra={"action": "ops_alert_failed", "error": f"{type(exc).__name__}"},
                )
                return False
        if response.is_success:
            self.metrics.alerts.labels(kind, "sent").inc()
            return True
        self.metrics.alerts.labels(kind, "failed").inc()
        logger.error(
            "ops alert rejected",
            extra={"action": "ops_alert_failed", "status_code": response.status_code},
        )
        return False

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self.client.aclose()


class DeadLetterAlerts:
    """Handler of the dead-letter topic: one alert per dead-lettered task event."""

    def __init__(self, alerter: OpsAlerter, remember: int = 10_000) -> None:
        self.alerter = alerter
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._remember = remember

    async def handle(self, envelope: Envelope) -> None:
        """Alert once per event id (redeliveries within this process are absorbed)."""
        message = envelope.message
        if not isinstance(message, events_pb2.TaskStateChanged):
            return
        event = message.event
        key = event.event_id or envelope.id
        if key in self._seen:
            return
        self._seen[key] = None
        if len(self._seen) > self._remember:
            self._seen.popitem(last=False)
        task = event.task
        target = task.spec.model or task.spec.deployment or "?"
        kind = task_pb2.TaskKind.Name(task.spec.kind).removeprefix("TASK_KIND_").lower()
        error = f"{task.error.code}: {task.error.message}" if task.HasField("error") else "n/a"
        await self.alerter.alert(
            "dead_letter",
            f"Task {event.task_id} of tenant {event.tenant_id} was dead-lettered after "
            f"{task.attempt} attempt(s) ({kind}, {target}). Last error: {error[:300]}",
        )


@dataclass
class _Streak:
    start: datetime
    last: datetime
    until: datetime
    alerted: bool = False


class ThrottleMonitor:
    """Alerts when a provider stays rate-limited longer than a threshold, and when it recovers.

    A streak of throttling continues while each throttled result arrives within ``quiet_seconds``
    of the previous one or of its ``retry_at``; its length is measured on the results' own
    timestamps, so replayed old results cannot raise a fresh alert.
    """

    def __init__(
        self,
        alerter: OpsAlerter,
        metrics: NotifierMetrics,
        *,
        threshold_seconds: float,
        quiet_seconds: float,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.alerter = alerter
        self.metrics = metrics
        self.threshold = threshold_seconds
        self.quiet = quiet_seconds
        self.clock = clock
        self.streaks: dict[str, _Streak] = {}

    async def handle(self, envelope: Envelope) -> None:
        """Track throttled results."""
        message = envelope.message
        if not isinstance(message, events_pb2.ProviderResult):
            return
        if message.WhichOneof("outcome") != "throttled":
            return
        provider = message.throttled.provider or "unknown"
        now = self.clock()
        seen = (
            message.observed_at.ToDatetime(tzinfo=UTC) if message.HasField("observed_at") else now
        )
        until = (
            message.throttled.retry_at.ToDatetime(tzinfo=UTC)
            if message.throttled.HasField("retry_at")
            else seen
        )
        until = max(until, seen)
        streak = self.streaks.get(provider)
        if streak is None or (seen - max(streak.last, streak.until)).total_seconds() > self.quiet:
            streak = _Streak(start=seen, last=seen, until=until)
            self.streaks[provider] = streak
        else:
            streak.last = max(streak.last, seen)
            streak.until = max(streak.until, until)
        duration = (max(streak.last, streak.until) - streak.start).total_seconds()
        recent = (now - streak.last).total_seconds() <= self.quiet
        if recent:
            self.metrics.throttled_providers.labels(provider).set(duration)
        if not streak.alerted and recent and duration >= self.threshold:
            streak.alerted = True
            await self.alerter.alert(
                "provider_throttled",
                f"Provider {provider} has been rate-limited for {duration:.0f}s "
                f"(since {streak.start.isoformat()}, retry at {streak.until.isoformat()}); "
                "dispatch to it is paused.",
            )

    async def tick(self) -> None:
        """End streaks that went quiet; tell the channel when an alerted provider recovered."""
        now = self.clock()
        for provider, streak in list(self.streaks.items()):
            if (now - max(streak.last, streak.until)).total_seconds() <= self.quiet:
                continue
            del self.streaks[provider]
            self.metrics.throttled_providers.labels(provider).set(0)
            if streak.alerted:
                duration = (max(streak.last, streak.until) - streak.start).total_seconds()
                await self.alerter.alert(
                    "provider_recovered",
                    f"Provider {provider} is no longer rate-limited (throttled for {duration:.0f}s).",
                )


class AlertTicker:
    """Periodic flush of suppressed alerts and throttle-streak checks."""

    def __init__(
        self, alerter: OpsAlerter, monitor: ThrottleMonitor, period_seconds: float
    ) -> None:
        self.alerter = alerter
        self.monitor = monitor
        self.period_seconds = period_seconds
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start ticking."""
        self._task = asyncio.create_task(self._run(), name="ops-alert-ticker")

    async def _run(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=self.period_seconds)
            try:
                await self.monitor.tick()
                await self.alerter.flush()
            except Exception:
                logger.exception("alert tick failed", extra={"action": "ops_alert_tick_failed"})

    async def stop(self) -> None:
        """Stop ticking."""
        self._stopping.set()
        if self._task is not None:
            await self._task
            self._task = None
