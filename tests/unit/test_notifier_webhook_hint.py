"""The notifier's wake-up on a task event's webhook hint (ADR 0007): the live reader, which sees
every event anyway, wakes the delivery worker only for events whose record says deliveries came
with them; the others cost no call."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry

from conveyor.events.v1 import events_pb2
from conveyor.tasks.v1 import task_pb2
from conveyor_common.kafka import encode
from conveyor_notifier.broadcast import EventBroadcaster
from conveyor_notifier.fanout import WatchHub
from conveyor_notifier.metrics import NotifierMetrics


@dataclass
class Record:
    key: bytes | None
    value: Any
    headers: list[tuple[str, bytes]]
    topic: str = "conveyor.tasks.v1.events"
    partition: int = 0
    offset: int = 1


def _record(task_id: str, hint: bool) -> Record:
    message = events_pb2.TaskStateChanged(
        event=task_pb2.TaskEvent(
            event_id=f"e-{task_id}", task_id=task_id, tenant_id="t", sequence=1
        ),
        webhook_deliveries=hint,
    )
    return Record(*encode(message, source="/services/scheduler", key=task_id))


async def test_only_hinted_events_wake_the_delivery_worker() -> None:
    reader = EventBroadcaster(
        bootstrap_servers="127.0.0.1:9",
        topic="conveyor.tasks.v1.events",
        hub=WatchHub(NotifierMetrics(CollectorRegistry()), 100),
        client_id="t",
    )
    wakes: list[int] = []
    reader.on_webhook_hint = lambda: wakes.append(1)
    for i in range(5):
        reader._publish(_record(f"quiet-{i}", hint=False))
    assert wakes == []
    reader._publish(_record("hooked", hint=True))
    assert wakes == [1]
