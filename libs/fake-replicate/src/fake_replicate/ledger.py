"""The ledger: an append-only record of what the fake provider did, plus pure helpers over it.

Events are plain JSON dicts (the same shape ``GET /_fake/ledger`` returns), each with ``seq`` (1, 2, ...),
``kind`` and ``t`` (Unix seconds, float):

* ``create``: an executed create. ``prediction_id, task, attempt, params`` (the webhook URL's query
  parameters), ``model, version, deployment, input, webhook, events_filter, deadline,
  response_dropped`` (true when the execute-then-drop fault hid the answer).
* ``create_rejected``: a create answered with an error, nothing created. ``status, reason, task,
  attempt, params``.
* ``start``: the prediction began processing (``prediction_id``).
* ``finish``: the prediction reached a terminal state (``prediction_id, status, started``).
* ``cancel``: a cancel (``prediction_id, by`` = ``api`` | ``deadline``, ``effective``).
* ``webhook``: one event's delivery outcome (``prediction_id, event, msg_id, outcome`` =
  ``delivered`` | ``failed`` | ``dropped``, ``attempts, http_status, duplicated, delayed_s, stale``).

The helpers below take a list of such dicts, so a checker can run them on JSON fetched over HTTP.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

Event = dict[str, Any]
IntervalStart = Literal["start", "create"]


class Ledger:
    """In-memory append-only event list."""

    def __init__(self) -> None:
        self._events: list[Event] = []

    def record(self, kind: str, **fields: Any) -> Event:
        event: Event = {"seq": len(self._events) + 1, "kind": kind, "t": time.time(), **fields}
        self._events.append(event)
        return event

    def events(
        self, *, kind: str | None = None, task: str | None = None, since_seq: int = 0
    ) -> list[Event]:
        return [
            e
            for e in self._events[since_seq:]
            if (kind is None or e["kind"] == kind) and (task is None or e.get("task") == task)
        ]

    def clear(self) -> None:
        self._events.clear()

    def __len__(self) -> int:
        return len(self._events)


def predictions_per_task(events: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Executed creates per task id (creates without a task id are not counted)."""
    counts: Counter[str] = Counter()
    for e in events:
        if e["kind"] == "create" and e.get("task") is not None:
            counts[str(e["task"])] += 1
    return dict(counts)


def predictions_per_attempt(events: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Executed creates per ``"{task}:{attempt}"``."""
    counts: Counter[str] = Counter()
    for e in events:
        if e["kind"] == "create" and e.get("task") is not None:
            counts[f"{e['task']}:{e.get('attempt')}"] += 1
    return dict(counts)


def group_value(create: Mapping[str, Any], group_by: str) -> str | None:
    """Group of a create event: ``param:K`` (webhook query parameter), ``input:K`` (input key) or a
    bare ``K`` (query parameter first, then input key). None when absent."""
    source, sep, key = group_by.partition(":")
    if not sep:
        source, key = "any", group_by
    params: Mapping[str, Any] = create.get("params") or {}
    inputs: Mapping[str, Any] = create.get("input") or {}
    value: Any = None
    if source in ("param", "any"):
        value = params.get(key)
    if value is None and source in ("input", "any"):
        value = inputs.get(key)
    return None if value is None else str(value)


@dataclass(frozen=True, slots=True)
class Interval:
    prediction_id: str
    begin: float
    end: float | None  # None: still running
    create: Mapping[str, Any]


def intervals(
    events: Sequence[Mapping[str, Any]], *, since: IntervalStart = "start"
) -> list[Interval]:
    """Provider-side run intervals: from the ``start`` instant (or the ``create`` instant) to ``finish``.

    With ``since="start"`` a prediction that never started (aborted, canceled while starting) has none.
    """
    creates: dict[str, Mapping[str, Any]] = {}
    begins: dict[str, float] = {}
    ends: dict[str, float] = {}
    for e in events:
        pid = e.get("prediction_id")
        if pid is None:
            continue
        kind = e["kind"]
        if kind == "create":
            creates[pid] = e
            if since == "create":
                begins[pid] = float(e["t"])
        elif kind == "start" and since == "start":
            begins[pid] = float(e["t"])
        elif kind == "finish":
            ends[pid] = float(e["t"])
    return [
        Interval(pid, begin, ends.get(pid), creates.get(pid, {})) for pid, begin in begins.items()
    ]


def _sweep(spans: Iterable[tuple[float, float]]) -> int:
    points: list[tuple[float, int]] = []
    for begin, end in spans:
        points.append((begin, 1))
        points.append((end, -1))
    # Ends sort before starts at the same instant: touching intervals do not overlap.
    points.sort()
    current = peak = 0
    for _, delta in points:
        current += delta
        peak = max(peak, current)
    return peak


@dataclass(frozen=True, slots=True)
class Concurrency:
    global_max: int
    by_group: dict[str, int]

    def as_json(self) -> dict[str, Any]:
        return {"global": self.global_max, "by_group": self.by_group}


def max_concurrency(
    events: Sequence[Mapping[str, Any]],
    *,
    group_by: str | None = None,
    since: IntervalStart = "start",
    now: float | None = None,
) -> Concurrency:
    """Peak number of predictions running at once, globally and per group (see ``group_value``).

    Unfinished predictions count as running until ``now``. Predictions whose group is absent are
    grouped under ``""``.
    """
    end_default = time.time() if now is None else now
    spans = [
        (iv.begin, iv.end if iv.end is not None else end_default, iv)
        for iv in intervals(events, since=since)
    ]
    groups: dict[str, list[tuple[float, float]]] = {}
    if group_by is not None:
        for begin, end, iv in spans:
            groups.setdefault(group_value(iv.create, group_by) or "", []).append((begin, end))
    return Concurrency(
        global_max=_sweep((b, e) for b, e, _ in spans),
        by_group={g: _sweep(s) for g, s in sorted(groups.items())},
    )


def summary(
    events: Sequence[Mapping[str, Any]],
    *,
    group_by: str | None = None,
    since: IntervalStart = "start",
) -> dict[str, Any]:
    """Everything a checker usually wants, in one JSON object."""
    per_task = predictions_per_task(events)
    per_attempt = predictions_per_attempt(events)
    statuses: Counter[str] = Counter()
    webhooks: Counter[str] = Counter()
    finished: set[str] = set()
    created: set[str] = set()
    for e in events:
        kind = e["kind"]
        if kind == "finish":
            statuses[str(e["status"])] += 1
            finished.add(str(e["prediction_id"]))
        elif kind == "create":
            created.add(str(e["prediction_id"]))
        elif kind == "webhook":
            webhooks[str(e["outcome"])] += 1
            if e.get("duplicated"):
                webhooks["duplicated"] += 1
    return {
        "creates": sum(1 for e in events if e["kind"] == "create"),
        "rejected_creates": sum(1 for e in events if e["kind"] == "create_rejected"),
        "dropped_responses": sum(
            1 for e in events if e["kind"] == "create" and e.get("response_dropped")
        ),
        "predictions_per_task": per_task,
        "tasks_with_several_predictions": {t: n for t, n in per_task.items() if n > 1},
        "attempts_with_several_predictions": {a: n for a, n in per_attempt.items() if n > 1},
        "in_flight": len(created - finished),
        "status_counts": dict(statuses),
        "cancels": sum(1 for e in events if e["kind"] == "cancel"),
        "webhooks": dict(webhooks),
        "max_concurrency": max_concurrency(events, group_by=group_by, since=since).as_json(),
    }
