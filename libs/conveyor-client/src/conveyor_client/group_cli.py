"""``conveyor group submit|get|watch|cancel``: task groups from the command line, with a progress
bar for the group and one per child (wired into :mod:`conveyor_client.cli`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from conveyor.tasks.v1 import group_pb2, task_pb2
from conveyor_client.client import AsyncConveyorClient
from conveyor_client.groups import delayed
from conveyor_client.options import build_spec

KINDS = ["video", "image", "text", "audio"]


class GroupUsageError(ValueError):
    """Bad command-line input (exit code 2)."""


def _short(enum: Any, value: int, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix).lower()


def _inputs(value: str) -> list[dict[str, Any]]:
    """A JSON array of input objects, or @file with one (or with one JSON object per line)."""
    text = Path(value[1:]).read_text() if value.startswith("@") else value
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        try:
            doc = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise GroupUsageError(f"--inputs is not JSON or JSON lines: {exc}") from None
    if not isinstance(doc, list) or not doc or not all(isinstance(d, dict) for d in doc):
        raise GroupUsageError("--inputs must be a non-empty list of JSON objects")
    return doc


def add_group_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """``conveyor group ...``."""
    group = sub.add_parser(
        "group", parents=[common], help="task groups (submit, get, watch, cancel)"
    )
    gsub = group.add_subparsers(
        dest="group_command", required=True, metavar="submit|get|watch|cancel"
    )
    p = gsub.add_parser("submit", parents=[common], help="submit a group of tasks of one model")
    p.add_argument("kind", choices=KINDS, help="kind of every child")
    p.add_argument("--model", required=True, help="owner/name[:version] of every child")
    p.add_argument(
        "--inputs", required=True, help="JSON list of input objects (one child each), or @file"
    )
    p.add_argument("--fail-fast", action="store_true", help="a child's failure cancels the rest")
    p.add_argument("--delay", type=float, help="seconds before any child may start")
    p.add_argument("--follow-up-model", help="fan-in task run when every child succeeded")
    p.add_argument("--follow-up-kind", choices=KINDS, default="video")
    p.add_argument("--follow-up-input", default="{}", help="the follow-up's own input (JSON)")
    p.add_argument("--outputs-field", default="", help="follow-up input field of the outputs")
    p.add_argument("--request-id", help="idempotency key (default: a new uuid4)")
    p.add_argument(
        "--webhook", metavar="URL", help="https URL sent the signed group.completed event"
    )
    p.add_argument("--watch", action="store_true", help="show live progress bars")
    for name, text in (("get", "show a group"), ("watch", "follow a group until it ends")):
        p = gsub.add_parser(name, parents=[common], help=text)
        p.add_argument("group_id")
    p = gsub.add_parser("cancel", parents=[common], help="cancel every child of a group")
    p.add_argument("group_id")
    p.add_argument("--reason", default="")


def print_group(console: Console, as_json: bool, group: group_pb2.Group) -> None:
    """One group (human table or JSON)."""
    if as_json:
        doc = json_format.MessageToDict(group, preserving_proto_field_name=True)
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return
    p = group.progress
    table = Table(show_header=False, box=None)
    rows = [
        ("group_id", group.group_id),
        ("status", _short(group_pb2.GroupStatus, group.status, "GROUP_STATUS_")),
        ("policy", _short(group_pb2.GroupPolicy, group.policy or 1, "GROUP_POLICY_")),
        ("progress", f"{p.done}/{p.total} done ({p.percent:.1f}%)"),
        (
            "children",
            f"{p.succeeded} succeeded, {p.failed} failed, {p.canceled} canceled,"
            f" {p.running} running, {p.queued} queued",
        ),
    ]
    if group.follow_up_task_id:
        rows.append(("follow_up_task_id", group.follow_up_task_id))
    if group.cancel_reason:
        rows.append(("cancel_reason", group.cancel_reason))
    for key, value in rows:
        table.add_row(f"[bold]{key}[/bold]", value)
    console.print(table)


async def watch_group(
    client: AsyncConveyorClient, group_id: str, console: Console, as_json: bool
) -> int:
    """Follow a group: one bar for the group, one per child (or JSON lines). Exit 0 only when the
    group succeeded."""
    last: group_pb2.Group | None = None
    if as_json:
        async for event in client.watch_group(group_id):
            doc = json_format.MessageToDict(event, preserving_proto_field_name=True)
            sys.stdout.write(json.dumps(doc) + "\n")
            sys.stdout.flush()
            last = event.group
    else:
        group = await client.get_group(group_id)
        with Progress(
            TextColumn("[bold]{task.fields[name]}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            top = progress.add_task(
                "group", total=group.progress.total, name=f"group {group_id[:8]}", status="..."
            )
            bars = {
                t: progress.add_task("child", total=100, name=f"  #{i} {t[:8]}", status="queued")
                for i, t in enumerate(group.child_task_ids)
            }
            async for event in client.watch_group(group_id):
                g = event.group
                last = g
                progress.update(
                    top,
                    completed=g.progress.done,
                    status=f"{_short(group_pb2.GroupStatus, g.status, 'GROUP_STATUS_')}"
                    f" {g.progress.percent:.0f}%",
                )
                if event.HasField("child_event"):
                    task = event.child_event.task
                    bar = bars.get(task.task_id)
                    if bar is not None:
                        progress.update(
                            bar,
                            completed=task.progress,
                            status=_short(task_pb2.TaskStatus, task.status, "TASK_STATUS_"),
                        )
        if last is not None:
            print_group(console, False, await client.get_group(group_id))
    if last is None:
        last = await client.get_group(group_id)
    return 0 if last.status == group_pb2.GROUP_STATUS_SUCCEEDED else 3


async def run_group(
    client: AsyncConveyorClient, args: argparse.Namespace, console: Console, as_json: bool
) -> int:
    """Run one ``conveyor group`` command."""
    cmd = args.group_command
    if cmd == "submit":
        children = [
            build_spec(args.kind, model=args.model, input=doc) for doc in _inputs(args.inputs)
        ]
        if args.delay:
            children = [delayed(c, delay=args.delay) for c in children]
        follow_up = None
        if args.follow_up_model:
            try:
                fu_input = json.loads(args.follow_up_input)
            except json.JSONDecodeError as exc:
                raise GroupUsageError(f"--follow-up-input is not valid JSON: {exc}") from None
            follow_up = build_spec(args.follow_up_kind, model=args.follow_up_model, input=fu_input)
        group = await client.submit_group(
            children,
            request_id=args.request_id,
            fail_fast=args.fail_fast,
            follow_up=follow_up,
            outputs_field=args.outputs_field,
            webhook_url=args.webhook,
        )
        if args.watch:
            return await watch_group(client, group.group_id, console, as_json)
        print_group(console, as_json, group)
        return 0
    if cmd == "get":
        print_group(console, as_json, await client.get_group(args.group_id))
        return 0
    if cmd == "watch":
        return await watch_group(client, args.group_id, console, as_json)
    group = await client.cancel_group(args.group_id, reason=args.reason)
    print_group(console, as_json, group)
    return 0
