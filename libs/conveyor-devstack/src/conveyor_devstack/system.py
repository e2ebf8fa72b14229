"""The whole Conveyor system as local processes, supervised: ``make run``, ``make up`` and e2e tests.

On a :class:`~conveyor_devstack.stack.Devstack` (PostgreSQL + Kafka) it starts, each as a subprocess
in its own process group with its logs in ``<run_dir>/<name>.log``, on free loopback ports:

* the fake Replicate (``python -m fake_replicate``; its URL comes from its stdout JSON line),
* ``python -m conveyor_scheduler migrate`` on a fresh database, then N scheduler replicas,
* M provider adapters behind a **webhook ingress** (a TCP round-robin in this process that plays the
  load balancer in front of the adapters: Replicate's webhooks reach any live adapter, as in
  Kubernetes, so a killed adapter does not lose the deliveries meant for its predictions),
* K notifiers and one or more gateways.

Callers of the scheduler and the notifier get every replica's address in one gRPC target
(``ipv4:127.0.0.1:a,127.0.0.1:b``; pick_first fails over when one dies).

Secrets (the JWT HS256 key, the fake's API token and webhook signing secret, the adapter's webhook
token key) are generated with :mod:`secrets` at every start; nothing has a default.

On a devstack whose Kafka has a SASL_SSL listener (``Devstack.start(kafka_security="SASL_SSL")``)
every service gets its ``<PREFIX>KAFKA_SECURITY_PROTOCOL``, ``_SASL_MECHANISM``, ``_SASL_USERNAME``,
``_SASL_PASSWORD_FILE`` and ``_SSL_CAFILE`` settings, and the topics are created through it too.

    async with ConveyorSystem.run(SystemConfig(schedulers=2)) as system:
        system.endpoints.gateway, system.mint_token("acme")
        await system.kill("adapter-1"); await system.restart("adapter-1")
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import re
import secrets
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conveyor_client.token import DEFAULT_AUDIENCE, DEFAULT_ISSUER, mint_token
from conveyor_common.kafka.security import security_env
from conveyor_common.sealing import Keyring
from conveyor_common.standard_webhooks import generate_secret
from conveyor_common.tls import TlsFiles, open_channel
from conveyor_devstack import _process
from conveyor_devstack.errors import DevstackError
from conveyor_devstack.kafka import KafkaServer
from conveyor_devstack.pki import LocalCA
from conveyor_devstack.stack import Devstack
from conveyor_devstack.topics import conveyor_topics, ensure_topics

log = logging.getLogger(__name__)

ROLES = ("fake", "scheduler", "adapter", "notifier", "gateway")
_FOREIGN_ENV = ("SCHEDULER_", "GATEWAY_", "ADAPTER_", "NOTIFIER_", "FAKE_REPLICATE_")
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


_LAUNCHER = """\
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
if os.getppid() != int(sys.argv[1]):
    os._exit(1)
os.execv(sys.argv[2], sys.argv[2:])
"""


def _launch(argv: Sequence[str]) -> list[str]:
    """``argv`` behind a tiny launcher that makes the child die with us (PR_SET_PDEATHSIG), then
    execs it (same pid). Not ``preexec_fn``: running Python between fork and exec in a process with
    gRPC threads (the test session, the demo) can crash the child before exec."""
    if not sys.platform.startswith("linux"):
        return list(argv)
    return [sys.executable, "-c", _LAUNCHER, str(os.getpid()), *argv]


def _child_env(extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_FOREIGN_ENV)}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def _target(ports: Sequence[int]) -> str:
    """One gRPC target for every replica (pick_first over the list)."""
    if len(ports) == 1:
        return f"127.0.0.1:{ports[0]}"
    return "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in ports)


class ConveyorSystem:
    """Starts, supervises and stops every Conveyor process on one devstack."""

    def __init__(self, devstack: Devstack, config: SystemConfig | None = None) -> None:
        self.devstack = devstack
        self.config = config or SystemConfig()
        self.run_dir = self.config.run_dir or Path(tempfile.mkdtemp(prefix="conveyor-system-"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # Generated at every start; never defaults in code.
        self.jwt_secret = secrets.token_urlsafe(48)
        self.fake_token = "r8_" + secrets.token_hex(20)
        self.fake_webhook_secret = generate_secret()
        self.webhook_token_key = secrets.token_urlsafe(32)
        self.secret_sealing_key = Keyring.generate_entry("devstack")
        self.database = self.config.database or f"conveyor_{uuid.uuid4().hex[:10]}"
        self.database_url = ""
        self.fake_url = ""
        self.processes: dict[str, ManagedProcess] = {}
        self.ingress: WebhookIngress | None = None
        self._owned_devstack = False
        self._stopped = False
        self.client_tls: TlsFiles | None = None
        """A certificate of the system's CA for calling internal services (``internal_tls``)."""

    # -- construction -------------------------------------------------------------------------

    @classmethod
    @contextlib.asynccontextmanager
    async def run(
        cls,
        config: SystemConfig | None = None,
        *,
        devstack: Devstack | None = None,
        fast: bool = True,
    ) -> AsyncIterator[ConveyorSystem]:
        """Start (a devstack when none is given, then) the system; stop everything at the end."""
        owned = devstack is None
        if devstack is None:
            devstack = await Devstack.start(fast=fast, topics=conveyor_topics()).start_async()
        system = cls(devstack, config)
        system._owned_devstack = owned
        try:
            await system.start()
            yield system
        finally:
            await asyncio.shield(system.stop())

    # -- tokens and endpoints -----------------------------------------------------------------

    def mint_token(
        self, tenant_id: str, *, tier: str = "free", role: str = "tenant", ttl_seconds: int = 86_400
    ) -> str:
        """A bearer token the gateways accept (HS256 with this run's generated key)."""
        return mint_token(
            self.jwt_secret,
            tenant_id,
            tier=tier,
            role=role,
            issuer=DEFAULT_ISSUER,
            audience=DEFAULT_AUDIENCE,
            ttl_seconds=ttl_seconds,
        )

    def by_role(self, role: str) -> list[ManagedProcess]:
        """The processes of one role, in name order."""
        return [p for p in self.processes.values() if p.role == role]

    @property
    def gateway_address(self) -> str:
        """host:port of the first gateway."""
        return f"127.0.0.1:{self.by_role('gateway')[0].grpc_port}"

    @property
    def endpoints(self) -> Endpoints:
        """Addresses, URLs and ready-made tokens."""
        gateways = [f"127.0.0.1:{p.grpc_port}" for p in self.by_role("gateway")]
        return Endpoints(
            gateway=gateways[0] if gateways else "",
            gateways=gateways,
            fake_url=self.fake_url,
            ledger_url=f"{self.fake_url}/_fake/ledger",
            ledger_summary_url=f"{self.fake_url}/_fake/ledger/summary?group_by=tenant",
            webhook_ingress=f"http://127.0.0.1:{self.ingress.port}" if self.ingress else "",
            admin_token=self.mint_token("ops", role="admin"),
            tenant_token=self.mint_token(self.config.tenant_id),
            tenant_id=self.config.tenant_id,
            database_url=self.database_url,
            kafka_bootstrap=self.devstack.kafka_bootstrap,
            run_dir=str(self.run_dir),
            processes={name: p.describe() for name, p in self.processes.items()},
            kafka_security=self._kafka().security.describe(),
        )

    def _kafka(self) -> KafkaServer:
        if self.devstack.kafka is None:
            raise DevstackError("the system needs a devstack with PostgreSQL and Kafka")
        return self.devstack.kafka

    def _kafka_env(self, prefix: str) -> dict[str, str]:
        """``<prefix>KAFKA_*`` security settings of a service (empty for PLAINTEXT)."""
        kafka = self._kafka()
        if kafka.security.protocol == "PLAINTEXT":
            return {}
        return security_env(prefix, kafka.security, password_file=kafka.password_file)

    # -- start --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bring everything up and wait until every process is healthy."""
        started = time.monotonic()
        cfg = self.config
        postgres = self.devstack.postgres
        if postgres is None or self.devstack.kafka is None:
            raise DevstackError("the system needs a devstack with PostgreSQL and Kafka")
        try:
            self.database_url = await asyncio.to_thread(postgres.create_database, self.database)
            await ensure_topics(
                self.devstack.kafka_bootstrap, conveyor_topics(), security=self._kafka().security
            )
            self._plan()
            assert self.ingress is not None
            await self.ingress.start()
            await asyncio.gather(self._start_fake(), self._migrate())
            self._set_ingress_env()
            await self._start_all("scheduler")
            await asyncio.gather(*(self._start_all(r) for r in ("adapter", "notifier", "gateway")))
        except BaseException:
            await asyncio.shield(self.stop())
            raise
        log.info(
            "system: up in %.1fs (%d schedulers, %d adapters, %d notifiers, %d gateways); "
            "gateway %s; logs in %s",
            time.monotonic() - started,
            cfg.schedulers,
            cfg.adapters,
            cfg.notifiers,
            cfg.gateways,
            self.gateway_address,
            self.run_dir,
        )

    def _plan(self) -> None:
        cfg = self.config
        py = sys.executable
        kafka = self.devstack.kafka_bootstrap
        level = cfg.log_level
        counts = {
            "scheduler": cfg.schedulers,
            "adapter": cfg.adapters,
            "notifier": cfg.notifiers,
            "gateway": cfg.gateways,
        }
        if min(counts.values()) < 1:
            raise DevstackError(f"every service needs at least one replica: {counts}")
        ports = iter(_process.free_ports(1 + 3 * sum(counts.values())))

        def add(role: str, index: int, argv: list[str], env: dict[str, str], **kw: Any) -> None:
            name = role if role == "fake" else f"{role}-{index}"
            self.processes[name] = ManagedProcess(
                name, role, argv, env, self.run_dir / f"{name}.log", **kw
            )

        fake_port = next(ports)
        fake_args = [py, "-m", "fake_replicate", "--host", "127.0.0.1", "--port", str(fake_port)]
        fake_args += ["--log-level", level]
        fake_env = {
            "FAKE_REPLICATE_TOKEN": self.fake_token,
            "FAKE_REPLICATE_WEBHOOK_SECRET": self.fake_webhook_secret,
        }
        for key, value in cfg.fake.items():
            raw = json.dumps(value) if isinstance(value, list | dict | bool) else str(value)
            fake_env["FAKE_REPLICATE_" + key.upper()] = raw
        add("fake", 0, fake_args, _child_env(fake_env), http_port=fake_port)

        sched_grpc = [next(ports) for _ in range(cfg.schedulers)]
        scheduler_target = _target(sched_grpc)
        for i, port in enumerate(sched_grpc, 1):
            env = {
                "SCHEDULER_DATABASE_URL": "",  # set once the database exists
                "SCHEDULER_KAFKA_BOOTSTRAP_SERVERS": kafka,
                **self._kafka_env("SCHEDULER_"),
                "SCHEDULER_GRPC_HOST": "127.0.0.1",
                "SCHEDULER_GRPC_PORT": str(port),
                "SCHEDULER_METRICS_PORT": str(next(ports)),
                "SCHEDULER_METRICS_HOST": "127.0.0.1",
                "SCHEDULER_INSTANCE_ID": f"scheduler-{i}",
                "SCHEDULER_LOG_LEVEL": level,
                "SCHEDULER_SHUTDOWN_GRACE_SECONDS": "2",
                "SCHEDULER_KAFKA_SESSION_TIMEOUT_MS": "3000",
                "SCHEDULER_WEBHOOK_SECRET_KEYS": self.secret_sealing_key,
                **({"SCHEDULER_WEBHOOK_ALLOW_HOSTS": "127.0.0.1"} if cfg.loopback_webhooks else {}),
                **cfg.scheduler_env,
            }
            add(
                "scheduler",
                i,
                [py, "-m", "conveyor_scheduler"],
                _child_env(env),
                grpc_port=port,
                metrics_port=int(env["SCHEDULER_METRICS_PORT"]),
            )

        for i in range(1, cfg.adapters + 1):
            env = {
                "ADAPTER_REPLICATE_API_TOKEN": self.fake_token,
                "ADAPTER_REPLICATE_BASE_URL": "",  # the fake's URL, once it listens
                "ADAPTER_REPLICATE_WEBHOOK_SECRET": self.fake_webhook_secret,
                "ADAPTER_WEBHOOK_PUBLIC_BASE_URL": "",  # the ingress, once it listens
                "ADAPTER_WEBHOOK_TOKEN_KEY": self.webhook_token_key,
                "ADAPTER_WEBHOOK_HOST": "127.0.0.1",
                "ADAPTER_WEBHOOK_PORT": str(next(ports)),
                "ADAPTER_SCHEDULER_ADDRESS": scheduler_target,
                "ADAPTER_KAFKA_BOOTSTRAP": kafka,
                **self._kafka_env("ADAPTER_"),
                "ADAPTER_KAFKA_SESSION_TIMEOUT_MS": "3000",
                "ADAPTER_ADAPTER_ID": f"adapter-{i}",
                "ADAPTER_GRPC_HOST": "127.0.0.1",
                "ADAPTER_GRPC_PORT": str(next(ports)),
                "ADAPTER_METRICS_PORT": str(next(ports)),
                "ADAPTER_METRICS_HOST": "127.0.0.1",
                "ADAPTER_LOG_LEVEL": level,
                "ADAPTER_STORAGE_BACKEND": "filesystem",
                "ADAPTER_STORAGE_FS_ROOT": str(self.run_dir / "outputs"),
                "ADAPTER_OUTPUT_ALLOWED_HOSTS": "127.0.0.1",
                "ADAPTER_OUTPUT_ALLOW_HTTP": "true",
                # Local runs: lost webhooks are noticed in seconds, not minutes.
                "ADAPTER_RECONCILE_INTERVAL_S": "5",
                "ADAPTER_WEBHOOK_OVERDUE_S": "20",
                "ADAPTER_SHUTDOWN_GRACE_SECONDS": "2",
                **cfg.adapter_env,
            }
            add(
                "adapter",
                i,
                [py, "-m", "conveyor_provider_adapter"],
                _child_env(env),
                grpc_port=int(env["ADAPTER_GRPC_PORT"]),
                metrics_port=int(env["ADAPTER_METRICS_PORT"]),
                http_port=int(env["ADAPTER_WEBHOOK_PORT"]),
            )
        self.ingress = WebhookIngress(self.by_role("adapter"))

        notifier_grpc = [next(ports) for _ in range(cfg.notifiers)]
        for i, port in enumerate(notifier_grpc, 1):
            env = {
                "NOTIFIER_KAFKA_BOOTSTRAP_SERVERS": kafka,
                **self._kafka_env("NOTIFIER_"),
                "NOTIFIER_SCHEDULER_ADDRESS": scheduler_target,
                "NOTIFIER_REPLICA_ID": f"notifier-{i}",
                "NOTIFIER_GRPC_HOST": "127.0.0.1",
                "NOTIFIER_GRPC_PORT": str(port),
                "NOTIFIER_METRICS_PORT": str(next(ports)),
                "NOTIFIER_METRICS_HOST": "127.0.0.1",
                "NOTIFIER_LOG_LEVEL": level,
                "NOTIFIER_SHUTDOWN_GRACE_SECONDS": "2",
                **(
                    {
                        "NOTIFIER_WEBHOOK_ALLOW_HOSTS": "127.0.0.1",
                        "NOTIFIER_RETRY_BASE_SECONDS": "1",
                    }
                    if cfg.loopback_webhooks
                    else {}
                ),
                **cfg.notifier_env,
            }
            add(
                "notifier",
                i,
                [py, "-m", "conveyor_notifier"],
                _child_env(env),
                grpc_port=port,
                metrics_port=int(env["NOTIFIER_METRICS_PORT"]),
            )

        for i in range(1, cfg.gateways + 1):
            port = next(ports)
            env = {
                "GATEWAY_SCHEDULER_ADDRESS": scheduler_target,
                "GATEWAY_NOTIFIER_ADDRESS": _target(notifier_grpc),
                "GATEWAY_JWT_HS256_SECRET": self.jwt_secret,
                "GATEWAY_GRPC_HOST": "127.0.0.1",
                "GATEWAY_GRPC_PORT": str(port),
                "GATEWAY_METRICS_PORT": str(next(ports)),
                "GATEWAY_METRICS_HOST": "127.0.0.1",
                "GATEWAY_LOG_LEVEL": level,
                "GATEWAY_SHUTDOWN_GRACE_SECONDS": "2",
                **(
                    {"GATEWAY_URL_ALLOWED_HOSTS": '["127.0.0.1"]', "GATEWAY_URL_ALLOW_HTTP": "true"}
                    if cfg.loopback_webhooks
                    else {}
                ),
                **cfg.gateway_env,
            }
            add(
                "gateway",
                i,
                [py, "-m", "conveyor_gateway"],
                _child_env(env),
                grpc_port=port,
                metrics_port=int(env["GATEWAY_METRICS_PORT"]),
            )
        for p in self.by_role("scheduler"):
            p.env["SCHEDULER_DATABASE_URL"] = self.database_url
        if cfg.internal_tls:
            self._plan_internal_tls()

    def _plan_internal_tls(self) -> None:
        """A CA, one certificate per service kind, and the settings that turn mutual TLS on
        (explicit ``*_env`` overrides still win)."""
        ca = LocalCA.create(self.run_dir / "pki")
        allowed = {
            "scheduler": ("SCHEDULER_", ["gateway", "provider-adapter", "notifier"]),
            "adapter": ("ADAPTER_", []),
            "notifier": ("NOTIFIER_", ["gateway"]),
        }
        overrides = {
            "scheduler": self.config.scheduler_env,
            "adapter": self.config.adapter_env,
            "notifier": self.config.notifier_env,
            "gateway": self.config.gateway_env,
        }
        for role, (prefix, peers) in allowed.items():
            issued = ca.issue("provider-adapter" if role == "adapter" else role)
            for p in self.by_role(role):
                p.env.update(
                    {
                        f"{prefix}TLS_CERT_FILE": str(issued.cert),
                        f"{prefix}TLS_KEY_FILE": str(issued.key),
                        f"{prefix}TLS_CA_FILE": str(ca.cert_path),
                        f"{prefix}TLS_ALLOWED_PEERS": json.dumps(peers),
                        # Targets list several IPs (no host name): every certificate names
                        # localhost.
                        f"{prefix}TLS_SERVER_NAME": "localhost",
                    }
                )
                p.env.update(overrides[role])
        gateway = ca.issue("gateway")
        for p in self.by_role("gateway"):
            p.env.update(
                {
                    "GATEWAY_INTERNAL_TLS_CERT_FILE": str(gateway.cert),
                    "GATEWAY_INTERNAL_TLS_KEY_FILE": str(gateway.key),
                    "GATEWAY_INTERNAL_TLS_CA_FILE": str(ca.cert_path),
                    "GATEWAY_INTERNAL_TLS_SERVER_NAME": "localhost",
                }
            )
            p.env.update(overrides["gateway"])
        probe = ca.issue("devstack")
        self.client_tls = TlsFiles(probe.cert, probe.key, ca.cert_path)

    def _set_ingress_env(self) -> None:
        assert self.ingress is not None
        for p in self.by_role("adapter"):
            p.env["ADAPTER_REPLICATE_BASE_URL"] = self.fake_url
            p.env["ADAPTER_WEBHOOK_PUBLIC_BASE_URL"] = f"http://127.0.0.1:{self.ingress.port}"

    async def _spawn(self, p: ManagedProcess, *, stdout_pipe: bool = False) -> None:
        with _open_log(
            p.log_path, f"--- start #{p.starts + 1} at {time.strftime('%X')} ---"
        ) as out:
            p.proc = await asyncio.create_subprocess_exec(
                *_launch(p.argv),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE if stdout_pipe else out,
                stderr=out,
                env=p.env,
                cwd=str(self.run_dir),
                start_new_session=True,
            )
        p.starts += 1
        p.started_at = time.monotonic()

    async def _start_fake(self) -> None:
        p = self.processes["fake"]
        await self._spawn(p, stdout_pipe=True)
        assert p.proc is not None
        assert p.proc.stdout is not None
        try:
            line = await asyncio.wait_for(p.proc.stdout.readline(), self.config.start_timeout)
            self.fake_url = str(json.loads(line)["url"])
        except (TimeoutError, ValueError, KeyError) as exc:
            raise DevstackError(
                f"fake_replicate did not start ({exc!r}); {p.log_path}:\n"
                + _process.tail_file(p.log_path)
            ) from None

    async def _migrate(self) -> None:
        sched = self.by_role("scheduler")[0]
        log_path = self.run_dir / "migrate.log"
        with _open_log(log_path) as out:
            proc = await asyncio.create_subprocess_exec(
                *_launch([sys.executable, "-m", "conveyor_scheduler", "migrate"]),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=sched.env,
                cwd=str(self.run_dir),
                start_new_session=True,
            )
        try:
            code = await asyncio.wait_for(proc.wait(), self.config.start_timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise DevstackError(f"migrate did not finish; {log_path}") from None
        if code != 0:
            raise DevstackError(
                f"migrate failed (exit {code}); {log_path}:\n" + _process.tail_file(log_path)
            )

    async def _start_all(self, role: str) -> None:
        procs = self.by_role(role)
        for p in procs:
            await self._spawn(p)
        await asyncio.gather(*(self._wait_healthy(p) for p in procs))

    async def _wait_healthy(self, p: ManagedProcess) -> None:
        deadline = time.monotonic() + self.config.start_timeout
        assert p.grpc_port is not None
        # The gateway's public port stays plaintext here; internal ports need the probe's cert.
        tls = self.client_tls if p.role != "gateway" else None
        async with open_channel(f"127.0.0.1:{p.grpc_port}", tls, []) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if not p.running:
                    assert p.proc is not None
                    raise DevstackError(
                        f"{p.name} exited with code {p.proc.returncode} while starting; "
                        f"{p.log_path}:\n{_process.tail_file(p.log_path)}"
                    )
                if time.monotonic() > deadline:
                    raise DevstackError(
                        f"{p.name} not healthy within {self.config.start_timeout:.0f}s; "
                        f"{p.log_path}:\n{_process.tail_file(p.log_path)}"
                    )
                try:
                    resp = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                    if resp.status == health_pb2.HealthCheckResponse.SERVING and (
                        p.http_port is None or await _http_ok(p.http_port)
                    ):
                        log.info(
                            "system: %s healthy in %.1fs (pid %s)",
                            p.name,
                            time.monotonic() - p.started_at,
                            p.pid,
                        )
                        return
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.1)

    # -- control ------------------------------------------------------------------------------

    def process(self, name: str) -> ManagedProcess:
        """The process called ``name`` (``scheduler-1``, ``adapter-2``, ``notifier-1``...)."""
        try:
            return self.processes[name]
        except KeyError:
            raise DevstackError(f"no process {name!r}; have {sorted(self.processes)}") from None

    async def kill(self, name: str, sig: signal.Signals = signal.SIGKILL) -> None:
        """Send ``sig`` to the process and, for SIGKILL/SIGTERM, wait until it is gone."""
        p = self.process(name)
        if not p.running:
            return
        assert p.proc is not None
        log.info("system: %s %s (pid %s)", sig.name, name, p.pid)
        with contextlib.suppress(ProcessLookupError):
            p.proc.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            try:
                await asyncio.wait_for(p.proc.wait(), self.config.stop_timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.proc.pid, signal.SIGKILL)
                await p.proc.wait()

    async def restart(self, name: str) -> None:
        """Stop the process (SIGTERM) if it runs, start it again on the same ports, wait healthy."""
        p = self.process(name)
        if p.role == "fake":
            raise DevstackError("the fake is not restartable (its ledger lives in memory)")
        await self.kill(name, signal.SIGTERM)
        await self._spawn(p)
        await self._wait_healthy(p)

    async def leader(self, wait: float = 10.0) -> str | None:
        """Name of the scheduler replica whose ``conveyor_scheduler_leader`` gauge is 1 (waits up to
        ``wait`` seconds for one; None when there is none)."""
        deadline = time.monotonic() + wait
        async with httpx.AsyncClient(timeout=1.0) as client:
            while True:
                for p in self.by_role("scheduler"):
                    if not p.running:
                        continue
                    try:
                        text = (await client.get(f"http://127.0.0.1:{p.metrics_port}/metrics")).text
                    except httpx.HTTPError:
                        continue
                    if metric_value(text, LEADER_METRIC) == 1.0:
                        return p.name
                if time.monotonic() > deadline:
                    return None
                await asyncio.sleep(0.2)

    async def metrics(self, name: str) -> str:
        """The Prometheus text of one process's /metrics."""
        p = self.process(name)
        async with httpx.AsyncClient(timeout=2.0) as client:
            return (await client.get(f"http://127.0.0.1:{p.metrics_port}/metrics")).text

    def exited(self) -> dict[str, int]:
        """Processes that are not running (name -> exit code), for checks after a run."""
        return {
            name: p.proc.returncode
            for name, p in self.processes.items()
            if p.proc is not None and p.proc.returncode is not None
        }

    async def stop(self) -> None:
        """SIGTERM the edge (gateways, notifiers, adapters), then the schedulers and the fake; wait,
        SIGKILL stragglers, then
        stop the devstack when this system started it. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        for roles in (("gateway", "notifier", "adapter"), ("scheduler", "fake")):
            procs = [p for role in roles for p in self.by_role(role) if p.running]
            for p in procs:
                assert p.proc is not None
                with contextlib.suppress(ProcessLookupError):
                    p.proc.send_signal(signal.SIGTERM)
            for p in procs:
                assert p.proc is not None
                try:
                    await asyncio.wait_for(p.proc.wait(), self.config.stop_timeout)
                except TimeoutError:
                    log.warning("system: %s did not stop after SIGTERM; killing it", p.name)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.proc.pid, signal.SIGKILL)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(p.proc.wait(), 5)
        if self.ingress is not None:
            await self.ingress.stop()
        if self._owned_devstack:
            await asyncio.to_thread(self.devstack.close)
        log.info("system: stopped; logs in %s", self.run_dir)


def _open_log(path: Path, banner: str | None = None) -> BinaryIO:
    path.parent.mkdir(parents=True, exist_ok=True)
    out = open(path, "ab")  # noqa: SIM115 - closed by the caller's with block
    if banner:
        out.write(banner.encode() + b"\n")
        out.flush()
    return out


async def _http_ok(port: int) -> bool:
    try:
        async with httpx.AsyncClient(timeout=1.0) as client:
            return (await client.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200
    except httpx.HTTPError:
        return False


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def metric_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """``(labels, value)`` of every sample of metric ``name`` in Prometheus text format."""
    out: list[tuple[dict[str, str], float]] = []
    for line in text.splitlines():
        m = _SAMPLE.match(line)
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
