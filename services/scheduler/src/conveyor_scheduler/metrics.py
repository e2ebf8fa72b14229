"""Prometheus metrics of the scheduler (``conveyor_scheduler_*``, ``conveyor_db_pool_*``), on an
injected registry.

Labelled counters are pre-initialised with their known label values (:func:`preinitialise`): a
series that appears only with its first event is invisible to ``rate()``/``increase()`` for that
event, so the first rejection, failure or dead letter after a start would never show or alert.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import AsyncAdaptedQueuePool, ConnectionPoolEntry, QueuePool

from conveyor_common.metrics import LATENCY_BUCKETS, WAIT_BUCKETS
from conveyor_common.vocabulary import (
    CANCELED,
    DEAD_LETTERED,
    FAILED,
    KIND_NAME,
    STATUS_NAME,
    SUCCEEDED,
)

KINDS = tuple(str(number) for number in KIND_NAME)
"""The ``kind`` label as the dispatcher writes it (the TaskKind number: video, image, text, audio)."""
TERMINAL_STATUSES = tuple(STATUS_NAME[s] for s in (SUCCEEDED, FAILED, CANCELED, DEAD_LETTERED))
ADMISSION_REASONS = ("queue", "waiting", "submit_rate", "tenant")
"""Last segment of a QuotaViolation subject: ``queue``, ``tenant:<t>/waiting``,
``tenant:<t>/submit_rate`` and ``tenant:<t>`` (unknown tenant, raced admission)."""
RESULT_OUTCOMES = ("started", "progress", "succeeded", "failed", "canceled", "throttled", "none")


class SchedulerMetrics:
    """Dashboards and autoscaling signals."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.queue_depth = Gauge(
            "conveyor_scheduler_queue_depth",
            "Queued tasks by kind and priority class (refreshed by the leader).",
            ["kind", "priority"],
            registry=registry,
        )
        self.active_slots = Gauge(
            "conveyor_scheduler_active_slots",
            "Slots held by dispatched or running tasks, by scope (global, kind:<k>, model:<m>).",
            ["scope"],
            registry=registry,
        )
        self.slot_limit = Gauge(
            "conveyor_scheduler_slot_limit",
            "Slot limit by scope (global, kind:<k>, model:<m>).",
            ["scope"],
            registry=registry,
        )
        self.queue_wait = Histogram(
            "conveyor_scheduler_queue_wait_seconds",
            "Time from enqueue (or retry backoff end) to dispatch.",
            ["kind"],
            buckets=WAIT_BUCKETS,
            registry=registry,
        )
        self.dispatch_latency = Histogram(
            "conveyor_scheduler_dispatch_cycle_seconds",
            "Duration of a dispatch cycle that dispatched something (wake-up to commit).",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.submit_group_size = Histogram(
            "conveyor_scheduler_submit_group_size",
            "Single submits committed together by one group-commit transaction.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=registry,
        )
        self.submit_group_seconds = Histogram(
            "conveyor_scheduler_submit_group_seconds",
            "Duration of one group-commit transaction (begin to commit).",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.dispatched = Counter(
            "conveyor_scheduler_dispatched_total",
            "Tasks dispatched, by kind.",
            ["kind"],
            registry=registry,
        )
        self.submit_dispatched = Counter(
            "conveyor_scheduler_submit_dispatched_total",
            "Tasks an idle leader's submit dispatched in its own transaction (of the dispatched).",
            registry=registry,
        )
        self.retries = Counter(
            "conveyor_scheduler_retries_total", "Retries scheduled.", registry=registry
        )
        self.dead_lettered = Counter(
            "conveyor_scheduler_dead_lettered_total", "Tasks dead-lettered.", registry=registry
        )
        self.terminal = Counter(
            "conveyor_scheduler_terminal_total",
            "Tasks reaching a terminal status, by status.",
            ["status"],
            registry=registry,
        )
        self.admission_rejected = Counter(
            "conveyor_scheduler_admission_rejections_total",
            "Submits rejected by admission control, by subject kind.",
            ["reason"],
            registry=registry,
        )
        self.submitted = Counter(
            "conveyor_scheduler_submitted_total",
            "Tasks admitted (deduplicated submits excluded).",
            registry=registry,
        )
        self.outbox_pending = Gauge(
            "conveyor_scheduler_outbox_pending",
            "Unpublished outbox rows seen by the relay's last pass.",
            registry=registry,
        )
        self.outbox_lag = Gauge(
            "conveyor_scheduler_outbox_lag_seconds",
            "Age of the oldest unpublished outbox row.",
            registry=registry,
        )
        self.outbox_published = Counter(
            "conveyor_scheduler_outbox_published_total",
            "Outbox records published.",
            registry=registry,
        )
        self.leader = Gauge(
            "conveyor_scheduler_leader", "1 when this replica is the leader.", registry=registry
        )
        self.results_applied = Counter(
            "conveyor_scheduler_results_total",
            "Provider results consumed, by outcome.",
            ["outcome"],
            registry=registry,
        )
        self.rescued = Counter(
            "conveyor_scheduler_rescued_dispatches_total",
            "DispatchTask commands re-emitted because no adapter confirmed them in time.",
            registry=registry,
        )
        self.expired = Counter(
            "conveyor_scheduler_expired_total",
            "Tasks expired before dispatch.",
            registry=registry,
        )
        self.db_pool = DatabasePoolMetrics(registry)
        preinitialise(self)


def preinitialise(m: SchedulerMetrics) -> None:
    """Create the series of every known label value at 0 (see the module docstring)."""
    for kind in KINDS:
        m.dispatched.labels(kind)
        m.queue_wait.labels(kind)
    for status in TERMINAL_STATUSES:
        m.terminal.labels(status)
    for reason in ADMISSION_REASONS:
        m.admission_rejected.labels(reason)
    for outcome in RESULT_OUTCOMES:
        m.results_applied.labels(outcome)


# --------------------------------------------------------------------------------------------------
# SQLAlchemy connection pool


class DatabasePoolMetrics:
    """The engine pool's state and checkout waits (``conveyor_db_pool_*``).

    :meth:`pool_class` is the ``poolclass`` of the engine (it times checkouts); :meth:`watch`
    registers the engine whose pool the gauges read at every scrape.
    """

    def __init__(self, registry: CollectorRegistry, name: str = "main") -> None:
        self.name = name
        self.wait = Histogram(
            "conveyor_db_pool_wait_seconds",
            "Time a checkout waited for a pooled connection (connect time of a new one included).",
            ["pool"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        ).labels(name)
        self.timeouts = Counter(
            "conveyor_db_pool_timeouts_total",
            "Checkouts that gave up after the pool timeout (pool and overflow exhausted).",
            ["pool"],
            registry=registry,
        ).labels(name)
        self._engines: weakref.WeakSet[AsyncEngine] = weakref.WeakSet()
        registry.register(_PoolCollector(self))

    def watch(self, engine: AsyncEngine) -> AsyncEngine:
        """Report ``engine``'s pool (returns the engine)."""
        self._engines.add(engine)
        return engine

    def pools(self) -> list[QueuePool]:
        """The current pools (an engine's ``dispose()`` replaces its pool)."""
        return [
            e.sync_engine.pool for e in self._engines if isinstance(e.sync_engine.pool, QueuePool)
        ]

    def pool_class(self) -> type[AsyncAdaptedQueuePool]:
        """An ``AsyncAdaptedQueuePool`` that times every checkout into :attr:`wait`."""
        metrics = self

        class TimedPool(AsyncAdaptedQueuePool):
            def _do_get(self) -> ConnectionPoolEntry:
                started = time.perf_counter()
                try:
                    return super()._do_get()
                except sa_exc.TimeoutError:
                    metrics.timeouts.inc()
                    raise
                finally:
                    metrics.wait.observe(time.perf_counter() - started)

        return TimedPool


class _PoolCollector(Collector):
    def __init__(self, metrics: DatabasePoolMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        families = {
            "size": GaugeMetricFamily(
                "conveyor_db_pool_size", "Connections the pool keeps (pool_size).", labels=["pool"]
            ),
            "max_overflow": GaugeMetricFamily(
                "conveyor_db_pool_max_overflow",
                "Connections the pool may open beyond its size.",
                labels=["pool"],
            ),
            "checked_out": GaugeMetricFamily(
                "conveyor_db_pool_checked_out",
                "Connections in use (checked out of the pool).",
                labels=["pool"],
            ),
            "checked_in": GaugeMetricFamily(
                "conveyor_db_pool_checked_in",
                "Idle connections in the pool.",
                labels=["pool"],
            ),
            "overflow": GaugeMetricFamily(
                "conveyor_db_pool_overflow",
                "Connections open beyond the pool size now (negative: not yet opened up to size).",
                labels=["pool"],
            ),
        }
        for pool in self.metrics.pools():
            label = [self.metrics.name]
            families["size"].add_metric(label, pool.size())
            families["max_overflow"].add_metric(label, pool._max_overflow)
            families["checked_out"].add_metric(label, pool.checkedout())
            families["checked_in"].add_metric(label, pool.checkedin())
            families["overflow"].add_metric(label, pool.overflow())
        yield from families.values()
