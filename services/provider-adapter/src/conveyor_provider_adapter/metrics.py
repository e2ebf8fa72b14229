"""Prometheus metrics of the adapter (``conveyor_adapter_*``), on an injected registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from conveyor_common.metrics import LATENCY_BUCKETS
from conveyor_common.standard_webhooks import RejectReason

# Known label values, pre-initialised at 0 so rate()/increase() see the first event (a series
# that appears with its first increment is invisible to them for that increment).
CREATE_FORMS = ("version", "model", "deployment")
CREATE_OUTCOMES = ("created", "rate_limited", "client_error", "ambiguous", "unreachable", "stale")
RATE_LIMITED_CALLS = ("create",)
SUBMIT_DECISIONS = ("proceed", "stop", "already_submitted")
WEBHOOK_OUTCOMES = ("accepted", "duplicate", "rejected", "unknown", "overloaded")
WEBHOOK_REJECT_REASONS = (*(r.value for r in RejectReason), "too_large", "bad_token", "bad_body")
RECONCILE_ACTIONS = (
    "poll",
    "poll_failed",
    "adopt",
    "adopt_list",
    "list_failed",
    "no_match",
    "unknown_failed",
    "deadline_cancel",
    "cancel",
    "error",
)
CANCEL_OUTCOMES = ("canceled", "deferred", "failed", "stale_prediction")
OUTPUT_FAILURE_REASONS = (
    "bad_url",
    "scheme_not_allowed",
    "host_not_allowed",
    "timeout",
    "http",
    "http_4xx",
    "redirect",
    "too_large",
    "storage",
)


UNBOUND_REASONS = (
    "other_prediction",
    "not_in_flight",
    "not_submitted",
    "recorded_elsewhere",
    "mismatch",
)
"""``reason`` of conveyor_adapter_webhooks_unbound_total (see binding.py)."""


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
            "Create calls by outcome (created, rate_limited, client_error, ambiguous, unreachable;"
            " stale: the scheduler refused the created prediction and had it canceled).",
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
        self.progress_coalesced = Counter(
            "conveyor_adapter_progress_coalesced_total",
            "Progress updates not published: within ADAPTER_PROGRESS_MIN_INTERVAL_SECONDS of the "
            "attempt's previous progress result (superseded by the next one or the terminal result).",
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
        for form in CREATE_FORMS:
            self.create_seconds.labels(form)
        for outcome in CREATE_OUTCOMES:
            self.creates.labels(outcome)
        for call in RATE_LIMITED_CALLS:
            self.rate_limited.labels(call)
        for decision in SUBMIT_DECISIONS:
            self.submit_decisions.labels(decision)
        for outcome in WEBHOOK_OUTCOMES:
            self.webhooks.labels(outcome)
        for reason in WEBHOOK_REJECT_REASONS:
            self.webhooks_rejected.labels(reason)
        for action in RECONCILE_ACTIONS:
            self.reconcile_actions.labels(action)
        for outcome in CANCEL_OUTCOMES:
            self.cancels.labels(outcome)
        for reason in OUTPUT_FAILURE_REASONS:
            self.output_failures.labels(reason)
        for reason in UNBOUND_REASONS:
            self.webhooks_unbound.labels(reason)
