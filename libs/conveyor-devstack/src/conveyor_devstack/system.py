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
import json
import os
import secrets
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conveyor_client.token import DEFAULT_AUDIENCE, DEFAULT_ISSUER, mint_token
from conveyor_common.sealing import Keyring
from conveyor_common.standard_webhooks import generate_secret
from conveyor_common.tls import TlsFiles, open_channel
from conveyor_devstack import _process
from conveyor_devstack.errors import DevstackError
from conveyor_devstack.processes import (
    LEADER_METRIC,
    Endpoints,
    ManagedProcess,
    SystemConfig,
    WebhookIngress,
    http_ok,
    launch,
    log,
    metric_value,
    open_log,
)
from conveyor_devstack.stack import Devstack
from conveyor_devstack.system_plan import SystemPlan
from conveyor_devstack.topics import conveyor_topics, ensure_topics


class ConveyorSystem(SystemPlan):
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

    async def _spawn(self, p: ManagedProcess, *, stdout_pipe: bool = False) -> None:
        with open_log(p.log_path, f"--- start #{p.starts + 1} at {time.strftime('%X')} ---") as out:
            p.proc = await asyncio.create_subprocess_exec(
                *launch(p.argv),
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
        with open_log(log_path) as out:
            proc = await asyncio.create_subprocess_exec(
                *launch([sys.executable, "-m", "conveyor_scheduler", "migrate"]),
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
                        p.http_port is None or await http_ok(p.http_port)
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


__all__ = ["ConveyorSystem", "ManagedProcess", "SystemConfig", "metric_value"]
