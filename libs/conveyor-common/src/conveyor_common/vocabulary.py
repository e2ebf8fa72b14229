"""Conveyor's vocabulary, derived from the protos: the one place that names enum numbers.

The database stores the protobuf enum numbers of ``conveyor.tasks.v1`` (and the scheduler's internal
enums), metrics and settings use lower-case names, and SQL compares numbers. Every table here is built
from the enum descriptors, so adding a priority class, a kind or a status to ``task.proto`` (and
regenerating the stubs) updates every service: nothing mirrors the numbers by hand.

Names are the enum value names without their prefix, lower-cased: ``TASK_KIND_VIDEO`` -> ``video``,
``PRIORITY_URGENT`` -> ``urgent``, ``TASK_STATUS_DEAD_LETTERED`` -> ``dead_lettered``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from conveyor.scheduler.v1 import provider_coordination_service_pb2 as provider_pb2
from conveyor.tasks.v1 import group_pb2, task_pb2


class _EnumWrapper(Protocol):
    @property
    def DESCRIPTOR(self) -> object: ...


def names(enum: _EnumWrapper, prefix: str) -> dict[int, str]:
    """``{number: name}`` for every value but ``*_UNSPECIFIED`` (0), in declaration order."""
    values = enum.DESCRIPTOR.values  # type: ignore[attr-defined]
    return {v.number: v.name.removeprefix(prefix).lower() for v in values if v.number != 0}


def by_name(table: Mapping[int, str]) -> dict[str, int]:
    """The inverse of :func:`names`."""
    return {name: number for number, name in table.items()}


def between(column: str, table: Mapping[int, str]) -> str:
    """A CHECK expression holding ``column`` to the numbers of ``table``."""
    return f"{column} BETWEEN {min(table)} AND {max(table)}"


KIND_NAME = names(task_pb2.TaskKind, "TASK_KIND_")
KIND_BY_NAME = by_name(KIND_NAME)
PRIORITY_NAME = names(task_pb2.Priority, "PRIORITY_")
PRIORITY_BY_NAME = by_name(PRIORITY_NAME)
TIER_NAME = names(task_pb2.Tier, "TIER_")
TIER_BY_NAME = by_name(TIER_NAME)
STATUS_NAME = names(task_pb2.TaskStatus, "TASK_STATUS_")
STATUS_BY_NAME = by_name(STATUS_NAME)
EVENT_TYPE_NAME = names(task_pb2.TaskEventType, "TASK_EVENT_TYPE_")

CLASS_SCORE = {number: float(max(PRIORITY_NAME) - number) for number in PRIORITY_NAME}
"""Priority class -> base score: the most urgent class scores highest, one point per class."""

# Task statuses (TaskStatus numbers).
QUEUED = task_pb2.TASK_STATUS_QUEUED
DISPATCHED = task_pb2.TASK_STATUS_DISPATCHED
RUNNING = task_pb2.TASK_STATUS_RUNNING
SUCCEEDED = task_pb2.TASK_STATUS_SUCCEEDED
FAILED = task_pb2.TASK_STATUS_FAILED
CANCELED = task_pb2.TASK_STATUS_CANCELED
DEAD_LETTERED = task_pb2.TASK_STATUS_DEAD_LETTERED
EXPIRED = task_pb2.TASK_STATUS_EXPIRED
TERMINAL_STATUSES = (SUCCEEDED, FAILED, CANCELED, DEAD_LETTERED, EXPIRED)
ACTIVE_STATUSES = (DISPATCHED, RUNNING)

# Task event types (TaskEventType numbers).
EV_SUBMITTED = task_pb2.TASK_EVENT_TYPE_SUBMITTED
EV_DISPATCHED = task_pb2.TASK_EVENT_TYPE_DISPATCHED
EV_STARTED = task_pb2.TASK_EVENT_TYPE_STARTED
EV_PROGRESS = task_pb2.TASK_EVENT_TYPE_PROGRESS
EV_SUCCEEDED = task_pb2.TASK_EVENT_TYPE_SUCCEEDED
EV_FAILED = task_pb2.TASK_EVENT_TYPE_FAILED
EV_RETRY = task_pb2.TASK_EVENT_TYPE_RETRY_SCHEDULED
EV_CANCEL_REQUESTED = task_pb2.TASK_EVENT_TYPE_CANCEL_REQUESTED
EV_CANCELED = task_pb2.TASK_EVENT_TYPE_CANCELED
EV_DEAD_LETTERED = task_pb2.TASK_EVENT_TYPE_DEAD_LETTERED
EV_EXPIRED = task_pb2.TASK_EVENT_TYPE_EXPIRED
EV_REDRIVEN = task_pb2.TASK_EVENT_TYPE_REDRIVEN
TERMINAL_EVENT_TYPES = frozenset(
    {EV_SUCCEEDED, EV_FAILED, EV_CANCELED, EV_DEAD_LETTERED, EV_EXPIRED}
)
"""Event types that end a task: exactly one per task, the last of its stream."""

# The provider-submit protocol (scheduler.v1 SubmitState and SubmitDecision numbers).
SS_DISPATCHED = provider_pb2.SUBMIT_STATE_DISPATCHED
SS_SUBMITTING = provider_pb2.SUBMIT_STATE_SUBMITTING
SS_UNKNOWN = provider_pb2.SUBMIT_STATE_UNKNOWN
SS_SUBMITTED = provider_pb2.SUBMIT_STATE_SUBMITTED
STALE_CREATE = "stale_create"
"""The reason of a CancelTask the scheduler sends for a create's prediction it refused (ADR 0003)."""
PROCEED = provider_pb2.SUBMIT_DECISION_PROCEED
STOP = provider_pb2.SUBMIT_DECISION_STOP
ALREADY_SUBMITTED = provider_pb2.SUBMIT_DECISION_ALREADY_SUBMITTED
RECONCILE = provider_pb2.SUBMIT_DECISION_RECONCILE

# Task groups (conveyor.tasks.v1 GroupStatus, GroupPolicy and GroupEventType numbers).
GROUP_STATUS_NAME = names(group_pb2.GroupStatus, "GROUP_STATUS_")
GROUP_POLICY_NAME = names(group_pb2.GroupPolicy, "GROUP_POLICY_")
G_RUNNING = group_pb2.GROUP_STATUS_RUNNING
G_SUCCEEDED = group_pb2.GROUP_STATUS_SUCCEEDED
G_PARTIALLY_FAILED = group_pb2.GROUP_STATUS_PARTIALLY_FAILED
G_FAILED = group_pb2.GROUP_STATUS_FAILED
G_CANCELED = group_pb2.GROUP_STATUS_CANCELED
G_TERMINAL = (G_SUCCEEDED, G_PARTIALLY_FAILED, G_FAILED, G_CANCELED)
POLICY_ALL_SETTLED = group_pb2.GROUP_POLICY_ALL_SETTLED
POLICY_FAIL_FAST = group_pb2.GROUP_POLICY_FAIL_FAST
GROUP_EV_CREATED = group_pb2.GROUP_EVENT_TYPE_CREATED
GROUP_EV_CHILD = group_pb2.GROUP_EVENT_TYPE_CHILD
GROUP_EV_CANCEL_REQUESTED = group_pb2.GROUP_EVENT_TYPE_CANCEL_REQUESTED
GROUP_EV_COMPLETED = group_pb2.GROUP_EVENT_TYPE_COMPLETED
GROUP_EV_FOLLOW_UP = group_pb2.GROUP_EVENT_TYPE_FOLLOW_UP_SUBMITTED
