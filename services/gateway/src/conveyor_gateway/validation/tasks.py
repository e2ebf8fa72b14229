"""Rule tables of the task API: the task spec (target, input document, deadlines, labels, delays,
retry policy, webhook) and SubmitTask, BatchSubmitTasks, GetTask, ListTasks, CancelTask, the watch
streams and GetQueueStats.
"""

from __future__ import annotations

import json
from typing import Any

from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.message import Message

from conveyor.tasks.v1 import (
    task_pb2,
)
from conveyor_common import limits
from conveyor_gateway.validation.checks import (
    LABEL_KEY_RE,
    MAX_FILTER_VALUES,
    MAX_WEBHOOK_EVENTS,
    Check,
    Ctx,
    Table,
    _field,
    _timestamp_ok,
    enum_value,
    int_range,
    nested,
    page_size,
    page_token,
    reason,
    ref,
    repeated_enum,
    request_id,
    spec_input,
    spec_target,
    target_ref_problem,
    task_id,
    timestamp,
    validate,
)


def spec_queue_deadline(msg: Message, path: str, ctx: Ctx) -> None:
    """In the future, at most ``max_queue_deadline_seconds`` away."""
    spec: Any = msg
    if not spec.HasField("queue_deadline"):
        return
    ts: timestamp_pb2.Timestamp = spec.queue_deadline
    if not _timestamp_ok(ts, path, ctx):
        return
    at = ts.seconds + ts.nanos / 1e9
    if at <= ctx.now:
        ctx.bad(path, "must be in the future")
    elif at > ctx.now + ctx.limits.max_queue_deadline_seconds:
        ctx.bad(path, f"must be at most {ctx.limits.max_queue_deadline_seconds} s from now")


def spec_run_timeout(msg: Message, path: str, ctx: Ctx) -> None:
    """Between 1 s and ``max_run_timeout_seconds``."""
    spec: Any = msg
    if not spec.HasField("run_timeout"):
        return
    d: duration_pb2.Duration = spec.run_timeout
    if not -999_999_999 <= d.nanos <= 999_999_999 or (d.seconds < 0 < d.nanos):
        ctx.bad(path, "is not a valid duration")
        return
    seconds = d.seconds + d.nanos / 1e9
    if not 1 <= seconds <= ctx.limits.max_run_timeout_seconds:
        ctx.bad(path, f"must be between 1 s and {ctx.limits.max_run_timeout_seconds} s")


def spec_labels(msg: Message, path: str, ctx: Ctx) -> None:
    """Count and size of labels."""
    spec: Any = msg
    labels = spec.labels
    limits = ctx.limits
    if len(labels) > limits.max_labels:
        ctx.bad(path, f"at most {limits.max_labels} labels")
        return
    for key in sorted(labels):
        value = labels[key]
        key_path = f"{path}[{json.dumps(key)}]"
        if not key or len(key) > limits.max_label_key_length or not LABEL_KEY_RE.match(key):
            ctx.bad(
                key_path,
                f"label keys are 1-{limits.max_label_key_length} characters of letters, digits and ._/-",
            )
        elif len(value) > limits.max_label_value_length:
            ctx.bad(
                key_path, f"label values are at most {limits.max_label_value_length} characters"
            )
        elif any(ord(c) < 32 for c in value):
            ctx.bad(key_path, "label values must not contain control characters")


def spec_not_before(msg: Message, path: str, ctx: Ctx) -> None:
    """A delayed task: at most ``max_queue_deadline_seconds`` away, before its queue deadline, and
    not together with ``delay``."""
    spec: Any = msg
    if not spec.HasField("not_before"):
        return
    ts: timestamp_pb2.Timestamp = spec.not_before
    if not _timestamp_ok(ts, path, ctx):
        return
    if spec.HasField("delay"):
        ctx.bad(path, "set not_before or delay, not both")
    at = ts.seconds + ts.nanos / 1e9
    if at > ctx.now + ctx.limits.max_queue_deadline_seconds:
        ctx.bad(path, f"must be at most {ctx.limits.max_queue_deadline_seconds} s from now")
    if spec.HasField("queue_deadline"):
        d = spec.queue_deadline
        if (d.seconds, d.nanos) <= (ts.seconds, ts.nanos):
            ctx.bad(path, "must be before queue_deadline")


def _seconds(d: duration_pb2.Duration) -> float | None:
    if not -999_999_999 <= d.nanos <= 999_999_999 or (d.seconds < 0 < d.nanos):
        return None
    return d.seconds + d.nanos / 1e9


def spec_delay(msg: Message, path: str, ctx: Ctx) -> None:
    """0 to ``max_queue_deadline_seconds``."""
    spec: Any = msg
    if not spec.HasField("delay"):
        return
    seconds = _seconds(spec.delay)
    if seconds is None or not 0 <= seconds <= ctx.limits.max_queue_deadline_seconds:
        ctx.bad(path, f"must be between 0 and {ctx.limits.max_queue_deadline_seconds} s")


def spec_retry_policy(msg: Message, path: str, ctx: Ctx) -> None:
    """A known backoff, a delay of 0.1 s to 24 h, an exponential cap not below the delay."""
    spec: Any = msg
    if not spec.HasField("retry_policy"):
        return
    rp = spec.retry_policy
    if rp.backoff not in (0, 1, 2):
        ctx.bad(f"{path}.backoff", "unknown backoff")
    delay = _seconds(rp.delay) if rp.HasField("delay") else None
    if delay is None or not 0.1 <= delay <= 86_400:
        ctx.bad(f"{path}.delay", "required, between 0.1 s and 24 h")
    if rp.HasField("max_delay"):
        cap = _seconds(rp.max_delay)
        if cap is None or cap > 86_400 or (delay is not None and cap < delay):
            ctx.bad(f"{path}.max_delay", "between delay and 24 h")


def webhook_url(*, required: bool) -> Check:
    """An https URL to a public address."""

    def check(msg: Message, path: str, ctx: Ctx) -> None:
        value: str = getattr(msg, _field(path))
        if not value:
            if required:
                ctx.bad(path, "is required")
            return
        ctx.url(path, value)

    return check


TASK_WEBHOOK: Table = {
    "url": [webhook_url(required=True)],
    "events": [repeated_enum(task_pb2.TaskEventType, MAX_WEBHOOK_EVENTS)],
}


TASK_SPEC: Table = {
    "kind": [enum_value(task_pb2.TaskKind, allow_unspecified=False)],
    "target": [spec_target],
    "input": [spec_input],
    "priority": [enum_value(task_pb2.Priority)],
    "queue_deadline": [spec_queue_deadline],
    "run_timeout": [spec_run_timeout],
    "max_attempts": [int_range(0, limits.MAX_ATTEMPTS_CEILING)],
    "labels": [spec_labels],
    "webhook": [nested(TASK_WEBHOOK)],
    "not_before": [spec_not_before],
    "delay": [spec_delay],
    "retry_policy": [spec_retry_policy],
}


SUBMIT: Table = {
    "request_id": [request_id(required=True)],
    "spec": [nested(TASK_SPEC, required=True)],
}


def batch_items(msg: Message, path: str, ctx: Ctx) -> None:
    """1..max_batch_items items, each a valid submit, request ids unique in the batch."""
    req: Any = msg
    items = req.items
    if not items:
        ctx.bad(path, "at least one item is required")
        return
    if len(items) > ctx.limits.max_batch_items:
        ctx.bad(path, f"at most {ctx.limits.max_batch_items} items per batch")
        return
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        item_path = f"{path}[{i}]"
        validate(item, SUBMIT, ctx, item_path)
        rid = item.request_id
        if rid:
            if rid in seen:
                ctx.bad(f"{item_path}.request_id", f"duplicates items[{seen[rid]}].request_id")
            else:
                seen[rid] = i


BATCH_SUBMIT: Table = {
    "request_id": [request_id(required=False)],
    "items": [batch_items],
}


GET_TASK: Table = {"task_id": [task_id()]}


def created_range(msg: Message, path: str, ctx: Ctx) -> None:
    """created_after before created_before when both are set."""
    flt: Any = msg
    if flt.HasField("created_after") and flt.HasField("created_before"):
        a, b = flt.created_after, flt.created_before
        if (a.seconds, a.nanos) >= (b.seconds, b.nanos):
            ctx.bad(path, "must be before filter.created_before")


TASK_FILTER: Table = {
    "statuses": [repeated_enum(task_pb2.TaskStatus, MAX_FILTER_VALUES)],
    "kinds": [repeated_enum(task_pb2.TaskKind, MAX_FILTER_VALUES)],
    "model": [ref(target_ref_problem, required=False)],
    "created_after": [timestamp(), created_range],
    "created_before": [timestamp()],
}


LIST_TASKS: Table = {
    "filter": [nested(TASK_FILTER)],
    "page_size": [page_size],
    "page_token": [page_token],
}


CANCEL_TASK: Table = {
    "request_id": [request_id(required=False)],
    "task_id": [task_id()],
    "reason": [reason],
}


WATCH_TASK: Table = {
    "task_id": [task_id()],
    "after_sequence": [int_range(0, 2**62)],
}


WATCH_TASKS: Table = {"types": [repeated_enum(task_pb2.TaskEventType, MAX_FILTER_VALUES)]}


QUEUE_STATS: Table = {
    "kind": [enum_value(task_pb2.TaskKind)],
    "model": [ref(target_ref_problem, required=False)],
}
