"""WatchHub: routing by (tenant, task) and tenant, bounded buffers, resume on overflow/shutdown."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from prometheus_client import CollectorRegistry

from conveyor.tasks.v1 import task_pb2
from conveyor_common.errors import ResourceExhausted, Unavailable
from conveyor_notifier.fanout import WatchHub
from conveyor_notifier.metrics import NotifierMetrics


def event(
    tenant: str,
    task: str,
    sequence: int,
    type_: task_pb2.TaskEventType.ValueType = task_pb2.TASK_EVENT_TYPE_PROGRESS,
) -> task_pb2.TaskEvent:
    return task_pb2.TaskEvent(
        event_id=f"{task}-{sequence}", tenant_id=tenant, task_id=task, sequence=sequence, type=type_
    )


def hub(buffer: int = 4) -> tuple[WatchHub, CollectorRegistry]:
    registry = CollectorRegistry()
    return WatchHub(NotifierMetrics(registry), buffer), registry


async def test_events_reach_task_and_tenant_subscribers_only() -> None:
    h, registry = hub()
    by_task = h.subscribe("a", "t1")
    by_tenant = h.subscribe("a", "")
    other_tenant = h.subscribe("b", "")
    other_task = h.subscribe("a", "t2")
    assert registry.get_sample_value("conveyor_notifier_active_watchers", {"scope": "task"}) == 2
    for e in (event("a", "t1", 1), event("b", "t1", 1), event("a", "t1", 2)):
        h.publish(e)
    assert [(await by_task.next()).sequence for _ in range(2)] == [1, 2]
    assert [(await by_tenant.next()).sequence for _ in range(2)] == [1, 2]
    got = await other_tenant.next()
    assert (got.tenant_id, got.task_id) == ("b", "t1")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(other_task.next(), timeout=0.05)
    for sub in (by_task, by_tenant, other_tenant, other_task):
        h.unsubscribe(sub)
        h.unsubscribe(sub)  # idempotent
    assert h.count == 0
    assert registry.get_sample_value("conveyor_notifier_active_watchers", {"scope": "task"}) == 0


async def test_a_subscriber_that_falls_behind_is_ended_not_skipped() -> None:
    h, registry = hub(buffer=3)
    slow = h.subscribe("a", "t")
    fast = h.subscribe("a", "")
    for sequence in range(1, 4):
        h.publish(event("a", "t", sequence))
    assert [(await fast.next()).sequence for _ in range(3)] == [1, 2, 3]
    h.publish(event("a", "t", 4))  # the slow one's buffer is full: it ends
    with pytest.raises(ResourceExhausted) as info:
        await slow.next()
    assert info.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "resume from your last sequence" in info.value.message
    assert (await fast.next()).sequence == 4  # others are not affected
    h.publish(event("a", "t", 5))
    with pytest.raises(ResourceExhausted):
        await slow.next()  # ended for good, never a later event after a gap
    assert h.count == 1
    ended = registry.get_sample_value(
        "conveyor_notifier_watch_streams_ended_total", {"reason": "overflow"}
    )
    assert ended == 1


async def test_close_ends_every_subscription_and_refuses_new_ones() -> None:
    h, _ = hub()
    subs = [h.subscribe("a", "t"), h.subscribe("a", "")]
    waiting = asyncio.create_task(subs[0].next())
    await asyncio.sleep(0)
    assert h.close() == 2
    with pytest.raises(Unavailable):
        await waiting
    with pytest.raises(Unavailable):
        await subs[1].next()
    late = h.subscribe("a", "t")
    with pytest.raises(Unavailable):
        await late.next()
    assert h.count == 0


async def test_the_type_filter_applies_before_the_buffer() -> None:
    h, registry = hub(buffer=3)
    narrow = h.subscribe("a", "", types=[task_pb2.TASK_EVENT_TYPE_CANCELED])
    for n in range(1, 1001):  # a burst of other events: never buffered for the narrow one
        h.publish(event("a", f"t{n}", 1, task_pb2.TASK_EVENT_TYPE_SUBMITTED))
    h.publish(event("a", "t7", 2, task_pb2.TASK_EVENT_TYPE_CANCELED))
    got = await asyncio.wait_for(narrow.next(), timeout=1)
    assert (got.task_id, got.sequence) == ("t7", 2)
    assert not narrow.ended
    assert registry.get_sample_value(
        "conveyor_notifier_watch_streams_ended_total", {"reason": "overflow"}
    ) in (None, 0)


async def test_a_duplicate_delivery_reaches_a_subscriber_once() -> None:
    h, _ = hub(buffer=10)
    whole = h.subscribe("a", "")
    one = h.subscribe("a", "t1")
    for e in (event("a", "t1", 1), event("a", "t2", 1), event("a", "t1", 2), event("a", "t1", 1)):
        h.publish(e)
    h.publish(event("a", "t1", 2))  # the topic delivered again (at least once)
    h.publish(event("a", "t1", 3))
    got = [(await whole.next()) for _ in range(4)]
    assert [(e.task_id, e.sequence) for e in got] == [("t1", 1), ("t2", 1), ("t1", 2), ("t1", 3)]
    assert [(await one.next()).sequence for _ in range(3)] == [1, 2, 3]
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(whole.next(), timeout=0.05)
