"""Conversions between task rows (dicts of column values) and the protobuf contract."""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2

from conveyor.scheduler.v1 import provider_coordination_service_pb2 as provider_pb2
from conveyor.tasks.v1 import task_pb2
from conveyor_scheduler.groups.delays import spec_extras, task_extras
from conveyor_scheduler.store import models as m

TaskRow = dict[str, Any]
"""A task as a dict of its column values (``SELECT * FROM tasks`` / ``RETURNING *``)."""


class TrackedRow(dict[str, Any]):
    """A task row that remembers which columns were assigned (saves write only those) and its
    (status, progress) as loaded (the group aggregate's deltas start from it)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.changed: set[str] = set()
        self.origin: tuple[int, int] = (self.get("status", 0), self.get("progress", 0))

    def __setitem__(self, key: str, value: Any) -> None:
        self.changed.add(key)
        super().__setitem__(key, value)

    def update(self, *args: Any, **kwargs: Any) -> None:
        other = dict(*args, **kwargs)
        self.changed.update(other)
        super().update(other)


"""SUCCEEDED, FAILED, CANCELED, DEAD_LETTERED, EXPIRED."""


def set_ts(out: timestamp_pb2.Timestamp, value: datetime) -> None:
    """Set a Timestamp from an aware datetime (faster than FromDatetime's time-tuple path)."""
    micros = (value - _EPOCH) // _MICRO
    out.seconds, rest = divmod(micros, 1_000_000)
    out.nanos = rest * 1000


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICRO = timedelta(microseconds=1)


def ts(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    """A protobuf Timestamp, or None."""
    if value is None:
        return None
    out = timestamp_pb2.Timestamp()
    set_ts(out, value)
    return out


def from_ts(value: timestamp_pb2.Timestamp) -> datetime:
    """A timezone-aware datetime from a Timestamp."""
    return value.ToDatetime(tzinfo=UTC)


def struct_to_dict(value: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as a plain JSON object (what ``json_format.MessageToDict`` gives, without its
    generic field machinery: it was a tenth of a submit's Python time)."""
    return {key: _json_value(v) for key, v in value.fields.items()}


def _json_value(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        number = value.number_value
        if not math.isfinite(number):  # as MessageToDict: JSON has no NaN or infinity
            raise ValueError("Struct numbers must be finite")
        return number
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return struct_to_dict(value.struct_value)
    if kind == "list_value":
        return [_json_value(v) for v in value.list_value.values]
    return None


def dict_to_struct(value: Mapping[str, Any]) -> struct_pb2.Struct:
    """A JSON object as a Struct."""
    out = struct_pb2.Struct()
    out.update(dict(value))
    return out


_SPEC_CACHE: dict[Any, bytes] = {}
_SPEC_CACHE_MAX = 100_000


def spec_of(row: Mapping[str, Any]) -> task_pb2.TaskSpec:
    """The TaskSpec stored in a task row (a task's spec never changes: cached serialized by id)."""
    cached = _SPEC_CACHE.get(row["id"])
    if cached is not None:
        spec = task_pb2.TaskSpec()
        spec.ParseFromString(cached)
        return spec
    spec = _build_spec(row)
    if len(_SPEC_CACHE) >= _SPEC_CACHE_MAX:
        _SPEC_CACHE.clear()
    _SPEC_CACHE[row["id"]] = spec.SerializeToString()
    return spec


def seed_spec(row: Mapping[str, Any], input_struct: struct_pb2.Struct) -> None:
    """Cache the stored TaskSpec of a new task row, taking ``spec.input`` from the submitted
    Struct (the row's ``input`` is that Struct as a JSON object, so rebuilding it is a wasted
    round trip)."""
    if len(_SPEC_CACHE) >= _SPEC_CACHE_MAX:
        _SPEC_CACHE.clear()
    _SPEC_CACHE[row["id"]] = _build_spec(row, input_struct).SerializeToString()


def _build_spec(
    row: Mapping[str, Any], input_struct: struct_pb2.Struct | None = None
) -> task_pb2.TaskSpec:
    spec = task_pb2.TaskSpec(
        kind=row["kind"],
        priority=row["priority"],
        max_attempts=row["max_attempts"],
        labels=row["labels"] or {},
    )
    if row["is_deployment"]:
        spec.deployment = row["model"]
    else:
        spec.model = row["model"]
    if input_struct is not None:
        spec.input.CopyFrom(input_struct)
    else:
        spec.input.CopyFrom(dict_to_struct(row["input"] or {}))
    if row["queue_deadline"] is not None:
        set_ts(spec.queue_deadline, row["queue_deadline"])
    spec.run_timeout.CopyFrom(duration_pb2.Duration(seconds=int(row["run_timeout_s"])))
    if row["webhook_url"]:
        spec.webhook.url = row["webhook_url"]
        spec.webhook.events.extend(row["webhook_events"] or [])
    spec_extras(spec, row)
    return spec


def spec_bytes(row: Mapping[str, Any]) -> bytes:
    """The serialized TaskSpec of a row (cached)."""
    cached = _SPEC_CACHE.get(row["id"])
    if cached is None:
        spec_of(row)
        cached = _SPEC_CACHE[row["id"]]
    return cached


SNAPSHOT = "_snapshot"
"""Key under which the submit paths keep a new row's Task: the snapshot its SUBMITTED event carries,
which is what ``task_proto`` would build (the row does not change before the answer)."""


def task_proto(row: Mapping[str, Any]) -> task_pb2.Task:
    """The public Task of a row (queue position and ETA are filled by GetTask only)."""
    snapshot: task_pb2.Task | None = row.get(SNAPSHOT)
    if snapshot is not None:
        return snapshot
    task = task_pb2.Task(
        task_id=str(row["id"]),
        tenant_id=row["tenant_id"],
        request_id=row["request_id"],
        status=row["status"],
        progress=row["progress"],
        attempt=row["attempt"],
        max_attempts=row["attempt_base"] + row["max_attempts"],
        prediction_id=row["prediction_id"] or "",
        last_sequence=row["last_sequence"],
        tier=row["tier"],
        cancel_requested=bool(row.get("cancel_requested")),
        cancel_reason=(row.get("cancel_reason") or "") if row.get("cancel_requested") else "",
    )
    task.spec.ParseFromString(spec_bytes(row))
    for field, column in (
        ("created_at", "created_at"),
        ("updated_at", "updated_at"),
        ("dispatched_at", "dispatched_at"),
        ("started_at", "started_at"),
        ("finished_at", "finished_at"),
        ("not_before", "not_before"),
    ):
        value = row[column]
        if value is not None:
            set_ts(getattr(task, field), value)
    if row["result"] is not None:
        task.result.ParseFromString(row["result"])
    if row["error_code"] is not None:
        task.error.code = row["error_code"]
        task.error.message = row["error_message"] or ""
        task.error.retryable = bool(row["error_retryable"])
    task_extras(task, row)
    return task


def event_proto(
    row: Mapping[str, Any], event_type: int, event_id: uuid.UUID, occurred_at: datetime
) -> task_pb2.TaskEvent:
    """A TaskEvent with a snapshot of ``row`` (the task right after the event)."""
    event = task_pb2.TaskEvent(
        event_id=str(event_id),
        task_id=str(row["id"]),
        tenant_id=row["tenant_id"],
        sequence=row["last_sequence"],
        type=event_type,  # type: ignore[arg-type]
    )
    set_ts(event.occurred_at, occurred_at)
    event.task.CopyFrom(task_proto(row))
    return event


def in_flight_proto(row: Mapping[str, Any]) -> provider_pb2.InFlightAttempt:
    """An InFlightAttempt of an active task row."""
    out = provider_pb2.InFlightAttempt(
        task_id=str(row["id"]),
        tenant_id=row["tenant_id"],
        attempt=row["attempt"],
        prediction_id=row["prediction_id"] or "",
        state=provider_pb2.SubmitState.ValueType(row["submit_state"] or 0),
        model=row["model"],
        kind=row["kind"],
        cancel_requested=row["cancel_requested"],
    )
    for field, column in (
        ("submit_started_at", "submit_started_at"),
        ("last_provider_update_at", "last_provider_update_at"),
        ("run_deadline", "run_deadline"),
    ):
        value = row[column]
        if value is not None:
            set_ts(getattr(out, field), value)
    return out


def duration(seconds: float) -> duration_pb2.Duration:
    """A Duration of ``seconds``."""
    out = duration_pb2.Duration()
    out.FromTimedelta(timedelta(seconds=max(0.0, seconds)))
    return out


def is_terminal(status: int) -> bool:
    """Whether a status is terminal."""
    return status in m.TERMINAL_STATUSES
