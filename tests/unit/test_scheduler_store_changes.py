"""conveyor_scheduler.store.changes: the outbox's hand-assembled TaskStateChanged bytes equal
protobuf's own serialization.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from conveyor.events.v1 import events_pb2
from conveyor.tasks.v1 import task_pb2
from conveyor_common.ids import uuid7
from conveyor_scheduler.store.bulk import _params
from conveyor_scheduler.store.changes import state_changed_bytes


@pytest.mark.parametrize("size", [0, 1, 127, 128, 300, 16_383, 16_384, 70_000])
@pytest.mark.parametrize("previous", [0, 1, 3, 8])
def test_state_changed_bytes_equal_the_protobuf_serialization(size: int, previous: int) -> None:
    event = task_pb2.TaskEvent(
        event_id=str(uuid.uuid4()), task_id="t", sequence=7, type=task_pb2.TASK_EVENT_TYPE_SUCCEEDED
    )
    event.task.spec.input.update({"prompt": "x" * size})
    payload = event.SerializeToString()
    expected = events_pb2.TaskStateChanged(previous_status=previous)  # type: ignore[arg-type]
    expected.event.CopyFrom(event)
    got = state_changed_bytes(payload, previous)
    assert got == expected.SerializeToString()
    assert events_pb2.TaskStateChanged.FromString(got) == expected


def test_shared_jsonb_values_are_dumped_once_and_equal() -> None:
    shared: dict[str, Any] = {"ce_time": "2026-11-23T00:00:00Z", "traceparent": None}
    rows: list[dict[str, Any]] = [{"h": shared}, {"h": shared}, {"h": {"other": 1}}]
    assert _params(rows, {"h": "jsonb"}, "p_") == {
        "p_h": ['{"ce_time": "2026-11-23T00:00:00Z", "traceparent": null}'] * 2 + ['{"other": 1}']
    }


def test_uuid7_is_time_ordered_and_version_7() -> None:
    ids = [uuid7() for _ in range(2000)]
    assert all(i.version == 7 for i in ids)
    assert len(set(ids)) == 2000
    prefixes = [i.int >> 80 for i in ids]  # the millisecond timestamps never go back
    assert prefixes == sorted(prefixes)
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    assert abs(prefixes[-1] - now_ms) < 5_000


def test_struct_to_dict_is_message_to_dict() -> None:
    from google.protobuf import json_format, struct_pb2

    from conveyor_scheduler.store.convert import struct_to_dict

    s = struct_pb2.Struct()
    s.update(
        {
            "prompt": "a cat",
            "steps": 30,
            "ratio": 0.5,
            "flag": True,
            "none": None,
            "nested": {"list": [1, "two", {"three": [3.5, False, None]}], "empty": {}},
            "empty_list": [],
        }
    )
    assert struct_to_dict(s) == json_format.MessageToDict(s)
    s["bad"] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        struct_to_dict(s)


def test_a_new_tasks_snapshot_is_the_task_its_row_gives() -> None:
    """The submit paths answer with the SUBMITTED event's Task: it must equal task_proto(row)."""
    from conveyor_common.vocabulary import EV_SUBMITTED
    from conveyor_scheduler.admission.submit import NewTask, fingerprint, new_task_row
    from conveyor_scheduler.dispatch.policy import Policy
    from conveyor_scheduler.settings import SchedulerSettings
    from conveyor_scheduler.store.changes import Changes
    from conveyor_scheduler.store.convert import SNAPSHOT, task_proto

    settings = SchedulerSettings(database_url="postgresql://unused@127.0.0.1/unused")  # type: ignore[arg-type]
    spec = task_pb2.TaskSpec(
        kind=task_pb2.TASK_KIND_VIDEO, model="acme/vid:v1", priority=task_pb2.PRIORITY_HIGH
    )
    spec.input.update({"prompt": "waves", "frames": [1, 2, 3]})
    spec.labels["team"] = "a"
    spec.webhook.url = "https://hooks.example.com/x"
    spec.webhook.events.append(task_pb2.TASK_EVENT_TYPE_SUCCEEDED)
    now = datetime.now(UTC)
    row = new_task_row(
        uuid7(), "acme", NewTask("r-1", spec, fingerprint(spec)), 2,
        Policy.from_settings(settings), settings, now,
    )  # fmt: skip
    row["last_sequence"] = 0
    changes = Changes(now=now)
    row[SNAPSHOT] = changes.event(row, EV_SUBMITTED, 0).task
    snapshot = task_proto(row)
    del row[SNAPSHOT]
    assert snapshot == task_proto(row)
    assert snapshot.spec.input == spec.input
    assert snapshot.last_sequence == 1
