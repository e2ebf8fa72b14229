"""Retry policy of client webhook deliveries: backoff with jitter, retry period, disabling."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from conveyor.scheduler.v1 import delivery_coordination_service_pb2 as delivery_pb2
from conveyor_notifier.delivery import RetryPolicy
from conveyor_notifier.egress import SendResult

NOW = datetime(2026, 1, 1, 12, tzinfo=UTC)
FAILED = SendResult(
    delivered=False, status_code=500, error="HTTP 500", refused=False, duration_s=0.2
)
OK = SendResult(delivered=True, status_code=204, error="", refused=False, duration_s=0.05)


def lease(
    *,
    attempts: int = 0,
    age: timedelta = timedelta(0),
    failures: int = 0,
    failing_for: timedelta | None = None,
) -> delivery_pb2.LeasedDelivery:
    item = delivery_pb2.LeasedDelivery(
        delivery_id="d1", attempts=attempts, endpoint_consecutive_failures=failures
    )
    item.created_at.FromDatetime(NOW - age)
    if failing_for is not None:
        item.endpoint_failing_since.FromDatetime(NOW - failing_for)
    return item


def test_backoff_doubles_with_jitter_and_a_cap() -> None:
    policy = RetryPolicy(base_seconds=5, max_seconds=60)
    assert policy.backoff(1, rng=lambda: 1.0) == 5
    assert policy.backoff(1, rng=lambda: 0.0) == 2.5
    assert policy.backoff(3, rng=lambda: 1.0) == 20
    assert policy.backoff(30, rng=lambda: 1.0) == 60
    assert policy.backoff(1000, rng=lambda: 0.0) == 30
    samples = {policy.backoff(2) for _ in range(50)}
    assert all(5 <= s <= 10 for s in samples)
    assert len(samples) > 1


def test_delivered_outcome() -> None:
    outcome = RetryPolicy().outcome(lease(), OK, NOW)
    assert outcome.delivered
    assert outcome.status_code == 204
    assert not outcome.HasField("retry_at")
    assert not outcome.disable_endpoint


def test_failure_is_retried_within_the_period_then_given_up() -> None:
    policy = RetryPolicy(base_seconds=10, max_seconds=3600, period_seconds=86_400)
    outcome = policy.outcome(lease(attempts=2), FAILED, NOW, rng=lambda: 1.0)
    assert outcome.retry_at.ToDatetime(tzinfo=UTC) == NOW + timedelta(seconds=40)
    assert outcome.error == "HTTP 500"
    late = policy.outcome(lease(attempts=30, age=timedelta(hours=23, minutes=59)), FAILED, NOW)
    assert not late.HasField("retry_at")  # the next try would be past the 24 h period: fail


@pytest.mark.parametrize(
    ("failures", "failing_for", "disabled"),
    [
        (19, timedelta(days=2), True),
        (18, timedelta(days=2), False),
        (30, timedelta(hours=1), False),
    ],
)
def test_endpoint_disabled_after_n_failures_over_m_seconds(
    failures: int, failing_for: timedelta, disabled: bool
) -> None:
    policy = RetryPolicy(disable_after_failures=20, disable_after_seconds=86_400)
    outcome = policy.outcome(lease(failures=failures, failing_for=failing_for), FAILED, NOW)
    assert outcome.disable_endpoint is disabled
    assert outcome.HasField("retry_at") is not disabled
    if disabled:
        assert "20 consecutive failed deliveries" in outcome.disabled_reason
