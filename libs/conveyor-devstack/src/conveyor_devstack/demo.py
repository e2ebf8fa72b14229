"""``python -m conveyor_devstack demo`` (``make run``): the whole system with a live demo workload.

Starts the devstack and every service (:mod:`conveyor_devstack.system`), creates three tenants with
their tiers and limits through the admin API, and submits ~30 tasks across them: videos, images and
text on several models and every priority class. Three are scripted to be refused once by the
provider (a retryable 408) and succeed on their second attempt, one fails on every attempt and is
dead-lettered, one is cancelled while it runs. The terminal shows each task's progress bar from the
SDK's watch stream, the queue depth (GetQueueStats) and the slots in use against the limits (the
scheduler leader's metrics), then a summary computed from the fake Replicate's ledger: tasks by
outcome, waits by priority class, and the peak slots held globally, per tenant and per model against
their limits. It ends by itself (exit 0 when every task ended as scripted and no limit was exceeded);
Ctrl-C stops everything cleanly. Without a terminal (CI) it prints plain progress lines instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from conveyor.tasks.v1 import task_pb2
from conveyor_client import TERMINAL_EVENTS, AsyncConveyorClient, ConveyorError
from conveyor_devstack.demo_workload import (
    DEADLINE_SECONDS,
    GLOBAL_LIMIT,
    KIND_COST,
    STATUS_STYLE,
    TENANTS,
    VIDEO_MODEL,
    DemoTask,
    demo_config,
    summarize,
    workload,
)
from conveyor_devstack.processes import metric_samples
from conveyor_devstack.system import ConveyorSystem

# --------------------------------------------------------------------------------------------------
# The workload


# --------------------------------------------------------------------------------------------------
# The run


class Demo:
    """Runs the workload on a started system and renders it."""

    def __init__(self, system: ConveyorSystem, console: Console, *, live: bool) -> None:
        self.system = system
        self.console = console
        self.live = live
        self.clients: dict[str, AsyncConveyorClient] = {}
        self.admin = AsyncConveyorClient(
            system.gateway_address, system.mint_token("ops", role="admin")
        )
        self.tasks: list[DemoTask] = []
        self.t0 = time.monotonic()
        self.queue_waiting = 0
        self.queue_active = 0
        self.slots: dict[str, tuple[float, float]] = {}
        """scope -> (in use, limit), from the leader's metrics."""
        self.leader: str | None = None
        self._http = httpx.AsyncClient(timeout=2.0, trust_env=False)
        self._background: list[asyncio.Task[None]] = []

    def elapsed(self) -> float:
        """Seconds since the workload began."""
        return time.monotonic() - self.t0

    def say(self, text: str) -> None:
        """A plain progress line (non-TTY mode)."""
        if not self.live:
            self.console.print(f"[{self.elapsed():6.1f}s] {text}", highlight=False, soft_wrap=True)

    async def close(self) -> None:
        """Stop the background work and close the clients."""
        for task in self._background:
            task.cancel()
        for task in self._background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for client in [self.admin, *self.clients.values()]:
            await client.close()
        await self._http.aclose()

    async def ledger(self) -> list[dict[str, Any]]:
        """Every event of the fake's ledger."""
        resp = await self._http.get(f"{self.system.fake_url}/_fake/ledger")
        resp.raise_for_status()
        events: list[dict[str, Any]] = resp.json()["events"]
        return events

    async def setup_tenants(self) -> None:
        """Create the tenants with their tiers and limits (admin API)."""
        for tenant, (tier, limit) in TENANTS.items():
            await self.admin.upsert_tenant(
                tenant, tier=tier, limits=task_pb2.TenantLimits(max_concurrency=limit)
            )
            self.clients[tenant] = AsyncConveyorClient(
                self.system.gateway_address, self.system.mint_token(tenant, tier=tier)
            )
            self.say(f"tenant {tenant}: tier {tier}, {limit} slots")

    async def run(self) -> None:
        """Submit, follow, cancel the scripted one; returns when every task ended."""
        first, rest = workload()
        self.tasks = [*first, *rest]
        # The provider refuses the next three creates (408, retryable): the three flaky tasks.
        await self._http.post(
            f"{self.system.fake_url}/_fake/config", json={"create_script": [408] * 3}
        )
        self.t0 = time.monotonic()
        self._background.append(asyncio.create_task(self._monitor()))
        watchers = [asyncio.create_task(self._submit_and_follow(t)) for t in first]
        await asyncio.sleep(1.0)
        for task in rest:
            watchers.append(asyncio.create_task(self._submit_and_follow(task)))
            await asyncio.sleep(0.05)
        async with asyncio.timeout(DEADLINE_SECONDS):
            await asyncio.gather(*watchers)
        await self._refresh_stats()

    async def _submit_and_follow(self, task: DemoTask) -> None:
        client = self.clients[task.tenant]
        try:
            resp = await client.submit(spec=task.spec)
        except ConveyorError as exc:
            task.status, task.note, task.finished = "rejected", str(exc), True
            self.say(f"{task.tenant}/{task.label}: submit refused: {exc}")
            return
        task.task_id = resp.task.task_id
        task.created_at = resp.task.created_at.ToDatetime().timestamp()
        task.status = "queued"
        self.say(f"{task.tenant}/{task.label}: submitted ({task.kind}, {task.priority})")
        canceller: asyncio.Task[None] | None = None
        while not task.finished:
            last = task.events[-1].sequence if task.events else 0
            try:
                async for event in client.watch(task.task_id, after_sequence=last):
                    task.events.append(event)
                    self._apply(task, event)
                    if (
                        task.role == "cancel"
                        and event.type == task_pb2.TASK_EVENT_TYPE_STARTED
                        and canceller is None
                    ):
                        canceller = asyncio.create_task(self._cancel_later(client, task))
                task.finished = True
            except ConveyorError as exc:  # the SDK resumed on UNAVAILABLE already
                if exc.code.name != "DEADLINE_EXCEEDED":
                    task.status, task.note, task.finished = "watch failed", str(exc), True
        if canceller is not None:
            await canceller

    async def _cancel_later(self, client: AsyncConveyorClient, task: DemoTask) -> None:
        await asyncio.sleep(2.0)
        self.say(f"{task.tenant}/{task.label}: cancelling while it runs")
        try:
            await client.cancel(task.task_id, reason="demo: cancelled while running")
        except ConveyorError as exc:
            task.note = f"cancel failed: {exc}"

    def _apply(self, task: DemoTask, event: task_pb2.TaskEvent) -> None:
        snapshot = event.task
        before = task.status
        task.status = task_pb2.TaskStatus.Name(snapshot.status).removeprefix("TASK_STATUS_").lower()
        task.progress = snapshot.progress
        task.attempt = snapshot.attempt
        name = task_pb2.TaskEventType.Name(event.type).removeprefix("TASK_EVENT_TYPE_").lower()
        if event.type == task_pb2.TASK_EVENT_TYPE_DISPATCHED and task.dispatched_at is None:
            task.dispatched_at = event.occurred_at.ToDatetime().timestamp()
        if event.type == task_pb2.TASK_EVENT_TYPE_RETRY_SCHEDULED:
            task.note = f"retry: {snapshot.error.message[:40]}"
        elif event.type in TERMINAL_EVENTS and snapshot.error.message:
            task.note = snapshot.error.message[:48]
        elif event.type == task_pb2.TASK_EVENT_TYPE_CANCEL_REQUESTED:
            task.note = "cancel requested"
        if name != "progress" and (task.status != before or name == "retry_scheduled"):
            extra = f" ({task.note})" if task.note and name != "dispatched" else ""
            self.say(f"{task.tenant}/{task.label}: {name} (attempt {task.attempt}){extra}")

    async def _monitor(self) -> None:
        last_line = 0.0
        while True:
            with contextlib.suppress(Exception):
                await self._refresh_stats()
            if not self.live and time.monotonic() - last_line >= 5.0:
                last_line = time.monotonic()
                self.say(self._stats_line())
            await asyncio.sleep(1.0)

    async def _refresh_stats(self) -> None:
        stats = await self.admin.stats(rpc_timeout=2.0)
        totals = [s for s in stats.stats if not s.model]
        self.queue_waiting = sum(s.waiting for s in totals)
        self.queue_active = sum(s.active for s in totals)
        self.leader = await self.system.leader(wait=0.0)
        if self.leader is None:
            return
        text = await self.system.metrics(self.leader)
        used = {
            lab.get("scope", ""): v
            for lab, v in metric_samples(text, "conveyor_scheduler_active_slots")
        }
        limit = {
            lab.get("scope", ""): v
            for lab, v in metric_samples(text, "conveyor_scheduler_slot_limit")
        }
        self.slots = {scope: (used.get(scope, 0.0), limit[scope]) for scope in limit}

    def _tenant_slots(self) -> dict[str, int]:
        held: Counter[str] = Counter()
        for t in self.tasks:
            if t.status in ("dispatched", "running"):
                held[t.tenant] += KIND_COST.get(t.kind, 1)
        return dict(held)

    def _stats_line(self) -> str:
        done = sum(1 for t in self.tasks if t.finished)
        g_used, g_limit = self.slots.get("global", (0.0, float(GLOBAL_LIMIT)))
        tenants = " ".join(
            f"{t}={n}/{TENANTS[t][1]}" for t, n in sorted(self._tenant_slots().items())
        )
        return (
            f"queue: {self.queue_waiting} waiting, {self.queue_active} active; "
            f"slots {int(g_used)}/{int(g_limit)} global {tenants}; "
            f"{done}/{len(self.tasks)} tasks done; leader {self.leader or '?'}"
        )

    # -- rendering ---------------------------------------------------------------------------

    def render(self) -> Group:
        """The live view: a header with queue and slots, and one row per task."""
        header = Table.grid(padding=(0, 2))
        header.add_column(style="bold")
        header.add_column()
        g_used, g_limit = self.slots.get("global", (0.0, float(GLOBAL_LIMIT)))
        header.add_row(
            "queue",
            f"{self.queue_waiting} waiting · {self.queue_active} active · "
            f"leader {self.leader or '…'} · {self.elapsed():.0f}s",
        )
        slot_row = Text()
        slot_row.append(f"global {int(g_used)}/{int(g_limit)}  ")
        held = self._tenant_slots()
        for tenant, (tier, limit) in TENANTS.items():
            slot_row.append(f"{tenant} ({tier}) {held.get(tenant, 0)}/{limit}  ")
        video = self.slots.get(f"model:{VIDEO_MODEL}")
        if video:
            slot_row.append(f"{VIDEO_MODEL} {int(video[0])}/{int(video[1])}")
        header.add_row("slots", slot_row)

        table = Table(expand=True, show_edge=False, pad_edge=False)
        table.add_column("tenant", no_wrap=True)
        table.add_column("task", no_wrap=True)
        table.add_column("kind", no_wrap=True)
        table.add_column("prio", no_wrap=True)
        table.add_column("progress", ratio=2)
        table.add_column("status", no_wrap=True)
        table.add_column("try", justify="right")
        table.add_column("note", ratio=2, no_wrap=True, overflow="ellipsis")
        for t in self.tasks:
            style = STATUS_STYLE.get(t.status, "")
            table.add_row(
                t.tenant,
                t.label,
                t.kind,
                t.priority,
                ProgressBar(total=100, completed=t.progress, width=None),
                Text(t.status, style=style),
                str(t.attempt or ""),
                Text(t.note, style="dim"),
            )
        return Group(Panel(header, title="Conveyor demo", border_style="blue"), table)


# --------------------------------------------------------------------------------------------------
# The summary


# --------------------------------------------------------------------------------------------------
# Entry point


async def run_demo(console: Console, run_dir: Path) -> int:
    """Start everything, run the workload, print the summary, stop everything; the exit code."""
    live = console.is_terminal
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    started = time.monotonic()
    console.print(
        "[bold]Conveyor demo[/]: starting PostgreSQL, Kafka, the fake Replicate and the services…"
    )
    code = 1
    try:
        async with ConveyorSystem.run(demo_config(run_dir=run_dir), fast=True) as system:
            ep = system.endpoints
            console.print(
                f"up in {time.monotonic() - started:.0f}s: gateway {ep.gateway}, ledger {ep.ledger_url}, "
                f"logs {ep.run_dir}",
                highlight=False,
                soft_wrap=True,
            )
            demo = Demo(system, console, live=live)
            try:
                code = await _drive(demo, console, stop, live)
            finally:
                await demo.close()
            console.print("stopping…")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    console.print(f"done in {time.monotonic() - started:.0f}s (exit {code})")
    return code


async def _drive(demo: Demo, console: Console, stop: asyncio.Event, live: bool) -> int:
    await demo.setup_tenants()
    work = asyncio.create_task(demo.run())
    stopper = asyncio.create_task(stop.wait())
    display = (
        Live(demo.render(), console=console, refresh_per_second=4, transient=False)
        if live
        else None
    )
    try:
        if display is not None:
            display.start()
        while not work.done() and not stop.is_set():
            await asyncio.wait({work, stopper}, timeout=0.25, return_when=asyncio.FIRST_COMPLETED)
            if display is not None:
                display.update(demo.render())
    finally:
        if display is not None:
            display.update(demo.render())
            display.stop()
        stopper.cancel()
    if stop.is_set() and not work.done():
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await work
        console.print("interrupted: stopping everything")
        return 130
    try:
        work.result()
    except TimeoutError:
        console.print(f"[red]the workload did not finish within {DEADLINE_SECONDS:.0f}s[/]")
        return 1
    took = demo.elapsed()
    return 0 if summarize(console, demo.tasks, await demo.ledger(), took) else 1


def main() -> int:
    """Entry point of ``python -m conveyor_devstack demo``."""
    run_dir = Path(".devstack/demo").resolve()
    shutil.rmtree(run_dir, ignore_errors=True)  # keep the last run's logs only
    return asyncio.run(run_demo(Console(file=sys.stdout), run_dir))
