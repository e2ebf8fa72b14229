"""Prometheus metrics on an injected registry, served on their own port.

Nothing is registered on the global default registry: each service builds one ``CollectorRegistry``
in ``run()`` and passes it to every component (tests build their own and read values from it).
Metric names carry the ``conveyor_`` prefix and base units (``_seconds``, ``_bytes``, ``_total``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Buckets for RPC and dispatch latencies (seconds)."""

WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
"""Buckets for queue waits and run times (seconds)."""


@dataclass
class MetricsServer:
    """A running /metrics HTTP server."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        """The bound port."""
        return int(self.server.server_port)

    def stop(self) -> None:
        """Stop serving (idempotent)."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def start_metrics_server(
    registry: CollectorRegistry, port: int, host: str = "0.0.0.0"
) -> MetricsServer:
    """Serve ``registry`` at ``http://host:port/metrics`` (port 0 = any free port)."""
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(server=server, thread=thread)


class RpcMetrics:
    """gRPC server metrics (names after go-grpc-prometheus, with the conveyor_ prefix)."""

    def __init__(self, registry: CollectorRegistry, service: str) -> None:
        self.handled = Counter(
            "conveyor_grpc_server_handled_total",
            "RPCs completed, by method and status code.",
            ["service", "grpc_method", "grpc_code"],
            registry=registry,
        )
        self.latency = Histogram(
            "conveyor_grpc_server_handling_seconds",
            "RPC handling time, by method.",
            ["service", "grpc_method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "conveyor_grpc_server_in_flight",
            "RPCs being handled now, by method.",
            ["service", "grpc_method"],
            registry=registry,
        )
        self.service = service


class KafkaMetrics:
    """Kafka producer/consumer metrics shared by every service."""

    def __init__(self, registry: CollectorRegistry, service: str) -> None:
        self.service = service
        self.produced = Counter(
            "conveyor_kafka_produced_total",
            "Records produced, by topic and outcome.",
            ["service", "topic", "outcome"],
            registry=registry,
        )
        self.consumed = Counter(
            "conveyor_kafka_consumed_total",
            "Records consumed, by topic and outcome (handled, duplicate, dead_lettered, retried).",
            ["service", "topic", "outcome"],
            registry=registry,
        )
        self.handle_seconds = Histogram(
            "conveyor_kafka_handle_seconds",
            "Time to handle one consumed record.",
            ["service", "topic"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.lag = Gauge(
            "conveyor_kafka_consumer_lag",
            "Records behind the end of the partition, by topic and partition.",
            ["service", "group", "topic", "partition"],
            registry=registry,
        )
