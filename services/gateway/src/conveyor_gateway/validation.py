"""Declarative request validation: one rule table per message, plus semantic checks.

A rule table maps a field name to the checks of that field; nested messages refer to their own table,
so every violation names its full path (``spec.input``, ``items[3].spec.model``,
``spec.labels["env"]``). :meth:`Validator.check` collects *every* violation of a request (nothing stops
at the first) and raises :class:`~conveyor_common.errors.InvalidArgument` with a BadRequest listing them
all; a request with violations is never forwarded.

Semantic checks: model and deployment reference formats, the serialized size of ``spec.input``,
priorities and deadlines in range, label limits, batch size, and URLs. Any string in ``spec.input`` that
looks like a URL, and every webhook URL, goes through the shared SSRF policy of
:mod:`conveyor_common.ssrf` (the scheduler and the notifier apply the same one): https only, no
userinfo or ambiguous IP spellings, and every address the host resolves to must be public (loopback,
private, link-local/cloud metadata, CGNAT, multicast, reserved, mapped... are refused). Resolution runs
after the syntax checks, concurrently, in the resolver's thread pool, with a time limit.
``url_allowed_hosts`` (host names, addresses or CIDRs) exempts hosts in tests and local runs.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2
from google.protobuf.message import Message

from conveyor.tasks.v1 import (
    admin_service_pb2 as admin_pb2,
)
from conveyor.tasks.v1 import (
    task_pb2,
)
from conveyor.tasks.v1 import (
    task_service_pb2 as svc_pb2,
)
from conveyor.tasks.v1 import (
    webhook_service_pb2 as hook_pb2,
)
from conveyor_common import limits
from conveyor_common.errors import FieldViolation, InvalidArgument, Unavailable
from conveyor_common.ssrf import RefusalReason, Target, UrlPolicy, UrlRefused
from conveyor_common.textcheck import JsonBounds, merge_violations, text_violations
from conveyor_gateway.auth import TENANT_ID_RE

# ---------------------------------------------------------------------------------------------
# Formats

_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,98}[A-Za-z0-9])?"
MODEL_RE = re.compile(rf"^(?P<owner>{_NAME})/(?P<name>{_NAME})(?::(?P<version>[^:]+))?$")
DEPLOYMENT_RE = re.compile(rf"^{_NAME}/{_NAME}$")
VERSION_ID_RE = re.compile(r"^[0-9a-f]{64}$")
VERSION_TAG_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,30}[A-Za-z0-9])?$")
UUID_RE = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
OPAQUE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
URL_LIKE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]{0,30}://")

MAX_INPUT_DEPTH = 32
MAX_REASON_LENGTH = 1000
MAX_PAGE_TOKEN_LENGTH = 2048
MAX_WEBHOOK_EVENTS = 32
MAX_FILTER_VALUES = 32
MAX_BULK_TASK_IDS = 10_000
MAX_URLS_PER_REQUEST = 64
DNS_RETRY_SECONDS = 5.0
"""RetryInfo of a submit whose webhook host could not be resolved for now."""
TIMESTAMP_MIN = -62135596800  # 0001-01-01T00:00:00Z
TIMESTAMP_MAX = 253402300799  # 9999-12-31T23:59:59Z


def model_ref_problem(value: str) -> str | None:
    """Why ``value`` is not a model reference, or None."""
    match = MODEL_RE.match(value)
    if match is None:
        return "must be 'owner/name' or 'owner/name:version'"
    version = match.group("version")
    if version is not None and not (VERSION_ID_RE.match(version) or VERSION_TAG_RE.match(version)):
        return "version must be a 64-hex version id or a short tag"
    return None


def deployment_ref_problem(value: str) -> str | None:
    """Why ``value`` is not a deployment reference, or None."""
    return None if DEPLOYMENT_RE.match(value) else "must be 'owner/name'"


def target_ref_problem(value: str) -> str | None:
    """Model or deployment reference (as used in filters, stats and pause)."""
    return model_ref_problem(value)


# ---------------------------------------------------------------------------------------------
# URL policy


# ---------------------------------------------------------------------------------------------
# Rule tables


@dataclass(frozen=True)
class Limits:
    """Configurable limits used by the rules."""

    max_input_bytes: int = 256 * 1024
    max_batch_items: int = 100
    max_group_children: int = 1000
    max_queue_deadline_seconds: int = 7 * 24 * 3600
    max_run_timeout_seconds: int = 6 * 3600
    max_labels: int = 32
    max_label_key_length: int = 63
    max_label_value_length: int = 256
    max_input_depth: int = 20
    max_input_nodes: int = 10_000


@dataclass
class Ctx:
    """State of one validation: limits, the clock, violations, URLs to resolve."""

    limits: Limits
    now: float
    violations: list[FieldViolation] = field(default_factory=list)
    urls: list[tuple[str, Target]] = field(default_factory=list)
    url_policy: UrlPolicy = field(default_factory=UrlPolicy)

    def bad(self, path: str, description: str) -> None:
        """Record a violation."""
        self.violations.append(FieldViolation(field=path, description=description))

    def url(self, path: str, value: str) -> None:
        """Check a URL's syntax now and queue its host for resolution."""
        try:
            target = self.url_policy.syntax(value)
        except UrlRefused as exc:
            self.bad(path, exc.message)
            return
        if len(self.urls) >= MAX_URLS_PER_REQUEST:
            self.bad(path, f"at most {MAX_URLS_PER_REQUEST} URLs per request")
        else:
            self.urls.append((path, target))


Check = Callable[[Message, str, Ctx], None]
"""A check of one field: (message, path of the field, ctx)."""
Table = dict[str, list[Check]]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def validate(message: Message, table: Table, ctx: Ctx, prefix: str = "") -> None:
    """Run every check of ``table`` on ``message``."""
    for name, checks in table.items():
        path = _join(prefix, name)
        for check in checks:
            check(message, path, ctx)


def _field(name: str) -> str:
    return name.rsplit(".", 1)[-1]


# -- generic checks ------------------------------------------------------------------------------


def required_string(max_len: int, pattern: re.Pattern[str] | None = None, what: str = "") -> Check:
    """A non-empty string of at most ``max_len`` characters (matching ``pattern``)."""

    def check(msg: Message, path: str, ctx: Ctx) -> None:
        value: str = getattr(msg, _field(path))
        if not value:
            ctx.bad(path, "is required")
        else:
            _string(value, path, ctx, max_len, pattern, what)

    return check


def optional_string(max_len: int, pattern: re.Pattern[str] | None = None, what: str = "") -> Check:
    """An optional string (empty = unset) with the same rules as :func:`required_string`."""

    def check(msg: Message, path: str, ctx: Ctx) -> None:
        value: str = getattr(msg, _field(path))
        if value:
            _string(value, path, ctx, max_len, pattern, what)

    return check


def _string(
    value: str, path: str, ctx: Ctx, max_len: int, pattern: re.Pattern[str] | None, what: str
) -> None:
    if len(value) > max_len:
        ctx.bad(path, f"must be at most {max_len} characters")
    elif pattern is not None and not pattern.match(value):
        ctx.bad(path, f"must be {what}" if what else "has an invalid format")
    elif pattern is None and any(ord(c) < 32 and c not in "\t\n" for c in value):
        ctx.bad(path, "must not contain control characters")


def ref(problem: Callable[[str], str | None], *, required: bool) -> Check:
    """A model/deployment reference."""

    def check(msg: Message, path: str, ctx: Ctx) -> None:
        value: str = getattr(msg, _field(path))
        if not value:
            if required:
                ctx.bad(path, "is required")
            return
        if len(value) > 256:
            ctx.bad(path, "must be at most 256 characters")
            return
        reason = problem(value)
        if reason is not None:
            ctx.bad(path, reason)

    return check


def enum_value(
    enum: Any, *, allow_unspecified: bool = True, required_name: str | None = None
) -> Check:
    """A defined value of ``enum`` (proto3 enums are open: unknown numbers must be refused)."""
    known = set(enum.values())

    def check(msg: Message, path: str, ctx: Ctx) -> None:
        value: int = getattr(msg, _field(path))
        if value not in known:
            ctx.bad(path, f"unknown value {value}")
        elif value == 0 and not allow_unspecified:
            ctx.bad(path, "is required" if required_name is None else required_name)

    return check


def repeated_enum(enum: Any, max_items: int, *, allow_unspecified: bool = False) -> Check:
    """A list of defined enum values, each named in its violation."""
    known = set(enum.values())

    def check(msg: Message, path: str, ctx: Ctx) -> None:
        values: Any = getattr(msg, _field(path))
        if len(values) > max_items:
            ctx.bad(path, f"at most {max_items} values")
            return
        for i, value in enumerate(values):
            if value not in known or (value == 0 and not allow_unspecified):
                ctx.bad(f"{path}[{i}]", f"unknown value {value}")

    return check


def int_range(lo: int, hi: int) -> Check:
    """An integer in [lo, hi]."""

    def check(msg: Message, path: str, ctx: Ctx) -> None:
        value: int = getattr(msg, _field(path))
        if not lo <= value <= hi:
            ctx.bad(path, f"must be between {lo} and {hi}")

    return check


def float_range(lo: float, hi: float) -> Check:
    """A finite float in [lo, hi]."""

    def check(msg: Message, path: str, ctx: Ctx) -> None:
        value: float = getattr(msg, _field(path))
        if not math.isfinite(value) or not lo <= value <= hi:
            ctx.bad(path, f"must be between {lo:g} and {hi:g}")

    return check


def nested(table: Table, *, required: bool = False) -> Check:
    """A sub-message validated with its own table."""

    def check(msg: Message, path: str, ctx: Ctx) -> None:
        name = _field(path)
        if not msg.HasField(name):
            if required:
                ctx.bad(path, "is required")
            return
        validate(getattr(msg, name), table, ctx, path)

    return check


def timestamp(*, required: bool = False) -> Check:
    """A well-formed Timestamp."""

    def check(msg: Message, path: str, ctx: Ctx) -> None:
        name = _field(path)
        if not msg.HasField(name):
            if required:
                ctx.bad(path, "is required")
            return
        _timestamp_ok(getattr(msg, name), path, ctx)

    return check


def _timestamp_ok(ts: timestamp_pb2.Timestamp, path: str, ctx: Ctx) -> bool:
    if not TIMESTAMP_MIN <= ts.seconds <= TIMESTAMP_MAX or not 0 <= ts.nanos <= 999_999_999:
        ctx.bad(path, "is not a valid timestamp")
        return False
    return True


def task_id(*, required: bool = True) -> Check:
    """A task id (UUID)."""
    return (required_string if required else optional_string)(36, UUID_RE, "a UUID")


def request_id(*, required: bool) -> Check:
    """A client idempotency key."""
    what = "1-128 characters of letters, digits and ._:-"
    return (required_string if required else optional_string)(128, REQUEST_ID_RE, what)


def tenant_id(*, required: bool) -> Check:
    """A tenant id."""
    what = "1-64 characters of letters, digits and ._-"
    return (required_string if required else optional_string)(64, TENANT_ID_RE, what)


def page_size(msg: Message, path: str, ctx: Ctx) -> None:
    """Page size 0-500."""
    int_range(0, 500)(msg, path, ctx)


def page_token(msg: Message, path: str, ctx: Ctx) -> None:
    """An opaque cursor of bounded length."""
    optional_string(MAX_PAGE_TOKEN_LENGTH)(msg, path, ctx)


def reason(msg: Message, path: str, ctx: Ctx) -> None:
    """A free-text reason."""
    optional_string(MAX_REASON_LENGTH)(msg, path, ctx)


# -- task spec checks ----------------------------------------------------------------------------


def spec_target(msg: Message, path: str, ctx: Ctx) -> None:
    """Exactly one of model/deployment, each in its format."""
    spec: Any = msg
    which = spec.WhichOneof("target")
    prefix = path.rsplit(".", 1)[0] if "." in path else ""
    if which is None:
        ctx.bad(_join(prefix, "model"), "model or deployment is required")
    elif which == "model":
        ref(model_ref_problem, required=True)(msg, _join(prefix, "model"), ctx)
    else:
        ref(deployment_ref_problem, required=True)(msg, _join(prefix, "deployment"), ctx)


def spec_input(msg: Message, path: str, ctx: Ctx) -> None:
    """Size and depth of the input document; URLs inside it."""
    spec: Any = msg
    if not spec.HasField("input"):
        return
    doc: struct_pb2.Struct = spec.input
    size = doc.ByteSize()
    if size > ctx.limits.max_input_bytes:
        ctx.bad(path, f"input document is {size} bytes; the limit is {ctx.limits.max_input_bytes}")
        return
    for sub_path, value in _walk_struct(doc, path, 0, ctx):
        if URL_LIKE_RE.match(value):
            ctx.url(sub_path, value)


def _walk_struct(
    doc: struct_pb2.Struct, path: str, depth: int, ctx: Ctx
) -> Iterator[tuple[str, str]]:
    if depth > MAX_INPUT_DEPTH:
        ctx.bad(path, f"nested deeper than {MAX_INPUT_DEPTH} levels")
        return
    for key, value in doc.fields.items():
        yield from _walk_value(
            value,
            f"{path}.{key}" if _SIMPLE_KEY.match(key) else f"{path}[{json.dumps(key)}]",
            depth + 1,
            ctx,
        )


_SIMPLE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _walk_value(
    value: struct_pb2.Value, path: str, depth: int, ctx: Ctx
) -> Iterator[tuple[str, str]]:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        yield path, value.string_value
    elif kind == "number_value":
        if not math.isfinite(value.number_value):
            ctx.bad(path, "numbers must be finite")
    elif kind == "struct_value":
        yield from _walk_struct(value.struct_value, path, depth, ctx)
    elif kind == "list_value":
        if depth > MAX_INPUT_DEPTH:
            ctx.bad(path, f"nested deeper than {MAX_INPUT_DEPTH} levels")
            return
        for i, item in enumerate(value.list_value.values):
            yield from _walk_value(item, f"{path}[{i}]", depth + 1, ctx)


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

# -- admin ---------------------------------------------------------------------------------------

TENANT_LIMITS: Table = {
    "max_concurrency": [int_range(0, 1_000_000)],
    "max_waiting": [int_range(0, 100_000_000)],
    "submit_rate_per_second": [float_range(0, 1_000_000)],
    "submit_burst": [int_range(0, 10_000_000)],
    "weight": [int_range(0, 1000)],
}

GET_TENANT: Table = {"tenant_id": [tenant_id(required=True)]}

UPSERT_TENANT: Table = {
    "request_id": [request_id(required=False)],
    "tenant_id": [tenant_id(required=True)],
    "tier": [enum_value(task_pb2.Tier)],
    "limits": [nested(TENANT_LIMITS)],
}

PAUSE_MODEL: Table = {
    "request_id": [request_id(required=False)],
    "model": [ref(target_ref_problem, required=True)],
    "reason": [reason],
}

RESUME_MODEL: Table = {
    "request_id": [request_id(required=False)],
    "model": [ref(target_ref_problem, required=True)],
}

LIST_DEAD_LETTERS: Table = {
    "tenant_id": [tenant_id(required=False)],
    "page_size": [page_size],
    "page_token": [page_token],
}


def selector_task_ids(msg: Message, path: str, ctx: Ctx) -> None:
    """Explicit task ids: UUIDs, bounded count."""
    sel: Any = msg
    ids = sel.task_ids
    if len(ids) > MAX_BULK_TASK_IDS:
        ctx.bad(path, f"at most {MAX_BULK_TASK_IDS} task ids")
        return
    for i, value in enumerate(ids):
        if not UUID_RE.match(value):
            ctx.bad(f"{path}[{i}]", "must be a UUID")


def selector_not_empty(msg: Message, path: str, ctx: Ctx) -> None:
    """A bulk selector must select something (never 'every task')."""
    sel: Any = msg
    if not (
        sel.task_ids or sel.tenant_id or sel.model or sel.statuses or sel.HasField("created_before")
    ):
        ctx.bad(path, "select by task_ids, tenant_id, model, statuses or created_before")


BULK_SELECTOR: Table = {
    "task_ids": [selector_task_ids],
    "tenant_id": [tenant_id(required=False)],
    "model": [ref(target_ref_problem, required=False)],
    "statuses": [repeated_enum(task_pb2.TaskStatus, MAX_FILTER_VALUES)],
    "created_before": [timestamp()],
    "limit": [int_range(0, 10_000)],
}

REDRIVE: Table = {
    "request_id": [request_id(required=False)],
    "selector": [nested(BULK_SELECTOR, required=True)],
}


def _bulk_cancel_selector(msg: Message, path: str, ctx: Ctx) -> None:
    req: Any = msg
    if not req.HasField("selector"):
        ctx.bad(path, "is required")
        return
    validate(req.selector, BULK_SELECTOR, ctx, path)
    selector_not_empty(req.selector, path, ctx)


BULK_CANCEL: Table = {
    "request_id": [request_id(required=False)],
    "selector": [_bulk_cancel_selector],
    "reason": [reason],
}

# -- webhooks ------------------------------------------------------------------------------------

CREATE_ENDPOINT: Table = {
    "request_id": [request_id(required=False)],
    "url": [webhook_url(required=True)],
    "events": [repeated_enum(task_pb2.TaskEventType, MAX_WEBHOOK_EVENTS)],
}
LIST_ENDPOINTS: Table = {}
DELETE_ENDPOINT: Table = {
    "request_id": [request_id(required=False)],
    "endpoint_id": [required_string(128, OPAQUE_ID_RE, "an endpoint id")],
}
ROTATE_SECRET: Table = {
    "request_id": [request_id(required=False)],
    "overlap_seconds": [int_range(0, 30 * 24 * 3600)],
}
LIST_DELIVERIES: Table = {
    "task_id": [task_id(required=False)],
    "endpoint_id": [optional_string(128, OPAQUE_ID_RE, "an endpoint id")],
    "page_size": [page_size],
    "page_token": [page_token],
}

TABLES: dict[type[Message], Table] = {
    svc_pb2.SubmitTaskRequest: SUBMIT,
    svc_pb2.BatchSubmitTasksRequest: BATCH_SUBMIT,
    svc_pb2.GetTaskRequest: GET_TASK,
    svc_pb2.ListTasksRequest: LIST_TASKS,
    svc_pb2.CancelTaskRequest: CANCEL_TASK,
    svc_pb2.WatchTaskRequest: WATCH_TASK,
    svc_pb2.WatchTasksRequest: WATCH_TASKS,
    svc_pb2.GetQueueStatsRequest: QUEUE_STATS,
    admin_pb2.GetTenantRequest: GET_TENANT,
    admin_pb2.UpsertTenantRequest: UPSERT_TENANT,
    admin_pb2.PauseModelRequest: PAUSE_MODEL,
    admin_pb2.ResumeModelRequest: RESUME_MODEL,
    admin_pb2.ListDeadLettersRequest: LIST_DEAD_LETTERS,
    admin_pb2.RedriveTasksRequest: REDRIVE,
    admin_pb2.BulkCancelTasksRequest: BULK_CANCEL,
    hook_pb2.CreateWebhookEndpointRequest: CREATE_ENDPOINT,
    hook_pb2.ListWebhookEndpointsRequest: LIST_ENDPOINTS,
    hook_pb2.DeleteWebhookEndpointRequest: DELETE_ENDPOINT,
    hook_pb2.RotateWebhookSecretRequest: ROTATE_SECRET,
    hook_pb2.ListWebhookDeliveriesRequest: LIST_DELIVERIES,
}


class Validator:
    """Validates public requests by their rule table; resolves URL hosts."""

    def __init__(
        self,
        limits: Limits | None = None,
        url_policy: UrlPolicy | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.limits = limits or Limits()
        self.url_policy = url_policy or UrlPolicy()
        self._clock = clock

    def violations(self, request: Message) -> tuple[list[FieldViolation], list[tuple[str, Target]]]:
        """Synchronous checks: the violations and the (path, URL) pairs still to resolve."""
        table = TABLES[type(request)]
        ctx = Ctx(self.limits, self._clock(), url_policy=self.url_policy)
        validate(request, table, ctx)
        bounds = JsonBounds(self.limits.max_input_depth, self.limits.max_input_nodes)
        return merge_violations(text_violations(request, bounds), ctx.violations, ctx.urls)

    async def check(self, request: Message) -> None:
        """Raise InvalidArgument naming every bad field of ``request`` (UNAVAILABLE with RetryInfo
        when a URL's host could not be resolved for now: DNS down or slow, retry later)."""
        violations, urls = self.violations(request)
        if urls:
            outcomes = await asyncio.gather(
                *(self.url_policy.check(t.url) for _, t in urls), return_exceptions=True
            )
            unavailable: list[str] = []
            for (path, _), outcome in zip(urls, outcomes, strict=True):
                if isinstance(outcome, UrlRefused):
                    if outcome.reason is RefusalReason.RESOLVER_UNAVAILABLE:
                        unavailable.append(f"{path}: {outcome.message}")
                    else:
                        violations.append(FieldViolation(field=path, description=outcome.message))
                elif isinstance(outcome, BaseException):
                    raise outcome
            if unavailable and not violations:
                raise Unavailable("; ".join(unavailable), retry_after_seconds=DNS_RETRY_SECONDS)
        if violations:
            raise InvalidArgument(violations)
