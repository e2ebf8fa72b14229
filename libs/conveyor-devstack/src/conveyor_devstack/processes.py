"""The parts of a running system: its configuration, one managed process (spawn, health, logs), the
addresses it serves, the webhook ingress, and the Prometheus text parsing used to read them."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import httpx

log = logging.getLogger(__name__)


ROLES = ("fake", "scheduler", "adapter", "notifier", "gateway")


FOREIGN_ENV = ("SCHEDULER_", "GATEWAY_", "ADAPTER_", "NOTIFIER_", "FAKE_REPLICATE_")
"""Environment prefixes removed from the children's environment: the system sets what it means."""


LEADER_METRIC = "conveyor_scheduler_leader"


@dataclass
class SystemConfig:
    """How many replicas of what, and per-service setting overrides (env var -> value)."""

    schedulers: int = 2
    adapters: int = 2
    notifiers: int = 1
    gateways: int = 1
    scheduler_env: dict[str, str] = field(default_factory=dict)
    """``SCHEDULER_*`` overrides (e.g. ``{"SCHEDULER_GLOBAL_CONCURRENCY": "8"}``)."""
    adapter_env: dict[str, str] = field(default_factory=dict)
    notifier_env: dict[str, str] = field(default_factory=dict)
    gateway_env: dict[str, str] = field(default_factory=dict)
    fake: dict[str, Any] = field(default_factory=dict)
    """FakeConfig fields given to the fake at start (``{"min_duration_s": 0.2}``)."""
    run_dir: Path | None = None
    """Where logs and outputs go (default: a new directory under the system temp dir)."""
    database: str | None = None
    """Name of the database created for this system (default ``conveyor_<random>``)."""
    log_level: str = "INFO"
    start_timeout: float = 90.0
    """Seconds each process may take to become healthy."""
    stop_timeout: float = 15.0
    """Seconds between SIGTERM and SIGKILL at stop."""
    loopback_webhooks: bool = True
    """Allow client webhooks to loopback receivers over http (the allow-lists of the scheduler's
    registration check, the notifier's connect check and the gateway's URL check); local only."""
    tenant_id: str = "demo"
    """Tenant of the ready-made tenant token."""
    internal_tls: bool = False
    """Mutual TLS between the services (a throwaway CA and a certificate per service, under
    ``run_dir/pki``); each internal server allows only the services that call it."""


@dataclass
class ManagedProcess:
    """One supervised child."""

    name: str
    role: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    grpc_port: int | None = None
    metrics_port: int | None = None
    http_port: int | None = None
    proc: asyncio.subprocess.Process | None = None
    starts: int = 0
    started_at: float = 0.0

    @property
    def pid(self) -> int | None:
        """The pid while it runs."""
        return self.proc.pid if self.proc is not None and self.proc.returncode is None else None

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self.proc is not None and self.proc.returncode is None

    def describe(self) -> dict[str, Any]:
        """Ports, pid and log path, as printed by ``make up``."""
        out: dict[str, Any] = {"role": self.role, "pid": self.pid, "log": str(self.log_path)}
        if self.grpc_port:
            out["grpc"] = f"127.0.0.1:{self.grpc_port}"
        if self.metrics_port:
            out["metrics"] = f"http://127.0.0.1:{self.metrics_port}/metrics"
        if self.http_port:
            out["http"] = f"http://127.0.0.1:{self.http_port}"
        return out


@dataclass
class Endpoints:
    """What a user of the running system needs."""

    gateway: str
    gateways: list[str]
    fake_url: str
    ledger_url: str
    ledger_summary_url: str
    webhook_ingress: str
    admin_token: str
    tenant_token: str
    tenant_id: str
    database_url: str
    kafka_bootstrap: str
    run_dir: str
    processes: dict[str, dict[str, Any]]
    kafka_security: str = "PLAINTEXT"
    """Protocol (and SASL mechanism and user) of the services' Kafka connections."""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return dict(self.__dict__)


class WebhookIngress:
    """A TCP round-robin on loopback in front of the adapters' webhook ports (the load balancer)."""

    def __init__(self, targets: Sequence[ManagedProcess]) -> None:
        self.targets = list(targets)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._next = itertools.count()
        self._pipes: set[asyncio.Task[None]] = set()

    async def start(self, port: int = 0) -> int:
        """Listen on 127.0.0.1; returns the port."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        """Stop listening and cut the open connections."""
        if self._server is not None:
            self._server.close()
            for task in list(self._pipes):
                task.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        live = [t for t in self.targets if t.running and t.http_port]
        start = next(self._next)
        for i in range(len(live)):
            target = live[(start + i) % len(live)]
            try:
                return await asyncio.open_connection("127.0.0.1", target.http_port)
            except OSError:
                continue
        return None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._pipes.add(task)
        try:
            upstream = await self._connect()
            if upstream is None:
                writer.close()
                return
            up_reader, up_writer = upstream
            await asyncio.gather(
                self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
            )
        finally:
            if task is not None:
                self._pipes.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            with contextlib.suppress(Exception):
                writer.close()


LAUNCHER = """\
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
if os.getppid() != int(sys.argv[1]):
    os._exit(1)
os.execv(sys.argv[2], sys.argv[2:])
"""


def launch(argv: Sequence[str]) -> list[str]:
    """``argv`` behind a tiny launcher that makes the child die with us (PR_SET_PDEATHSIG), then
    execs it (same pid). Not ``preexec_fn``: running Python between fork and exec in a process with
    gRPC threads (the test session, the demo) can crash the child before exec."""
    if not sys.platform.startswith("linux"):
        return list(argv)
    return [sys.executable, "-c", LAUNCHER, str(os.getpid()), *argv]


def child_env(extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN_ENV)}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def target_of(ports: Sequence[int]) -> str:
    """One gRPC target for every replica (pick_first over the list)."""
    if len(ports) == 1:
        return f"127.0.0.1:{ports[0]}"
    return "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in ports)


def open_log(path: Path, banner: str | None = None) -> BinaryIO:
    path.parent.mkdir(parents=True, exist_ok=True)
    out = open(path, "ab")  # noqa: SIM115 - closed by the caller's with block
    if banner:
        out.write(banner.encode() + b"\n")
        out.flush()
    return out


async def http_ok(port: int) -> bool:
    try:
        async with httpx.AsyncClient(timeout=1.0) as client:
            return (await client.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200
    except httpx.HTTPError:
        return False


SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def metric_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """``(labels, value)`` of every sample of metric ``name`` in Prometheus text format."""
    out: list[tuple[dict[str, str], float]] = []
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if not m or m.group(1) != name:
            continue
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        try:
            out.append((labels, float(m.group(3))))
        except ValueError:
            continue
    return out


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The value of the first sample of ``name`` whose labels include ``labels``."""
    for have, value in metric_samples(text, name):
        if all(have.get(k) == v for k, v in labels.items()):
            return value
    return None
