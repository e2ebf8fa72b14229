"""Work counted per task, not timed: PostgreSQL transactions, Kafka records, gRPC calls.

Counts do not move with the machine's speed. A run on this 2-core machine varies by 10-15% in its
timings from one invocation to the next, so a structural change (one round trip fewer per task) is
easier to see in these counts than in CPU milliseconds.

* PostgreSQL: ``xact_commit`` of the system's database (``pg_stat_database``). Busy backends flush
  their counts at most every second, so a window's count is off by up to a second's worth at
  each edge (under 5% over the pipeline benchmark's window).
* Kafka: the records written to each topic (the sum of its partitions' end offsets).
* gRPC: ``conveyor_grpc_server_handled_total`` of every service process, by method.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg
from aiokafka import AIOKafkaConsumer, TopicPartition

from conveyor_devstack.processes import metric_samples
from conveyor_devstack.system import ConveyorSystem

RPC_METRIC = "conveyor_grpc_server_handled_total"
SERVICE_ROLES = ("scheduler", "adapter", "notifier", "gateway")


async def end_offsets(bootstrap: str, topic: str) -> int:
    """Records ever written to ``topic`` (sum of its partitions' end offsets)."""
    return (await topic_end_offsets(bootstrap, [topic]))[topic]


async def topic_end_offsets(bootstrap: str, topics: list[str]) -> dict[str, int]:
    """Records ever written to each of ``topics``."""
    consumer = AIOKafkaConsumer(*topics, bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()  # subscribed: the topics' metadata is fetched
    try:
        out: dict[str, int] = {}
        for topic in topics:
            parts = consumer.partitions_for_topic(topic) or set()
            if not parts:
                raise RuntimeError(f"no partitions known for {topic}")
            offsets = await consumer.end_offsets([TopicPartition(topic, p) for p in parts])
            out[topic] = int(sum(offsets.values()))
        return out
    finally:
        await consumer.stop()


def xact_commit(url: str, database: str) -> int:
    """Transactions committed in ``database`` so far (pg_stat_database). Backends flush their
    counts at most every second while busy and every 10 s when idle."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_force_next_flush()")
        conn.execute("SELECT pg_stat_clear_snapshot()")
        row = conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = %s", (database,)
        ).fetchone()
        return 0 if row is None else int(row[0])


def rpc_counts(metrics_text: str) -> dict[str, float]:
    """RPCs a process handled so far, by ``service/Method`` (every status code; the method's
    last path segment)."""
    out: dict[str, float] = {}
    for labels, value in metric_samples(metrics_text, RPC_METRIC):
        method = labels.get("grpc_method", "").rsplit("/", 1)[-1]
        key = f"{labels.get('service', '')}/{method}"
        out[key] = out.get(key, 0.0) + value
    return out


@dataclass
class Counts:
    """One reading of every counter."""

    pg_transactions: int
    kafka_records: dict[str, int]
    rpcs: dict[str, float] = field(default_factory=dict)


async def read_counts(system: ConveyorSystem, topics: list[str]) -> Counts:
    """Read every counter now (a few tens of milliseconds)."""
    services = [p.name for role in SERVICE_ROLES for p in system.by_role(role) if p.running]
    texts = await asyncio.gather(*(system.metrics(name) for name in services))
    rpcs: dict[str, float] = {}
    for text in texts:
        for key, value in rpc_counts(text).items():
            rpcs[key] = rpcs.get(key, 0.0) + value
    assert system.devstack.postgres is not None
    pg = await asyncio.to_thread(xact_commit, system.devstack.postgres.url, system.database)
    records = await topic_end_offsets(system.devstack.kafka_bootstrap, topics)
    return Counts(pg_transactions=pg, kafka_records=records, rpcs=rpcs)


def _per(delta: float, tasks: int) -> float:
    return round(delta / tasks, 2)


def per_task(before: Counts, after: Counts, tasks: int) -> dict[str, Any]:
    """What the window between two readings did per completed task (zero counts left out)."""
    if tasks <= 0:
        return {}
    records = _deltas(before.kafka_records, after.kafka_records)
    rpcs = _deltas(before.rpcs, after.rpcs)
    return {
        "pg_transactions": _per(after.pg_transactions - before.pg_transactions, tasks),
        "kafka_records": _per(sum(records.values()), tasks),
        "kafka_records_by_topic": {k: _per(v, tasks) for k, v in sorted(records.items())},
        "grpc_calls": _per(sum(rpcs.values()), tasks),
        "grpc_calls_by_method": {k: _per(v, tasks) for k, v in sorted(rpcs.items())},
    }


def _deltas(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in after.items():
        delta = value - before.get(key, 0.0)
        if delta > 0:
            out[key] = delta
    return out
