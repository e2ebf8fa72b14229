"""Where a task's added latency goes: the medians of each stage of its path, from timestamps the
system already keeps (no tracing needed).

The points, in path order: the submit's transaction (``tasks.created_at``), the dispatch cycle that
took it (``dispatched_at``), its DispatchTask record (Kafka record time), the adapter's
``BeginSubmit`` (``submit_started_at``), the create and the finish at the fake (its ledger), the
provider result record (Kafka), the result applied (``finished_at``), the terminal task event record
(Kafka) and the client seeing it on its watch stream. PostgreSQL's and the fake's clocks are this
machine's; Kafka's record times are the producers' (CreateTime).
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
from collections.abc import Iterable, Mapping
from typing import Any

import psycopg
from aiokafka import AIOKafkaConsumer, TopicPartition

from bench._pipeline_system import fetch_ledger
from conveyor_common import topics
from conveyor_devstack.system import ConveyorSystem

POINTS = (
    "created",
    "dispatched",
    "command_record",
    "begin_submit",
    "create",
    "finish",
    "result_record",
    "finished",
    "terminal_record",
    "seen",
)
"""A task's path, in order (see the module docstring)."""

TOPICS = (topics.PROVIDER_COMMANDS, topics.PROVIDER_RESULTS, topics.TASK_EVENTS)


def stage_medians(tasks: Iterable[Mapping[str, float | None]]) -> dict[str, float | int]:
    """Median milliseconds of each stage (``<from>_to_<to>_ms``, consecutive points) over the tasks
    that have both ends, the whole path (``total_ms``) and the tasks counted (``n``)."""
    spans: dict[str, list[float]] = {}
    n = 0
    for points in tasks:
        n += 1
        for a, b in (*itertools.pairwise(POINTS), (POINTS[0], POINTS[-1])):
            start, end = points.get(a), points.get(b)
            if start is None or end is None:
                continue
            name = "total_ms" if (a, b) == (POINTS[0], POINTS[-1]) else f"{a}_to_{b}_ms"
            spans.setdefault(name, []).append((end - start) * 1000.0)
    out: dict[str, float | int] = {"n": n}
    for a, b in itertools.pairwise(POINTS):
        name = f"{a}_to_{b}_ms"
        if name in spans:
            out[name] = round(statistics.median(spans[name]), 2)
    if "total_ms" in spans:
        out["total_ms"] = round(statistics.median(spans["total_ms"]), 2)
    return out


async def end_offsets(bootstrap: str) -> dict[TopicPartition, int]:
    """Each partition's end offset of the path's topics now (where a later read starts)."""
    consumer = AIOKafkaConsumer(*TOPICS, bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = [
            TopicPartition(t, p) for t in TOPICS for p in consumer.partitions_for_topic(t) or ()
        ]
        return dict(await consumer.end_offsets(parts))
    finally:
        await consumer.stop()


async def record_times(
    bootstrap: str, start: Mapping[TopicPartition, int], keys: set[str]
) -> dict[str, dict[str, list[float]]]:
    """Record times (epoch seconds, in offset order) by topic and key, of the records written
    since ``start`` whose key is one of ``keys``."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(list(start))
        for tp, offset in start.items():
            consumer.seek(tp, offset)
        end = await consumer.end_offsets(list(start))
        out: dict[str, dict[str, list[float]]] = {t: {} for t in TOPICS}
        left = {tp for tp in start if end[tp] > start[tp]}
        deadline = asyncio.get_running_loop().time() + 120.0
        while left and asyncio.get_running_loop().time() < deadline:
            batches = await consumer.getmany(*left, timeout_ms=1000, max_records=5000)
            for tp, records in batches.items():
                for r in records:
                    key = r.key.decode() if r.key else ""
                    if key in keys:
                        out[tp.topic].setdefault(key, []).append(r.timestamp / 1000.0)
                    if r.offset + 1 >= end[tp]:
                        left.discard(tp)
        return out
    finally:
        await consumer.stop()


def _pg_points(url: str, ids: list[str]) -> dict[str, tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT id::text, extract(epoch FROM created_at), extract(epoch FROM dispatched_at),"
            " extract(epoch FROM submit_started_at), extract(epoch FROM finished_at)"
            " FROM tasks WHERE id::text = ANY(%s)",
            (ids,),
        ).fetchall()
    return {r[0]: tuple(None if v is None else float(v) for v in r[1:]) for r in rows}


async def breakdown(
    system: ConveyorSystem,
    ids: list[str],
    seen: Mapping[str, float],
    start: Mapping[TopicPartition, int],
) -> dict[str, float | int]:
    """The stage medians of the tasks ``ids`` (``seen``: the client's sightings, epoch seconds;
    ``start``: :func:`end_offsets` before they were submitted)."""
    keys = set(ids)
    url = system.database_url.replace("postgresql+psycopg://", "postgresql://")
    pg = await asyncio.to_thread(_pg_points, url, ids)
    creates = [e for e in await fetch_ledger(system, "create") if e.get("task") in keys]
    prediction = {str(e["task"]): str(e["prediction_id"]) for e in creates}
    created_at = {str(e["task"]): float(e["t"]) for e in creates}
    finished_at: dict[str, float] = {}
    for e in await fetch_ledger(system, "finish"):
        finished_at.setdefault(str(e["prediction_id"]), float(e["t"]))
    records = await record_times(system.devstack.kafka_bootstrap, start, keys)
    tasks = []
    for tid in ids:
        created, dispatched, begin, finished = pg.get(tid, (None, None, None, None))
        commands = records[topics.PROVIDER_COMMANDS].get(tid, [])
        results = records[topics.PROVIDER_RESULTS].get(tid, [])
        task_events = records[topics.TASK_EVENTS].get(tid, [])
        tasks.append(
            {
                "created": created,
                "dispatched": dispatched,
                "command_record": commands[0] if commands else None,
                "begin_submit": begin,
                "create": created_at.get(tid),
                "finish": finished_at.get(prediction.get(tid, "")),
                "result_record": results[-1] if results else None,
                "finished": finished,
                "terminal_record": task_events[-1] if task_events else None,
                "seen": seen.get(tid),
            }
        )
    return stage_medians(tasks)
