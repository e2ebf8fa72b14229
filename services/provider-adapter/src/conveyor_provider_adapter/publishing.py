"""ProviderResult records: built with their identity fields, and published to
``conveyor.provider.v1.results`` keyed by task id (retried while Kafka is away). Result ids are
deterministic (results.py says how), so the scheduler's inbox applies each observation once."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime
from typing import Any, TypeAlias

from google.protobuf import json_format, struct_pb2

from conveyor.events.v1 import events_pb2
from conveyor_common import topics
from conveyor_common.kafka import EventProducer
from conveyor_provider_adapter.metrics import AdapterMetrics

logger = logging.getLogger(__name__)

Source: TypeAlias = "events_pb2.ResultSource.ValueType"


def _ts(when: datetime) -> Any:
    from google.protobuf import timestamp_pb2

    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(when.astimezone(UTC))
    return ts


def new_result(
    result_id: str,
    task_id: str,
    attempt: int,
    *,
    tenant_id: str,
    prediction_id: str,
    source: Source,
) -> events_pb2.ProviderResult:
    """A ProviderResult with its identity fields set (the outcome is set by the caller)."""
    result = events_pb2.ProviderResult(
        result_id=result_id,
        task_id=task_id,
        tenant_id=tenant_id,
        attempt=attempt,
        prediction_id=prediction_id,
        source=source,
    )
    result.observed_at.CopyFrom(_ts(datetime.now(UTC)))
    return result


def to_value(obj: Any) -> struct_pb2.Value:
    """Any JSON value as a protobuf Value (non-JSON values become strings)."""
    value = struct_pb2.Value()
    json_format.Parse(json.dumps(obj, default=str), value)
    return value


def outcome_of(result: events_pb2.ProviderResult) -> str:
    """Which outcome the result carries (for metrics and logs)."""
    return result.WhichOneof("outcome") or "none"


class ResultPublisher:
    """Publishes ProviderResults keyed by task id, retrying while Kafka is away."""

    def __init__(
        self,
        producer: EventProducer,
        metrics: AdapterMetrics,
        *,
        topic: str = topics.PROVIDER_RESULTS,
        attempts: int = 6,
        backoff_s: float = 0.25,
    ) -> None:
        self.topic = topic
        self.producer = producer
        self.metrics = metrics
        self.attempts = attempts
        self.backoff_s = backoff_s

    async def publish(self, result: events_pb2.ProviderResult, *, required: bool = False) -> bool:
        """Send and wait for the ack; False (or raise, when ``required``) after the last retry."""
        source = events_pb2.ResultSource.Name(result.source).removeprefix("RESULT_SOURCE_").lower()
        for n in range(1, self.attempts + 1):
            try:
                await self.producer.send(
                    self.topic, result, key=result.task_id, event_id=result.result_id
                )
            except Exception:
                if n == self.attempts:
                    self.metrics.publish_failures.inc()
                    logger.exception(
                        "provider result not published",
                        extra={"action": "result_publish_failed", "result_id": result.result_id},
                    )
                    if required:
                        raise
                    return False
                await asyncio.sleep(self.backoff_s * 2 ** (n - 1))
                continue
            self.metrics.results.labels(outcome_of(result), source).inc()
            logger.info(
                "provider result published",
                extra={
                    "action": "result_published",
                    "task_id": result.task_id,
                    "attempt": result.attempt,
                    "result_id": result.result_id,
                    "outcome": outcome_of(result),
                    "source": source,
                },
            )
            return True
        return False
