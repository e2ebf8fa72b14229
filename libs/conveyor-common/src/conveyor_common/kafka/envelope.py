"""The event envelope: CloudEvents binary mode over Kafka with protobuf values.

Headers: ``ce_specversion`` (1.0), ``ce_id`` (UUID, the consumers' dedup key), ``ce_type`` (the
protobuf message's full name, e.g. ``conveyor.events.v1.DispatchTask``), ``ce_source``
(``/services/<name>``), ``ce_time`` (RFC 3339), ``ce_subject`` (task id), ``content-type``
(``application/protobuf``), ``traceparent`` (W3C). The key is the task id; the value is the
serialized message.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from google.protobuf.message import DecodeError as ProtobufDecodeError
from google.protobuf.message import Message

from conveyor.events.v1 import events_pb2
from conveyor.tasks.v1 import task_pb2
from conveyor_common.context import current_traceparent

SPEC_VERSION = "1.0"
CONTENT_TYPE = "application/protobuf"

Headers = list[tuple[str, bytes]]


class DecodeError(Exception):
    """A record that is not a valid Conveyor event (goes to the dead-letter topic)."""


@dataclass(frozen=True)
class Envelope:
    """A decoded record."""

    id: str
    type: str
    source: str
    subject: str
    time: str
    traceparent: str | None
    key: str
    message: Message
    topic: str = ""
    partition: int = -1
    offset: int = -1


class TypeRegistry:
    """Maps ``ce_type`` names to protobuf message classes."""

    def __init__(self, classes: Iterable[type[Message]] = ()) -> None:
        self._types: dict[str, type[Message]] = {}
        for cls in classes:
            self.register(cls)

    def register(self, cls: type[Message]) -> None:
        """Register a message class under its full name."""
        self._types[cls.DESCRIPTOR.full_name] = cls

    def get(self, name: str) -> type[Message] | None:
        """The class registered for ``name``."""
        return self._types.get(name)


def default_registry() -> TypeRegistry:
    """Every Kafka payload type of conveyor.events.v1."""
    return TypeRegistry(
        [
            events_pb2.TaskStateChanged,
            events_pb2.DispatchTask,
            events_pb2.CancelTask,
            events_pb2.ProviderResult,
            task_pb2.TaskEvent,
        ]
    )


def encode(
    message: Message,
    *,
    source: str,
    key: str,
    event_id: str | None = None,
    time: datetime | None = None,
    traceparent: str | None = None,
) -> tuple[bytes, bytes, Headers]:
    """Key, value and headers of a record carrying ``message``."""
    when = (time or datetime.now(UTC)).isoformat().replace("+00:00", "Z")
    headers: Headers = [
        ("ce_specversion", SPEC_VERSION.encode()),
        ("ce_id", (event_id or str(uuid.uuid4())).encode()),
        ("ce_type", message.DESCRIPTOR.full_name.encode()),
        ("ce_source", source.encode()),
        ("ce_subject", key.encode()),
        ("ce_time", when.encode()),
        ("content-type", CONTENT_TYPE.encode()),
        ("traceparent", (traceparent or current_traceparent()).encode()),
    ]
    return key.encode(), message.SerializeToString(), headers


def header_map(headers: Sequence[tuple[str, Any]] | None) -> dict[str, str]:
    """Headers as a dict of strings (undecodable values are dropped)."""
    out: dict[str, str] = {}
    for name, value in headers or ():
        try:
            out[name] = value.decode() if isinstance(value, bytes | bytearray) else str(value)
        except UnicodeDecodeError:
            continue
    return out


def decode(record: Any, registry: TypeRegistry) -> Envelope:
    """Decode an aiokafka ``ConsumerRecord``; raises :class:`DecodeError` for anything invalid."""
    headers = header_map(record.headers)
    for required in ("ce_id", "ce_type", "ce_specversion"):
        if not headers.get(required):
            raise DecodeError(f"missing header {required}")
    if headers["ce_specversion"] != SPEC_VERSION:
        raise DecodeError(f"unsupported ce_specversion {headers['ce_specversion']!r}")
    content_type = headers.get("content-type", CONTENT_TYPE)
    if content_type != CONTENT_TYPE:
        raise DecodeError(f"unsupported content-type {content_type!r}")
    cls = registry.get(headers["ce_type"])
    if cls is None:
        raise DecodeError(f"unknown ce_type {headers['ce_type']!r}")
    if not isinstance(record.value, bytes | bytearray):
        raise DecodeError("record has no value")
    message = cls()
    try:
        message.ParseFromString(bytes(record.value))
    except (ProtobufDecodeError, RuntimeError, ValueError) as exc:
        raise DecodeError(f"cannot parse {headers['ce_type']}: {exc}") from exc
    key = record.key.decode(errors="replace") if isinstance(record.key, bytes | bytearray) else ""
    return Envelope(
        id=headers["ce_id"],
        type=headers["ce_type"],
        source=headers.get("ce_source", ""),
        subject=headers.get("ce_subject", key),
        time=headers.get("ce_time", ""),
        traceparent=headers.get("traceparent"),
        key=key,
        message=message,
        topic=getattr(record, "topic", ""),
        partition=getattr(record, "partition", -1),
        offset=getattr(record, "offset", -1),
    )
