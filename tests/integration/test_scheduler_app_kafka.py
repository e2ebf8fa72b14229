"""Outbox -> real Kafka and provider results <- real Kafka, through a whole scheduler replica.

Events arrive keyed by task id with CloudEvents headers (ce_id = the event id), in per-task sequence
order; DispatchTask commands reach the commands topic; ProviderResults produced to the results topic
are applied once (a redelivered result changes nothing).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from sqlalchemy import text

from conveyor.events.v1 import events_pb2
from conveyor_common import topics
from conveyor_common.kafka import EventProducer, ProducerConfig
from conveyor_common.kafka.envelope import header_map
from conveyor_scheduler.app import SchedulerApp
from conveyor_testkit import scheduler as kit

pytestmark = [pytest.mark.integration, pytest.mark.postgres, pytest.mark.kafka]


@pytest.fixture(scope="module")
async def app(
    database_url: str, kafka_bootstrap: str, conveyor_kafka_topics: dict[str, int]
) -> AsyncIterator[SchedulerApp]:
    await kit.migrate(database_url)
    settings = kit.make_settings(
        database_url,
        kafka_bootstrap_servers=kafka_bootstrap,
        results_consumer_group=f"sched-test-{uuid.uuid4().hex[:8]}",
        instance_id="kafka-test",
        global_concurrency=20,
        tier_concurrency={"free": 20, "premium": 20, "pro": 20},
    )
    app = SchedulerApp(settings, grpc=False)
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


async def _collect(
    bootstrap: str, topic: str, keys: set[str], until: Any, wait_seconds: float = 30.0
) -> list[Any]:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"sched-reader-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    out: list[Any] = []
    deadline = time.monotonic() + wait_seconds
    try:
        while time.monotonic() < deadline and not until(out):
            batch = await consumer.getmany(timeout_ms=300)
            for records in batch.values():
                out += [r for r in records if r.key and r.key.decode() in keys]
    finally:
        await consumer.stop()
    return out


async def test_outbox_to_kafka_and_results_back(app: SchedulerApp, kafka_bootstrap: str) -> None:
    rows = await app.core.submit("k1", 1, [kit.item() for _ in range(3)])
    ids = {str(r["id"]) for r, _ in rows}

    def dispatched(records: list[Any]) -> bool:
        return len(records) >= 3

    commands = await _collect(kafka_bootstrap, topics.PROVIDER_COMMANDS, ids, dispatched)
    assert {r.key.decode() for r in commands} == ids
    for r in commands:
        h = header_map(r.headers)
        assert h["ce_type"] == "conveyor.events.v1.DispatchTask"
        assert h["ce_subject"] == r.key.decode()
        cmd = events_pb2.DispatchTask()
        cmd.ParseFromString(r.value)
        assert (cmd.task_id, cmd.attempt) == (r.key.decode(), 1)
        assert cmd.HasField("run_deadline")

    producer = EventProducer(
        ProducerConfig(kafka_bootstrap, "sched-test-adapter"), source="/services/provider-adapter"
    )
    await producer.start()
    try:
        for task_id in sorted(ids):
            started = kit.result(task_id, 1, "started")
            done = kit.result(task_id, 1, "succeeded")
            for msg in (started, done, done):  # the last one is a redelivery
                await producer.send(
                    topics.PROVIDER_RESULTS, msg, key=task_id, event_id=msg.result_id
                )
    finally:
        await producer.stop()

    deadline = time.monotonic() + 30
    done_count = 0
    while time.monotonic() < deadline:
        async with app.engine.connect() as conn:
            done_count = await conn.scalar(
                text("SELECT count(*) FROM tasks WHERE status = 4 AND id = ANY(:ids)"),
                {"ids": [uuid.UUID(i) for i in ids]},
            )
        if done_count == 3:
            break
        await asyncio.sleep(0.1)
    assert done_count == 3

    def complete(records: list[Any]) -> bool:
        return len(records) >= 12  # submitted, dispatched, started, succeeded per task

    events = await _collect(kafka_bootstrap, topics.TASK_EVENTS, ids, complete)
    per_task: dict[str, list[int]] = defaultdict(list)
    for r in events:
        h = header_map(r.headers)
        change = events_pb2.TaskStateChanged()
        change.ParseFromString(r.value)
        assert h["ce_id"] == change.event.event_id
        assert h["ce_type"] == "conveyor.events.v1.TaskStateChanged"
        assert change.event.task_id == r.key.decode()
        per_task[r.key.decode()].append(change.event.sequence)
    for task_id in ids:
        seqs = per_task[task_id]
        assert seqs == sorted(seqs), seqs  # per-task order
        assert sorted(set(seqs)) == [1, 2, 3, 4]
    async with app.engine.connect() as conn:
        unpublished = await conn.scalar(
            text("SELECT count(*) FROM outbox WHERE published_at IS NULL")
        )
        last_seq = await conn.scalar(
            text("SELECT max(last_sequence) FROM tasks WHERE id = ANY(:ids)"),
            {"ids": [uuid.UUID(i) for i in ids]},
        )
    assert unpublished == 0
    assert last_seq == 4  # the redelivered success changed nothing
    assert (app.registry.get_sample_value("conveyor_scheduler_outbox_published_total") or 0) >= 15
    await kit.check_invariants(app.engine, app.core.policy)
