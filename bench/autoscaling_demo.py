"""Autoscaling of the provider adapter, shown on the running stack.

What runs, all on 127.0.0.1: PostgreSQL and Kafka (devstack), the fake Replicate, the scheduler, the
notifier, the gateway and up to 6 provider adapters (``conveyor_devstack.system``), and a real
Prometheus (Debian's package) scraping every process's /metrics. A load generator submits image tasks
through the gateway at a rate that rises, then falls. Every sync period the controller here:

1. evaluates the EXACT PromQL of the provider-adapter KEDA trigger
   (``deploy/k8s/components/autoscaling-keda/scaledobjects.yaml``) through Prometheus's HTTP API,
   and, for comparison, the prometheus-adapter rule of the HPA flavour expanded the way the adapter does;
2. computes the desired replicas with the Kubernetes HPA algorithm: AverageValue target
   (``ceil(value / threshold)``, 10 % tolerance), min/max, and the ``behavior`` of the manifest
   (stabilization windows, rate policies with their periods, selectPolicy);
3. starts or stops adapter processes (SIGTERM: they leave the consumer group cleanly) to match.

Each adapter creates at most ``--per-replica`` predictions per second (``ADAPTER_CREATE_RATE_PER_MIN``),
which makes one replica's capacity explicit: throughput can only follow the load by adding replicas.
``--time-scale K`` divides every period of the behaviour and the sync/scrape intervals by K (default 4:
the 300 s scale-down window becomes 75 s) so the run takes minutes, not half an hour; the PromQL and
the algorithm are unchanged.

Outputs in ``bench/results/autoscaling/``: ``autoscaling.csv`` (every tick), ``autoscaling.md`` (a
table, one row per ~10 s, and the summary), ``autoscaling.png`` (load/throughput, backlog, replicas),
``summary.json``.

Usage: ``python bench/autoscaling_demo.py [--time-scale 4] [--per-replica 2] [--quick]``
(``--quick``: a shorter profile for a smoke run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
SCALED_OBJECTS = ROOT / "deploy" / "k8s" / "components" / "autoscaling-keda" / "scaledobjects.yaml"
ADAPTER_RULES = ROOT / "deploy" / "k8s" / "monitoring" / "prometheus-adapter-rules.yaml"
OUT = ROOT / "bench" / "results" / "autoscaling"
NAMESPACE = "conveyor"
TARGET = "provider-adapter"

log = logging.getLogger("autoscaling_demo")


# --------------------------------------------------------------------------------------------------
# The HPA algorithm (kubernetes pkg/controller/podautoscaler, autoscaling/v2 with behavior)


@dataclass(frozen=True)
class Policy:
    """One scaling policy: ``type`` Pods or Percent, ``value`` per ``period`` seconds."""

    type: str
    value: int
    period: float


@dataclass(frozen=True)
class Rules:
    """HPAScalingRules of one direction."""

    stabilization: float
    select: str
    policies: tuple[Policy, ...]


@dataclass(frozen=True)
class Behavior:
    """scaleUp and scaleDown rules."""

    up: Rules
    down: Rules

    @staticmethod
    def from_manifest(doc: dict[str, Any], time_scale: float = 1.0) -> Behavior:
        """From a ``behavior`` mapping; every period and window divided by ``time_scale``."""

        def rules(d: dict[str, Any]) -> Rules:
            return Rules(
                stabilization=float(d.get("stabilizationWindowSeconds", 0)) / time_scale,
                select=str(d.get("selectPolicy", "Max")),
                policies=tuple(
                    Policy(p["type"], int(p["value"]), float(p["periodSeconds"]) / time_scale)
                    for p in d["policies"]
                ),
            )

        return Behavior(up=rules(doc["scaleUp"]), down=rules(doc["scaleDown"]))


@dataclass
class HpaModel:
    """Desired replicas from metric values, as the HPA controller computes them."""

    min_replicas: int
    max_replicas: int
    targets: Sequence[float]
    """AverageValue target of each metric (per replica)."""
    behavior: Behavior
    tolerance: float = 0.1
    recommendations: list[tuple[float, int]] = field(default_factory=list)
    events: list[tuple[float, int]] = field(default_factory=list)
    """(time, replica change) of the scale operations done."""

    def proposal(self, current: int, values: Sequence[float]) -> int:
        """Replicas the metrics ask for (max over metrics), before behaviour and bounds."""
        best = 0
        for value, target in zip(values, self.targets, strict=True):
            if current > 0 and abs(value / (target * current) - 1.0) <= self.tolerance:
                wanted = current
            else:
                wanted = math.ceil(value / target)
            best = max(best, wanted)
        return best

    def _stabilize(self, now: float, current: int, desired: int) -> int:
        up_cut = now - self.behavior.up.stabilization
        down_cut = now - self.behavior.down.stabilization
        up_rec, down_rec = desired, desired
        for stamp, rec in self.recommendations:
            if stamp > up_cut:
                up_rec = min(up_rec, rec)
            if stamp > down_cut:
                down_rec = max(down_rec, rec)
        keep = max(self.behavior.up.stabilization, self.behavior.down.stabilization)
        self.recommendations = [(s, r) for s, r in self.recommendations if s > now - keep]
        self.recommendations.append((now, desired))
        recommendation = current
        recommendation = max(recommendation, up_rec)
        return min(recommendation, down_rec)

    def _changed(self, now: float, period: float, sign: int) -> int:
        return sum(
            abs(c) for s, c in self.events if s > now - period and (c > 0) == (sign > 0) and c != 0
        )

    def _up_limit(self, now: float, current: int) -> int:
        rules = self.behavior.up
        if rules.select == "Disabled":
            return current
        limits = []
        for p in rules.policies:
            start = current - self._changed(now, p.period, +1) + self._changed(now, p.period, -1)
            if p.type == "Pods":
                limits.append(start + p.value)
            else:
                limits.append(math.ceil(start * (1 + p.value / 100)))
        return max(limits) if rules.select == "Max" else min(limits)

    def _down_limit(self, now: float, current: int) -> int:
        rules = self.behavior.down
        if rules.select == "Disabled":
            return current
        limits = []
        for p in rules.policies:
            start = current - self._changed(now, p.period, +1) + self._changed(now, p.period, -1)
            if p.type == "Pods":
                limits.append(start - p.value)
            else:
                limits.append(int(start * (1 - p.value / 100)))
        # For scaling down, the policy allowing the biggest change gives the lowest count.
        return min(limits) if rules.select == "Max" else max(limits)

    def desired(self, now: float, current: int, values: Sequence[float]) -> tuple[int, int]:
        """(proposal from the metrics, replicas after stabilization, rate limits and bounds)."""
        proposal = self.proposal(current, values)
        wanted = self._stabilize(now, current, proposal)
        if wanted > current:
            limit = max(self._up_limit(now, current), current)
            wanted = min(wanted, limit, self.max_replicas)
        elif wanted < current:
            limit = min(self._down_limit(now, current), current)
            wanted = max(wanted, limit, self.min_replicas)
        wanted = min(max(wanted, self.min_replicas), self.max_replicas)
        return proposal, wanted

    def record(self, now: float, change: int) -> None:
        """Remember a scale operation (rate policies count them per period)."""
        if change:
            self.events.append((now, change))
            horizon = max(
                [p.period for p in self.behavior.up.policies + self.behavior.down.policies]
            )
            self.events = [(s, c) for s, c in self.events if s > now - horizon]


# --------------------------------------------------------------------------------------------------
# The manifests: exact queries, targets, bounds and behaviour


@dataclass(frozen=True)
class Scaler:
    """The provider adapter's ScaledObject, and the HPA-flavour queries for the same metrics."""

    names: tuple[str, ...]
    queries: tuple[str, ...]
    thresholds: tuple[float, ...]
    min_replicas: int
    max_replicas: int
    behavior: dict[str, Any]
    adapter_rule_queries: tuple[str, ...]


HPAS = ROOT / "deploy" / "k8s" / "components" / "autoscaling-hpa" / "hpas.yaml"


def load_scaler() -> Scaler:
    """Read the provider-adapter ScaledObject; expand the prometheus-adapter rules its HPA twin uses."""
    docs = [d for d in yaml.safe_load_all(SCALED_OBJECTS.read_text()) if d]
    (so,) = [d for d in docs if d["spec"]["scaleTargetRef"]["name"] == TARGET]
    triggers = so["spec"]["triggers"]
    hpas = [d for d in yaml.safe_load_all(HPAS.read_text()) if d]
    (hpa,) = [d for d in hpas if d["spec"]["scaleTargetRef"]["name"] == TARGET]
    rules = {
        r["name"]["as"]: r for r in yaml.safe_load(ADAPTER_RULES.read_text())["rules"]["external"]
    }
    expanded = []
    for metric in hpa["spec"]["metrics"]:
        spec = metric["external"]["metric"]
        rule = rules[spec["name"]]
        series = rule["seriesQuery"].split("{", 1)[0]
        labels = [f'namespace="{NAMESPACE}"'] + [
            f'{k}="{v}"' for k, v in spec.get("selector", {}).get("matchLabels", {}).items()
        ]
        expanded.append(
            rule["metricsQuery"]
            .replace("<<.Series>>", series)
            .replace("<<.LabelMatchers>>", ",".join(labels))
        )
    return Scaler(
        names=tuple(t["name"] for t in triggers),
        # The component's queries carry a placeholder kustomize replaces with the namespace.
        queries=tuple(
            t["metadata"]["query"].replace('namespace="NAMESPACE"', f'namespace="{NAMESPACE}"')
            for t in triggers
        ),
        thresholds=tuple(float(t["metadata"]["threshold"]) for t in triggers),
        min_replicas=int(so["spec"]["minReplicaCount"]),
        max_replicas=int(so["spec"]["maxReplicaCount"]),
        behavior=so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"],
        adapter_rule_queries=tuple(expanded),
    )


# --------------------------------------------------------------------------------------------------
# Prometheus


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


# --------------------------------------------------------------------------------------------------
# Load


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


# --------------------------------------------------------------------------------------------------
# The adapter replicas


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


# --------------------------------------------------------------------------------------------------
# The run


@dataclass
class Row:
    t: float
    offered_tps: float
    submitted: int
    dispatch_backlog: float
    commands_lag: float
    rule_values_agree: bool
    proposal: int
    desired: int
    replicas_running: int
    creates_per_s: float
    completed_per_s: float


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from conveyor_devstack.system import ConveyorSystem, SystemConfig

    scaler = load_scaler()
    behavior = Behavior.from_manifest(scaler.behavior, args.time_scale)
    model = HpaModel(scaler.min_replicas, scaler.max_replicas, scaler.thresholds, behavior)
    sync = 15.0 / args.time_scale
    profile = load_profile(args.quick)
    workdir = Path(tempfile.mkdtemp(prefix="conveyor-autoscale-"))
    log.info(
        "queries: %s; thresholds %s; replicas %d-%d; sync %.2fs; workdir %s",
        scaler.queries,
        scaler.thresholds,
        scaler.min_replicas,
        scaler.max_replicas,
        sync,
        workdir,
    )
    per_min = str(int(args.per_replica * 60))
    config = SystemConfig(
        schedulers=1,
        adapters=1,
        notifiers=1,
        gateways=1,
        run_dir=workdir / "system",
        log_level="WARNING",
        scheduler_env={
            "SCHEDULER_GLOBAL_CONCURRENCY": "2000",
            "SCHEDULER_TIER_CONCURRENCY": '{"free": 2000, "premium": 2000, "pro": 2000}',
            "SCHEDULER_PROVIDER_RATE_PER_SECOND": "200",
            "SCHEDULER_PROVIDER_BURST": "200",
            "SCHEDULER_TENANT_SUBMIT_RATE": "200",
            "SCHEDULER_TENANT_SUBMIT_BURST": "400",
            "SCHEDULER_QUEUE_CAPACITY": "20000",
            "SCHEDULER_TENANT_MAX_WAITING": "20000",
            # Commands wait in Kafka while the adapters are scaled out: no re-emission meanwhile.
            "SCHEDULER_SUBMIT_LEASE_SECONDS": "3600",
        },
        adapter_env={
            "ADAPTER_CREATE_RATE_PER_MIN": per_min,
            "ADAPTER_CREATE_BURST": "1",
            "ADAPTER_THROTTLE_MAX_WAIT_S": "600",
            # The manifest's 15 s, scaled like every other period.
            "ADAPTER_RECONCILE_INTERVAL_S": str(round(15.0 / args.time_scale, 2)),
        },
        fake={
            "min_duration_s": 0.3,
            "max_duration_s": 0.6,
            "output_kind": "text",
            "output_bytes": 64,
        },
    )
    prom = Prometheus(workdir, scrape_interval=max(1.0, sync / 2))
    async with ConveyorSystem.run(config) as system:
        pool = AdapterPool(system, scaler.max_replicas)
        adapters = pool.names
        await asyncio.gather(*(pool.start(n) for n in adapters[1 : scaler.min_replicas]))
        await prom.start(pool.metrics_targets())
        try:
            rows, stats = await control(args, scaler, model, system, pool, prom, profile, adapters)
        finally:
            prom.stop()
    return write_results(rows, stats, scaler, args, profile)


async def control(
    args: argparse.Namespace,
    scaler: Scaler,
    model: HpaModel,
    system: Any,
    pool: AdapterPool,
    prom: Prometheus,
    profile: list[tuple[float, float]],
    adapters: list[str],
) -> tuple[list[Row], LoadStats]:
    """Drive the load and run the autoscaling loop until the replicas are back at the minimum."""
    sync = 15.0 / args.time_scale
    rows: list[Row] = []
    running = adapters[: scaler.min_replicas]
    current = len(running)
    changing: set[asyncio.Task[None]] = set()

    async def scale_to(n: int) -> None:
        nonlocal running
        if n > len(running):
            start = [a for a in adapters if a not in running][: n - len(running)]
            running = running + start
            for name in start:
                t = asyncio.create_task(pool.start(name))
                changing.add(t)
                t.add_done_callback(changing.discard)
        elif n < len(running):
            stop = running[n:]
            running = running[:n]
            for name in stop:
                t = asyncio.create_task(pool.stop(name))
                changing.add(t)
                t.add_done_callback(changing.discard)

    stats = LoadStats()
    throughput = f'sum(rate(conveyor_adapter_creates_total{{namespace="{NAMESPACE}",outcome="created"}}[{max(4, round(sync * 3))}s]))'
    completed = f'sum(rate(conveyor_scheduler_terminal_total{{namespace="{NAMESPACE}",status="succeeded"}}[{max(4, round(sync * 3))}s]))'
    await asyncio.sleep(sync)  # a few scrapes before the first decision
    t0 = time.monotonic()
    load = asyncio.create_task(
        drive_load(system.gateway_address, system.endpoints.tenant_token, profile, stats, t0)
    )
    total = sum(d for d, _ in profile)
    async with httpx.AsyncClient(timeout=5.0, trust_env=False) as client:
        while True:
            now = time.monotonic() - t0
            values = [(await prom.query(client, q)) or 0.0 for q in scaler.queries]
            rule_values = [
                (await prom.query(client, q)) or 0.0 for q in scaler.adapter_rule_queries
            ]
            proposal, desired = model.desired(now, current, values)
            if desired != current:
                model.record(now, desired - current)
                await scale_to(desired)
                current = desired
            live = sum(1 for n in running if system.process(n).running)
            rows.append(
                Row(
                    t=round(now, 2),
                    offered_tps=offered_rate(profile, now),
                    submitted=stats.submitted,
                    dispatch_backlog=values[0],
                    commands_lag=values[1],
                    rule_values_agree=values == rule_values,
                    proposal=proposal,
                    desired=desired,
                    replicas_running=live,
                    creates_per_s=round((await prom.query(client, throughput)) or 0.0, 3),
                    completed_per_s=round((await prom.query(client, completed)) or 0.0, 3),
                )
            )
            r = rows[-1]
            log.info(
                "t=%6.1fs load=%4.1f/s backlog=%5.0f lag=%5.0f proposal=%d desired=%d "
                "running=%d creates=%5.2f/s",
                r.t,
                r.offered_tps,
                r.dispatch_backlog,
                r.commands_lag,
                r.proposal,
                r.desired,
                r.replicas_running,
                r.creates_per_s,
            )
            if now > total and current == scaler.min_replicas and r.dispatch_backlog == 0:
                break
            if now > total + args.max_tail:
                log.warning("stopping: replicas did not return to the minimum in time")
                break
            await asyncio.sleep(max(0.0, sync - ((time.monotonic() - t0) - now)))
    load.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await load
    if changing:
        await asyncio.wait(changing, timeout=30)
    return rows, stats


def write_results(
    rows: list[Row],
    stats: LoadStats,
    scaler: Scaler,
    args: argparse.Namespace,
    profile: list[tuple[float, float]],
) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "autoscaling.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0]).keys()))
        writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))
    by_replicas: dict[int, list[float]] = {}
    for row in rows:
        if row.dispatch_backlog > scaler.thresholds[0]:  # backlog: throughput is capacity-bound
            by_replicas.setdefault(row.replicas_running, []).append(row.creates_per_s)
    capacity = {n: round(sum(v) / len(v), 2) for n, v in sorted(by_replicas.items()) if v}
    summary = {
        "queries": dict(zip(scaler.names, scaler.queries, strict=True)),
        "adapter_rule_queries": list(scaler.adapter_rule_queries),
        "threshold_per_replica": dict(zip(scaler.names, scaler.thresholds, strict=True)),
        "min_replicas": scaler.min_replicas,
        "max_replicas": scaler.max_replicas,
        "time_scale": args.time_scale,
        "sync_period_s": round(15.0 / args.time_scale, 2),
        "per_replica_creates_per_s": args.per_replica,
        "profile": [{"seconds": d, "tasks_per_s": r} for d, r in profile],
        "submitted": stats.submitted,
        "rejected": stats.rejected,
        "errors": stats.errors,
        "peak_dispatch_backlog": max(r.dispatch_backlog for r in rows),
        "peak_commands_lag": max(r.commands_lag for r in rows),
        "peak_replicas": max(r.replicas_running for r in rows),
        "final_replicas": rows[-1].replicas_running,
        "peak_creates_per_s": max(r.creates_per_s for r in rows),
        "creates_per_s_by_replicas_under_backlog": capacity,
        "keda_and_adapter_rule_agree_ticks": sum(r.rule_values_agree for r in rows),
        "ticks": len(rows),
        "duration_s": rows[-1].t,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    step = max(1, round(10.0 / (15.0 / args.time_scale)))
    lines = [
        "# Autoscaling demo: provider adapter on its dispatch backlog",
        "",
        "KEDA triggers of `deploy/k8s/components/autoscaling-keda` evaluated by Prometheus: "
        + "; ".join(
            f"{n} `{q}` (threshold {t:g} per replica)"
            for n, q, t in zip(scaler.names, scaler.queries, scaler.thresholds, strict=True)
        )
        + f"; {scaler.min_replicas}-{scaler.max_replicas} replicas; "
        f"behaviour from the manifest with every period divided by {args.time_scale:g} "
        f"(sync every {15.0 / args.time_scale:.2f} s). Each adapter creates at most "
        f"{args.per_replica:g} predictions/s.",
        "",
        "| t (s) | offered (tasks/s) | dispatch backlog | commands lag | proposal | desired "
        "| running | creates/s | completed/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines.extend(
        f"| {row.t:.0f} | {row.offered_tps:g} | {row.dispatch_backlog:.0f} | {row.commands_lag:.0f} "
        f"| {row.proposal} | {row.desired} "
        f"| {row.replicas_running} | {row.creates_per_s:.2f} | {row.completed_per_s:.2f} |"
        for row in rows[::step] + ([rows[-1]] if (len(rows) - 1) % step else [])
    )
    lines += ["", "Summary:", "", "```json", json.dumps(summary, indent=2), "```", ""]
    (out / "autoscaling.md").write_text("\n".join(lines))
    plot(rows, scaler, out / "autoscaling.png", args)
    return summary


def plot(rows: list[Row], scaler: Scaler, path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r.t for r in rows]
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    ax1.step(
        t, [r.offered_tps for r in rows], where="post", label="offered load (tasks/s)", color="grey"
    )
    ax1.plot(
        t,
        [r.creates_per_s for r in rows],
        label="throughput: predictions created/s",
        color="tab:blue",
    )
    ax1.plot(
        t,
        [r.completed_per_s for r in rows],
        label="tasks completed/s",
        color="tab:green",
        alpha=0.7,
    )
    ax1.set_ylabel("per second")
    ax1.legend(loc="upper right", fontsize=8)
    ax1.set_title(
        f"provider-adapter autoscaling on the dispatch backlog "
        f"(time scale 1/{args.time_scale:g}, {args.per_replica:g} creates/s per replica)"
    )
    ax2.plot(
        t, [r.dispatch_backlog for r in rows], label="dispatch backlog (trigger 1)", color="tab:red"
    )
    ax2.plot(t, [r.commands_lag for r in rows], label="commands lag (trigger 2)", color="tab:brown")
    ax2.plot(
        t,
        [scaler.thresholds[0] * r.replicas_running for r in rows],
        label="threshold x running replicas",
        color="tab:orange",
        linestyle="--",
    )
    ax2.set_ylabel("commands")
    ax2.legend(loc="upper right", fontsize=8)
    ax3.step(
        t,
        [r.proposal for r in rows],
        where="post",
        label="metric proposal",
        color="tab:purple",
        alpha=0.5,
    )
    ax3.step(
        t, [r.desired for r in rows], where="post", label="desired (HPA behaviour)", color="black"
    )
    ax3.step(
        t,
        [r.replicas_running for r in rows],
        where="post",
        label="running adapters",
        color="tab:blue",
        linestyle="--",
    )
    ax3.set_ylabel("replicas")
    ax3.set_xlabel("seconds")
    ax3.set_ylim(0, scaler.max_replicas + 1)
    ax3.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-scale", type=float, default=4.0, help="divide periods by this")
    parser.add_argument(
        "--per-replica", type=float, default=2.0, help="creates/s one adapter may do"
    )
    parser.add_argument("--quick", action="store_true", help="a short profile (smoke run)")
    parser.add_argument(
        "--max-tail", type=float, default=240.0, help="seconds allowed after the load"
    )
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if os.environ.get("PYTHONASYNCIODEBUG"):
        logging.getLogger("asyncio").setLevel(logging.DEBUG)
    summary = asyncio.run(run(args))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
