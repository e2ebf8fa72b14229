"""What the CLI prints: tables and single-line answers (``--json`` prints JSON and only then), one
spelling of every enum, and the live progress bars of ``watch`` (labelled by model and task)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from conveyor_client.enums import TaskStatus
from conveyor_client.sdk import AsyncClient
from conveyor_client.types import Paused, Task, Tenant


def when_text(value: datetime | None) -> str:
    return value.isoformat(timespec="seconds").replace("+00:00", "Z") if value else ""


def status_text(task: Task) -> str:
    """The status as shown to people: a requested cancel is visible while the task still runs."""
    if task.cancel_requested and not task.terminal:
        return f"{task.status} (cancel requested)"
    if task.held_reason and not task.terminal:
        return f"{task.status} ({task.held_reason})"
    return str(task.status)


def progress_label(task_id: str, model: str) -> str:
    """A progress-bar label that tells tasks apart (UUIDv7 ids share their leading digits)."""
    return f"{model} …{task_id[-8:]}" if model else f"…{task_id[-12:]}"


class Output:
    """Human (rich) or JSON output."""

    def __init__(self, as_json: bool) -> None:
        self.json = as_json
        tty = sys.stdout.isatty()
        self.console = Console(file=sys.stdout, soft_wrap=True, width=None if tty else 200)

    def emit(self, data: Any) -> None:
        """Print one JSON document."""
        sys.stdout.write(json.dumps(data, indent=None if isinstance(data, list) else 2) + "\n")
        sys.stdout.flush()

    def task(self, task: Task, deduplicated: bool | None = None) -> None:
        """One task."""
        if self.json:
            data = task.to_dict()
            if deduplicated is not None:
                data = {"task": data, "deduplicated": deduplicated}
            self.emit(data)
            return
        table = Table(show_header=False, box=None)
        rows = [
            ("task_id", task.task_id),
            ("status", status_text(task)),
            ("kind", str(task.kind)),
            ("model", task.target),
            ("priority", str(task.priority)),
            ("progress", f"{task.progress}%"),
            ("attempt", f"{task.attempt}/{task.max_attempts}"),
            ("created_at", when_text(task.created_at)),
        ]
        if task.queue_position:
            rows.append(("queue_position", str(task.queue_position)))
        if task.estimated_start_at:
            rows.append(("estimated_start_at", when_text(task.estimated_start_at)))
        if task.finished_at:
            rows.append(("finished_at", when_text(task.finished_at)))
        if task.error is not None:
            rows.append(("error", f"{task.error.code}: {task.error.message}"))
        rows.extend(("output", f.url or f.source_url) for f in task.outputs)
        if deduplicated:
            rows.append(("deduplicated", "yes"))
        for key, value in rows:
            table.add_row(f"[bold]{key}[/bold]", value)
        self.console.print(table)

    def tasks(self, tasks: Sequence[Task]) -> None:
        """A list of tasks."""
        if self.json:
            self.emit([t.to_dict() for t in tasks])
            return
        table = Table("task_id", "status", "kind", "model", "priority", "attempt", "progress",
                      "created_at")  # fmt: skip
        for t in tasks:
            table.add_row(
                t.task_id,
                status_text(t),
                str(t.kind),
                t.target,
                str(t.priority),
                f"{t.attempt}/{t.max_attempts}",
                f"{t.progress}%",
                when_text(t.created_at),
            )
        self.console.print(table)

    def dead_letters(self, tasks: Sequence[Task]) -> None:
        """Dead-lettered tasks: whose, where, how often tried and why they failed."""
        table = Table("task_id", "tenant", "model", "attempts", "error", "finished_at")
        for t in tasks:
            error = f"{t.error.code}: {t.error.message}" if t.error is not None else ""
            table.add_row(
                t.task_id,
                t.tenant_id,
                t.target,
                f"{t.attempt}/{t.max_attempts}",
                error,
                when_text(t.finished_at or t.updated_at),
            )
        self.console.print(table)

    def paused(self, entries: Sequence[Paused]) -> None:
        """Paused models and tenants: why, since when, and how many tasks wait on each."""
        if self.json:
            self.emit([e.to_dict() for e in entries])
            return
        table = Table("paused", "name", "reason", "since", "queued")
        for e in entries:
            table.add_row(e.kind, e.name, e.reason, when_text(e.since), str(e.queued))
        self.console.print(table)

    def tenant(self, tenant: Tenant) -> None:
        """A tenant's tier, and its limits as set and in effect."""
        if self.json:
            self.emit(tenant.to_dict())
            return
        self.console.print(f"tenant {tenant.tenant_id}  tier {tenant.tier}")
        table = Table("limit", "set", "in effect")
        for name in (
            "max_concurrency",
            "max_waiting",
            "submit_rate_per_second",
            "submit_burst",
            "weight",
        ):
            value = getattr(tenant.limits, name)
            table.add_row(
                name, str(value) if value else "-", str(getattr(tenant.effective_limits, name))
            )
        self.console.print(table)


async def watch_tasks(client: AsyncClient, task_id: str, out: Output, after: int = 0) -> int:
    """Follow a task; a progress bar (or JSON lines) until it ends. Exit 0 only if it succeeded."""
    final: Task | None = None
    if out.json:
        async for event in client.watch(task_id, after_sequence=after):
            sys.stdout.write(json.dumps(event.to_dict()) + "\n")
            sys.stdout.flush()
            final = event.task
    else:
        with Progress(
            TextColumn("[bold]{task.fields[label]}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=out.console,
        ) as progress:
            bar = progress.add_task(
                "watch", total=100, label=progress_label(task_id, ""), status="..."
            )
            async for event in client.watch(task_id, after_sequence=after):
                progress.update(
                    bar,
                    completed=event.task.progress,
                    status=status_text(event.task),
                    label=progress_label(task_id, event.task.target),
                )
                final = event.task
        if final is not None and final.terminal:
            out.task(final)
    if final is None or not final.terminal:
        final = await client.get(task_id)
        if not out.json:
            out.task(final)
    return 0 if final.status == TaskStatus.SUCCEEDED else 3
