"""The autoscaling demo's rig: a Prometheus server scraping the adapters, the offered load profile and
its driver, and the pool of provider-adapter processes the model scales.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench._hpa_model import NAMESPACE

log = logging.getLogger("autoscaling_demo")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    """A real Prometheus server on loopback scraping the given targets."""

    def __init__(self, workdir: Path, scrape_interval: float) -> None:
        self.workdir = workdir
        self.scrape_interval = scrape_interval
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{self.port}"

    def write_config(self, targets: dict[str, tuple[int, str]]) -> Path:
        """One static target per process: namespace and pod labels as a PodMonitor gives them."""
        interval = f"{max(1, round(self.scrape_interval * 1000))}ms"
        config = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "scrape_configs": [
                {
                    "job_name": f"{NAMESPACE}/{role}",
                    "scrape_interval": interval,
                    "scrape_timeout": interval,
                    "static_configs": [
                        {
                            "targets": [f"127.0.0.1:{port}"],
                            "labels": {"namespace": NAMESPACE, "pod": pod},
                        }
                        for pod, (port, r) in sorted(targets.items())
                        if r == role
                    ],
                }
                for role in sorted({r for _, r in targets.values()})
            ],
        }
        path = self.workdir / "prometheus.yml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def launch(self, targets: dict[str, tuple[int, str]]) -> None:
        """Write the configuration and start the server process."""
        binary = "prometheus"
        config = self.write_config(targets)
        log_file = open(self.workdir / "prometheus.log", "wb")  # noqa: SIM115 - closed at stop
        self._log = log_file
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=2h",
                "--log.level=warn",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    async def start(self, targets: dict[str, tuple[int, str]]) -> None:
        """Launch and wait until /-/ready answers."""
        self.launch(targets)
        assert self.proc is not None
        async with httpx.AsyncClient(timeout=2.0, trust_env=False) as client:
            for _ in range(300):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"prometheus exited; see {self.workdir / 'prometheus.log'}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{self.url}/-/ready")).status_code == 200:
                        return
                await asyncio.sleep(0.1)
        raise RuntimeError("prometheus did not become ready")

    async def query(self, client: httpx.AsyncClient, expr: str) -> float | None:
        """The value of an instant query returning one sample (None when the result is empty)."""
        resp = await client.get(f"{self.url}/api/v1/query", params={"query": expr})
        resp.raise_for_status()
        body = resp.json()
        if body["status"] != "success":
            raise RuntimeError(f"query failed: {body}")
        result = body["data"]["result"]
        if body["data"]["resultType"] == "scalar":
            return float(result[1])
        if not result:
            return None
        if len(result) != 1:
            raise RuntimeError(f"{expr!r} returned {len(result)} series; KEDA needs one")
        return float(result[0]["value"][1])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(AttributeError):
            self._log.close()


def load_profile(quick: bool) -> list[tuple[float, float]]:
    """(duration seconds, tasks per second) phases: rising, then falling, then idle."""
    if quick:
        return [(15, 0.5), (45, 4.0), (30, 0.5), (30, 0.0)]
    return [(30, 0.5), (60, 2.5), (80, 4.5), (60, 2.0), (70, 0.5), (90, 0.0)]


def offered_rate(profile: list[tuple[float, float]], t: float) -> float:
    elapsed = 0.0
    for duration, rate in profile:
        if t < elapsed + duration:
            return rate
        elapsed += duration
    return 0.0


@dataclass
class LoadStats:
    submitted: int = 0
    rejected: int = 0
    errors: int = 0


async def drive_load(
    address: str, token: str, profile: list[tuple[float, float]], stats: LoadStats, t0: float
) -> None:
    """Open-loop submits through the gateway at the profile's rate (each submit its own task)."""
    from conveyor_client import AsyncConveyorClient

    total = sum(d for d, _ in profile)
    pending: set[asyncio.Task[None]] = set()
    async with AsyncConveyorClient(address, token, retries=2) as client:

        async def one() -> None:
            try:
                await client.submit(
                    "image",
                    model="demo/sdxl",
                    input={
                        "prompt": "a lighthouse at dusk",
                        "__fake_duration_s": 0.5,
                        "__fake_output_kind": "text",
                        "__fake_output_count": 1,
                    },
                    rpc_timeout=10.0,
                )
                stats.submitted += 1
            except Exception as exc:
                if "RESOURCE_EXHAUSTED" in repr(exc):
                    stats.rejected += 1
                else:
                    stats.errors += 1
                    log.debug("submit failed: %r", exc)

        next_at = time.monotonic()
        while (now := time.monotonic()) - t0 < total:
            rate = offered_rate(profile, now - t0)
            if rate <= 0:
                await asyncio.sleep(0.2)
                next_at = time.monotonic()
                continue
            if now < next_at:
                await asyncio.sleep(next_at - now)
            task = asyncio.create_task(one())
            pending.add(task)
            task.add_done_callback(pending.discard)
            next_at += 1.0 / rate
        if pending:
            await asyncio.wait(pending, timeout=15)


class AdapterPool:
    """Adapter processes beyond the system's first one, started and stopped on demand.

    They are spawned without a ``preexec_fn`` (so with vfork/exec: no Python runs in the child of
    this process, which has gRPC threads busy with the load), registered with the system (its
    webhook ingress routes Replicate's webhooks to them; its stop() stops them) and checked healthy
    over HTTP (the receiver's /healthz and /metrics), not gRPC.
    """

    def __init__(self, system: Any, max_replicas: int) -> None:
        from conveyor_devstack import _process
        from conveyor_devstack.system import ManagedProcess

        self.system = system
        (first,) = system.by_role("adapter")
        self.names = [first.name]
        ports = iter(_process.free_ports(3 * (max_replicas - 1)))
        for i in range(2, max_replicas + 1):
            web, grpc_port, metrics = next(ports), next(ports), next(ports)
            env = {
                **first.env,
                "ADAPTER_WEBHOOK_PORT": str(web),
                "ADAPTER_GRPC_PORT": str(grpc_port),
                "ADAPTER_METRICS_PORT": str(metrics),
                "ADAPTER_ADAPTER_ID": f"adapter-{i}",
            }
            name = f"adapter-{i}"
            proc = ManagedProcess(
                name,
                "adapter",
                list(first.argv),
                env,
                system.run_dir / f"{name}.log",
                grpc_port=grpc_port,
                metrics_port=metrics,
                http_port=web,
            )
            system.processes[name] = proc
            system.ingress.targets.append(proc)
            self.names.append(name)

    def metrics_targets(self) -> dict[str, tuple[int, str]]:
        return {
            p.name: (int(p.metrics_port), p.role)
            for p in self.system.processes.values()
            if p.metrics_port
        }

    async def start(self, name: str) -> None:
        """Spawn one adapter and wait until its webhook receiver and /metrics answer."""
        p = self.system.process(name)
        if p.running:
            return
        with p.log_path.open("ab") as out:
            p.proc = await asyncio.create_subprocess_exec(
                *p.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=p.env,
                cwd=str(self.system.run_dir),
                start_new_session=True,
            )
        p.starts += 1
        p.started_at = time.monotonic()
        async with httpx.AsyncClient(timeout=1.0, trust_env=False) as client:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and p.running:
                with contextlib.suppress(httpx.HTTPError):
                    hz = await client.get(f"http://127.0.0.1:{p.http_port}/healthz")
                    mt = await client.get(f"http://127.0.0.1:{p.metrics_port}/metrics")
                    if hz.status_code == 200 and mt.status_code == 200:
                        return
                await asyncio.sleep(0.2)
        log.warning("%s did not become healthy (see %s)", name, p.log_path)

    async def stop(self, name: str) -> None:
        """SIGTERM: the adapter finishes its batch, commits and leaves the consumer group."""
        await self.system.kill(name, signal.SIGTERM)
