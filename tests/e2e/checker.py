"""A Jepsen-style checker for end-to-end runs: history of client operations in, figures and verdict out.

The generator records every client operation in a :class:`History` (``invoke`` then ``ok`` / ``fail``
/ ``info`` for an unknown outcome, as Jepsen does). After the nemesis stops and the queue drained, the
test collects

* the final state of every task (``GetTask``) and every task each tenant can list (``ListTasks``),
* what each watcher saw (``TaskEvent`` sequence numbers and types, through the SDK's resuming watch),
* the fake Replicate's ledger (every create and every start/finish instant),

and :func:`check` reports, in the categories of Jepsen's ``total-queue`` checker:

* **lost**: accepted (``ok``, or ``info`` and found afterwards) but not terminal after the drain;
* **duplicated**: two tasks for one ``(tenant, request_id)``, or a task with two terminal events;
* **unexpected**: tasks nobody submitted;
* **recovered**: submits with an unknown outcome whose task exists;

plus the provider side (predictions per task and per attempt), the limits (slot-weighted peak
concurrency from the ledger's intervals, globally, per tenant and per model, against the limits) and
the watchers (sequence numbers 1..N contiguous, each once, ending at the one terminal event).
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import Any

from conveyor.tasks.v1 import task_pb2
from fake_replicate.ledger import intervals, predictions_per_attempt, predictions_per_task

TERMINAL_STATUSES = frozenset(
    {
        task_pb2.TASK_STATUS_SUCCEEDED,
        task_pb2.TASK_STATUS_FAILED,
        task_pb2.TASK_STATUS_CANCELED,
        task_pb2.TASK_STATUS_DEAD_LETTERED,
        task_pb2.TASK_STATUS_EXPIRED,
    }
)
TERMINAL_EVENTS = frozenset(
    {
        task_pb2.TASK_EVENT_TYPE_SUCCEEDED,
        task_pb2.TASK_EVENT_TYPE_FAILED,
        task_pb2.TASK_EVENT_TYPE_CANCELED,
        task_pb2.TASK_EVENT_TYPE_DEAD_LETTERED,
        task_pb2.TASK_EVENT_TYPE_EXPIRED,
    }
)


# --------------------------------------------------------------------------------------------------
# History


@dataclass
class History:
    """Jepsen-style operation log: one dict per ``invoke``/``ok``/``fail``/``info``."""

    ops: list[dict[str, Any]] = field(default_factory=list)

    def record(self, phase: str, f: str, process: str, **fields: Any) -> None:
        """Append one operation (``phase`` in invoke|ok|fail|info, ``f`` the operation name)."""
        self.ops.append({"type": phase, "f": f, "process": process, "time": time.time(), **fields})

    def dump(self, path: Path) -> None:
        """Write the history as JSONL."""
        path.write_text("".join(json.dumps(op, sort_keys=True) + "\n" for op in self.ops))

    def completions(self, f: str) -> dict[str, dict[str, Any]]:
        """The last completion (ok/fail/info) of each ``request_id`` of operation ``f``."""
        out: dict[str, dict[str, Any]] = {}
        for op in self.ops:
            if op["f"] == f and op["type"] != "invoke":
                out[op["request_id"]] = op
        return out


@dataclass(frozen=True)
class TaskMeta:
    """What the generator knows about a task it submitted."""

    tenant: str
    kind: str
    model: str
    request_id: str


@dataclass(frozen=True)
class Limits:
    """The configured limits in slots, and each kind's slot cost."""

    global_limit: int
    tenant: Mapping[str, int]
    model: Mapping[str, int] = field(default_factory=dict)
    kind_cost: Mapping[str, int] = field(default_factory=lambda: {"video": 2})


# --------------------------------------------------------------------------------------------------
# Concurrency from the ledger


def _weighted_peak(spans: Iterable[tuple[float, float, int]]) -> int:
    points: list[tuple[float, int]] = []
    for begin, end, weight in spans:
        points.append((begin, weight))
        points.append((end, -weight))
    points.sort(key=lambda p: (p[0], p[1]))  # ends (negative) before starts at the same instant
    current = peak = 0
    for _, delta in points:
        current += delta
        peak = max(peak, current)
    return peak


def peak_slots(
    events: Sequence[Mapping[str, Any]],
    meta: Mapping[str, TaskMeta],
    kind_cost: Mapping[str, int],
    *,
    since: str = "create",
    now: float | None = None,
) -> tuple[int, dict[str, int], dict[str, int]]:
    """Slot-weighted peak concurrency ``(global, per tenant, per model)`` from the ledger.

    A prediction holds its task's slot cost from its create (``since="create"``) or start instant to
    its finish (still running: until ``now``). Predictions of tasks not in ``meta`` count 1 globally.
    """
    end_default = time.time() if now is None else now
    everything: list[tuple[float, float, int]] = []
    by_tenant: dict[str, list[tuple[float, float, int]]] = defaultdict(list)
    by_model: dict[str, list[tuple[float, float, int]]] = defaultdict(list)
    for iv in intervals(events, since="create" if since == "create" else "start"):
        task = str(iv.create.get("task") or "")
        info = meta.get(task)
        weight = kind_cost.get(info.kind, 1) if info else 1
        span = (iv.begin, iv.end if iv.end is not None else end_default, weight)
        everything.append(span)
        if info is not None:
            by_tenant[info.tenant].append(span)
            by_model[info.model].append(span)
    return (
        _weighted_peak(everything),
        {t: _weighted_peak(s) for t, s in by_tenant.items()},
        {m: _weighted_peak(s) for m, s in by_model.items()},
    )


# --------------------------------------------------------------------------------------------------
# The check


@dataclass
class Report:
    """Every figure the checker computes; ``failures`` lists the gates that did not hold."""

    figures: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every gate held."""
        return not self.failures

    def format(self) -> str:
        """Human-readable figures, one per line."""
        lines = ["checker figures:"]
        for key, value in self.figures.items():
            lines.append(f"  {key}: {json.dumps(value, sort_keys=True, default=str)}")
        lines.append("verdict: " + ("OK" if self.ok else "FAILED: " + "; ".join(self.failures)))
        return "\n".join(lines)


def _sample(items: Iterable[str], n: int = 5) -> list[str]:
    return sorted(items)[:n]


def check(
    *,
    history: History,
    meta: Mapping[str, TaskMeta],
    final: Mapping[str, task_pb2.Task],
    listed: Mapping[str, Sequence[task_pb2.Task]],
    watches: Mapping[str, Sequence[task_pb2.TaskEvent]],
    watch_errors: Mapping[str, str],
    ledger: Sequence[Mapping[str, Any]],
    limits: Limits,
    max_predictions_per_task: int = 1,
) -> Report:
    """Check a drained run (see the module docstring). ``final`` maps every task id the generator
    knows (accepted submits) to its state after the drain; ``listed`` every tenant's ListTasks."""
    report = Report()
    fig = report.figures
    fail = report.failures

    # --- queue: lost / duplicated / unexpected / recovered -------------------------------------
    submits = history.completions("submit")
    fig["submits"] = dict(Counter(op["type"] for op in submits.values()))
    by_request: dict[tuple[str, str], set[str]] = defaultdict(set)
    listed_ids: dict[str, task_pb2.Task] = {}
    for tenant, tasks in listed.items():
        for task in tasks:
            listed_ids[task.task_id] = task
            by_request[(tenant, task.request_id)].add(task.task_id)
    accepted = {op["task_id"] for op in submits.values() if op["type"] == "ok"}
    recovered: set[str] = set()
    unexpected: set[str] = set()
    for rid, op in submits.items():
        found = by_request.get((op["tenant"], rid), set())
        if op["type"] == "info":  # outcome unknown: it may or may not exist
            recovered |= found
        elif op["type"] == "fail":  # definitely refused: nothing may exist
            unexpected |= found
    submitted = {(op["tenant"], rid) for rid, op in submits.items()}
    unexpected |= {t for key, ids in by_request.items() if key not in submitted for t in ids}
    fig["recovered"] = len(recovered)
    expected = accepted | recovered
    lost = {t for t in expected if t not in final or final[t].status not in TERMINAL_STATUSES}
    fig["lost"] = len(lost)
    if lost:
        fail.append(f"{len(lost)} lost tasks, e.g. {_sample(lost)}")
    duplicated_requests = {k: v for k, v in by_request.items() if len(v) > 1}
    fig["duplicated_requests"] = len(duplicated_requests)
    fig["unexpected"] = len(unexpected)
    if duplicated_requests:
        fail.append(f"{len(duplicated_requests)} request ids created several tasks")
    if unexpected:
        fail.append(f"{len(unexpected)} unexpected tasks, e.g. {_sample(unexpected)}")
    missing_from_list = accepted - set(listed_ids)
    if missing_from_list:
        fail.append(f"{len(missing_from_list)} accepted tasks missing from ListTasks")
    statuses = Counter(
        task_pb2.TaskStatus.Name(final[t].status).removeprefix("TASK_STATUS_").lower()
        for t in expected
        if t in final
    )
    fig["final_status"] = dict(sorted(statuses.items()))
    fig["ok_frac"] = round(statuses.get("succeeded", 0) / max(1, len(expected)), 4)

    # --- watchers -------------------------------------------------------------------------------
    incomplete: dict[str, str] = {}
    several_terminal: set[str] = set()
    for task_id in expected:
        events = watches.get(task_id)
        if events is None:
            incomplete[task_id] = watch_errors.get(task_id, "no watcher")
            continue
        seqs = [e.sequence for e in events]
        terminal = [e for e in events if e.type in TERMINAL_EVENTS]
        if len(terminal) > 1:
            several_terminal.add(task_id)
        if seqs != list(range(1, len(seqs) + 1)):
            incomplete[task_id] = f"sequences not 1..N: {seqs}"
        elif not events or events[-1].type not in TERMINAL_EVENTS:
            incomplete[task_id] = watch_errors.get(task_id, "did not end at a terminal event")
        elif task_id in final and final[task_id].last_sequence != seqs[-1]:
            incomplete[task_id] = (
                f"ended at {seqs[-1]}, the task's last sequence is {final[task_id].last_sequence}"
            )
        elif task_id in final and events[-1].task.status != final[task_id].status:
            incomplete[task_id] = "terminal event disagrees with the final state"
    fig["watchers"] = len(watches)
    fig["watch_events"] = sum(len(v) for v in watches.values())
    fig["watchers_incomplete"] = len(incomplete)
    fig["tasks_with_several_terminal_events"] = len(several_terminal)
    if incomplete:
        sample = {k: incomplete[k] for k in _sample(incomplete, 3)}
        fail.append(f"{len(incomplete)} watchers missed events or did not finish: {sample}")
    if several_terminal:
        fail.append(f"{len(several_terminal)} tasks with several terminal events")

    # --- provider side --------------------------------------------------------------------------
    per_task = {t: n for t, n in predictions_per_task(ledger).items() if t in meta}
    per_attempt = {
        a: n for a, n in predictions_per_attempt(ledger).items() if a.split(":")[0] in meta
    }
    several = {t: n for t, n in per_task.items() if n > max_predictions_per_task}
    several_per_attempt = {a: n for a, n in per_attempt.items() if n > 1}
    fig["predictions"] = sum(per_task.values())
    fig["tasks_with_predictions"] = len(per_task)
    fig["max_predictions_per_task"] = max(per_task.values(), default=0)
    fig["tasks_with_several_predictions"] = len(several)
    fig["attempts_with_several_predictions"] = len(several_per_attempt)
    fig["cancel_calls_at_provider"] = sum(1 for e in ledger if e["kind"] == "cancel")
    fig["predictions_canceled"] = sum(
        1 for e in ledger if e["kind"] == "finish" and e.get("status") == "canceled"
    )
    if several:
        fail.append(
            f"{len(several)} tasks with several predictions: {dict(list(several.items())[:5])}"
        )
    if several_per_attempt:
        fail.append(f"{len(several_per_attempt)} attempts with several predictions")

    # --- limits ---------------------------------------------------------------------------------
    peak_global, peak_tenant, peak_model = peak_slots(ledger, meta, limits.kind_cost)
    fig["peak_slots_global"] = f"{peak_global}/{limits.global_limit}"
    fig["peak_slots_by_tenant"] = {
        t: f"{peak_tenant.get(t, 0)}/{limit}" for t, limit in sorted(limits.tenant.items())
    }
    if limits.model:
        fig["peak_slots_by_model"] = {
            m: f"{peak_model.get(m, 0)}/{limit}" for m, limit in sorted(limits.model.items())
        }
    exceeded = []
    if peak_global > limits.global_limit:
        exceeded.append(f"global {peak_global}>{limits.global_limit}")
    exceeded += [
        f"tenant {t} {peak_tenant[t]}>{limit}"
        for t, limit in limits.tenant.items()
        if peak_tenant.get(t, 0) > limit
    ]
    exceeded += [
        f"model {m} {peak_model[m]}>{limit}"
        for m, limit in limits.model.items()
        if peak_model.get(m, 0) > limit
    ]
    fig["limit_exceedances"] = len(exceeded)
    if exceeded:
        fail.append("limits exceeded: " + ", ".join(exceeded))
    return report


def stuck_by_task(
    watches: dict[str, list[task_pb2.TaskEvent]], at: float, *, held: bool = False
) -> dict[str, float]:
    """For each task dispatched or running at ``at`` (wall clock) and not finished by then: seconds
    from ``at`` to its next state change. Without ``held``, the tasks whose next change is the retry
    of an attempt whose create outcome was unknown (a kill between its ``BeginSubmit`` and its
    create: the adapter may not create again until ``SUBMIT_UNKNOWN_GRACE_S`` proves no prediction
    exists, ADR 0003) are left out; with it, only those."""
    active = {task_pb2.TASK_STATUS_DISPATCHED, task_pb2.TASK_STATUS_RUNNING}
    out: dict[str, float] = {}
    for task_id, events in watches.items():
        before = [e for e in events if e.occurred_at.ToDatetime(UTC).timestamp() <= at]
        after = [e for e in events if e.occurred_at.ToDatetime(UTC).timestamp() > at]
        if not before or not after or before[-1].task.status not in active:
            continue
        unknown = (
            after[0].type == task_pb2.TASK_EVENT_TYPE_RETRY_SCHEDULED
            and after[0].task.error.code == "submit_unknown"
        )
        if unknown == held:
            out[task_id] = after[0].occurred_at.ToDatetime(UTC).timestamp() - at
    return out


def stuck_seconds(
    watches: dict[str, list[task_pb2.TaskEvent]], at: float, *, held: bool = False
) -> list[float]:
    """The values of :func:`stuck_by_task`."""
    return list(stuck_by_task(watches, at, held=held).values())


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
