"""Typed results of the SDK: plain dataclasses and string enums instead of protobuf messages.

Every enum has one spelling, used in and out (CLI flags, ``--json`` output, ``str()``): the lower-case
name without the proto prefix (``TaskStatus.SUCCEEDED == "succeeded"``). ``.proto`` gives the wire
value and ``from_proto`` reads one. Each dataclass keeps the message it was read from in ``proto``
(left out of ``==``, ``repr`` and :meth:`to_dict`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format, timestamp_pb2

from conveyor.tasks.v1 import admin_service_pb2 as admin_pb2
from conveyor.tasks.v1 import task_pb2
from conveyor_client.enums import EventType, Priority, TaskKind, TaskStatus, Tier


def _time(msg: Any, name: str) -> datetime | None:
    if not msg.HasField(name):
        return None
    ts: timestamp_pb2.Timestamp = getattr(msg, name)
    return ts.ToDatetime(tzinfo=UTC)


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, _Record):
        return value.to_dict()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class _Record:
    """JSON-ready dict of a dataclass (enums by name, times ISO-8601, numbers as numbers)."""

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values, without ``proto``."""
        return {
            f.name: _plain(getattr(self, f.name))
            for f in fields(self)  # type: ignore[arg-type]
            if f.name != "proto"
        }


@dataclass(frozen=True, slots=True)
class OutputFile(_Record):
    """A stored copy of one output file."""

    url: str
    source_url: str
    size_bytes: int
    content_type: str


@dataclass(frozen=True, slots=True)
class TaskError(_Record):
    """Why the last attempt failed."""

    code: str
    message: str
    retryable: bool


@dataclass(frozen=True, slots=True)
class Task(_Record):
    """One task. ``cancel_requested``: a cancel was asked and the task has not ended yet;
    ``held_reason``: why a queued task is held by an operator ("model paused", "tenant paused")."""

    task_id: str
    tenant_id: str
    request_id: str
    status: TaskStatus
    kind: TaskKind
    model: str
    deployment: str
    priority: Priority
    tier: Tier
    progress: int
    attempt: int
    max_attempts: int
    input: dict[str, Any]
    labels: dict[str, str]
    prediction_id: str
    created_at: datetime | None
    updated_at: datetime | None
    dispatched_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    not_before: datetime | None
    queue_position: int
    estimated_start_at: datetime | None
    last_sequence: int
    outputs: list[OutputFile]
    output: Any
    predict_time_seconds: float | None
    error: TaskError | None
    cancel_requested: bool = False
    cancel_reason: str = ""
    held_reason: str = ""
    proto: task_pb2.Task = field(default_factory=task_pb2.Task, repr=False, compare=False)

    @property
    def target(self) -> str:
        """The model or deployment the task runs on."""
        return self.model or self.deployment

    @property
    def terminal(self) -> bool:
        """The task will not change any more."""
        return self.status.terminal

    @classmethod
    def from_proto(cls, msg: task_pb2.Task, *, cancel_requested: bool = False) -> Task:
        """Read a Task message."""
        spec = msg.spec
        result = msg.result if msg.HasField("result") else None
        return cls(
            task_id=msg.task_id,
            tenant_id=msg.tenant_id,
            request_id=msg.request_id,
            status=TaskStatus.from_proto(msg.status),
            kind=TaskKind.from_proto(spec.kind),
            model=spec.model,
            deployment=spec.deployment,
            priority=Priority.from_proto(spec.priority),
            tier=Tier.from_proto(msg.tier),
            progress=msg.progress,
            attempt=msg.attempt,
            max_attempts=msg.max_attempts,
            input=json_format.MessageToDict(spec.input) if spec.HasField("input") else {},
            labels=dict(spec.labels),
            prediction_id=msg.prediction_id,
            created_at=_time(msg, "created_at"),
            updated_at=_time(msg, "updated_at"),
            dispatched_at=_time(msg, "dispatched_at"),
            started_at=_time(msg, "started_at"),
            finished_at=_time(msg, "finished_at"),
            not_before=_time(msg, "not_before"),
            queue_position=msg.queue_position,
            estimated_start_at=_time(msg, "estimated_start_at"),
            last_sequence=msg.last_sequence,
            outputs=[
                OutputFile(f.url, f.source_url, f.size_bytes, f.content_type)
                for f in (result.files if result is not None else ())
            ],
            output=(
                json_format.MessageToDict(result.output)
                if result is not None and result.HasField("output")
                else None
            ),
            predict_time_seconds=(
                result.predict_time.ToTimedelta().total_seconds()
                if result is not None and result.HasField("predict_time")
                else None
            ),
            error=(
                TaskError(msg.error.code, msg.error.message, msg.error.retryable)
                if msg.HasField("error") and msg.error.code
                else None
            ),
            cancel_requested=(cancel_requested or msg.cancel_requested)
            and not TaskStatus.from_proto(msg.status).terminal,
            cancel_reason=msg.cancel_reason,
            held_reason=msg.held_reason,
            proto=msg,
        )


@dataclass(frozen=True, slots=True)
class TaskEvent(_Record):
    """One event of a task, with the task as it was after the event."""

    event_id: str
    task_id: str
    tenant_id: str
    sequence: int
    type: EventType
    occurred_at: datetime | None
    task: Task
    proto: task_pb2.TaskEvent = field(default_factory=task_pb2.TaskEvent, repr=False, compare=False)

    @classmethod
    def from_proto(cls, msg: task_pb2.TaskEvent, *, cancel_requested: bool = False) -> TaskEvent:
        """Read a TaskEvent message."""
        kind = EventType.from_proto(msg.type)
        return cls(
            event_id=msg.event_id,
            task_id=msg.task_id,
            tenant_id=msg.tenant_id,
            sequence=msg.sequence,
            type=kind,
            occurred_at=_time(msg, "occurred_at"),
            task=Task.from_proto(
                msg.task, cancel_requested=cancel_requested or kind == EventType.CANCEL_REQUESTED
            ),
            proto=msg,
        )


@dataclass(frozen=True, slots=True)
class Submitted(_Record):
    """The answer to a submit: the task, and whether the request id had been seen already."""

    task: Task
    deduplicated: bool


@dataclass(frozen=True, slots=True)
class BatchSubmitted(_Record):
    """The answer to a batch submit, one item per spec in the order given."""

    items: list[Submitted]

    @property
    def tasks(self) -> list[Task]:
        """The tasks, in the order given."""
        return [item.task for item in self.items]


@dataclass(frozen=True, slots=True)
class QueueStat(_Record):
    """Counters of one (kind, model) row of the queue statistics."""

    kind: TaskKind
    model: str
    waiting: int
    active: int
    succeeded: int
    failed: int
    dead_lettered: int
    canceled: int
    expired: int
    oldest_waiting_seconds: float
    recent_run_time_p50_seconds: float

    @classmethod
    def from_proto(cls, msg: task_pb2.QueueStats) -> QueueStat:
        """Read a QueueStats message."""
        return cls(
            kind=TaskKind.from_proto(msg.kind),
            model=msg.model,
            waiting=msg.waiting,
            active=msg.active,
            succeeded=msg.succeeded,
            failed=msg.failed,
            dead_lettered=msg.dead_lettered,
            canceled=msg.canceled,
            expired=msg.expired,
            oldest_waiting_seconds=msg.oldest_waiting_age.ToTimedelta().total_seconds(),
            recent_run_time_p50_seconds=msg.recent_run_time_p50.ToTimedelta().total_seconds(),
        )


@dataclass(frozen=True, slots=True)
class TenantLimits(_Record):
    """A tenant's limits (0 = the tier's default)."""

    max_concurrency: int = 0
    max_waiting: int = 0
    submit_rate_per_second: float = 0.0
    submit_burst: int = 0
    weight: int = 0

    @classmethod
    def from_proto(cls, msg: task_pb2.TenantLimits) -> TenantLimits:
        """Read a TenantLimits message."""
        return cls(
            msg.max_concurrency,
            msg.max_waiting,
            msg.submit_rate_per_second,
            msg.submit_burst,
            msg.weight,
        )

    def to_proto(self) -> task_pb2.TenantLimits:
        """The wire message."""
        return task_pb2.TenantLimits(
            max_concurrency=self.max_concurrency,
            max_waiting=self.max_waiting,
            submit_rate_per_second=self.submit_rate_per_second,
            submit_burst=self.submit_burst,
            weight=self.weight,
        )


@dataclass(frozen=True, slots=True)
class Tenant(_Record):
    """A tenant: its tier, the limits set on it and the limits in effect."""

    tenant_id: str
    tier: Tier
    limits: TenantLimits
    effective_limits: TenantLimits

    @classmethod
    def from_proto(cls, msg: task_pb2.Tenant) -> Tenant:
        """Read a Tenant message."""
        return cls(
            msg.tenant_id,
            Tier.from_proto(msg.tier),
            TenantLimits.from_proto(msg.limits),
            TenantLimits.from_proto(msg.effective_limits),
        )


@dataclass(frozen=True, slots=True)
class TaskPage(_Record):
    """One page of tasks and the token of the next page ("" = last page)."""

    tasks: list[Task]
    next_page_token: str

    @classmethod
    def from_dead_letters(cls, msg: admin_pb2.ListDeadLettersResponse) -> TaskPage:
        """Read a ListDeadLetters answer."""
        return cls([Task.from_proto(t) for t in msg.tasks], msg.next_page_token)


@dataclass(frozen=True, slots=True)
class Paused(_Record):
    """A paused model or tenant (``kind`` is "model" or "tenant")."""

    kind: str
    name: str
    reason: str
    since: datetime | None
    queued: int

    @classmethod
    def from_proto(cls, msg: admin_pb2.PausedEntry) -> Paused:
        """Read a PausedEntry message."""
        kind = msg.WhichOneof("target") or "model"
        return cls(
            kind="model" if kind == "model" else "tenant",
            name=msg.model if kind == "model" else msg.tenant_id,
            reason=msg.reason,
            since=msg.paused_since.ToDatetime(UTC) if msg.HasField("paused_since") else None,
            queued=msg.queued,
        )
