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
from typing import Any

from rich.table import Table

from conveyor_client.cli_output import Output, watch_tasks
from conveyor_client.cli_parser import build_parser
from conveyor_client.enums import Priority, TaskKind, TaskStatus, Tier
from conveyor_client.errors import ConveyorError
from conveyor_client.group_cli import GroupUsageError, run_group
from conveyor_client.options import tls_credentials
from conveyor_client.sdk import AsyncClient
from conveyor_client.token import mint_token
from conveyor_client.types import TenantLimits


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


def _ts(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(f"{value!r} is not an ISO-8601 time") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


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
                return await watch_tasks(client, resp.task.task_id, out)
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
        return await watch_tasks(client, args.task_id, out, args.after)
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
            paused = await client.pause_model(
                args.model, reason=args.reason or "", allow_unknown=args.allow_unknown
            )
        else:
            paused = await client.resume_model(args.model)
        if out.json:
            out.emit({"model": args.model, "paused": paused})
        else:
            out.console.print(f"{args.model}: {'paused' if paused else 'running'}")
        return 0
    if sub in ("pause-tenant", "resume-tenant"):
        if sub == "pause-tenant":
            paused = await client.pause_tenant(args.tenant_id, reason=args.reason or "")
        else:
            paused = await client.resume_tenant(args.tenant_id)
        if out.json:
            out.emit({"tenant_id": args.tenant_id, "paused": paused})
        else:
            out.console.print(f"{args.tenant_id}: {'paused' if paused else 'running'}")
        return 0
    if sub == "paused":
        out.paused(await client.paused())
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
