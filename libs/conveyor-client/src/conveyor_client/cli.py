"""``conveyor``: the command line on the SDK.

Address and token come from ``--address``/``--token`` or ``CONVEYOR_ADDRESS``/``CONVEYOR_TOKEN``;
``admin`` commands use ``CONVEYOR_ADMIN_TOKEN`` when it is set and ``--token`` is not given.
``--json`` prints machine-readable output (one JSON document, or one JSON line per watch event);
without it the output is text and tables. Enums have one spelling in and out (``succeeded``, ``high``).
Errors never print a traceback: one line on stderr. Exit codes: 0 success, 1 the call failed,
2 usage (bad arguments, unreadable files), 3 a followed task (``watch``, ``submit --wait/--watch``)
ended without succeeding, 130 interrupted, 141 stdout closed early (e.g. ``| head -1``).
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
from typing import Any, NoReturn

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from conveyor_client.errors import ConveyorError
from conveyor_client.group_cli import GroupUsageError, add_group_parser, run_group
from conveyor_client.options import tls_credentials
from conveyor_client.sdk import AsyncClient
from conveyor_client.token import DEFAULT_AUDIENCE, DEFAULT_ISSUER, mint_token
from conveyor_client.types import (
    Priority,
    Task,
    TaskKind,
    TaskStatus,
    Tenant,
    TenantLimits,
    Tier,
)

DEFAULT_ADDRESS = "127.0.0.1:50051"
KINDS = [k.value for k in TaskKind if k != TaskKind.UNSPECIFIED]
PRIORITIES = [p.value for p in Priority if p != Priority.UNSPECIFIED]
TIERS = [t.value for t in Tier if t != Tier.UNSPECIFIED]
STATUSES = [s.value for s in TaskStatus if s != TaskStatus.UNSPECIFIED]


class UsageError(Exception):
    """A bad command line argument detected after parsing."""


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _load_input(value: str | None) -> dict[str, Any] | None:
    if value is None:
        return None
    text = _read(value[1:], "--input file").decode() if value.startswith("@") else value
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


def _when(value: datetime | None) -> str:
    return value.isoformat(timespec="seconds").replace("+00:00", "Z") if value else ""


def _status_text(task: Task) -> str:
    """The status as shown to people: a requested cancel is visible while the task still runs."""
    if task.cancel_requested and not task.terminal:
        return f"{task.status} (cancel requested)"
    return str(task.status)


def _label(task_id: str, model: str) -> str:
    """A progress-bar label that tells tasks apart (UUIDv7 ids share their leading digits)."""
    return f"{model} …{task_id[-8:]}" if model else f"…{task_id[-12:]}"


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
            ("status", _status_text(task)),
            ("kind", str(task.kind)),
            ("model", task.target),
            ("priority", str(task.priority)),
            ("progress", f"{task.progress}%"),
            ("attempt", f"{task.attempt}/{task.max_attempts}"),
            ("created_at", _when(task.created_at)),
        ]
        if task.queue_position:
            rows.append(("queue_position", str(task.queue_position)))
        if task.estimated_start_at:
            rows.append(("estimated_start_at", _when(task.estimated_start_at)))
        if task.finished_at:
            rows.append(("finished_at", _when(task.finished_at)))
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
                _status_text(t),
                str(t.kind),
                t.target,
                str(t.priority),
                f"{t.attempt}/{t.max_attempts}",
                f"{t.progress}%",
                _when(t.created_at),
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
                _when(t.finished_at or t.updated_at),
            )
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


async def _watch(client: AsyncClient, task_id: str, out: Output, after: int = 0) -> int:
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
            bar = progress.add_task("watch", total=100, label=_label(task_id, ""), status="...")
            async for event in client.watch(task_id, after_sequence=after):
                progress.update(
                    bar,
                    completed=event.task.progress,
                    status=_status_text(event.task),
                    label=_label(task_id, event.task.target),
                )
                final = event.task
        if final is not None and final.terminal:
            out.task(final)
    if final is None or not final.terminal:
        final = await client.get(task_id)
        if not out.json:
            out.task(final)
    return 0 if final.status == TaskStatus.SUCCEEDED else 3


def _selector(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "task_ids": args.task_id or [],
        "tenant_id": args.tenant or "",
        "model": args.model or "",
        "statuses": args.status or [],
        "created_before": _ts(args.created_before),
        "limit": args.limit,
    }


def _token_for(args: argparse.Namespace) -> str | None:
    """--token, else CONVEYOR_ADMIN_TOKEN for admin commands (when set), else CONVEYOR_TOKEN."""
    if getattr(args, "token", None):
        return str(args.token)
    if args.command == "admin" and os.environ.get("CONVEYOR_ADMIN_TOKEN"):
        return os.environ["CONVEYOR_ADMIN_TOKEN"]
    return os.environ.get("CONVEYOR_TOKEN") or None


async def _run(args: argparse.Namespace) -> int:
    out = Output(args.json)
    if args.command == "token":
        return _token(args, out)
    credentials = tls_credentials(
        tls=args.tls,
        ca_file=args.ca_file and str(args.ca_file),
        cert_file=args.cert_file and str(args.cert_file),
        key_file=args.key_file and str(args.key_file),
    )
    client = AsyncClient(
        args.address, _token_for(args), timeout=args.timeout, credentials=credentials
    )
    try:
        return await _dispatch(client, args, out)
    finally:
        await client.close()


async def _dispatch(client: AsyncClient, args: argparse.Namespace, out: Output) -> int:
    cmd = args.command
    if cmd == "group":
        try:
            return await run_group(client.raw, args, out.console, out.json)
        except GroupUsageError as exc:
            raise UsageError(str(exc)) from None
    if cmd == "submit":
        resp = await client.submit(
            args.kind,
            model=args.model,
            deployment=args.deployment,
            input=_load_input(args.input),
            priority=args.priority or Priority.UNSPECIFIED,
            run_timeout=args.run_timeout,
            max_attempts=args.max_attempts,
            labels=_labels(args.label),
            webhook_url=args.webhook,
            request_id=args.request_id,
        )
        if args.watch or args.wait:
            if not out.json:
                out.console.print(f"submitted {resp.task.task_id}")
            if args.watch:
                return await _watch(client, resp.task.task_id, out)
            final = await client.wait(resp.task.task_id)
            out.task(final)
            return 0 if final.status == TaskStatus.SUCCEEDED else 3
        out.task(resp.task, resp.deduplicated)
        return 0
    if cmd == "get":
        out.task(await client.get(args.task_id))
        return 0
    if cmd == "list":
        collected = [
            task
            async for task in client.list(
                statuses=args.status or [],
                kinds=args.kind or [],
                model=args.model or "",
                created_after=_ts(args.created_after),
                created_before=_ts(args.created_before),
                page_size=args.page_size,
                limit=args.limit,
            )
        ]
        out.tasks(collected)
        return 0
    if cmd == "cancel":
        out.task(await client.cancel(args.task_id, reason=args.reason or ""))
        return 0
    if cmd == "watch":
        return await _watch(client, args.task_id, out, args.after)
    if cmd == "stats":
        rows = await client.stats(kind=args.kind or TaskKind.UNSPECIFIED, model=args.model or "")
        if out.json:
            out.emit({"stats": [row.to_dict() for row in rows]})
            return 0
        table = Table(
            "kind", "model", "waiting", "active", "succeeded", "failed", "dead", "canceled",
            "expired", "oldest wait", "run p50",
        )  # fmt: skip
        for row in rows:
            table.add_row(
                str(row.kind),
                row.model or "(all)",
                str(row.waiting),
                str(row.active),
                str(row.succeeded),
                str(row.failed),
                str(row.dead_lettered),
                str(row.canceled),
                str(row.expired),
                f"{row.oldest_waiting_seconds:.1f}s",
                f"{row.recent_run_time_p50_seconds:.1f}s",
            )
        out.console.print(table)
        return 0
    if cmd == "admin":
        return await _admin(client, args, out)
    raise UsageError(f"unknown command {cmd!r}")


async def _admin(client: AsyncClient, args: argparse.Namespace, out: Output) -> int:
    sub = args.admin_command
    if sub == "tenant":
        if args.tenant_command == "get":
            tenant = await client.get_tenant(args.tenant_id)
        else:
            limits = TenantLimits(
                max_concurrency=args.max_concurrency,
                max_waiting=args.max_waiting,
                submit_rate_per_second=args.submit_rate,
                submit_burst=args.submit_burst,
                weight=args.weight,
            )
            tenant = await client.upsert_tenant(
                args.tenant_id, tier=args.tier or Tier.UNSPECIFIED, limits=limits
            )
        out.tenant(tenant)
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
        page = await client.dead_letters(
            tenant_id=args.tenant or "", page_size=args.page_size, page_token=args.page_token or ""
        )
        if out.json:
            out.emit(page.to_dict())
        else:
            out.dead_letters(page.tasks)
            if page.next_page_token:
                out.console.print(f"next page: --page-token {page.next_page_token}")
        return 0
    if sub in ("redrive", "bulk-cancel"):
        if sub == "redrive":
            ids = await client.redrive(**_selector(args))
        else:
            ids = await client.bulk_cancel(**_selector(args), reason=args.reason or "")
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
        secret = _read(args.secret_file, "--secret-file").strip()
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


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump): ``conveyor submit: error: ...``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _common_options(*, suppress: bool) -> _Parser:
    """Options valid before or after the command (after it, they do not reset earlier values)."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    common = _Parser(add_help=False)
    common.add_argument(
        "--address",
        default=default(os.environ.get("CONVEYOR_ADDRESS", DEFAULT_ADDRESS)),
        help="gateway host:port (env CONVEYOR_ADDRESS; default 127.0.0.1:50051)",
    )
    common.add_argument(
        "--token",
        default=default(None),
        help="bearer token (env CONVEYOR_TOKEN; admin commands: CONVEYOR_ADMIN_TOKEN if set)",
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

    parser = _Parser(
        prog="conveyor",
        description="Submit and follow Conveyor generation tasks.",
        parents=[top],
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

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
    asub = admin.add_subparsers(
        dest="admin_command", required=True, metavar="ADMIN_COMMAND", parser_class=_Parser
    )
    tenant = asub.add_parser("tenant", parents=[common], help="tenant tier and limits")
    tsub = tenant.add_subparsers(
        dest="tenant_command", required=True, metavar="get|set", parser_class=_Parser
    )
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


def _error_line(exc: ConveyorError) -> str:
    """The error on one line; a field already named in the message is not repeated."""
    text = f"{exc.code.name}: {' '.join(exc.message.split())}"
    extra = [
        f"{v.field}: {v.description}"
        for v in (*exc.field_violations, *exc.quota_violations)
        if v.description not in exc.message
    ]
    if extra:
        text += " (" + "; ".join(extra) + ")"
    if exc.retry_after_seconds is not None:
        text += f"; retry after {exc.retry_after_seconds:.3g} s"
    return text


def _stdout_closed() -> int:
    """stdout's reader went away (``| head``): stop quietly, like a process killed by SIGPIPE."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 141


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code. Never raises (set CONVEYOR_DEBUG=1 for tracebacks)."""
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
            sys.stderr.write(f"conveyor: error: {_error_line(exc)}\n")
        return 1
    except UsageError as exc:
        sys.stderr.write(f"conveyor: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _stdout_closed()
    except Exception as exc:
        if os.environ.get("CONVEYOR_DEBUG"):
            raise
        text = " ".join(str(exc).split()) or type(exc).__name__
        sys.stderr.write(f"conveyor: error: {type(exc).__name__}: {text}\n")
        return 1


def run() -> None:
    """Console entry point: exit with :func:`main`'s code; a closed stdout stays quiet at exit."""
    code = main()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        code = _stdout_closed()
    sys.exit(code)


if __name__ == "__main__":
    run()
