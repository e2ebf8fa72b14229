"""Pure helpers of the pipeline benchmark: percentiles, CPU accounting from /proc, fake-ledger analysis.

Kept free of I/O where they can be (the /proc readers are thin wrappers over the pure parsers), so the
unit tests in ``tests/unit/test_bench_pipeline.py`` exercise them on synthetic data.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (``p`` in 0..100) as the other benches compute it; NaN when empty."""
    if not values:
        return float("nan")
    if not 0.0 <= p <= 100.0:
        raise ValueError(f"percentile must be within 0..100, got {p}")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


# ---------------------------------------------------------------------------------------------
# CPU from /proc


@dataclass(frozen=True)
class ProcStat:
    """The fields of ``/proc/<pid>/stat`` the accounting needs (times in clock ticks)."""

    pid: int
    ppid: int
    comm: str
    utime: int
    stime: int
    cutime: int
    cstime: int

    @property
    def own(self) -> int:
        """CPU the process itself used (user + system)."""
        return self.utime + self.stime

    @property
    def reaped(self) -> int:
        """CPU of its children that exited and were waited for (cutime + cstime)."""
        return self.cutime + self.cstime


def parse_stat(text: str) -> ProcStat:
    """Parse one ``/proc/<pid>/stat`` line (``comm`` may hold spaces and parentheses)."""
    head, sep, tail = text.rpartition(")")
    if not sep:
        raise ValueError(f"not a /proc stat line: {text[:80]!r}")
    pid_text, _, comm = head.partition(" (")
    fields = tail.split()
    # fields[0] is the state (field 3 of proc(5)); utime..cstime are fields 14..17.
    return ProcStat(
        pid=int(pid_text),
        ppid=int(fields[1]),
        comm=comm,
        utime=int(fields[11]),
        stime=int(fields[12]),
        cutime=int(fields[13]),
        cstime=int(fields[14]),
    )


def read_snapshot(proc_root: Path = Path("/proc")) -> dict[int, ProcStat]:
    """Every readable process's stat, by pid (processes that vanish while read are skipped)."""
    out: dict[int, ProcStat] = {}
    for entry in proc_root.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            out[int(entry.name)] = parse_stat((entry / "stat").read_text())
        except (OSError, ValueError, IndexError):
            continue
    return out


def descendants(snapshot: Mapping[int, ProcStat], root: int) -> set[int]:
    """``root`` and every live process below it (by ppid) in the snapshot."""
    children: dict[int, list[int]] = {}
    for stat in snapshot.values():
        children.setdefault(stat.ppid, []).append(stat.pid)
    seen: set[int] = set()
    stack = [root] if root in snapshot else []
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        stack.extend(children.get(pid, ()))
    return seen


def tree_ticks(snapshot: Mapping[int, ProcStat], root: int) -> int | None:
    """CPU ticks of a process tree: own time of every live member plus the reaped-children time
    each holds. A child's time sits in its own stat while it lives and moves to its parent's
    cutime/cstime when reaped (PostgreSQL's postmaster reaps its backends), so the sum counts each
    tick once and deltas of it stay right across exits. None when ``root`` is not running."""
    if root not in snapshot:
        return None
    return sum(snapshot[pid].own + snapshot[pid].reaped for pid in descendants(snapshot, root))


@dataclass(frozen=True)
class CpuTarget:
    """A named group to account: a root pid, with its descendants or alone."""

    name: str
    pid: int
    tree: bool = True


def group_ticks(snapshot: Mapping[int, ProcStat], targets: Iterable[CpuTarget]) -> dict[str, int]:
    """Ticks of each target in one snapshot (targets not running are left out)."""
    out: dict[str, int] = {}
    for target in targets:
        if target.tree:
            ticks = tree_ticks(snapshot, target.pid)
        else:
            stat = snapshot.get(target.pid)
            ticks = None if stat is None else stat.own
        if ticks is not None:
            out[target.name] = out.get(target.name, 0) + ticks
    return out


def cpu_ms(before: Mapping[str, int], after: Mapping[str, int], clk_tck: int) -> dict[str, float]:
    """Milliseconds of CPU each group used between two samples (groups present in both)."""
    return {
        name: (after[name] - before[name]) * 1000.0 / clk_tck for name in before if name in after
    }


def clock_ticks() -> int:
    """Clock ticks per second of /proc times (SC_CLK_TCK)."""
    return int(os.sysconf("SC_CLK_TCK"))


class CpuProbe:
    """Samples the CPU ticks of named process groups."""

    def __init__(self, targets: Sequence[CpuTarget], proc_root: Path = Path("/proc")) -> None:
        self.targets = list(targets)
        self.proc_root = proc_root
        self.clk_tck = clock_ticks()

    def sample(self) -> dict[str, int]:
        """Ticks per group now."""
        return group_ticks(read_snapshot(self.proc_root), self.targets)

    def delta_ms(self, before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, float]:
        """CPU milliseconds per group between two samples."""
        return cpu_ms(before, after, self.clk_tck)


def per_task(
    cpu: Mapping[str, float], completed: int, *, exclude: Iterable[str] = ()
) -> tuple[float, dict[str, float]]:
    """(total ms per task over the groups not excluded, ms per task of each group)."""
    skip = set(exclude)
    if completed <= 0:
        return float("nan"), {name: float("nan") for name in cpu}
    by = {name: round(ms / completed, 3) for name, ms in cpu.items()}
    total = sum(ms for name, ms in cpu.items() if name not in skip) / completed
    return round(total, 3), by


# ---------------------------------------------------------------------------------------------
# The fake's ledger


def _events(events: Iterable[Mapping[str, Any]], kind: str) -> list[Mapping[str, Any]]:
    return sorted((e for e in events if e.get("kind") == kind), key=lambda e: float(e["t"]))


def refill_gaps(events: Iterable[Mapping[str, Any]]) -> list[float]:
    """Seconds from each finish at the provider to the create that took its slot.

    Finishes and creates are paired in time order: each finish with the earliest create at or after
    it that no earlier finish took. Creates before any finish (the first fill) pair with nothing; a
    finish with no later create (the end of the backlog) is left out.
    """
    evs = list(events)
    creates = [float(e["t"]) for e in _events(evs, "create")]
    finishes = [float(e["t"]) for e in _events(evs, "finish")]
    gaps: list[float] = []
    j = 0
    for finished in finishes:
        while j < len(creates) and creates[j] < finished:
            j += 1
        if j == len(creates):
            break
        gaps.append(creates[j] - finished)
        j += 1
    return gaps


def run_times(events: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Task id -> seconds its (last) prediction ran at the fake, create to finish."""
    evs = list(events)
    created: dict[str, tuple[str, float]] = {}
    for e in _events(evs, "create"):
        if e.get("task"):
            created[str(e["prediction_id"])] = (str(e["task"]), float(e["t"]))
    out: dict[str, float] = {}
    for e in _events(evs, "finish"):
        hit = created.get(str(e.get("prediction_id")))
        if hit is not None:
            task, t_create = hit
            out[task] = float(e["t"]) - t_create
    return out


def first_creates(events: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Task id -> time of its first create at the fake."""
    out: dict[str, float] = {}
    for e in _events(events, "create"):
        task = e.get("task")
        if task and str(task) not in out:
            out[str(task)] = float(e["t"])
    return out


def added_latencies_ms(
    submitted: Mapping[str, float], terminal: Mapping[str, float], runs: Mapping[str, float]
) -> list[float]:
    """Per task: (terminal event seen - submit) - the prediction's own run time, in ms. Tasks missing
    any of the three are left out (the caller reports how many)."""
    out: list[float] = []
    for task, t_submit in submitted.items():
        t_end = terminal.get(task)
        run = runs.get(task)
        if t_end is None or run is None:
            continue
        out.append((t_end - t_submit - run) * 1000.0)
    return out


def summarize_ms(values: Sequence[float]) -> dict[str, float | int]:
    """Count, p50, p90, p99 and max of millisecond samples, rounded."""
    return {
        "n": len(values),
        "p50_ms": round(percentile(values, 50), 1),
        "p90_ms": round(percentile(values, 90), 1),
        "p99_ms": round(percentile(values, 99), 1),
        "max_ms": round(max(values, default=float("nan")), 1),
    }
