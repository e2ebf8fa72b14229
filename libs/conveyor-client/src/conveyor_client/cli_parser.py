"""The CLI's command line: every command and option, with enum choices from the proto's names."""

from __future__ import annotations

import argparse
import os
from typing import Any, NoReturn

from conveyor_client.enums import Priority, TaskKind, TaskStatus, Tier
from conveyor_client.group_cli import add_group_parser
from conveyor_client.token import DEFAULT_AUDIENCE, DEFAULT_ISSUER

DEFAULT_ADDRESS = "127.0.0.1:50051"


KINDS = [k.value for k in TaskKind if k != TaskKind.UNSPECIFIED]


PRIORITIES = [p.value for p in Priority if p != Priority.UNSPECIFIED]


TIERS = [t.value for t in Tier if t != Tier.UNSPECIFIED]


STATUSES = [s.value for s in TaskStatus if s != TaskStatus.UNSPECIFIED]


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump): ``conveyor submit: error: ...``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def common_options(*, suppress: bool) -> Parser:
    """Options valid before or after the command (after it, they do not reset earlier values)."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    common = Parser(add_help=False)
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
    top = common_options(suppress=False)
    common = common_options(suppress=True)

    parser = Parser(
        prog="conveyor",
        description="Submit and follow Conveyor generation tasks.",
        parents=[top],
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=Parser
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
        dest="admin_command", required=True, metavar="ADMIN_COMMAND", parser_class=Parser
    )
    tenant = asub.add_parser("tenant", parents=[common], help="tenant tier and limits")
    tsub = tenant.add_subparsers(
        dest="tenant_command", required=True, metavar="get|set", parser_class=Parser
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
    p.add_argument(
        "--allow-unknown",
        action="store_true",
        help="pause a model no task has used yet (ahead of first use)",
    )
    p = asub.add_parser("resume", parents=[common], help="resume dispatch of a model")
    p.add_argument("model")
    p = asub.add_parser("pause-tenant", parents=[common], help="pause dispatch of a tenant's tasks")
    p.add_argument("tenant_id")
    p.add_argument("--reason")
    p = asub.add_parser("resume-tenant", parents=[common], help="resume a paused tenant")
    p.add_argument("tenant_id")
    asub.add_parser("paused", parents=[common], help="list paused models and tenants")
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
