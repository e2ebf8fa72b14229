"""The building blocks of request validation: identifier formats and model references, the limits,
the validation context (violations and URLs to resolve), and the check builders every rule table is
made of (strings, enums, ranges, timestamps, nested tables, ids, page tokens).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import struct_pb2, timestamp_pb2
from google.protobuf.message import Message

from conveyor_common.errors import FieldViolation
from conveyor_common.ssrf import Target, UrlPolicy, UrlRefused
from conveyor_gateway.auth import TENANT_ID_RE

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


def group_event_types(msg: Message, path: str, ctx: Ctx) -> None:
    """Group event types a webhook receives: defined, not CHILD (a child's events are task
    events), no repeats."""
    from conveyor.tasks.v1 import group_pb2

    values: Any = getattr(msg, _field(path))
    known = set(group_pb2.GroupEventType.values()) - {0}
    if len(values) > len(known):
        ctx.bad(path, f"at most {len(known)} values")
        return
    for i, value in enumerate(values):
        if value == group_pb2.GROUP_EVENT_TYPE_CHILD:
            ctx.bad(f"{path}[{i}]", "a child's events are task events: subscribe to them in events")
        elif value not in known:
            ctx.bad(f"{path}[{i}]", f"unknown value {value}")
    if len(set(values)) != len(values):
        ctx.bad(path, "duplicate values")


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
