"""Settings of the provider adapter (environment variables prefixed ``ADAPTER_``).

Secrets have no defaults: ``ADAPTER_REPLICATE_API_TOKEN`` and ``ADAPTER_WEBHOOK_TOKEN_KEY`` must be
set, and so must ``ADAPTER_WEBHOOK_PUBLIC_BASE_URL`` (where Replicate reaches our receiver). The
Replicate signing secret (``ADAPTER_REPLICATE_WEBHOOK_SECRET``) is optional: when unset it is fetched
from ``GET /v1/webhooks/default/secret`` at start. List settings accept JSON or comma-separated values.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from conveyor_common import topics
from conveyor_common.kafka.security import KafkaSecuritySettings
from conveyor_common.settings import ServiceSettings
from conveyor_common.tls import InternalTlsSettings


class AdapterSettings(KafkaSecuritySettings, ServiceSettings, InternalTlsSettings):
    """Everything the adapter reads from the environment."""

    model_config = SettingsConfigDict(env_prefix="ADAPTER_", frozen=True, extra="ignore")

    # --- Replicate ---
    replicate_api_token: SecretStr
    """Replicate API token (secret, required)."""
    replicate_base_url: str = "https://api.replicate.com"
    """Base URL of the Replicate API (the fake's URL in tests and ``make run``)."""
    replicate_webhook_secret: SecretStr | None = None
    """``whsec_`` signing secret; unset = fetched from ``GET /v1/webhooks/default/secret``."""
    replicate_connect_timeout_s: float = Field(default=3.0, gt=0, le=60)
    """Connect timeout of Replicate calls."""
    replicate_create_timeout_s: float = Field(default=10.0, gt=0, le=120)
    """Read timeout of a create call; past it the outcome is ambiguous (never resubmitted)."""
    replicate_request_timeout_s: float = Field(default=10.0, gt=0, le=120)
    """Read timeout of get/cancel/list calls."""
    provider: str = "replicate"
    """Provider name reported in ProviderThrottled."""

    # --- our webhook receiver ---
    webhook_public_base_url: str = Field(min_length=1)
    """Public base URL of the receiver (required); Replicate calls ``<base>/webhooks/replicate``."""
    webhook_token_key: SecretStr
    """Our HMAC key for the ``token`` query parameter of webhook URLs (secret, required)."""
    webhook_host: str = "0.0.0.0"
    """Address the webhook HTTP server binds."""
    webhook_port: int = Field(default=8080, ge=0, le=65535)
    """Port of the webhook HTTP server (0 = any free port)."""
    webhook_tolerance_s: int = Field(default=300, ge=1, le=3600)
    """Allowed clock skew of ``webhook-timestamp`` (Standard Webhooks default 300 s)."""
    webhook_max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    """Largest webhook body accepted."""
    webhook_queue_size: int = Field(default=1000, ge=1)
    """Verified deliveries waiting to be published; when full the receiver answers 503."""
    webhook_workers: int = Field(default=64, ge=1, le=1000)
    """Deliveries turned into provider results at once (output copies run here); a task's
    deliveries one after another, different tasks' side by side."""
    webhook_dedup_size: int = Field(default=100_000, ge=100)
    """Entries of the in-memory webhook-id LRU (durable dedup is the scheduler's inbox)."""
    webhook_secret_refresh_s: float = Field(default=60.0, ge=1)
    """Minimum gap between re-fetches of a fetched secret after a bad signature (rotation)."""

    # --- scheduler and Kafka ---
    scheduler_address: str = "127.0.0.1:50051"
    """host:port of the scheduler's ProviderCoordinationService."""
    scheduler_timeout_s: float = Field(default=5.0, gt=0, le=60)
    """Deadline of one coordination call."""
    scheduler_retry_s: float = Field(default=30.0, ge=0, le=600)
    """How long coordination calls are retried while the scheduler is unavailable."""
    kafka_bootstrap: str = "127.0.0.1:9092"
    """Kafka bootstrap servers."""
    consumer_group: str = "provider-adapter"
    """Consumer group of the commands topic."""
    commands_topic: str = topics.PROVIDER_COMMANDS
    """Topic of DispatchTask/CancelTask (its ``.dlq`` twin takes undecodable records)."""
    results_topic: str = topics.PROVIDER_RESULTS
    """Topic ProviderResults are published to."""
    kafka_session_timeout_ms: int = Field(default=6_000, ge=1_000, le=300_000)
    """Consumer session timeout: a replica lost without leaving the group (kill -9, frozen) has its
    partitions resumed by the others after this long. Brokers refuse values below their
    ``group.min.session.timeout.ms`` (6 s by default; the devstack's broker allows 1 s)."""
    adapter_id: str = Field(default_factory=socket.gethostname)
    """Id of this replica (audit in BeginSubmit)."""
    command_concurrency: int = Field(default=64, ge=1, le=1000)
    """Commands of different tasks handled side by side (each its submit protocol and create),
    up to this many in hand; the consumer fetches more as half of them free up, so a slow
    create holds its own slot, not the others (``conveyor_common.kafka.streaming``). A task's
    commands stay in order. 1: a partition's commands one after another, a fetch at a time. Many
    at once let the submit protocol's calls, and everything downstream, go in batches
    (work-through 58 -> 180 tasks/s measured; with 1% of creates hanging 3 s, 47 -> 180)."""

    # --- back-pressure ---
    create_rate_per_min: float = Field(default=600.0, gt=0)
    """Token-bucket refill rate of creates (Replicate's limit is 600/min)."""
    create_burst: int = Field(default=10, ge=1)
    """Token-bucket size of creates."""
    default_retry_after_s: float = Field(default=5.0, gt=0, le=600)
    """Pause after a 429 that carries neither ``retry_after`` nor ``Retry-After``."""
    throttle_max_wait_s: float = Field(default=120.0, ge=0, le=3600)
    """How long one dispatch keeps retrying a throttled create before failing it (retryable)."""

    # --- progress ---
    progress_min_interval_seconds: float = Field(default=1.0, ge=0, le=3600)
    """Least time between two progress results of one attempt; a percentage change within it is
    held until the interval ends (a later change or the terminal result supersedes it)."""
    progress_hold_seconds: float = Field(default=0.3, ge=0, le=60)
    """How long a progress update, and the ``started`` result that records a create, is held
    before it is published: a prediction that ends within it costs no progress (or ``started``)
    result (its terminal result supersedes it and records it). A ``started`` whose terminal
    delivery is already waiting in the adapter when the hold ends waits for that delivery instead.
    0 = at once."""

    # --- reconciler ---
    reconcile_interval_s: float = Field(default=30.0, gt=0)
    """Period of the reconciler."""
    webhook_overdue_s: float = Field(default=120.0, gt=0)
    """A submitted prediction with no provider update for this long is polled."""
    submit_unknown_grace_s: float = Field(default=180.0, gt=0)
    """After this long an unknown submit with no matching prediction fails (retryable)."""
    deadline_slack_s: float = Field(default=30.0, ge=0)
    """Past run deadline + slack a still-running prediction is canceled by the reconciler."""
    reconcile_skew_s: float = Field(default=60.0, ge=0)
    """Clock-skew margin of ``created_after`` in list reconciliations."""

    # --- outputs ---
    storage_backend: Literal["filesystem", "s3"] = "filesystem"
    """Where outputs are copied: ``filesystem`` or ``s3`` (S3, R2, MinIO)."""
    storage_fs_root: Path = Path("/var/lib/conveyor/outputs")
    """Root directory of the filesystem backend."""
    storage_public_base_url: str | None = None
    """Public base URL of stored objects (``<base>/<key>``); unset = file:// or s3:// URLs."""
    storage_s3_bucket: str | None = None
    """Bucket of the S3 backend."""
    storage_s3_endpoint_url: str | None = None
    """Endpoint of an S3-compatible service (R2, MinIO); unset = AWS."""
    storage_s3_region: str = "us-east-1"
    """Region of the S3 backend."""
    storage_s3_access_key_id: SecretStr | None = None
    """Access key id (unset = the default AWS credential chain)."""
    storage_s3_secret_access_key: SecretStr | None = None
    """Secret access key (unset = the default AWS credential chain)."""
    storage_prefix: str = "outputs/"
    """Key prefix of stored outputs."""
    output_allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["replicate.delivery", "*.replicate.delivery"]
    )
    """Hosts outputs may be downloaded from (``*.`` matches subdomains); others are not copied."""
    output_allow_http: bool = False
    """Allow plain-http output URLs (tests against the fake on loopback)."""
    output_max_bytes: int = Field(default=512 * 1024 * 1024, ge=1)
    """Largest output file copied."""
    output_timeout_s: float = Field(default=120.0, gt=0)
    """Time limit of one output download."""
    output_copy_parallel: int = Field(default=4, ge=1, le=64)
    """Output files of one prediction copied at the same time (a storyboard's images)."""

    @field_validator("output_allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                return json.loads(text)
            return [h.strip().lower() for h in text.split(",") if h.strip()]
        return value

    @field_validator("webhook_public_base_url", "replicate_base_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http(s) URL")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _check_storage(self) -> AdapterSettings:
        if self.storage_backend == "s3" and not self.storage_s3_bucket:
            raise ValueError("ADAPTER_STORAGE_S3_BUCKET is required when storage_backend is s3")
        if (self.storage_s3_access_key_id is None) != (self.storage_s3_secret_access_key is None):
            raise ValueError("set both S3 access key id and secret access key, or neither")
        return self
