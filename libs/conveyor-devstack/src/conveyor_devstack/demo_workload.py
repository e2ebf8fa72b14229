"""The demo's workload and its summary: the tenants, the mixed task set (paced submits, a burst, a
cancel, a deadline), and the peaks of concurrency per limit read back from the fake's ledger."""

from __future__ import annotations

import random
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from conveyor.tasks.v1 import task_pb2
from conveyor_client import build_spec
from conveyor_devstack.system import SystemConfig
from fake_replicate.ledger import intervals

GLOBAL_LIMIT = 6


VIDEO_MODEL = "acme/video-gen"


VIDEO_MODEL_LIMIT = 4


KIND_COST = {"video": 2, "image": 1, "text": 1, "audio": 1}


TENANTS: dict[str, tuple[str, int]] = {
    "studio": ("pro", 4),
    "webshop": ("premium", 3),
    "hobbyist": ("free", 2),
}
"""tenant -> (tier, max concurrent slots)."""


PACE = 1.6
"""Scales every provider run time (the whole workload then takes ~25 s on an idle machine)."""


DEADLINE_SECONDS = 150.0
"""The workload must be over this long after the first submit, or the demo fails."""


STATUS_STYLE = {
    "queued": "dim",
    "dispatched": "cyan",
    "running": "bold cyan",
    "succeeded": "green",
    "failed": "red",
    "canceled": "yellow",
    "dead_lettered": "bold red",
    "expired": "red",
}


def demo_config(**overrides: Any) -> SystemConfig:
    """The demo's system: 2 schedulers (one leader), 1 adapter, 1 notifier, 1 gateway."""
    config = SystemConfig(
        schedulers=2,
        adapters=1,
        notifiers=1,
        gateways=1,
        tenant_id="webshop",
        scheduler_env={
            "SCHEDULER_GLOBAL_CONCURRENCY": str(GLOBAL_LIMIT),
            "SCHEDULER_MODEL_LIMITS": f'{{"{VIDEO_MODEL}": {VIDEO_MODEL_LIMIT}}}',
            "SCHEDULER_RETRY_BASE_SECONDS": "0.5",
            "SCHEDULER_RETRY_MAX_SECONDS": "2",
            "SCHEDULER_LEADER_RETRY_SECONDS": "0.5",
            "SCHEDULER_STATS_CACHE_SECONDS": "0.5",
        },
        fake={
            "seed": 42,
            "progress_steps": 10,
            "webhook_throttle_s": 0.2,
            "webhook_retry_base_s": 0.2,
        },
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


@dataclass
class DemoTask:
    """One task of the demo and what its watch stream told us."""

    label: str
    tenant: str
    kind: str
    model: str
    priority: str
    spec: task_pb2.TaskSpec
    role: str = "normal"
    """normal | flaky (refused once, then succeeds) | dead-letter | cancel (cancelled running)."""
    task_id: str = ""
    status: str = "submitting"
    progress: int = 0
    attempt: int = 0
    created_at: float | None = None
    dispatched_at: float | None = None
    finished: bool = False
    note: str = ""
    events: list[task_pb2.TaskEvent] = field(default_factory=list)

    @property
    def expected(self) -> str:
        """The final status the script expects."""
        return {"dead-letter": "dead_lettered", "cancel": "canceled"}.get(self.role, "succeeded")


def _task(
    label: str,
    tenant: str,
    kind: str,
    model: str,
    priority: str,
    seconds: float,
    role: str = "normal",
    **extra: Any,
) -> DemoTask:
    inputs: dict[str, Any] = {
        "prompt": label,
        "__fake_duration_s": round(seconds * PACE, 2),
        **extra,
    }
    if kind == "text":
        inputs["__fake_output_kind"] = "text"
    elif kind == "video":
        inputs["__fake_output_kind"] = "mp4"
    spec = build_spec(
        kind,
        model=model,
        input=inputs,
        priority=priority,
        max_attempts=2 if role == "dead-letter" else 3,
    )
    return DemoTask(label, tenant, kind, model, priority, spec, role)


def workload(seed: int = 7) -> tuple[list[DemoTask], list[DemoTask]]:
    """``(first, rest)``: the three flaky urgent tasks go first (they take the scripted 408s)."""
    rng = random.Random(seed)
    first = [
        _task("flaky banner", "webshop", "image", "acme/sdxl", "urgent", 1.5, "flaky"),
        _task("flaky caption", "hobbyist", "text", "acme/llama", "urgent", 1.2, "flaky"),
        _task("flaky poster", "studio", "image", "acme/flux", "urgent", 1.5, "flaky"),
    ]
    rest = [
        _task("trailer cut", "studio", "video", VIDEO_MODEL, "high", 4.0),
        _task("teaser loop", "studio", "video", VIDEO_MODEL, "normal", 3.5),
        _task("b-roll", "studio", "video", VIDEO_MODEL, "low", 3.0),
        _task("director's cut", "studio", "video", VIDEO_MODEL, "normal", 60, "cancel"),
        _task("storyboard 1", "studio", "image", "acme/flux", "normal", 2.0),
        _task("storyboard 2", "studio", "image", "acme/flux", "low", 2.0),
        _task("blurb", "hobbyist", "text", "acme/llama", "normal", 1.5),
        _task(
            "broken upscale",
            "hobbyist",
            "image",
            "acme/upscaler",
            "high",
            1.0,
            "dead-letter",
            __fake_outcome="failed_retryable",
        ),
    ]
    series = [
        # (label, tenant, kind, model, priorities, seconds, count)
        (
            "product shot",
            "webshop",
            "image",
            "acme/sdxl",
            ["high", "normal", "normal", "low"],
            (1.5, 3.0),
            7,
        ),
        ("description", "webshop", "text", "acme/llama", ["normal", "low"], (1.0, 2.0), 4),
        ("avatar", "hobbyist", "image", "acme/sdxl", ["normal", "low", "low"], (1.5, 2.5), 5),
    ]
    rest += [
        _task(f"{label} {i + 1}", tenant, kind, model, rng.choice(prios), rng.uniform(*secs))
        for label, tenant, kind, model, prios, secs, count in series
        for i in range(count)
    ]
    rng.shuffle(rest)
    return first, rest


def _weighted_peak(spans: Iterable[tuple[float, float, int]]) -> int:
    points = sorted(
        [(b, w) for b, _, w in spans] + [(e, -w) for _, e, w in spans], key=lambda p: (p[0], p[1])
    )
    current = peak = 0
    for _, delta in points:
        current += delta
        peak = max(peak, current)
    return peak


def limit_peaks(
    events: Sequence[Mapping[str, Any]], tasks: Sequence[DemoTask]
) -> dict[str, tuple[int, int]]:
    """``scope -> (peak slots held at the provider, limit)`` from the ledger's create->finish
    intervals, each weighted by its task's slot cost."""
    by_id = {t.task_id: t for t in tasks}
    now = time.time()
    spans: dict[str, list[tuple[float, float, int]]] = defaultdict(list)
    for iv in intervals(events, since="create"):
        task = by_id.get(str(iv.create.get("task")))
        if task is None:
            continue
        span = (iv.begin, iv.end if iv.end is not None else now, KIND_COST.get(task.kind, 1))
        spans["global"].append(span)
        spans[f"tenant {task.tenant}"].append(span)
        if task.model == VIDEO_MODEL:
            spans[f"model {VIDEO_MODEL}"].append(span)
    limits = {"global": GLOBAL_LIMIT, f"model {VIDEO_MODEL}": VIDEO_MODEL_LIMIT}
    limits.update({f"tenant {t}": limit for t, (_, limit) in TENANTS.items()})
    return {scope: (_weighted_peak(spans.get(scope, [])), limit) for scope, limit in limits.items()}


def summarize(
    console: Console, tasks: Sequence[DemoTask], ledger: Sequence[Mapping[str, Any]], took: float
) -> bool:
    """Print the closing summary; True when the run went as scripted and every limit held."""
    outcomes = Counter(t.status for t in tasks)
    table = Table(title="Tasks by outcome", show_edge=False)
    table.add_column("outcome")
    table.add_column("tasks", justify="right")
    for status, n in sorted(outcomes.items(), key=lambda kv: -kv[1]):
        table.add_row(Text(status, style=STATUS_STYLE.get(status, "")), str(n))
    retried = [t for t in tasks if t.attempt > 1 and t.status == "succeeded"]
    table.add_row("(succeeded after a retry)", str(len(retried)))

    waits: dict[str, list[float]] = defaultdict(list)
    for t in tasks:
        if t.dispatched_at is not None and t.created_at is not None:
            waits[t.priority].append(max(0.0, t.dispatched_at - t.created_at))
    wait_table = Table(title="Queue wait by priority", show_edge=False)
    for col in ("priority", "tasks", "p50 s", "max s"):
        wait_table.add_column(col, justify="right" if col != "priority" else "left")
    for prio in ("urgent", "high", "normal", "low"):
        values = waits.get(prio, [])
        if values:
            wait_table.add_row(
                prio, str(len(values)), f"{statistics.median(values):.2f}", f"{max(values):.2f}"
            )

    peaks = limit_peaks(ledger, tasks)
    limit_table = Table(title="Limits held (provider ledger)", show_edge=False)
    limit_table.add_column("scope")
    limit_table.add_column("peak/limit", justify="right")
    limit_table.add_column("")
    held = True
    for scope, (peak, limit) in peaks.items():
        ok = peak <= limit
        held &= ok
        limit_table.add_row(
            scope, f"{peak}/{limit}", Text("held" if ok else "EXCEEDED", "green" if ok else "red")
        )
    per_task = Counter(str(e["task"]) for e in ledger if e["kind"] == "create" and e.get("task"))
    scripted = all(t.status == t.expected for t in tasks)
    console.print()
    console.print(table)
    console.print(wait_table)
    console.print(limit_table)
    console.print(
        f"{len(tasks)} tasks in {took:.1f}s; {sum(per_task.values())} predictions at the provider; "
        f"{sum(1 for e in ledger if e['kind'] == 'create_rejected')} creates refused (scripted 408s)",
        soft_wrap=True,
    )
    if not scripted:
        off = [
            f"{t.label}: {t.status} (expected {t.expected})"
            for t in tasks
            if t.status != t.expected
        ]
        console.print(Text("not as scripted: " + "; ".join(off), style="red"))
    return scripted and held
