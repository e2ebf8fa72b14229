"""The JSON body of a client webhook (Standard Webhooks' recommended ``type``/``timestamp``/``data``).

::

    {"type": "task.succeeded", "timestamp": "2026-01-01T00:00:00Z",
     "data": {"event_id": "...", "task_id": "...", "tenant_id": "...", "sequence": 5,
              "task": {...the task snapshot, protobuf JSON with proto field names...}}}

A group event (a group's endpoint, or a tenant endpoint subscribed to group events)::

    {"type": "group.completed", "timestamp": "...",
     "data": {"event_id": "...", "group_id": "...", "tenant_id": "...", "sequence": 14,
              "group": {...the group snapshot...},
              "outputs": [{"index": 0, "task_id": "...", "status": "TASK_STATUS_SUCCEEDED",
                           "result": {...}}, ...]}}

Rendering is deterministic: a retried delivery carries the same bytes (only ``webhook-timestamp``
and the signature change per attempt).
"""

from __future__ import annotations

import json

from google.protobuf import json_format

from conveyor.tasks.v1 import group_pb2, task_pb2

_PREFIX = "TASK_EVENT_TYPE_"
_GROUP_PREFIX = "GROUP_EVENT_TYPE_"


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


def group_event_type_name(event_type: int) -> str:
    """``GROUP_EVENT_TYPE_COMPLETED`` -> ``group.completed``."""
    name = group_pb2.GroupEventType.Name(event_type)  # type: ignore[arg-type]
    return "group." + name.removeprefix(_GROUP_PREFIX).lower()


def render_group(event: group_pb2.GroupEvent) -> bytes:
    """The body bytes of a group event (COMPLETED carries every child's outcome)."""
    timestamp = event.occurred_at.ToJsonString() if event.HasField("occurred_at") else None
    data: dict[str, object] = {
        "event_id": event.event_id,
        "group_id": event.group_id,
        "tenant_id": event.tenant_id,
        "sequence": event.sequence,
        "group": json_format.MessageToDict(event.group, preserving_proto_field_name=True),
    }
    if event.type == group_pb2.GROUP_EVENT_TYPE_COMPLETED:
        data["outputs"] = [
            json_format.MessageToDict(o, preserving_proto_field_name=True) for o in event.outputs
        ]
    document = {"type": group_event_type_name(event.type), "timestamp": timestamp, "data": data}
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()
