"""``conveyor``: the command line on the SDK.

Address and token come from ``--address``/``--token`` or ``CONVEYOR_ADDRESS``/``CONVEYOR_TOKEN``.
``--json`` prints machine-readable output (one JSON document, or one JSON line per watch event).
Exit codes: 0 success, 1 the call failed (the status and each bad field go to stderr), 2 usage,
3 a followed task (``watch``, ``submit --wait/--watch``) ended without succeeding.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from conveyor.tasks.v1 import admin_service_pb2 as admin_pb2
from conveyor.tasks.v1 import task_pb2
from conveyor_client.client import TERMINAL_EVENTS, AsyncConveyorClient, build_spec
from conveyor_client.errors import ConveyorError
from conveyor_client.group_cli import GroupUsageError, add_group_parser, run_group
from conveyor_client.token import DEFAULT_AUDIENCE, DEFAULT_ISSUER, mint_token

DEFAULT_ADDRESS = "127.0.0.1:50051"
KINDS = ["video", "image", "text", "audio"]
PRIORITIES = ["urgent", "high", "normal", "low"]
TIERS = ["free", "premium", "pro"]
STATUSES = [
    "queued",
    "dispatched",
    "running",
    "succeeded",
    "failed",
    "canceled",
    "dead_lettered",
    "expired",
]


class UsageError(Exception):
    """A bad command line argument detected after parsing."""


def _status(name: str) -> task_pb2.TaskStatus.ValueType:
    return task_pb2.TaskStatus.Value("TASK_STATUS_" + name.upper())


def _kind(name: str) -> task_pb2.TaskKind.ValueType:
    return task_pb2.TaskKind.Value("TASK_KIND_" + name.upper())


def _short(enum: Any, value: int, prefix: str) -> str:
    try:
        return str(enum.Name(value)).removeprefix(prefix).lower()
    except ValueError:
        return str(value)


def _to_dict(msg: Message) -> dict[str, Any]:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def _load_input(value: str | None) -> dict[str, Any] | None:
    if value is None:
        return None
    text = Path(value[1:]).read_text() if value.startswith("@") else value
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--input is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise UsageError("--input must be a JSON object")
    return doc


def _labels(pairs: Sequence[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep:
            raise UsageError(f"--label {pair!r} must be KEY=VALUE")
        out[key] = value
    return out


def _ts(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(f"{value!r} is not an ISO-8601 time") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


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

    def task(self, task: task_pb2.Task, deduplicated: bool | None = None) -> None:
        """One task."""
        if self.json:
            data = _to_dict(task)
            if deduplicated is not None:
                data = {"task": data, "deduplicated": deduplicated}
            self.emit(data)
            return
        table = Table(show_header=False, box=None)
        status = _short(task_pb2.TaskStatus, task.status, "TASK_STATUS_")
        target = task.spec.model or task.spec.deployment
        rows = [
            ("task_id", task.task_id),
            ("status", status),
            ("kind", _short(task_pb2.TaskKind, task.spec.kind, "TASK_KIND_")),
            ("model", target),
            ("progress", f"{task.progress}%"),
            ("attempt", f"{task.attempt}/{task.max_attempts}"),
            ("created_at", task.created_at.ToJsonString() if task.HasField("created_at") else ""),
        ]
        if task.queue_position:
            rows.append(("queue_position", str(task.queue_position)))
        if task.HasField("estimated_start_at"):
            rows.append(("estimated_start_at", task.estimated_start_at.ToJsonString()))
        if task.HasField("error") and task.error.code:
            rows.append(("error", f"{task.error.code}: {task.error.message}"))
        if task.HasField("result"):
            rows.extend(("output", f.url or f.source_url) for f in task.result.files)
        if deduplicated:
            rows.append(("deduplicated", "yes"))
        for key, value in rows:
            table.add_row(f"[bold]{key}[/bold]", value)
        self.console.print(table)

    def tasks(self, tasks: Sequence[task_pb2.Task]) -> None:
        """A list of tasks."""
        if self.json:
            self.emit([_to_dict(t) for t in tasks])
            return
        table = Table("task_id", "status", "kind", "model", "progress", "created_at")
        for t in tasks:
            table.add_row(
                t.task_id,
                _short(task_pb2.TaskStatus, t.status, "TASK_STATUS_"),
                _short(task_pb2.TaskKind, t.spec.kind, "TASK_KIND_"),
                t.spec.model or t.spec.deployment,
                f"{t.progress}%",
                t.created_at.ToJsonString() if t.HasField("created_at") else "",
            )
        self.console.print(table)


async def _watch(client: AsyncConveyorClient, task_id: str, out: Output, after: int = 0) -> int:
    """Follow a task; a progress bar (or JSON lines) until it ends. Exit 0 only if it succeeded."""
    final: task_pb2.Task | None = None
    if out.json:
        async for event in client.watch(task_id, after_sequence=after):
            sys.stdout.write(json.dumps(_to_dict(event)) + "\n")
            sys.stdout.flush()
            if event.type in TERMINAL_EVENTS:
                final = event.task
    else:
        with Progress(
            TextColumn("[bold]{task.fields[task_id]}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=out.console,
        ) as progress:
            bar = progress.add_task("watch", total=100, task_id=task_id[:8], status="...")
            async for event in client.watch(task_id, after_sequence=after):
                status = _short(task_pb2.TaskStatus, event.task.status, "TASK_STATUS_")
                progress.update(bar, completed=event.task.progress, status=status)
                if event.type in TERMINAL_EVENTS:
                    final = event.task
        if final is not None:
            out.task(final)
    if final is None:
        final = await client.get(task_id)
        if not out.json:
            out.task(final)
    return 0 if final.status == task_pb2.TASK_STATUS_SUCCEEDED else 3


def _selector(args: argparse.Namespace) -> admin_pb2.BulkSelector:
    sel = admin_pb2.BulkSelector(
        task_ids=args.task_id or [],
        tenant_id=args.tenant or "",
        model=args.model or "",
        statuses=[_status(s) for s in (args.status or [])],
        limit=args.limit,
    )
    before = _ts(args.created_before)
    if before is not None:
        sel.created_before.FromDatetime(before)
    return sel


async def _run(args: argparse.Namespace) -> int:
    out = Output(args.json)
    if args.command == "token":
        return _token(args, out)
    credentials = _credentials(args)
    client = AsyncConveyorClient(
        args.address, args.token, timeout=args.timeout, credentials=credentials
    )
    try:
        return await _dispatch(client, args, out)
    finally:
        await client.close()


async def _dispatch(client: AsyncConveyorClient, args: argparse.Namespace, out: Output) -> int:
    cmd = args.command
    if cmd == "group":
        try:
            return await run_group(client, args, out.console, out.json)
        except GroupUsageError as exc:
            raise UsageError(str(exc)) from None
    if cmd == "submit":
        spec = build_spec(
            args.kind,
            model=args.model,
            deployment=args.deployment,
            input=_load_input(args.input),
            priority=args.priority or task_pb2.PRIORITY_UNSPECIFIED,
            run_timeout=args.run_timeout,
            max_attempts=args.max_attempts,
            labels=_labels(args.label),
            webhook_url=args.webhook,
        )
        resp = await client.submit(spec=spec, request_id=args.request_id)
        if args.watch or args.wait:
            if not out.json:
                out.console.print(f"submitted {resp.task.task_id}")
            if args.watch:
                return await _watch(client, resp.task.task_id, out)
            final = await client.wait(resp.task.task_id)
            out.task(final)
            return 0 if final.status == task_pb2.TASK_STATUS_SUCCEEDED else 3
        out.task(resp.task, resp.deduplicated)
        return 0
    if cmd == "get":
        out.task(await client.get(args.task_id))
        return 0
    if cmd == "list":
        collected: list[task_pb2.Task] = []
        async for page in client.list(
            statuses=[_status(s) for s in (args.status or [])],
            kinds=[_kind(k) for k in (args.kind or [])],
            model=args.model or "",
            created_after=_ts(args.created_after),
            created_before=_ts(args.created_before),
            page_size=args.page_size,
        ):
            collected.extend(page)
            if len(collected) >= args.limit:
                break
        out.tasks(collected[: args.limit])
        return 0
    if cmd == "cancel":
        out.task(await client.cancel(args.task_id, reason=args.reason or ""))
        return 0
    if cmd == "watch":
        return await _watch(client, args.task_id, out, args.after)
    if cmd == "stats":
        resp_stats = await client.stats(
            kind=_kind(args.kind) if args.kind else task_pb2.TASK_KIND_UNSPECIFIED,
            model=args.model or "",
        )
        if out.json:
            out.emit(_to_dict(resp_stats))
            return 0
        table = Table(
            "kind", "model", "waiting", "active", "succeeded", "failed", "dead", "canceled",
            "expired", "oldest wait", "run p50",
        )  # fmt: skip
        for row in resp_stats.stats:
            table.add_row(
                _short(task_pb2.TaskKind, row.kind, "TASK_KIND_"),
                row.model or "(all)",
                str(row.waiting),
                str(row.active),
                str(row.succeeded),
                str(row.failed),
                str(row.dead_lettered),
                str(row.canceled),
                str(row.expired),
                f"{row.oldest_waiting_age.ToTimedelta().total_seconds():.1f}s",
                f"{row.recent_run_time_p50.ToTimedelta().total_seconds():.1f}s",
            )
        out.console.print(table)
        return 0
    if cmd == "admin":
        return await _admin(client, args, out)
    raise UsageError(f"unknown command {cmd!r}")


async def _admin(client: AsyncConveyorClient, args: argparse.Namespace, out: Output) -> int:
    sub = args.admin_command
    if sub == "tenant":
        if args.tenant_command == "get":
            tenant = await client.get_tenant(args.tenant_id)
        else:
            limits = task_pb2.TenantLimits(
                max_concurrency=args.max_concurrency,
                max_waiting=args.max_waiting,
                submit_rate_per_second=args.submit_rate,
                submit_burst=args.submit_burst,
                weight=args.weight,
            )
            tenant = await client.upsert_tenant(
                args.tenant_id, tier=args.tier or task_pb2.TIER_UNSPECIFIED, limits=limits
            )
        if out.json:
            out.emit(_to_dict(tenant))
        else:
            out.console.print_json(json.dumps(_to_dict(tenant)))
        return 0
    if sub in ("pause", "resume"):
        if sub == "pause":
            paused = await client.pause_model(args.model, reason=args.reason or "")
        else:
            paused = await client.resume_model(args.model)
        if out.json:
            out.emit({"model": args.model, "paused": paused})
        else:
            out.console.print(f"{args.model}: {'paused' if paused else 'running'}")
        return 0
    if sub == "dead-letters":
        page = await client.list_dead_letters(
            tenant_id=args.tenant or "", page_size=args.page_size, page_token=args.page_token or ""
        )
        if out.json:
            out.emit(_to_dict(page))
        else:
            out.tasks(list(page.tasks))
            if page.next_page_token:
                out.console.print(f"next page: --page-token {page.next_page_token}")
        return 0
    if sub in ("redrive", "bulk-cancel"):
        selector = _selector(args)
        if sub == "redrive":
            ids = await client.redrive(selector)
        else:
            ids = await client.bulk_cancel(selector, reason=args.reason or "")
        if out.json:
            out.emit({"task_ids": ids})
        else:
            verb = "redriven" if sub == "redrive" else "canceled"
            out.console.print(f"{len(ids)} task(s) {verb}")
            for task_id in ids:
                out.console.print(f"  {task_id}")
        return 0
    raise UsageError(f"unknown admin command {sub!r}")


def _token(args: argparse.Namespace, out: Output) -> int:
    if args.secret_file:
        secret = Path(args.secret_file).read_bytes().strip()
    elif args.secret:
        secret = args.secret.encode()
    else:
        raise UsageError("conveyor token needs --secret or --secret-file")
    token = mint_token(
        secret,
        args.tenant,
        subject=args.subject,
        tier=args.tier,
        role=args.role,
        issuer=args.issuer,
        audience=args.audience,
        ttl_seconds=args.ttl,
    )
    if out.json:
        out.emit({"token": token})
    else:
        sys.stdout.write(token + "\n")
    return 0


def _credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    if not (args.tls or args.ca_file or args.cert_file):
        return None
    root = Path(args.ca_file).read_bytes() if args.ca_file else None
    key = Path(args.key_file).read_bytes() if args.key_file else None
    cert = Path(args.cert_file).read_bytes() if args.cert_file else None
    return grpc.ssl_channel_credentials(
        root_certificates=root, private_key=key, certificate_chain=cert
    )


def _common_options(*, suppress: bool) -> argparse.ArgumentParser:
    """Options valid before or after the command (after it, they do not reset earlier values)."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--address",
        default=default(os.environ.get("CONVEYOR_ADDRESS", DEFAULT_ADDRESS)),
        help="gateway host:port (env CONVEYOR_ADDRESS; default 127.0.0.1:50051)",
    )
    common.add_argument(
        "--token",
        default=default(os.environ.get("CONVEYOR_TOKEN")),
        help="bearer token (env CONVEYOR_TOKEN)",
    )
    common.add_argument(
        "--timeout", type=float, default=default(10.0), help="per-call deadline, seconds"
    )
    common.add_argument(
        "--json", action="store_true", default=default(False), help="machine-readable JSON output"
    )
    common.add_argument(
        "--tls", action="store_true", default=default(False), help="connect with TLS"
    )
    common.add_argument(
        "--ca-file", default=default(None), help="CA bundle of the gateway's certificate"
    )
    common.add_argument(
        "--cert-file", default=default(None), help="client certificate (mutual TLS)"
    )
    common.add_argument("--key-file", default=default(None), help="client private key (mutual TLS)")
    return common


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    top = _common_options(suppress=False)
    common = _common_options(suppress=True)

    parser = argparse.ArgumentParser(
        prog="conveyor",
        description="Submit and follow Conveyor generation tasks.",
        parents=[top],
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("submit", parents=[common], help="submit a task")
    p.add_argument("kind", choices=KINDS, help="kind of generation")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--model", help="owner/name or owner/name:version")
    target.add_argument("--deployment", help="owner/name of a deployment")
    p.add_argument("--input", help="input document: JSON, or @file with JSON")
    p.add_argument("--priority", choices=PRIORITIES)
    p.add_argument("--max-attempts", type=int, default=0)
    p.add_argument("--run-timeout", type=float, help="seconds the provider may run")
    p.add_argument("--label", action="append", metavar="KEY=VALUE")
    p.add_argument("--webhook", metavar="URL", help="https URL notified of terminal events")
    p.add_argument("--request-id", help="idempotency key (default: a new uuid4)")
    follow = p.add_mutually_exclusive_group()
    follow.add_argument("--wait", action="store_true", help="wait until the task ends")
    follow.add_argument("--watch", action="store_true", help="show a live progress bar")

    p = sub.add_parser("get", parents=[common], help="show one task")
    p.add_argument("task_id")

    p = sub.add_parser("list", parents=[common], help="list your tasks, newest first")
    p.add_argument("--status", action="append", choices=STATUSES)
    p.add_argument("--kind", action="append", choices=KINDS)
    p.add_argument("--model")
    p.add_argument("--created-after", help="ISO-8601 time")
    p.add_argument("--created-before", help="ISO-8601 time")
    p.add_argument("--page-size", type=int, default=50)
    p.add_argument("--limit", type=int, default=50, help="most tasks shown")

    p = sub.add_parser("cancel", parents=[common], help="cancel a task")
    p.add_argument("task_id")
    p.add_argument("--reason")

    p = sub.add_parser("watch", parents=[common], help="follow a task until it ends")
    p.add_argument("task_id")
    p.add_argument("--after", type=int, default=0, help="resume after this sequence number")

    p = sub.add_parser("stats", parents=[common], help="queue statistics")
    p.add_argument("--kind", choices=KINDS)
    p.add_argument("--model")

    p = sub.add_parser("token", parents=[common], help="mint a development HS256 token")
    p.add_argument("--secret", help="HS256 secret (same as GATEWAY_JWT_HS256_SECRET)")
    p.add_argument("--secret-file", help="file holding the secret")
    p.add_argument("--tenant", required=True)
    p.add_argument("--subject")
    p.add_argument("--tier", choices=TIERS, default="free")
    p.add_argument("--role", choices=["tenant", "admin"], default="tenant")
    p.add_argument("--issuer", default=DEFAULT_ISSUER)
    p.add_argument("--audience", default=DEFAULT_AUDIENCE)
    p.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds")

    admin = sub.add_parser("admin", parents=[common], help="operator commands (admin role)")
    asub = admin.add_subparsers(dest="admin_command", required=True, metavar="ADMIN_COMMAND")
    tenant = asub.add_parser("tenant", parents=[common], help="tenant tier and limits")
    tsub = tenant.add_subparsers(dest="tenant_command", required=True, metavar="get|set")
    p = tsub.add_parser("get", parents=[common], help="show a tenant")
    p.add_argument("tenant_id")
    p = tsub.add_parser("set", parents=[common], help="create or update a tenant")
    p.add_argument("tenant_id")
    p.add_argument("--tier", choices=TIERS)
    p.add_argument("--max-concurrency", type=int, default=0)
    p.add_argument("--max-waiting", type=int, default=0)
    p.add_argument("--submit-rate", type=float, default=0.0)
    p.add_argument("--submit-burst", type=int, default=0)
    p.add_argument("--weight", type=int, default=0)

    p = asub.add_parser("pause", parents=[common], help="pause dispatch of a model")
    p.add_argument("model")
    p.add_argument("--reason")
    p = asub.add_parser("resume", parents=[common], help="resume dispatch of a model")
    p.add_argument("model")
    p = asub.add_parser("dead-letters", parents=[common], help="list dead-lettered tasks")
    p.add_argument("--tenant")
    p.add_argument("--page-size", type=int, default=50)
    p.add_argument("--page-token")
    for name, text in (
        ("redrive", "queue dead-lettered tasks again"),
        ("bulk-cancel", "cancel every matching task"),
    ):
        p = asub.add_parser(name, parents=[common], help=text)
        p.add_argument("--task-id", action="append", help="explicit task id (repeatable)")
        p.add_argument("--tenant")
        p.add_argument("--model")
        p.add_argument("--status", action="append", choices=STATUSES)
        p.add_argument("--created-before", help="ISO-8601 time")
        p.add_argument("--limit", type=int, default=0)
        if name == "bulk-cancel":
            p.add_argument("--reason")
    add_group_parser(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return asyncio.run(_run(args))
    except ConveyorError as exc:
        if args.json:
            sys.stderr.write(
                json.dumps(
                    {
                        "code": exc.code.name,
                        "message": exc.message,
                        "field_violations": [
                            {"field": v.field, "description": v.description}
                            for v in exc.field_violations
                        ],
                        "retry_after_seconds": exc.retry_after_seconds,
                    }
                )
                + "\n"
            )
        else:
            sys.stderr.write(f"error: {exc}\n")
        return 1
    except UsageError as exc:
        sys.stderr.write(f"conveyor: {exc}\n")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
