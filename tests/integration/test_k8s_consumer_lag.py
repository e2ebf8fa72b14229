"""The consumer-lag gauge the autoscalers read, on a real Kafka broker.

The KEDA trigger and the prometheus-adapter rule sum ``max by (partition)`` of
``conveyor_kafka_consumer_lag`` over a group's members. That is only right if each partition is
reported by the member that owns it: after a rebalance the member that lost a partition must drop
its series, or its last value stays forever and the autoscaler never scales down.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry

from conveyor.events.v1 import events_pb2
from conveyor_common import topics
from conveyor_common.kafka import (
    ConsumerConfig,
    Envelope,
    EventConsumer,
    EventProducer,
    ProducerConfig,
    default_registry,
)
from conveyor_common.metrics import KafkaMetrics
from conveyor_devstack import ensure_topics

pytestmark = [pytest.mark.integration, pytest.mark.kafka]

PARTITIONS = 4


def lag_series(registry: CollectorRegistry, topic: str) -> dict[str, float]:
    """partition -> lag reported in ``registry``."""
    out: dict[str, float] = {}
    for family in registry.collect():
        if family.name == "conveyor_kafka_consumer_lag":
            for sample in family.samples:
                if sample.labels["topic"] == topic:
                    out[sample.labels["partition"]] = sample.value
    return out


async def wait_for(predicate: Callable[[], bool], within: float = 45.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.1)


async def test_lag_series_follow_partition_ownership(kafka_bootstrap: str) -> None:
    topic = f"test.k8s.lag.{uuid.uuid4().hex[:8]}"
    await ensure_topics(kafka_bootstrap, {topic: PARTITIONS, topics.dlq(topic): 1})
    producer = EventProducer(ProducerConfig(kafka_bootstrap, "test-lag"), source="/tests")
    await producer.start()
    handled: list[str] = []

    async def handle(env: Envelope) -> None:
        handled.append(env.key)

    def member(registry: CollectorRegistry) -> EventConsumer:
        return EventConsumer(
            ConsumerConfig(
                bootstrap_servers=kafka_bootstrap,
                group_id="k8s-lag",
                topics=[topic],
                session_timeout_ms=6000,
                heartbeat_interval_ms=500,
            ),
            handle,
            registry=default_registry(),
            dlq_producer=producer,
            metrics=KafkaMetrics(registry, "test"),
        )

    first_registry, second_registry = CollectorRegistry(), CollectorRegistry()
    first, second = member(first_registry), member(second_registry)
    try:
        for i in range(40):
            await producer.send(topic, events_pb2.CancelTask(task_id=f"t{i}"), key=f"t{i}")
        await first.start()
        await wait_for(lambda: len(handled) == 40)
        await wait_for(lambda: len(lag_series(first_registry, topic)) == PARTITIONS)
        await wait_for(lambda: set(lag_series(first_registry, topic).values()) == {0.0})

        await second.start()
        for i in range(40, 80):
            await producer.send(topic, events_pb2.CancelTask(task_id=f"t{i}"), key=f"t{i}")
        await wait_for(lambda: len(handled) == 80)

        def split() -> bool:
            a, b = lag_series(first_registry, topic), lag_series(second_registry, topic)
            return bool(a) and bool(b) and not (a.keys() & b.keys())

        await wait_for(split)
        a, b = lag_series(first_registry, topic), lag_series(second_registry, topic)
        assert sorted(a.keys() | b.keys()) == [str(p) for p in range(PARTITIONS)]
        assert len(a) < PARTITIONS, "the first member dropped the partitions it gave away"
    finally:
        await second.stop()
        await first.stop()
        await producer.stop()
