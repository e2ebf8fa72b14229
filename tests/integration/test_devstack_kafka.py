"""The devstack's Apache Kafka: explicit partition counts, a produce/consume round trip, restart."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from conveyor_common import topics
from conveyor_devstack import DevstackError, KafkaServer, ensure_topics

pytestmark = [pytest.mark.integration, pytest.mark.kafka]


async def partition_counts(bootstrap: str, names: list[str]) -> dict[str, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics(names)
    finally:
        await admin.close()
    return {t["topic"]: len(t["partitions"]) for t in described if t["error_code"] == 0}


async def test_conveyor_topics_exist_with_their_partition_counts(
    kafka_bootstrap: str, conveyor_kafka_topics: dict[str, int]
) -> None:
    assert conveyor_kafka_topics[topics.TASK_EVENTS] == 6
    assert conveyor_kafka_topics[topics.TASK_DEAD_LETTER] == 1
    assert conveyor_kafka_topics[topics.PROVIDER_COMMANDS] == 6
    assert conveyor_kafka_topics[topics.PROVIDER_RESULTS] == 6
    assert conveyor_kafka_topics[topics.dlq(topics.PROVIDER_RESULTS)] == 1
    assert len(conveyor_kafka_topics) == 8

    await ensure_topics(kafka_bootstrap, conveyor_kafka_topics)  # idempotent
    counts = await partition_counts(kafka_bootstrap, list(conveyor_kafka_topics))
    assert counts == conveyor_kafka_topics


async def test_ensure_topics_refuses_an_existing_topic_with_other_partitions(
    kafka_bootstrap: str, make_topic: Callable[[int], str]
) -> None:
    name = make_topic(2)
    with pytest.raises(DevstackError, match="2 partitions, expected 4"):
        await ensure_topics(kafka_bootstrap, {name: 4})
    assert await partition_counts(kafka_bootstrap, [name]) == {name: 2}


async def test_topics_are_not_created_automatically(kafka_bootstrap: str) -> None:
    name = f"test.devstack.never-created.{uuid.uuid4().hex[:8]}"
    assert await partition_counts(kafka_bootstrap, [name]) == {}
    assert await partition_counts(kafka_bootstrap, [name]) == {}


async def produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all")
    await producer.start()
    try:
        for key, value in records:
            await producer.send_and_wait(topic, value, key=key, headers=[("ce_id", value)])
    finally:
        await producer.stop()


async def consume(bootstrap: str, topic: str, count: int) -> list[tuple[int, bytes, bytes, bytes]]:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"test-devstack-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    got: list[tuple[int, bytes, bytes, bytes]] = []
    try:
        while len(got) < count:
            batch = await consumer.getmany(timeout_ms=10_000)
            assert batch, f"no records within 10s; got {len(got)} of {count}"
            for records in batch.values():
                got.extend((r.partition, r.key, r.value, dict(r.headers)["ce_id"]) for r in records)
        await consumer.commit()
    finally:
        await consumer.stop()
    return got


async def test_produce_and_consume_round_trip(
    kafka_bootstrap: str, make_topic: Callable[[int], str]
) -> None:
    topic = make_topic(3)
    records = [(f"task-{i % 4}".encode(), f"event-{i}".encode()) for i in range(20)]
    await produce(kafka_bootstrap, topic, records)

    got = await consume(kafka_bootstrap, topic, len(records))

    assert sorted(value for _, _, value, _ in got) == sorted(value for _, value in records)
    assert all(value == header for _, _, value, header in got)
    partitions_by_key: dict[bytes, set[int]] = {}
    for partition, key, _, _ in got:
        partitions_by_key.setdefault(key, set()).add(partition)
    assert all(len(p) == 1 for p in partitions_by_key.values())  # one key, one partition
    for key in partitions_by_key:  # per-key order is the send order
        sent = [v for k, v in records if k == key]
        assert [v for _, k, v, _ in got if k == key] == sent


async def test_killed_broker_restarts_with_its_data(
    devstack_kafka_server: KafkaServer, make_topic: Callable[[int], str]
) -> None:
    if not devstack_kafka_server.can_restart:
        pytest.skip(f"restart needs the local-process backend, not {devstack_kafka_server.backend}")
    bootstrap = devstack_kafka_server.bootstrap
    topic = make_topic(1)
    await produce(bootstrap, topic, [(b"k", b"before-kill")])

    await devstack_kafka_server.stop_async("kill")
    assert not devstack_kafka_server.local.running
    await devstack_kafka_server.start_async()

    assert devstack_kafka_server.bootstrap == bootstrap
    got = await consume(bootstrap, topic, 1)
    assert [value for _, _, value, _ in got] == [b"before-kill"]
