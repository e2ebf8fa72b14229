"""The BullMQ peer of the benchmarks: a durable Redis and the shared harness, used by more than one bench.

The harness lives outside the repo (``../shared/bench/peers/bullmq``; ``BULLMQ_HARNESS`` overrides the
path): ``bench.js`` (add rates, drain, paced latency), ``worker.js`` (a Worker with a no-op processor
that reports completions over IPC). ``make bench-peers`` (tools/bench/install-peers.sh) installs
``redis-server`` and the harness's ``node_modules`` when it can; without them each run returns a
``{"skipped": reason}`` entry instead of figures. Redis always runs durable here: AOF with an fsync per
write (``appendfsync always``), like our PostgreSQL with fsync and synchronous_commit on.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT.parent / "shared" / "bench" / "peers"
WORK_THROUGH_JS = Path(__file__).resolve().parent / "bullmq_work_through.js"
REDIS_DURABILITY = "appendonly yes, appendfsync always (fsync per write)"


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def harness_dir() -> Path:
    """Where the BullMQ harness is (``BULLMQ_HARNESS`` or the shared default)."""
    return Path(os.environ.get("BULLMQ_HARNESS") or PEERS / "bullmq")


def unavailable() -> str | None:
    """Why the BullMQ peer cannot run here, or None when Redis, Node and the harness are at hand."""
    harness = harness_dir()
    if not harness.is_dir():
        return f"no BullMQ harness at {harness}"
    if shutil.which("redis-server") is None:
        return "redis-server is not installed (make bench-peers installs it)"
    if shutil.which("node") is None:
        return "node is not installed"
    if not (harness / "node_modules" / "bullmq").is_dir():
        return f"{harness}/node_modules is missing (make bench-peers installs it)"
    return None


@dataclass
class Redis:
    """A running throwaway durable Redis."""

    port: int
    proc: subprocess.Popen[bytes]
    data: Path


class PeerSkipped(Exception):
    """The peer could not run; the message says why (it becomes the ``skipped`` entry)."""


@contextlib.contextmanager
def durable_redis() -> Iterator[Redis]:
    """A Redis on a free loopback port with AOF fsync on every write; stopped and deleted at exit."""
    redis = shutil.which("redis-server")
    if redis is None:
        raise PeerSkipped("redis-server is not installed (make bench-peers installs it)")
    port = free_port()
    data = Path(tempfile.mkdtemp(prefix="bullmq-redis-"))
    server = subprocess.Popen(
        [redis, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
         "--appendonly", "yes", "--appendfsync", "always", "--save", "",
         "--maxmemory-policy", "noeviction"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10.0
        while True:  # without a listening Redis, the harness would retry until its watchdog
            if server.poll() is not None:
                raise PeerSkipped(f"redis-server exited at start rc={server.returncode}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
                break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise PeerSkipped("redis-server did not listen within 10 s")
            time.sleep(0.05)
        yield Redis(port, server, data)
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=5)
        shutil.rmtree(data, ignore_errors=True)


def _node_env(redis: Redis, harness: Path) -> dict[str, str]:
    return {
        **os.environ,
        "REDIS_PORT": str(redis.port),
        "WATCHDOG_S": "240",
        "BULLMQ_BACKEND": "redis",
        "BULLMQ_HARNESS": str(harness),
    }


def _kill_group(proc: subprocess.Popen[Any] | None) -> None:
    # The harness forks worker.js, which outlives a failed parent (its watchdog exits only the parent)
    # and holds the output open: every node process runs in its own session, whose group is killed.
    if proc is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_bullmq(quick: bool) -> dict[str, Any]:
    """BullMQ's durable add, drain and paced latency (the harness's ``bench.js``), or a skip entry.

    ``bench.js N CONCURRENCY RATE PACED_SECONDS`` prints one JSON line.
    """
    reason = unavailable()
    if reason is not None:
        return {"skipped": reason}
    harness = harness_dir()
    node = shutil.which("node")
    assert node is not None
    try:
        with durable_redis() as redis:
            n, paced = ("4000", "5") if quick else ("20000", "20")
            out_path, err_path = redis.data / "bench.out", redis.data / "bench.err"
            bench_js: subprocess.Popen[bytes] | None = None
            try:
                with out_path.open("w") as out_file, err_path.open("w") as err_file:
                    bench_js = subprocess.Popen(
                        [node, "bench.js", n, "50", "500", paced],
                        cwd=harness, env=_node_env(redis, harness),
                        stdout=out_file, stderr=err_file, start_new_session=True,
                    )  # fmt: skip
                try:
                    bench_js.wait(timeout=300)
                except subprocess.TimeoutExpired:
                    return {"skipped": "bench.js did not finish within 300 s"}
                lines = out_path.read_text().strip().splitlines()
                err = err_path.read_text()
                if bench_js.returncode != 0 or not lines:
                    return {"skipped": f"bench.js failed rc={bench_js.returncode}: {err[-500:]}"}
                result: dict[str, Any] = json.loads(lines[-1])
                result["redis"] = REDIS_DURABILITY
                return result
            finally:
                _kill_group(bench_js)
    except PeerSkipped as exc:
        return {"skipped": str(exc)}


class _Lines:
    """JSON lines from a child's stdout with a deadline (select, so a stuck child cannot hang us)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.fd = proc.stdout.fileno()
        self.proc = proc
        self.buffer = b""

    def next(self, deadline: float) -> dict[str, Any]:
        while True:
            line, sep, rest = self.buffer.partition(b"\n")
            if sep:
                self.buffer = rest
                with contextlib.suppress(ValueError):
                    parsed = json.loads(line)
                    if isinstance(parsed, dict):
                        return parsed
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise PeerSkipped("the BullMQ work-through driver did not answer in time")
            ready, _, _ = select.select([self.fd], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    raise PeerSkipped(f"the BullMQ driver exited (rc={self.proc.poll()})")
                self.buffer += chunk


def run_work_through(
    *,
    warmup_s: float,
    window_s: float,
    outstanding: int,
    concurrency: int,
    on_window: Callable[[str, dict[str, int]], Any],
) -> dict[str, Any]:
    """BullMQ end to end in a closed loop: ``outstanding`` jobs added but not completed at all times, a
    Worker (the harness's ``worker.js``) completing them, completions seen by the producer through
    QueueEvents. Returns the driver's result line (``jobs_per_s`` over the window), or a skip entry.

    ``on_window("start"|"end", pids)`` is called at the window's edges with the pids to account
    (``redis``, ``worker``, ``producer``) so the caller samples CPU there.
    """
    reason = unavailable()
    if reason is not None:
        return {"skipped": reason}
    harness = harness_dir()
    node = shutil.which("node")
    assert node is not None
    driver: subprocess.Popen[bytes] | None = None
    try:
        with durable_redis() as redis:
            err_path = redis.data / "work-through.err"
            try:
                with err_path.open("w") as err_file:
                    driver = subprocess.Popen(
                        [node, str(WORK_THROUGH_JS), str(warmup_s), str(window_s),
                         str(outstanding), str(concurrency)],
                        cwd=harness, env=_node_env(redis, harness),
                        stdout=subprocess.PIPE, stderr=err_file, start_new_session=True,
                    )  # fmt: skip
                lines = _Lines(driver)
                deadline = time.monotonic() + warmup_s + window_s + 120.0
                result: dict[str, Any] = {}
                try:
                    while True:
                        msg = lines.next(deadline)
                        event = msg.get("event")
                        pids = {
                            "redis": redis.proc.pid,
                            "worker": int(msg.get("worker_pid", 0)),
                            "producer": driver.pid,
                        }
                        if event in ("window_start", "window_end"):
                            on_window(str(event).removeprefix("window_"), pids)
                        elif event == "result":
                            result = msg
                            break
                except PeerSkipped as exc:
                    err = err_path.read_text(errors="replace")[-500:]
                    return {"skipped": f"{exc}: {err}"}
                result.pop("event", None)
                result["redis"] = REDIS_DURABILITY
                return result
            finally:
                _kill_group(driver)
    except PeerSkipped as exc:
        return {"skipped": str(exc)}
