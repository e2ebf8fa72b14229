"""Prometheus metrics of the adapter (``conveyor_adapter_*``), on an injected registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from conveyor_common.metrics import LATENCY_BUCKETS


class AdapterMetrics:
    """Every adapter metric; build one per registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.in_flight = Gauge(
            "conveyor_adapter_predictions_in_flight",
            "Attempts in flight at the provider (from the scheduler's ListInFlight), by submit state.",
            ["state"],
            registry=registry,
        )
        self.create_seconds = Histogram(
            "conveyor_adapter_create_seconds",
            "Latency of prediction create calls, by create form.",
            ["form"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.creates = Counter(
            "conveyor_adapter_creates_total",
            "Create calls by outcome (created, rate_limited, client_error, ambiguous, unreachable).",
            ["outcome"],
            registry=registry,
        )
        self.submit_decisions = Counter(
            "conveyor_adapter_submit_decisions_total",
            "BeginSubmit answers by decision.",
            ["decision"],
            registry=registry,
        )
        self.rate_limited = Counter(
            "conveyor_adapter_rate_limited_total",
            "429 (and 402) answers from the provider, by call.",
            ["call"],
            registry=registry,
        )
        self.throttle_wait_seconds = Counter(
            "conveyor_adapter_create_wait_seconds_total",
            "Time creates waited for the token bucket (including 429 pauses).",
            registry=registry,
        )
        self.webhooks = Counter(
            "conveyor_adapter_webhooks_total",
            "Webhook deliveries by outcome (accepted, duplicate, rejected, unknown, overloaded).",
            ["outcome"],
            registry=registry,
        )
        self.webhooks_rejected = Counter(
            "conveyor_adapter_webhooks_rejected_total",
            "Rejected webhook deliveries by reason.",
            ["reason"],
            registry=registry,
        )
        self.webhooks_unbound = Counter(
            "conveyor_adapter_webhooks_unbound_total",
            "Signed deliveries whose prediction is not the one recorded for the attempt of their URL "
            "(re-targeted or stale): ignored, nothing canceled.",
            ["reason"],
            registry=registry,
        )
        self.webhook_queue = Gauge(
            "conveyor_adapter_webhook_queue_depth",
            "Verified deliveries waiting to be turned into results.",
            registry=registry,
        )
        self.results = Counter(
            "conveyor_adapter_results_published_total",
            "ProviderResults published, by outcome and source.",
            ["outcome", "source"],
            registry=registry,
        )
        self.publish_failures = Counter(
            "conveyor_adapter_result_publish_failures_total",
            "ProviderResults that could not be published after retries.",
            registry=registry,
        )
        self.reconcile_actions = Counter(
            "conveyor_adapter_reconcile_actions_total",
            "Reconciler actions (poll, adopt, no_match, unknown_failed, deadline_cancel, cancel).",
            ["action"],
            registry=registry,
        )
        self.cancels = Counter(
            "conveyor_adapter_cancels_total",
            "Cancel calls by outcome (canceled, deferred, failed, stale_prediction, deadline_timer).",
            ["outcome"],
            registry=registry,
        )
        self.output_bytes = Counter(
            "conveyor_adapter_output_copy_bytes_total",
            "Bytes of outputs copied to storage, by backend.",
            ["backend"],
            registry=registry,
        )
        self.output_files = Counter(
            "conveyor_adapter_output_copy_files_total",
            "Output files copied to storage, by backend.",
            ["backend"],
            registry=registry,
        )
        self.output_failures = Counter(
            "conveyor_adapter_output_copy_failures_total",
            "Output copies that failed, by reason (host_not_allowed, too_large, http, storage...).",
            ["reason"],
            registry=registry,
        )
