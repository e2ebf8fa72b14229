"""Kafka topic names and partition counts: the one place they are defined.

Every record is keyed by task id, so a task's events stay in order on one partition. Each topic has a
``<topic>.dlq`` twin that receives records which cannot be decoded or keep failing.
"""

from __future__ import annotations

from typing import Final

TASK_EVENTS: Final = "conveyor.tasks.v1.events"
"""TaskStateChanged for every event of every task (scheduler -> notifier)."""

TASK_DEAD_LETTER: Final = "conveyor.tasks.v1.dead-letter"
"""TaskStateChanged of dead-lettered tasks (scheduler -> notifier's operations alerts)."""

PROVIDER_COMMANDS: Final = "conveyor.provider.v1.commands"
"""DispatchTask and CancelTask (scheduler -> provider adapter)."""

PROVIDER_RESULTS: Final = "conveyor.provider.v1.results"
"""ProviderResult (provider adapter -> scheduler)."""

DLQ_SUFFIX: Final = ".dlq"

PARTITIONS: Final[dict[str, int]] = {
    TASK_EVENTS: 6,
    TASK_DEAD_LETTER: 1,
    PROVIDER_COMMANDS: 6,
    PROVIDER_RESULTS: 6,
}
"""Partition counts. Consumer replicas beyond a topic's partitions sit idle: HPA max <= these."""


def dlq(topic: str) -> str:
    """Name of the dead-letter twin of ``topic``."""
    return topic + DLQ_SUFFIX


def all_topics() -> dict[str, int]:
    """Every topic with its partition count, dead-letter twins included (1 partition each)."""
    topics = dict(PARTITIONS)
    for name in PARTITIONS:
        topics[dlq(name)] = 1
    return topics
