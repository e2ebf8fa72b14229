"""`make bench`: run every benchmark in one invocation and print the figures and ratios.

Each benchmark measures its baseline in the same run (scheduler: the naive per-row-counter dispatch of
performance.md §2.4 on the same PostgreSQL; gateway: BullMQ's durable add when Redis and Node are at
hand, else the figures measured for it on this machine kind; pipeline: BullMQ end to end, a worker
completing jobs) and writes ``bench/results/*.json``.
``--quick`` runs short smoke versions (under a minute each).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

BENCHES: list[tuple[str, Path, Path, list[str]]] = [
    ("scheduler", ROOT / "bench" / "scheduler_bench.py", RESULTS / "scheduler.json", []),
    ("groups", ROOT / "bench" / "group_bench.py", RESULTS / "groups.json", []),
    # The adapter's submit protocol, batch calls against item by item (issue #13).
    (
        "submit-protocol",
        ROOT / "bench" / "submit_protocol_bench.py",
        RESULTS / "submit_protocol.json",
        [],
    ),
    # One scheduler replica, then the deployed shape (deploy/k8s runs two) on the same 2 cores.
    ("gateway", ROOT / "bench" / "gateway_bench.py", RESULTS / "gateway.json", []),
    (
        "gateway-2-replicas",
        ROOT / "bench" / "gateway_bench.py",
        RESULTS / "gateway-2-replicas.json",
        ["--scheduler-replicas", "2"],
    ),
    # The whole path end to end (issue #13) in the make-up shape, with BullMQ's end-to-end run.
    ("pipeline", ROOT / "bench" / "pipeline_bench.py", RESULTS / "pipeline.json", []),
]
NESTED = ("cpu_ms_per_task_by_process",)
"""Flat dicts of figures printed one entry per line (``key[name]``)."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short smoke runs")
    parser.add_argument("--only", choices=[name for name, _, _, _ in BENCHES], action="append")
    args = parser.parse_args()
    failed = []
    for name, script, out, extra in BENCHES:
        if args.only and name not in args.only:
            continue
        cmd = [sys.executable, str(script), "--out", str(out), *extra]
        if args.quick:
            cmd.append("--quick")
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        started = time.monotonic()
        rc = subprocess.call(cmd, cwd=ROOT)
        print(f"== {name}: exit {rc} after {time.monotonic() - started:.0f} s", flush=True)
        if rc != 0:
            failed.append(name)
            continue
        figures = json.loads(out.read_text())
        for key in sorted(figures):
            value = figures[key]
            if isinstance(value, int | float) and not isinstance(value, bool):
                print(f"   {key:45} {value}")
        for key in NESTED:
            for name, value in (figures.get(key) or {}).items():
                print(f"   {f'{key}[{name}]':45} {value}")
    if failed:
        print(f"benchmarks failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
