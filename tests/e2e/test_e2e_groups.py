"""Task groups and delayed tasks end to end: every service a real process (the session system).

A 10-image storyboard group followed on one group watch (aggregate progress, every child's events,
a resumed watch equal to the original's tail) and its fan-in follow-up receiving all ten outputs;
fail-fast and all-settled; a group cancel reaching the provider for every running child (the fake's
ledger); a large group of tenant A while tenant B's single tasks keep their fair share (the fake's
ledger); delayed tasks dispatched on time (the scheduler's dispatched timestamps); a waiting delayed
task canceled; kill -9 of the leader and an adapter during a group leaves the group exact.
"""

from __future__ import annotations

import asyncio
import signal
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest

from conveyor.tasks.v1 import group_pb2, task_pb2
from conveyor_client import AsyncConveyorClient, ConveyorError, build_spec, delayed
from fake_replicate.testing import Delivery, WebhookReceiver
from tests.e2e.harness import E2E, aclose, creates, wait_terminal

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.slow]

G = group_pb2
CHILD = G.GROUP_EVENT_TYPE_CHILD


async def watch_group(
    client: AsyncConveyorClient, group_id: str, *, after: int = 0, within: float = 90.0
) -> list[group_pb2.GroupEvent]:
    """Every event of the group's stream after ``after`` until it ends."""
    async with asyncio.timeout(within):
        return [e async for e in client.watch_group(group_id, after_sequence=after)]


def image(prompt: str, **knobs: Any) -> task_pb2.TaskSpec:
    return build_spec("image", model="e2e/storyboard", input={"prompt": prompt, **knobs})


async def test_storyboard_group_progress_and_fan_in(e2e: E2E) -> None:
    _, client = await e2e.tenant("story", tier="pro", max_concurrency=5)
    seq = await e2e.ledger_seq()
    children = [image(f"shot {i}", __fake_duration_s=1.0) for i in range(10)]
    group = await client.submit_group(
        children,
        follow_up=build_spec("video", model="e2e/storyboard-video", input={"fps": 2}),
        outputs_field="frames",
        labels={"kind": "storyboard"},
    )
    assert len(group.child_task_ids) == 10
    assert group.progress.total == 10
    events = await watch_group(client, group.group_id)

    # One gap-free stream: sequence 1, 2, 3 ... with every child's events and the progress.
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert events[0].type == G.GROUP_EVENT_TYPE_CREATED
    child_events = [e for e in events if e.type == CHILD]
    assert {e.child_event.task_id for e in child_events} == set(group.child_task_ids)
    per_child = {
        t: [e.child_event.sequence for e in child_events if e.child_event.task_id == t]
        for t in group.child_task_ids
    }
    for seqs in per_child.values():
        assert seqs == sorted(seqs)  # a child's events in its own order, none twice
        assert len(seqs) == len(set(seqs))
    done = [e.group.progress.done for e in events]
    assert done == sorted(done)
    assert done[0] == 0
    assert done[-1] == 10
    # "n of 10 done" was observed on the way (children finishing in one transaction share a step).
    assert len({d for d in done if 0 < d < 10}) >= 3, sorted(set(done))
    percents = [e.group.progress.percent for e in events]
    assert any(0 < p < 100 and p != int(p / 10) * 10 for p in percents), percents[:40]
    completed = [e for e in events if e.type == G.GROUP_EVENT_TYPE_COMPLETED]
    assert len(completed) == 1
    assert completed[0].group.status == G.GROUP_STATUS_SUCCEEDED
    outputs = completed[0].outputs
    assert [o.index for o in outputs] == list(range(10))
    assert all(o.status == task_pb2.TASK_STATUS_SUCCEEDED for o in outputs)
    assert events[-1].type == G.GROUP_EVENT_TYPE_FOLLOW_UP_SUBMITTED
    follow_up_id = events[-1].group.follow_up_task_id
    assert follow_up_id

    # A watch resumed mid-way continues with exactly the original's tail.
    middle = len(events) // 2
    assert await watch_group(client, group.group_id, after=middle) == events[middle:]

    # The fan-in follow-up received the ten outputs, in child order.
    final = (await wait_terminal(client, [follow_up_id]))[follow_up_id]
    assert final.status == task_pb2.TASK_STATUS_SUCCEEDED
    [create] = [e for e in await e2e.ledger(seq, kind="create") if str(e["task"]) == follow_up_id]
    frames = create["input"]["frames"]
    assert frames == [o.result.files[0].url for o in outputs]
    assert create["input"]["fps"] == 2
    got = await client.get_group(group.group_id)
    assert got.status == G.GROUP_STATUS_SUCCEEDED
    assert got.progress.done == 10
    assert got.progress.percent == 100.0


async def test_group_completed_webhook_carries_every_childs_output(e2e: E2E) -> None:
    """The group's own webhook and the tenant's endpoint (defaults: terminal task events and
    group.completed) each receive one signed group.completed with every child's outcome; bad
    subscriptions and a private group webhook URL are refused by name."""
    _, client = await e2e.tenant("group-hooks", tier="pro", max_concurrency=5)
    receiver = WebhookReceiver(secrets=[])
    url = await receiver.start()
    try:
        endpoint = await client.create_webhook_endpoint(f"{url}/tenant")
        receiver.secrets.append(endpoint.signing_secret)
        assert list(endpoint.endpoint.group_events) == []
        children = [image(f"panel {i}", __fake_duration_s=0.3) for i in range(3)]
        group = await client.submit_group(children, webhook_url=f"{url}/group")

        def completed(deliveries: list[Delivery]) -> list[Delivery]:
            return [
                d
                for d in deliveries
                if d.payload["type"] == "group.completed"
                and d.payload["data"]["group_id"] == group.group_id
            ]

        await receiver.wait_for(lambda ds: len(completed(ds)) >= 2, within_s=60)
        await asyncio.sleep(0.5)  # a duplicate would show here
        hooks = completed(receiver.deliveries)
        assert sorted(d.path for d in hooks) == ["/group", "/tenant"]
        assert all(d.verified for d in hooks), [d.reject_reason for d in hooks]
        for d in hooks:
            data = d.payload["data"]
            assert data["group"]["status"] == "GROUP_STATUS_SUCCEEDED"
            assert [o["task_id"] for o in data["outputs"]] == list(group.child_task_ids)
            assert all(o["status"] == "TASK_STATUS_SUCCEEDED" for o in data["outputs"])
            assert all(o["result"]["files"][0]["url"] for o in data["outputs"])
        # The tenant endpoint also had each child's terminal task event, and nothing of the group
        # but its completion.
        tenant = [d for d in receiver.deliveries if d.path == "/tenant"]
        assert {
            d.payload["data"].get("task_id")
            for d in tenant
            if d.payload["type"] == "task.succeeded"
        } >= set(group.child_task_ids)
        assert not [d for d in tenant if d.payload["type"].startswith("group.") and d not in hooks]
        log = await client.list_webhook_deliveries(endpoint_id=endpoint.endpoint.endpoint_id)
        [row] = [r for r in log.deliveries if r.group_id == group.group_id]
        assert row.group_event_type == G.GROUP_EVENT_TYPE_COMPLETED
        assert row.task_id == ""

        with pytest.raises(ConveyorError) as bad:
            await client.create_webhook_endpoint(
                f"{url}/child", group_events=[G.GROUP_EVENT_TYPE_CHILD]
            )
        assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in bad.value.field_violations] == ["group_events[0]"]
        with pytest.raises(ConveyorError) as private:
            await client.submit_group(children[:1], webhook_url="https://10.0.0.1/hook")
        assert private.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in private.value.field_violations] == ["spec.webhook.url"]
    finally:
        await receiver.stop()


async def test_fail_fast_and_all_settled(e2e: E2E) -> None:
    _, client = await e2e.tenant("policies", tier="pro", max_concurrency=5)
    seq = await e2e.ledger_seq()
    settled = await client.submit_group(
        [
            image("ok 1", __fake_duration_s=0.3),
            image("broken", __fake_outcome="failed", __fake_duration_s=0.3),
            image("ok 2", __fake_duration_s=0.3),
        ]
    )
    settled_events = await watch_group(client, settled.group_id)
    end = settled_events[-1]
    assert end.type == G.GROUP_EVENT_TYPE_COMPLETED
    assert end.group.status == G.GROUP_STATUS_PARTIALLY_FAILED
    assert [o.status for o in end.outputs] == [
        task_pb2.TASK_STATUS_SUCCEEDED,
        task_pb2.TASK_STATUS_FAILED,
        task_pb2.TASK_STATUS_SUCCEEDED,
    ]

    fast = await client.submit_group(
        [image("broken", __fake_outcome="failed", __fake_duration_s=0.5)]
        + [image(f"slow {i}", __fake_outcome="hang") for i in range(3)],
        fail_fast=True,
    )
    events = await watch_group(client, fast.group_id)
    types = [e.type for e in events]
    assert G.GROUP_EVENT_TYPE_CANCEL_REQUESTED in types
    end = events[-1]
    assert end.group.status == G.GROUP_STATUS_FAILED
    assert end.group.cancel_reason.startswith("fail-fast")
    assert [o.status for o in end.outputs] == [task_pb2.TASK_STATUS_FAILED] + [
        task_pb2.TASK_STATUS_CANCELED
    ] * 3
    # The siblings that ran at the provider were canceled there.
    ledger = await e2e.ledger(seq)
    hung = set(fast.child_task_ids[1:])
    predictions = {
        e["prediction_id"] for e in ledger if e["kind"] == "create" and e["task"] in hung
    }
    canceled = {e["prediction_id"] for e in ledger if e["kind"] == "cancel" and e["by"] == "api"}
    assert predictions <= canceled


async def test_group_cancel_reaches_the_provider_for_every_running_child(e2e: E2E) -> None:
    _, client = await e2e.tenant("gcancel", tier="pro", max_concurrency=4)
    seq = await e2e.ledger_seq()
    group = await client.submit_group([image(f"hang {i}", __fake_outcome="hang") for i in range(6)])
    # Wait (on the group's own stream) until four children run at the provider.
    started: set[str] = set()
    stream = client.watch_group(group.group_id)
    last = 0
    try:
        async with asyncio.timeout(60):
            async for event in stream:
                last = event.sequence
                if (
                    event.type == CHILD
                    and event.child_event.type == task_pb2.TASK_EVENT_TYPE_STARTED
                ):
                    started.add(event.child_event.task_id)
                if len(started) == 4:
                    break
    finally:
        await aclose(stream)
    canceled = await client.cancel_group(group.group_id, reason="storyboard abandoned")
    assert canceled.cancel_requested
    events = await watch_group(client, group.group_id, after=last)
    end = events[-1]
    assert end.type == G.GROUP_EVENT_TYPE_COMPLETED
    assert end.group.status == G.GROUP_STATUS_CANCELED
    assert all(o.status == task_pb2.TASK_STATUS_CANCELED for o in end.outputs)
    ledger = await e2e.ledger(seq)
    by_task = {str(e["task"]): e["prediction_id"] for e in ledger if e["kind"] == "create"}
    assert set(by_task) == started  # the two queued children never reached the provider
    api_cancels = {e["prediction_id"] for e in ledger if e["kind"] == "cancel" and e["by"] == "api"}
    assert set(by_task.values()) <= api_cancels


GROUP_CHILDREN = 300
"""Children of tenant A's big group (the issue's 1,000 takes ~1 min on the 5-slot system; the
fair-share property does not depend on the size once A's backlog outlasts B's tasks)."""


async def test_big_group_does_not_starve_another_tenant(e2e: E2E) -> None:
    _, a = await e2e.tenant("fair-a", tier="pro", max_concurrency=5)
    _, b = await e2e.tenant("fair-b", tier="pro", max_concurrency=5)
    seq = await e2e.ledger_seq()
    # B's single tasks first, A's big group right after: the session ages priorities fast (0.2
    # class steps a second), so B's tasks are never in a lower priority band than A's children
    # and the two tenants share the slots by weighted fair queueing (equal weights).
    b_specs = [image(f"b{i}", __fake_duration_s=0.2) for i in range(20)]
    batch = await b.submit_batch(b_specs)
    b_ids = [t.task_id for t in batch.tasks]
    group = await a.submit_group(
        [image(f"a{i}", __fake_duration_s=0.2) for i in range(GROUP_CHILDREN)]
    )
    await wait_terminal(b, b_ids, within=120)
    order = creates(await e2e.ledger(seq, kind="create"))
    a_set = set(group.child_task_ids)
    window = [t for t in order if t in a_set or t in b_ids]
    last_b = max(window.index(t) for t in b_ids)
    # B holds about half of the slots while both wait, so its 20 tasks are all created within
    # about the first 40 creates; starved behind the group, it would wait for A's 300.
    assert last_b < 55, (last_b, len(window))
    events = await watch_group(a, group.group_id, within=180)
    assert events[-1].group.status == G.GROUP_STATUS_SUCCEEDED
    assert events[-1].group.progress.succeeded == GROUP_CHILDREN
    assert len(creates(await e2e.ledger(seq, kind="create"), a_set)) == GROUP_CHILDREN


DELAYED = 60
"""Delayed tasks of the e2e run, 0.4 s apart: within the 5-slot system's capacity, so lateness
measures the scheduler's wake-up (the p99 over 500 tasks is measured in
tests/integration/test_scheduler_groups.py, where capacity is ample)."""


async def test_delayed_tasks_dispatch_on_time(e2e: E2E) -> None:
    _, client = await e2e.tenant("delayed", tier="pro", max_concurrency=5)
    start = datetime.now(UTC) + timedelta(seconds=3)
    due = {}
    # 2.5 tasks a second, each running 50 ms: the 5 slots never make a due task wait.
    for i in range(DELAYED):
        at = start + timedelta(milliseconds=400 * i)
        spec = delayed(image(f"d{i}", __fake_duration_s=0.05), not_before=at)
        task = (await client.submit(spec=spec)).task
        assert task.scheduled
        assert task.not_before.ToDatetime(tzinfo=UTC) == at
        due[task.task_id] = at
    finals = await wait_terminal(client, list(due), within=120)
    lateness = []
    for task_id, at in due.items():
        task = await client.get(task_id)
        assert finals[task_id].status == task_pb2.TASK_STATUS_SUCCEEDED
        dispatched = task.dispatched_at.ToDatetime(tzinfo=UTC)
        assert dispatched >= at, (task_id, dispatched, at)  # never early
        lateness.append((dispatched - at).total_seconds())
    lateness.sort()
    p99 = lateness[max(0, int(0.99 * len(lateness)) - 1)]
    p50 = lateness[len(lateness) // 2]
    print(
        f"\ndelayed tasks: {len(lateness)} dispatched, lateness p50 {p50 * 1000:.1f} ms,"
        f" p99 {p99 * 1000:.1f} ms, max {lateness[-1] * 1000:.1f} ms"
    )
    # The leader wakes at the earliest not_before: a missed wake-up would show as the 1 s poll.
    assert p99 < 0.5, lateness[-10:]


async def test_cancel_a_waiting_delayed_task(e2e: E2E) -> None:
    _, client = await e2e.tenant("delay-cancel", tier="pro", max_concurrency=5)
    seq = await e2e.ledger_seq()
    resp = await client.submit(spec=delayed(image("later"), delay=60, retry_delay=5))
    task = await client.get(resp.task.task_id)
    assert task.status == task_pb2.TASK_STATUS_QUEUED
    assert task.scheduled
    assert task.estimated_start_at.ToDatetime(tzinfo=UTC) >= task.not_before.ToDatetime(tzinfo=UTC)
    assert task.spec.retry_policy.backoff == task_pb2.RETRY_BACKOFF_FIXED
    canceled = await client.cancel(task.task_id, reason="not needed after all")
    assert canceled.status == task_pb2.TASK_STATUS_CANCELED
    assert not canceled.scheduled
    assert creates(await e2e.ledger(seq, kind="create"), [task.task_id]) == []


async def test_kill_leader_and_adapter_during_a_group(e2e: E2E) -> None:
    _, client = await e2e.tenant("gkill", tier="pro", max_concurrency=5)
    children = [image(f"k{i}", __fake_duration_s=0.6) for i in range(40)]
    group = await client.submit_group(
        children, follow_up=build_spec("image", model="e2e/storyboard", input={"prompt": "all"})
    )
    system = e2e.system
    collected: list[group_pb2.GroupEvent] = []
    five_done, fifteen_done = asyncio.Event(), asyncio.Event()

    async def follow() -> None:
        async with asyncio.timeout(180):
            async for event in client.watch_group(group.group_id):
                collected.append(event)
                if event.group.progress.done >= 5:
                    five_done.set()
                if event.group.progress.done >= 15:
                    fifteen_done.set()

    watcher = asyncio.create_task(follow())
    # kill -9 the leader once a few children are done, then an adapter.
    await asyncio.wait_for(five_done.wait(), 60)
    leader = await system.leader(wait=10)
    assert leader is not None
    await system.kill(leader, signal.SIGKILL)
    assert await system.leader(wait=30) is not None
    await asyncio.wait_for(fifteen_done.wait(), 90)
    await system.kill("adapter-1", signal.SIGKILL)
    await system.restart(leader)
    killed = time.monotonic()
    await system.restart("adapter-1")
    print(f"\nadapter-1 restarted in {time.monotonic() - killed:.1f}s")
    await watcher

    # The group's history is gap-free and ends exactly once.
    assert [e.sequence for e in collected] == list(range(1, len(collected) + 1))
    assert [e.type for e in collected].count(G.GROUP_EVENT_TYPE_COMPLETED) == 1
    assert collected[-1].type == G.GROUP_EVENT_TYPE_FOLLOW_UP_SUBMITTED
    got = await client.get_group(group.group_id)
    # Its aggregate equals the children's states, one by one.
    statuses = [(await client.get(t)).status for t in got.child_task_ids]
    assert statuses.count(task_pb2.TASK_STATUS_SUCCEEDED) == got.progress.succeeded
    assert got.progress.done == sum(1 for s in statuses if s >= task_pb2.TASK_STATUS_SUCCEEDED)
    assert got.progress.total == 40
    assert got.status == (
        G.GROUP_STATUS_SUCCEEDED
        if got.progress.succeeded == 40
        else G.GROUP_STATUS_PARTIALLY_FAILED
    )
    assert got.follow_up_task_id == collected[-1].group.follow_up_task_id
    listed = await client.list_groups(statuses=[got.status])
    assert got.group_id in [g.group_id for g in listed.groups]
    assert not system.exited(), system.exited()
