"""conveyor_common.kafka on a real Apache Kafka broker: idempotent producer, consumer group with
manual commit, resume at the committed offset, dead-letter topic for undecodable and failing records."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import cast

import pytest
from aiokafka import AIOKafkaConsumer
from prometheus_client import CollectorRegistry

from conveyor.events.v1 import events_pb2
from conveyor_common import topics
from conveyor_common.kafka import (
    ConsumerConfig,
    Envelope,
    EventConsumer,
    EventProducer,
    PermanentError,
    ProducerConfig,
    default_registry,
)
from conveyor_common.kafka.envelope import Headers
from conveyor_common.metrics import KafkaMetrics
from conveyor_devstack import ensure_topics

pytestmark = [pytest.mark.integration, pytest.mark.kafka]


@pytest.fixture
async def topic(kafka_bootstrap: str) -> str:
    name = f"test.common.{uuid.uuid4().hex[:8]}"
    await ensure_topics(kafka_bootstrap, {name: 3, topics.dlq(name): 1})
    return name


@pytest.fixture
async def producer(kafka_bootstrap: str) -> AsyncIterator[EventProducer]:
    p = EventProducer(ProducerConfig(kafka_bootstrap, "test-producer"), source="/tests")
    await p.start()
    yield p
    await p.stop()


def consumer_for(
    bootstrap: str,
    topic: str,
    group: str,
    handler: Callable[[Envelope], Awaitable[None]],
    producer: EventProducer,
    *,
    registry: CollectorRegistry | None = None,
    commit_interval_ms: int = 100,
    fetch_timeout_ms: int = 500,
    key_concurrency: int = 1,
) -> EventConsumer:
    return EventConsumer(
        ConsumerConfig(
            bootstrap_servers=bootstrap,
            group_id=group,
            topics=[topic],
            max_attempts=3,
            retry_backoff_seconds=0.01,
            session_timeout_ms=6000,
            heartbeat_interval_ms=500,
            commit_interval_ms=commit_interval_ms,
            fetch_timeout_ms=fetch_timeout_ms,
            key_concurrency=key_concurrency,
        ),
        handler,
        registry=default_registry(),
        dlq_producer=producer,
        metrics=KafkaMetrics(registry, "test") if registry else None,
    )


async def wait_for(predicate: Callable[[], bool], within: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def read_all(bootstrap: str, topic: str, expect: int) -> list[object]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    out: list[object] = []
    try:
        deadline = asyncio.get_running_loop().time() + 30
        while len(out) < expect and asyncio.get_running_loop().time() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                out.extend(records)
    finally:
        await consumer.stop()
    return out


async def test_keys_headers_and_per_key_order(
    kafka_bootstrap: str, topic: str, producer: EventProducer
) -> None:
    tasks = [f"task-{i}" for i in range(4)]
    for attempt in range(1, 6):
        for task in tasks:
            await producer.send(
                topic, events_pb2.DispatchTask(task_id=task, attempt=attempt), key=task
            )
    seen: dict[str, list[int]] = {t: [] for t in tasks}
    ids: set[str] = set()

    async def handle(env: Envelope) -> None:
        assert isinstance(env.message, events_pb2.DispatchTask)
        assert env.key == env.message.task_id
        assert env.type == "conveyor.events.v1.DispatchTask"
        assert env.source == "/tests"
        assert env.traceparent
        assert env.traceparent.startswith("00-")
        ids.add(env.id)
        seen[env.key].append(env.message.attempt)

    registry = CollectorRegistry()
    consumer = consumer_for(kafka_bootstrap, topic, "g-order", handle, producer, registry=registry)
    await consumer.start()
    try:
        await wait_for(lambda: sum(len(v) for v in seen.values()) == 20)
    finally:
        await consumer.stop()
    assert all(v == [1, 2, 3, 4, 5] for v in seen.values())
    assert len(ids) == 20
    handled = registry.get_sample_value(
        "conveyor_kafka_consumed_total", {"service": "test", "topic": topic, "outcome": "handled"}
    )
    assert handled == 20.0


async def test_key_concurrency_handles_keys_side_by_side_each_in_order(
    kafka_bootstrap: str, topic: str, producer: EventProducer
) -> None:
    """With ``key_concurrency`` a partition's records of different keys run side by side (more at
    once than the topic's 3 partitions, never more than the bound), each key's in order; a record
    that fails for good is dead-lettered without holding up the others, and a restarted consumer
    re-handles nothing (the whole batch was committed)."""
    keys = [f"task-{i}" for i in range(12)]
    for attempt in range(1, 4):
        for key in keys:
            await producer.send(
                topic, events_pb2.DispatchTask(task_id=key, attempt=attempt), key=key
            )
    seen: dict[str, list[int]] = {k: [] for k in keys}
    running = 0
    most = 0

    async def handle(env: Envelope) -> None:
        nonlocal running, most
        assert isinstance(env.message, events_pb2.DispatchTask)
        if env.key == "task-0" and env.message.attempt == 2:
            raise PermanentError("bad command")
        running += 1
        most = max(most, running)
        try:
            await asyncio.sleep(0.05)
        finally:
            running -= 1
        seen[env.key].append(env.message.attempt)

    consumer = consumer_for(
        kafka_bootstrap, topic, "g-keys", handle, producer, commit_interval_ms=0, key_concurrency=6
    )
    await consumer.start()
    try:
        await wait_for(lambda: sum(len(v) for v in seen.values()) == 35)
    finally:
        await consumer.stop()
    assert seen.pop("task-0") == [1, 3]  # its failed record dead-lettered, the next one handled
    assert all(v == [1, 2, 3] for v in seen.values())
    assert 3 < most <= 6
    dead = await read_all(kafka_bootstrap, topics.dlq(topic), 1)
    assert len(dead) == 1

    again: list[str] = []

    async def handle_again(env: Envelope) -> None:
        again.append(env.key or "")

    restarted = consumer_for(kafka_bootstrap, topic, "g-keys", handle_again, producer)
    await restarted.start()
    try:
        await asyncio.sleep(2.0)
    finally:
        await restarted.stop()
    assert again == []


async def test_key_concurrency_fetches_on_while_a_slow_record_is_in_hand(
    kafka_bootstrap: str, topic: str, producer: EventProducer
) -> None:
    """Records fetched after a slow one are handled while it is still running (the consumer does
    not wait for a whole fetched batch before fetching again); its partition's commit stops short
    of it until it finishes, and the next record of its key waits for it."""
    await producer.send(topic, events_pb2.CancelTask(task_id="slow", reason="1"), key="slow")
    release = asyncio.Event()
    handled: list[str] = []

    async def handle(env: Envelope) -> None:
        assert isinstance(env.message, events_pb2.CancelTask)
        name = f"{env.message.task_id}-{env.message.reason}"
        if name == "slow-1":
            handled.append("slow-1 started")
            await release.wait()
        handled.append(name)

    consumer = consumer_for(
        kafka_bootstrap, topic, "g-stream", handle, producer, commit_interval_ms=0,
        key_concurrency=8,
    )  # fmt: skip
    await consumer.start()
    try:
        await wait_for(lambda: "slow-1 started" in handled)
        for i in range(6):  # fetched after the slow record, in later fetches
            await producer.send(
                topic, events_pb2.CancelTask(task_id=f"t{i}", reason="1"), key=f"t{i}"
            )
        await producer.send(topic, events_pb2.CancelTask(task_id="slow", reason="2"), key="slow")
        await wait_for(lambda: all(f"t{i}-1" in handled for i in range(6)))
        await asyncio.sleep(0.5)
        assert not {"slow-1", "slow-2"} & set(handled)
        (slow,) = [r for r in await read_all(kafka_bootstrap, topic, 8) if r.key == b"slow"][:1]  # type: ignore[attr-defined]
        inner = consumer._consumer
        tp = next(tp for tp in inner.assignment() if tp.partition == slow.partition)  # type: ignore[attr-defined]
        assert ((await inner.committed(tp)) or 0) <= slow.offset  # type: ignore[attr-defined]
        release.set()
        await wait_for(lambda: "slow-2" in handled)
    finally:
        await consumer.stop()
    assert handled.index("slow-1") < handled.index("slow-2")
    again: list[str] = []

    async def handle_again(env: Envelope) -> None:
        again.append(env.key or "")

    restarted = consumer_for(kafka_bootstrap, topic, "g-stream", handle_again, producer)
    await restarted.start()
    try:
        await asyncio.sleep(2.0)
    finally:
        await restarted.stop()
    assert again == []


async def test_restarted_consumer_resumes_at_committed_offset(
    kafka_bootstrap: str, topic: str, producer: EventProducer
) -> None:
    for i in range(10):
        await producer.send(topic, events_pb2.CancelTask(task_id="t", reason=str(i)), key="t")
    first: list[str] = []

    async def handle_first(env: Envelope) -> None:
        assert isinstance(env.message, events_pb2.CancelTask)
        first.append(env.message.reason)

    c1 = consumer_for(kafka_bootstrap, topic, "g-resume", handle_first, producer)
    await c1.start()
    await wait_for(lambda: len(first) == 10)
    await c1.stop()  # commits what it handled

    for i in range(10, 15):
        await producer.send(topic, events_pb2.CancelTask(task_id="t", reason=str(i)), key="t")
    second: list[str] = []

    async def handle_second(env: Envelope) -> None:
        assert isinstance(env.message, events_pb2.CancelTask)
        second.append(env.message.reason)

    c2 = consumer_for(kafka_bootstrap, topic, "g-resume", handle_second, producer)
    await c2.start()
    try:
        await wait_for(lambda: len(second) >= 5)
        await asyncio.sleep(0.5)
    finally:
        await c2.stop()
    assert first == [str(i) for i in range(10)]
    assert second == [str(i) for i in range(10, 15)]


async def test_coalesced_commits_are_made_when_idle(
    kafka_bootstrap: str, topic: str, producer: EventProducer
) -> None:
    """With a commit interval far longer than the test, handled offsets are still committed once
    the consumer goes idle (one fetch timeout without records)."""
    for i in range(10):
        await producer.send(topic, events_pb2.CancelTask(task_id=f"t{i}"), key=f"t{i}")
    handled: list[str] = []

    async def handle(env: Envelope) -> None:
        assert isinstance(env.message, events_pb2.CancelTask)
        handled.append(env.message.task_id)

    c1 = consumer_for(
        kafka_bootstrap,
        topic,
        "g-idle",
        handle,
        producer,
        commit_interval_ms=600_000,
        fetch_timeout_ms=300,
    )
    await c1.start()
    try:
        await wait_for(lambda: len(handled) == 10)
        inner = c1._consumer

        async def committed_total() -> int:
            return sum([(await inner.committed(tp)) or 0 for tp in inner.assignment()])

        deadline = asyncio.get_running_loop().time() + 10
        while await committed_total() < 10:
            assert asyncio.get_running_loop().time() < deadline, "idle commit not made"
            await asyncio.sleep(0.1)
    finally:
        await c1.stop()


async def test_coalesced_commits_are_made_before_partitions_move(
    kafka_bootstrap: str, topic: str, producer: EventProducer
) -> None:
    """A rebalance commits what the old owner handled: nothing is handled twice when a second
    member joins, although neither the interval nor an idle fetch came around to commit."""
    for i in range(12):
        await producer.send(topic, events_pb2.CancelTask(task_id=f"t{i}"), key=f"t{i}")
    handled: list[str] = []

    async def handle(env: Envelope) -> None:
        assert isinstance(env.message, events_pb2.CancelTask)
        handled.append(env.message.task_id)

    c1, c2 = (
        consumer_for(
            kafka_bootstrap,
            topic,
            "g-move",
            handle,
            producer,
            commit_interval_ms=600_000,
            fetch_timeout_ms=60_000,
        )
        for _ in "12"
    )
    await c1.start()
    try:
        await wait_for(lambda: len(handled) == 12)
        await c2.start()
        await wait_for(lambda: len(c2._consumer.assignment()) > 0)
        for i in range(12, 18):
            await producer.send(topic, events_pb2.CancelTask(task_id=f"t{i}"), key=f"t{i}")
        await wait_for(lambda: len(handled) >= 18)
        await asyncio.sleep(1.0)
    finally:
        await c2.stop()
        await c1.stop()
    assert sorted(handled) == sorted(f"t{i}" for i in range(18))


async def test_undecodable_and_failing_records_go_to_the_dlq(
    kafka_bootstrap: str, topic: str, producer: EventProducer
) -> None:
    await producer.send_raw(topic, b"poison", b"not a protobuf", [("ce_id", b"x")])
    await producer.send(topic, events_pb2.CancelTask(task_id="perm"), key="perm")
    await producer.send(topic, events_pb2.CancelTask(task_id="flaky"), key="flaky")
    await producer.send(topic, events_pb2.CancelTask(task_id="ok"), key="ok")
    calls: dict[str, int] = {}
    done: list[str] = []

    async def handle(env: Envelope) -> None:
        calls[env.key] = calls.get(env.key, 0) + 1
        if env.key == "perm":
            raise PermanentError("cannot ever handle")
        if env.key == "flaky" and calls[env.key] < 3:
            raise ConnectionError("transient")
        done.append(env.key)

    consumer = consumer_for(kafka_bootstrap, topic, "g-dlq", handle, producer)
    await consumer.start()
    try:
        await wait_for(lambda: {"ok", "flaky"} <= set(done))
    finally:
        await consumer.stop()
    assert calls["perm"] == 1
    assert calls["flaky"] == 3
    dead = await read_all(kafka_bootstrap, topics.dlq(topic), 2)
    by_key = {r.key: dict(r.headers) for r in dead}  # type: ignore[attr-defined]
    assert set(by_key) == {b"poison", b"perm"}
    assert by_key[b"poison"]["x-original-topic"] == topic.encode()
    assert by_key[b"poison"]["x-error"].startswith(b"decode:")
    assert by_key[b"perm"]["x-error"].startswith(b"permanent:")


class _FlakyDlqProducer(EventProducer):
    """A DLQ producer whose first ``fail`` sends raise (Kafka briefly away)."""

    def __init__(self, inner: EventProducer, fail: int) -> None:
        self.inner = inner
        self.fail = fail
        self.sent: list[bytes | None] = []

    async def send_raw(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        headers: Headers,
    ) -> None:
        if self.fail > 0:
            self.fail -= 1
            raise ConnectionError("dead-letter topic unreachable")
        await self.inner.send_raw(topic, key, value, headers)
        self.sent.append(key)


@pytest.mark.parametrize("key_concurrency", [1, 4])
async def test_consumer_survives_a_failed_dead_letter_and_skips_nothing(
    kafka_bootstrap: str, topic: str, producer: EventProducer, key_concurrency: int
) -> None:
    """Also streamed by key: the records after the poison one wait for it (one key), are not run
    ahead of the rewind, and are handled once, in order, after it."""
    for reason in ("before", "poison", "after-1", "after-2"):
        await producer.send(topic, events_pb2.CancelTask(task_id="k", reason=reason), key="k")
    handled: list[str] = []
    poison_calls = 0

    async def handle(env: Envelope) -> None:
        nonlocal poison_calls
        assert isinstance(env.message, events_pb2.CancelTask)
        if env.message.reason == "poison":
            poison_calls += 1
            raise PermanentError("never")
        handled.append(env.message.reason)

    dlq = _FlakyDlqProducer(producer, fail=1)
    consumer = consumer_for(
        kafka_bootstrap, topic, "g-dlq-flaky", handle, dlq, key_concurrency=key_concurrency
    )
    await consumer.start()
    try:
        await wait_for(lambda: "after-2" in handled)
    finally:
        await consumer.stop()
    # The failed dead-lettering did not stop the consumer, and the poison record was retried
    # (rewound) rather than skipped: it reached the DLQ once, and nothing after it was lost.
    assert poison_calls == 2
    assert dlq.sent == [b"k"]
    assert handled.count("after-1") == 1
    assert handled[-2:] == ["after-1", "after-2"]
    if key_concurrency > 1:
        assert handled == ["before", "after-1", "after-2"]


async def test_a_batch_handler_gets_whole_batches_and_a_poison_record_falls_back(
    kafka_bootstrap: str, topic: str, producer: EventProducer
) -> None:
    """Good batches go to the batch handler in one call each, in per-key order; a batch with a
    record the batch handler cannot take is handled record by record, where the bad record alone
    is dead-lettered and the others are handled."""
    for i in range(30):
        await producer.send(topic, events_pb2.CancelTask(task_id=f"t{i % 3}-{i}"), key=f"k{i % 3}")
    batches: list[list[str]] = []
    singles: list[str] = []

    async def handle_batch(envs: Sequence[Envelope]) -> None:
        ids = [cast(events_pb2.CancelTask, e.message).task_id for e in envs]
        if "bad" in ids:
            raise ValueError("a record the batch cannot take")
        batches.append(ids)

    async def handle(env: Envelope) -> None:
        task_id = cast(events_pb2.CancelTask, env.message).task_id
        if task_id == "bad":
            raise PermanentError("never")
        singles.append(task_id)

    consumer = consumer_for(kafka_bootstrap, topic, "g-batch", handle, producer)
    consumer.batch_handler = handle_batch
    await consumer.start()
    try:
        await wait_for(lambda: sum(map(len, batches)) == 30)
        assert singles == []
        assert len(batches) < 30  # whole fetches, not one call per record
        for key in range(3):  # each key's records in the order they were sent
            seen = [int(t.split("-")[1]) for b in batches for t in b if t.startswith(f"t{key}-")]
            assert seen == sorted(seen)
        await producer.send(topic, events_pb2.CancelTask(task_id="bad"), key="k0")
        await producer.send(topic, events_pb2.CancelTask(task_id="after"), key="k0")
        await wait_for(lambda: "after" in singles or any("after" in b for b in batches))
    finally:
        await consumer.stop()
    dead = await read_all(kafka_bootstrap, topics.dlq(topic), 1)
    assert [r.key for r in dead] == [b"k0"]  # type: ignore[attr-defined]
