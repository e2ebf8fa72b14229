"""The SDK's enums: one spelling of each, used in and out (CLI flags, ``--json`` output, ``str()``).

Every enum has one spelling, used in and out (CLI flags, ``--json`` output, ``str()``): the lower-case
name without the proto prefix (``TaskStatus.SUCCEEDED == "succeeded"``). ``.proto`` gives the wire
value and ``from_proto`` reads one. Each dataclass keeps the message it was read from in ``proto``
(left out of ``==``, ``repr`` and :meth:`to_dict`).
"""

from __future__ import annotations

import enum
from typing import Any, Self

from conveyor.tasks.v1 import task_pb2


class _ProtoEnum(enum.StrEnum):
    """A proto enum by its short lower-case name."""

    @classmethod
    def _prefix(cls) -> str:
        raise NotImplementedError

    @classmethod
    def _wrapper(cls) -> Any:
        raise NotImplementedError

    @property
    def proto(self) -> int:
        """The wire value."""
        return int(self._wrapper().Value(self._prefix() + self.value.upper()))

    @classmethod
    def from_proto(cls, value: int) -> Self:
        """The member of a wire value (``unspecified`` for an unknown one)."""
        try:
            name = str(cls._wrapper().Name(value))
        except ValueError:
            return cls("unspecified")
        return cls(name.removeprefix(cls._prefix()).lower())

    @classmethod
    def parse(cls, value: str | int | _ProtoEnum) -> Self:
        """From a member, a wire value, or a name with or without the prefix, any case."""
        if isinstance(value, cls):
            return value
        if isinstance(value, int):
            return cls.from_proto(value)
        name = str(value).lower().removeprefix(cls._prefix().lower())
        try:
            return cls(name)
        except ValueError:
            choices = ", ".join(m.value for m in cls if m.value != "unspecified")
            raise ValueError(f"{value!r} is not one of {choices}") from None


class TaskStatus(_ProtoEnum):
    """Where a task is in its life."""

    UNSPECIFIED = "unspecified"
    QUEUED = "queued"
    DISPATCHED = "dispatched"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    DEAD_LETTERED = "dead_lettered"
    EXPIRED = "expired"

    @classmethod
    def _prefix(cls) -> str:
        return "TASK_STATUS_"

    @classmethod
    def _wrapper(cls) -> Any:
        return task_pb2.TaskStatus

    @property
    def terminal(self) -> bool:
        """The task will not change any more."""
        return self in _TERMINAL_STATUSES


_TERMINAL_STATUSES = frozenset(
    {
        TaskStatus.SUCCEEDED,
        TaskStatus.FAILED,
        TaskStatus.CANCELED,
        TaskStatus.DEAD_LETTERED,
        TaskStatus.EXPIRED,
    }
)


class TaskKind(_ProtoEnum):
    """Kind of generation."""

    UNSPECIFIED = "unspecified"
    VIDEO = "video"
    IMAGE = "image"
    TEXT = "text"
    AUDIO = "audio"

    @classmethod
    def _prefix(cls) -> str:
        return "TASK_KIND_"

    @classmethod
    def _wrapper(cls) -> Any:
        return task_pb2.TaskKind


class Priority(_ProtoEnum):
    """Priority class (unspecified = the server's default, normal)."""

    UNSPECIFIED = "unspecified"
    URGENT = "urgent"
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"

    @classmethod
    def _prefix(cls) -> str:
        return "PRIORITY_"

    @classmethod
    def _wrapper(cls) -> Any:
        return task_pb2.Priority


class Tier(_ProtoEnum):
    """A tenant's tier."""

    UNSPECIFIED = "unspecified"
    FREE = "free"
    PREMIUM = "premium"
    PRO = "pro"

    @classmethod
    def _prefix(cls) -> str:
        return "TIER_"

    @classmethod
    def _wrapper(cls) -> Any:
        return task_pb2.Tier


class EventType(_ProtoEnum):
    """What happened to a task."""

    UNSPECIFIED = "unspecified"
    SUBMITTED = "submitted"
    DISPATCHED = "dispatched"
    STARTED = "started"
    PROGRESS = "progress"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    RETRY_SCHEDULED = "retry_scheduled"
    CANCEL_REQUESTED = "cancel_requested"
    CANCELED = "canceled"
    DEAD_LETTERED = "dead_lettered"
    EXPIRED = "expired"
    REDRIVEN = "redriven"

    @classmethod
    def _prefix(cls) -> str:
        return "TASK_EVENT_TYPE_"

    @classmethod
    def _wrapper(cls) -> Any:
        return task_pb2.TaskEventType

    @property
    def terminal(self) -> bool:
        """The task's last event."""
        return self in _TERMINAL_EVENTS


_TERMINAL_EVENTS = frozenset(
    {
        EventType.SUCCEEDED,
        EventType.FAILED,
        EventType.CANCELED,
        EventType.DEAD_LETTERED,
        EventType.EXPIRED,
    }
)
