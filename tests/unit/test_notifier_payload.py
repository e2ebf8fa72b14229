"""Webhook body rendering and Standard Webhooks signing as the delivery worker does it."""

from __future__ import annotations

import json

from conveyor.tasks.v1 import group_pb2, task_pb2
from conveyor_common.standard_webhooks import WebhookVerifier, generate_secret, sign_headers
from conveyor_notifier.payload import event_type_name, group_event_type_name, render, render_group


def test_event_type_names() -> None:
    assert event_type_name(task_pb2.TASK_EVENT_TYPE_SUCCEEDED) == "task.succeeded"
    assert event_type_name(task_pb2.TASK_EVENT_TYPE_RETRY_SCHEDULED) == "task.retry_scheduled"


def test_body_is_deterministic_and_carries_the_snapshot() -> None:
    event = task_pb2.TaskEvent(
        event_id="e1",
        task_id="t1",
        tenant_id="acme",
        sequence=3,
        type=task_pb2.TASK_EVENT_TYPE_PROGRESS,
        task=task_pb2.Task(task_id="t1", status=task_pb2.TASK_STATUS_RUNNING, progress=40),
    )
    event.occurred_at.FromSeconds(1_767_225_600)
    body = render(event)
    assert body == render(event)
    document = json.loads(body)
    assert document["type"] == "task.progress"
    assert document["timestamp"] == "2026-01-01T00:00:00Z"
    assert document["data"]["sequence"] == 3
    assert document["data"]["task"] == {
        "task_id": "t1",
        "status": "TASK_STATUS_RUNNING",
        "progress": 40,
    }


def test_signatures_verify_with_each_secret_in_force() -> None:
    old, new = generate_secret(), generate_secret()
    body = render(task_pb2.TaskEvent(event_id="e", task_id="t", tenant_id="x", sequence=1))
    headers = sign_headers([new, old], body, msg_id="delivery-1")
    assert headers["webhook-id"] == "delivery-1"
    assert len(headers["webhook-signature"].split()) == 2
    WebhookVerifier([old]).verify(headers, body)
    WebhookVerifier([new]).verify(headers, body)


def test_group_completed_body_carries_every_childs_outcome() -> None:
    assert group_event_type_name(group_pb2.GROUP_EVENT_TYPE_COMPLETED) == "group.completed"
    assert (
        group_event_type_name(group_pb2.GROUP_EVENT_TYPE_CANCEL_REQUESTED)
        == "group.cancel_requested"
    )
    event = group_pb2.GroupEvent(
        event_id="g-e",
        group_id="g1",
        tenant_id="acme",
        sequence=9,
        type=group_pb2.GROUP_EVENT_TYPE_COMPLETED,
        group=group_pb2.Group(group_id="g1", status=group_pb2.GROUP_STATUS_PARTIALLY_FAILED),
    )
    event.occurred_at.FromSeconds(1_767_225_600)
    ok = event.outputs.add(index=0, task_id="c0", status=task_pb2.TASK_STATUS_SUCCEEDED)
    ok.result.files.add(url="https://cdn.example/c0.png")
    event.outputs.add(
        index=1, task_id="c1", status=task_pb2.TASK_STATUS_FAILED
    ).error.message = "nsfw"
    body = render_group(event)
    assert body == render_group(event)
    document = json.loads(body)
    assert document["type"] == "group.completed"
    assert document["timestamp"] == "2026-01-01T00:00:00Z"
    data = document["data"]
    assert (data["group_id"], data["tenant_id"], data["sequence"]) == ("g1", "acme", 9)
    assert data["group"]["status"] == "GROUP_STATUS_PARTIALLY_FAILED"
    assert [o["task_id"] for o in data["outputs"]] == ["c0", "c1"]
    assert data["outputs"][0]["result"]["files"] == [{"url": "https://cdn.example/c0.png"}]
    assert data["outputs"][1]["error"]["message"] == "nsfw"
    # Other group events carry the snapshot only.
    event.type = group_pb2.GROUP_EVENT_TYPE_CANCEL_REQUESTED
    assert "outputs" not in json.loads(render_group(event))["data"]
