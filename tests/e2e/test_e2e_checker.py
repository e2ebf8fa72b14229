"""The kill test's checker catches what it must (unit tests on synthetic histories; no devstack).

A checker that cannot fail proves nothing: each test feeds it a history with one planted violation
(a lost task, a duplicated or phantom task, a second prediction, a limit exceeded, a watcher gap) and
expects exactly that to be reported; a clean history passes.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import timestamp_pb2

from conveyor.tasks.v1 import task_pb2
from conveyor_devstack.demo_workload import DemoTask, limit_peaks, workload
from conveyor_devstack.processes import metric_value, target_of
from tests.e2e.checker import History, Limits, Report, TaskMeta, check, peak_slots, stuck_by_task

S = task_pb2


def _task(
    task_id: str, tenant: str, rid: str, status: task_pb2.TaskStatus.ValueType, last: int
) -> task_pb2.Task:
    return task_pb2.Task(
        task_id=task_id, tenant_id=tenant, request_id=rid, status=status, last_sequence=last
    )


def _events(
    task: task_pb2.Task, types: list[task_pb2.TaskEventType.ValueType]
) -> list[task_pb2.TaskEvent]:
    return [
        task_pb2.TaskEvent(task_id=task.task_id, sequence=i, type=t, task=task)
        for i, t in enumerate(types, 1)
    ]


OK_TYPES = [
    S.TASK_EVENT_TYPE_SUBMITTED,
    S.TASK_EVENT_TYPE_DISPATCHED,
    S.TASK_EVENT_TYPE_STARTED,
    S.TASK_EVENT_TYPE_SUCCEEDED,
]


class Scenario:
    """Two tenants, three tasks that all succeeded, one prediction each, within every limit."""

    def __init__(self) -> None:
        self.history = History()
        self.meta: dict[str, TaskMeta] = {}
        self.final: dict[str, task_pb2.Task] = {}
        self.listed: dict[str, list[task_pb2.Task]] = {"a": [], "b": []}
        self.watches: dict[str, list[task_pb2.TaskEvent]] = {}
        self.ledger: list[dict[str, Any]] = []
        for n, (task_id, tenant, begin, end) in enumerate(
            [("t1", "a", 0.0, 1.0), ("t2", "a", 1.0, 2.0), ("t3", "b", 0.5, 1.5)]
        ):
            rid = f"r{n}"
            self.history.record("invoke", "submit", tenant, tenant=tenant, request_id=rid)
            self.history.record(
                "ok", "submit", tenant, tenant=tenant, request_id=rid, task_id=task_id
            )
            task = _task(task_id, tenant, rid, S.TASK_STATUS_SUCCEEDED, 4)
            self.meta[task_id] = TaskMeta(tenant, "image", "m/x", rid)
            self.final[task_id] = task
            self.listed[tenant].append(task)
            self.watches[task_id] = _events(task, OK_TYPES)
            self.create(task_id, f"p{n}", begin, end)

    def create(self, task_id: str, prediction: str, begin: float, end: float) -> None:
        self.ledger += [
            {
                "kind": "create",
                "task": task_id,
                "attempt": 1,
                "prediction_id": prediction,
                "t": begin,
            },
            {"kind": "finish", "prediction_id": prediction, "status": "succeeded", "t": end},
        ]

    def check(self, global_limit: int = 2) -> Report:
        return check(
            history=self.history,
            meta=self.meta,
            final=self.final,
            listed=self.listed,
            watches=self.watches,
            watch_errors={},
            ledger=self.ledger,
            limits=Limits(global_limit=global_limit, tenant={"a": 1, "b": 1}),
        )


def test_a_clean_run_passes() -> None:
    report = Scenario().check()
    assert report.ok, report.format()
    assert report.figures["lost"] == 0
    assert report.figures["peak_slots_global"] == "2/2"
    assert "verdict: OK" in report.format()


def test_a_task_left_queued_is_lost() -> None:
    s = Scenario()
    s.final["t2"] = _task("t2", "a", "r1", S.TASK_STATUS_QUEUED, 1)
    s.watches["t2"] = s.watches["t2"][:1]
    report = s.check()
    assert report.figures["lost"] == 1
    assert report.figures["watchers_incomplete"] == 1
    assert not report.ok


def test_two_tasks_for_one_request_and_a_phantom_are_reported() -> None:
    s = Scenario()
    s.listed["a"].append(_task("t9", "a", "r0", S.TASK_STATUS_SUCCEEDED, 4))
    s.listed["b"].append(_task("t8", "b", "never-sent", S.TASK_STATUS_SUCCEEDED, 4))
    report = s.check()
    assert report.figures["duplicated_requests"] == 1
    assert report.figures["unexpected"] == 1
    assert not report.ok


def test_an_unknown_submit_that_exists_is_recovered_and_must_end() -> None:
    s = Scenario()
    s.history.record("invoke", "submit", "b", tenant="b", request_id="r-info")
    s.history.record("info", "submit", "b", tenant="b", request_id="r-info", error="timeout")
    s.listed["b"].append(_task("t7", "b", "r-info", S.TASK_STATUS_RUNNING, 3))
    report = s.check()
    assert report.figures["recovered"] == 1
    assert report.figures["lost"] == 1  # it exists but never ended


def test_a_second_prediction_for_a_task_is_reported() -> None:
    s = Scenario()
    s.create("t3", "p-dup", 5.0, 6.0)
    report = s.check()
    assert report.figures["tasks_with_several_predictions"] == 1
    assert not report.ok


def test_limits_are_checked_slot_weighted_per_tenant_and_globally() -> None:
    s = Scenario()
    s.meta["t3"] = TaskMeta("b", "video", "m/v", "r2")  # costs 2 slots from 0.5 to 1.5
    report = s.check(global_limit=2)
    assert report.figures["peak_slots_global"] == "3/2"
    assert report.figures["peak_slots_by_tenant"] == {"a": "1/1", "b": "2/1"}
    assert report.figures["limit_exceedances"] == 2
    assert not report.ok
    # Touching intervals do not overlap: t1 ends when t2 begins.
    assert peak_slots(s.ledger, s.meta, {"video": 2})[1]["a"] == 1


def test_a_watcher_gap_or_a_second_terminal_event_is_reported() -> None:
    s = Scenario()
    del s.watches["t1"][1]  # sequence 2 never reached the watcher
    s.watches["t3"].append(
        task_pb2.TaskEvent(task_id="t3", sequence=5, type=S.TASK_EVENT_TYPE_FAILED)
    )
    report = s.check()
    assert report.figures["watchers_incomplete"] == 2
    assert report.figures["tasks_with_several_terminal_events"] == 1


def test_metric_parsing_and_grpc_targets() -> None:
    text = (
        "# HELP conveyor_scheduler_leader 1 when leader\n"
        "conveyor_scheduler_leader 1.0\n"
        'conveyor_scheduler_active_slots{scope="global"} 3.0\n'
        'conveyor_scheduler_active_slots{scope="model:a/b"} 2.0\n'
    )
    assert metric_value(text, "conveyor_scheduler_leader") == 1.0
    assert metric_value(text, "conveyor_scheduler_active_slots", scope="model:a/b") == 2.0
    assert metric_value(text, "conveyor_scheduler_slot_limit") is None
    assert target_of([5001]) == "127.0.0.1:5001"
    assert target_of([5001, 5002]) == "ipv4:127.0.0.1:5001,127.0.0.1:5002"


def test_demo_workload_and_its_limit_summary() -> None:
    first, rest = workload()
    roles = [t.role for t in [*first, *rest]]
    assert roles.count("flaky") == 3
    assert roles.count("dead-letter") == 1
    assert roles.count("cancel") == 1
    assert {t.kind for t in rest} == {"video", "image", "text"}
    video: DemoTask = next(t for t in rest if t.kind == "video")
    video.task_id = "v1"
    events = [
        {"kind": "create", "task": "v1", "prediction_id": "p1", "t": 0.0},
        {"kind": "finish", "prediction_id": "p1", "status": "succeeded", "t": 1.0},
    ]
    peaks = limit_peaks(events, [video])
    assert peaks["global"][0] == 2  # a video holds two slots
    assert peaks[f"tenant {video.tenant}"][0] == 2


def test_stuck_after_a_fault_tells_an_unknown_create_held_for_its_grace() -> None:
    def event(
        kind: task_pb2.TaskEventType.ValueType,
        status: task_pb2.TaskStatus.ValueType,
        at: float,
        code: str = "",
    ) -> task_pb2.TaskEvent:
        task = task_pb2.Task(status=status)
        if code:
            task.error.code = code
        return task_pb2.TaskEvent(
            type=kind, task=task, occurred_at=timestamp_pb2.Timestamp(seconds=int(at))
        )

    fault = 1_000.0
    dispatched = event(S.TASK_EVENT_TYPE_DISPATCHED, S.TASK_STATUS_DISPATCHED, fault - 1)
    watches = {
        "ran": [dispatched, event(S.TASK_EVENT_TYPE_STARTED, S.TASK_STATUS_RUNNING, fault + 3)],
        "held": [
            dispatched,
            event(
                S.TASK_EVENT_TYPE_RETRY_SCHEDULED,
                S.TASK_STATUS_QUEUED,
                fault + 21,
                "submit_unknown",
            ),
        ],
        "failed_retry": [
            dispatched,
            event(S.TASK_EVENT_TYPE_RETRY_SCHEDULED, S.TASK_STATUS_QUEUED, fault + 12, "provider"),
        ],
        "queued_before": [event(S.TASK_EVENT_TYPE_SUBMITTED, S.TASK_STATUS_QUEUED, fault - 1)],
    }
    assert stuck_by_task(watches, fault) == {"ran": 3.0, "failed_retry": 12.0}
    assert stuck_by_task(watches, fault, held=True) == {"held": 21.0}
