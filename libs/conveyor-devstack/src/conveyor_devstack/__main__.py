"""``python -m conveyor_devstack``: start, stop and inspect the devstack from a shell.

    up                       start PostgreSQL + Kafka (+ Conveyor's topics) and the whole system (fake
                             Replicate, schedulers, adapter, notifier, gateway), print the URLs,
                             endpoints and tokens, stay up until SIGINT/SIGTERM, then stop everything
    up --backends-only       only PostgreSQL + Kafka (also implied by --no-postgres/--no-kafka/--no-topics)
    up --kafka-security SASL_SSL
                             Kafka (a local process) with a SASL_SSL listener: SCRAM-SHA-512 users and a
                             throwaway CA; the services connect through it
    up --detach --state-file .devstack/state.json
                             the same in the background; returns once everything answers (``make up``)
    down --state-file ...    stop a detached devstack
    status --state-file ...  print a detached devstack's URLs (exit 1 when it is not running)
    fetch                    resolve the Kafka jars into the cache (CI's install step)
    demo                     the whole system with a live demo workload (``make run``)

The URLs are printed as ``export CONVEYOR_TEST_DATABASE_URL=...`` lines (``eval "$(...)"``
makes tests reuse this devstack, and the ``conveyor`` CLI talk to the gateway) or, with ``--json``,
as one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from conveyor_common.logging import configure_logging
from conveyor_devstack import _process
from conveyor_devstack.backends import DATABASE_URL_ENV, KAFKA_BOOTSTRAP_ENV
from conveyor_devstack.errors import DevstackError
from conveyor_devstack.kafka import LISTENER_SECURITY
from conveyor_devstack.kafka_install import fetch_kafka
from conveyor_devstack.stack import Devstack
from conveyor_devstack.topics import conveyor_topics

log = logging.getLogger("conveyor_devstack")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m conveyor_devstack", description=__doc__)
    parser.add_argument("--log-level", default=None, help="INFO (WARNING for demo)")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start PostgreSQL and Kafka")
    up.add_argument("--no-postgres", action="store_true", help="do not start PostgreSQL")
    up.add_argument("--no-kafka", action="store_true", help="do not start Kafka")
    up.add_argument("--no-topics", action="store_true", help="do not create Conveyor's topics")
    up.add_argument(
        "--fast", action="store_true", help="PostgreSQL without fsync (tests only, not benchmarks)"
    )
    up.add_argument("--json", action="store_true", help="print one JSON object, not exports")
    up.add_argument("--detach", action="store_true", help="run in the background")
    up.add_argument("--state-file", type=Path, help="where a running devstack writes its URLs")
    up.add_argument("--log-file", type=Path, help="the detached devstack's log")
    up.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for --detach")
    up.add_argument(
        "--backends-only", action="store_true", help="only PostgreSQL and Kafka, no services"
    )
    up.add_argument(
        "--kafka-security",
        choices=LISTENER_SECURITY,
        default="PLAINTEXT",
        type=str.upper,
        help="Kafka's client listener: PLAINTEXT (default) or SASL_SSL (SCRAM-SHA-512 users and a "
        "throwaway CA; always a local process)",
    )

    for name, text in (("down", "stop a detached devstack"), ("status", "show a devstack")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--state-file", type=Path, required=True)
        cmd.add_argument("--json", action="store_true")
        if name == "down":
            cmd.add_argument("--timeout", type=float, default=60.0)

    fetch = sub.add_parser("fetch", help="resolve the Kafka jars into the cache")
    fetch.add_argument("--force", action="store_true", help="resolve again even if cached")
    sub.add_parser("demo", help="the whole system with a live demo workload (make run)")
    return parser


def _say(text: str) -> None:
    """Results go to stdout (logs go to stderr), so ``eval "$(... up --detach)"`` works."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _render(state: dict[str, Any], as_json: bool) -> str:
    if as_json:
        return json.dumps(state, indent=2, sort_keys=True)
    lines = []
    if "database_url" in state:
        lines.append(f"export {DATABASE_URL_ENV}={shlex.quote(state['database_url'])}")
    security = state.get("kafka_security")
    if "kafka_bootstrap" in state and not security:
        lines.append(f"export {KAFKA_BOOTSTRAP_ENV}={shlex.quote(state['kafka_bootstrap'])}")
    if security:  # not exported: tests reusing a broker from the environment speak PLAINTEXT
        lines.append(
            f"# kafka {state['kafka_bootstrap']} {security['protocol']} "
            f"{security['sasl_mechanism']}: user "
            f"{security['sasl_username']}, password in {security['sasl_password_file']}, "
            f"CA {security['ssl_cafile']}"
        )
    if system := state.get("system"):
        lines += [
            f"export CONVEYOR_ADDRESS={shlex.quote(system['gateway'])}",
            f"export CONVEYOR_TOKEN={shlex.quote(system['tenant_token'])}  "
            f"# tenant {system['tenant_id']}",
            f"export CONVEYOR_ADMIN_TOKEN={shlex.quote(system['admin_token'])}",
            f"# gateway (gRPC, reflection on): {system['gateway']}",
            f"# fake Replicate ledger: {system['ledger_url']}",
            f"# ledger summary:        {system['ledger_summary_url']}",
            f"# logs: {system['run_dir']}",
        ]
        for name, proc in sorted(system["processes"].items()):
            ports = "  ".join(f"{k} {proc[k]}" for k in ("grpc", "http", "metrics") if k in proc)
            lines.append(f"# {name:<12} pid {proc['pid']}  {ports}")
    return "\n".join(lines)


def _read_state(path: Path) -> dict[str, Any] | None:
    try:
        state: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    pid = state.get("pid")
    if not isinstance(pid, int) or not _process_alive(pid):
        return None
    return state


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_state(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


async def _serve(args: argparse.Namespace) -> int:
    """Start, publish the URLs, wait for SIGINT/SIGTERM, stop."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    topics = {} if args.no_topics or args.no_kafka else conveyor_topics()
    starter = Devstack.start(
        postgres=not args.no_postgres,
        kafka=not args.no_kafka,
        fast=args.fast,
        topics=topics,
        kafka_security=args.kafka_security,
    )
    async with starter as stack, contextlib.AsyncExitStack() as services:
        state = {"pid": os.getpid(), **stack.describe()}
        if _with_system(args):
            from conveyor_devstack.system import ConveyorSystem, SystemConfig

            run_dir = (args.state_file or Path(".devstack/state.json")).resolve().parent / "run"
            shutil.rmtree(run_dir, ignore_errors=True)  # the last run's logs only
            config = SystemConfig(
                schedulers=2, adapters=1, notifiers=1, gateways=1, run_dir=run_dir
            )
            system = await services.enter_async_context(ConveyorSystem.run(config, devstack=stack))
            state["system"] = system.endpoints.as_dict()
        if args.state_file:
            _write_state(args.state_file, state)
        _say(_render(state, args.json))
        log.info("devstack: up; stop with SIGINT/SIGTERM")
        try:
            await stop.wait()
        finally:
            log.info("devstack: stopping")
            if args.state_file:
                with contextlib.suppress(FileNotFoundError):
                    args.state_file.unlink()
    return 0


def _with_system(args: argparse.Namespace) -> bool:
    """Whether ``up`` starts the services too (everything but --backends-only and partial stacks)."""
    return not (args.backends_only or args.no_postgres or args.no_kafka or args.no_topics)


def _detach(args: argparse.Namespace) -> int:
    state_file: Path = args.state_file or Path(".devstack/state.json")
    if (running := _read_state(state_file)) is not None:
        log.info("devstack: already running (pid %s, %s)", running["pid"], state_file)
        _say(_render(running, args.json))
        return 0
    with contextlib.suppress(FileNotFoundError):
        state_file.unlink()
    log_file: Path = args.log_file or state_file.with_name("devstack.log")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "conveyor_devstack", "--log-level", args.log_level, "up"]
    argv += ["--state-file", str(state_file.resolve())]
    for flag in ("no_postgres", "no_kafka", "no_topics", "fast", "backends_only"):
        if getattr(args, flag):
            argv.append("--" + flag.replace("_", "-"))
    argv += ["--kafka-security", args.kafka_security]
    with open(log_file, "ab") as out:
        child = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
        )
    deadline = time.monotonic() + args.timeout
    while (state := _read_state(state_file)) is None or state.get("pid") != child.pid:
        if child.poll() is not None:
            log.error(
                "devstack: failed to start (exit %s); %s:\n%s",
                child.returncode,
                log_file,
                _process.tail_file(log_file),
            )
            return 1
        if time.monotonic() > deadline:
            child.send_signal(signal.SIGTERM)
            log.error("devstack: not up within %.0fs; see %s", args.timeout, log_file)
            return 1
        time.sleep(0.2)
    log.info("devstack: up in the background (pid %s, log %s)", child.pid, log_file)
    _say(_render(state, args.json))
    return 0


def _down(args: argparse.Namespace) -> int:
    state = _read_state(args.state_file)
    if state is None:
        log.info("devstack: not running (%s)", args.state_file)
        with contextlib.suppress(FileNotFoundError):
            args.state_file.unlink()
        return 0
    pid = int(state["pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    while _process_alive(pid):
        if time.monotonic() > deadline:
            log.warning("devstack: pid %s still running after %.0fs; killing it", pid, args.timeout)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)  # its servers die with it (PDEATHSIG)
            break
        time.sleep(0.1)
    with contextlib.suppress(FileNotFoundError):
        args.state_file.unlink()
    log.info("devstack: stopped (pid %s)", pid)
    return 0


def _status(args: argparse.Namespace) -> int:
    state = _read_state(args.state_file)
    if state is None:
        log.info("devstack: not running (%s)", args.state_file)
        return 1
    _say(_render(state, args.json))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m conveyor_devstack`` and the ``conveyor-devstack`` script."""
    args = _parser().parse_args(argv)
    if args.log_level is None:
        args.log_level = "WARNING" if args.command == "demo" else "INFO"
    configure_logging("devstack", args.log_level, stream=sys.stderr)
    try:
        if args.command == "up":
            return _detach(args) if args.detach else asyncio.run(_serve(args))
        if args.command == "down":
            return _down(args)
        if args.command == "status":
            return _status(args)
        if args.command == "demo":
            from conveyor_devstack.demo import main as demo_main

            return demo_main()
        libs = fetch_kafka(force=args.force)
        _say(str(libs))
        return 0
    except DevstackError as exc:
        log.error("devstack: %s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
