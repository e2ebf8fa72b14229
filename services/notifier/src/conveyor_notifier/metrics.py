"""The notifier's Prometheus metrics (``conveyor_notifier_*``), on an injected registry.

Consumer lag is the shared ``conveyor_kafka_consumer_lag`` gauge of
:class:`conveyor_common.metrics.KafkaMetrics` (the broadcast reader reports under group
``notifier-watch``).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from conveyor_common.metrics import LATENCY_BUCKETS

DELIVERY_BUCKETS = (*LATENCY_BUCKETS, 15.0, 30.0, 60.0)

# Known label values, pre-initialised at 0 so rate()/increase() see the first event.
DELIVERY_OUTCOMES = ("delivered", "retry", "failed", "refused", "stale")
WATCH_SCOPES = ("task", "tenant")
WATCH_EVENT_OUTCOMES = ("queued", "overflow")
WATCH_END_REASONS = ("overflow", "shutdown")
ALERT_KINDS = ("dead_letter", "provider_throttled", "provider_recovered", "endpoint_disabled")
ALERT_OUTCOMES = ("sent", "suppressed", "failed", "logged")
BACKLOG_STATES = ("pending", "due")
PROVIDERS = ("replicate",)


class NotifierMetrics:
    """Deliveries, watchers and alerts."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.deliveries = Counter(
            "conveyor_notifier_deliveries_total",
            "Webhook delivery attempts by outcome (delivered, retry, failed, refused, stale).",
            ["outcome"],
            registry=registry,
        )
        self.delivery_seconds = Histogram(
            "conveyor_notifier_delivery_seconds",
            "Duration of one webhook delivery attempt.",
            buckets=DELIVERY_BUCKETS,
            registry=registry,
        )
        self.delivery_lag_seconds = Histogram(
            "conveyor_notifier_delivery_lag_seconds",
            "Time from the task event to its successful delivery.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400),
            registry=registry,
        )
        self.enqueued = Counter(
            "conveyor_notifier_deliveries_enqueued_total",
            "Deliveries created from task events.",
            registry=registry,
        )
        self.backlog = Gauge(
            "conveyor_notifier_delivery_backlog",
            "Pending webhook deliveries (state=pending) and those due now (state=due).",
            ["state"],
            registry=registry,
        )
        self.oldest_due_seconds = Gauge(
            "conveyor_notifier_delivery_oldest_due_seconds",
            "How long the oldest due delivery has been waiting.",
            registry=registry,
        )
        self.disabled_endpoints = Gauge(
            "conveyor_notifier_disabled_endpoints",
            "Webhook endpoints disabled for failing too long.",
            registry=registry,
        )
        self.endpoints_disabled = Counter(
            "conveyor_notifier_endpoints_disabled_total",
            "Endpoints this replica disabled.",
            registry=registry,
        )
        self.watchers = Gauge(
            "conveyor_notifier_active_watchers",
            "Live watch subscribers (scope=task or tenant).",
            ["scope"],
            registry=registry,
        )
        self.watch_events = Counter(
            "conveyor_notifier_watch_events_total",
            "Events handed to watch subscribers (outcome=queued) or that overflowed one.",
            ["outcome"],
            registry=registry,
        )
        self.watch_ended = Counter(
            "conveyor_notifier_watch_streams_ended_total",
            "Watch streams ended by the notifier (reason=overflow or shutdown).",
            ["reason"],
            registry=registry,
        )
        self.alerts = Counter(
            "conveyor_notifier_ops_alerts_total",
            "Operations alerts by kind and outcome (sent, suppressed, failed, logged).",
            ["kind", "outcome"],
            registry=registry,
        )
        self.throttled_providers = Gauge(
            "conveyor_notifier_provider_throttled_seconds",
            "How long a provider has been rate-limited (0 when not).",
            ["provider"],
            registry=registry,
        )
        for outcome in DELIVERY_OUTCOMES:
            self.deliveries.labels(outcome)
        for scope in WATCH_SCOPES:
            self.watchers.labels(scope)
        for outcome in WATCH_EVENT_OUTCOMES:
            self.watch_events.labels(outcome)
        for reason in WATCH_END_REASONS:
            self.watch_ended.labels(reason)
        for kind in ALERT_KINDS:
            for outcome in ALERT_OUTCOMES:
                self.alerts.labels(kind, outcome)
        for state in BACKLOG_STATES:
            self.backlog.labels(state)
        for provider in PROVIDERS:
            self.throttled_providers.labels(provider)
