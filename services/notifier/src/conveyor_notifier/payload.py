"""The JSON body of a client webhook (Standard Webhooks' recommended ``type``/``timestamp``/``data``).

::

    {"type": "task.succeeded", "timestamp": "2026-01-01T00:00:00Z",
     "data": {"event_id": "...", "task_id": "...", "tenant_id": "...", "sequence": 5,
              "task": {...the task snapshot, protobuf JSON with proto field names...}}}

Rendering is deterministic: a retried delivery carries the same bytes (only ``webhook-timestamp``
and the signature change per attempt).
"""

from __future__ import annotations

import json

from google.protobuf import json_format

from conveyor.tasks.v1 import task_pb2

_PREFIX = "TASK_EVENT_TYPE_"


def event_type_name(event_type: int) -> str:
    """``TASK_EVENT_TYPE_SUCCEEDED`` -> ``task.succeeded``."""
    name = task_pb2.TaskEventType.Name(event_type)  # type: ignore[arg-type]
    return "task." + name.removeprefix(_PREFIX).lower()


def render(event: task_pb2.TaskEvent) -> bytes:
    """The body bytes of ``event``."""
    timestamp = event.occurred_at.ToJsonString() if event.HasField("occurred_at") else None
    document = {
        "type": event_type_name(event.type),
        "timestamp": timestamp,
        "data": {
            "event_id": event.event_id,
            "task_id": event.task_id,
            "tenant_id": event.tenant_id,
            "sequence": event.sequence,
            "task": json_format.MessageToDict(event.task, preserving_proto_field_name=True),
        },
    }
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()
