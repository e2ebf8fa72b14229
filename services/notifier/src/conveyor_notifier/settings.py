"""Notifier settings (environment prefix ``NOTIFIER_``), validated at start.

The notifier has no database: durable webhook state lives in the scheduler, reached over gRPC at
``NOTIFIER_SCHEDULER_ADDRESS``. ``NOTIFIER_KAFKA_BOOTSTRAP_SERVERS`` and the scheduler address are
required. ``NOTIFIER_OPS_WEBHOOK_URL`` (a Slack-compatible incoming webhook; it carries a token, so it
is a secret without a default) is optional: unset, operations alerts only go to the logs.

``NOTIFIER_WEBHOOK_ALLOW_HOSTS`` (comma-separated hostnames, addresses or CIDRs, empty by default)
exempts hosts from the SSRF address policy and allows plain ``http://`` to them: for tests and local
runs that deliver to loopback receivers. Never set it in production to anything but hosts you own.
"""

from __future__ import annotations

import socket
import uuid
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from conveyor_common import topics
from conveyor_common.kafka.security import KafkaSecuritySettings
from conveyor_common.settings import ServiceSettings
from conveyor_common.ssrf import AllowList
from conveyor_common.tls import InternalTlsSettings


def default_replica_id() -> str:
    """Host name plus a random suffix (unique per process, also for two replicas on one host)."""
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"


class NotifierSettings(KafkaSecuritySettings, ServiceSettings, InternalTlsSettings):
    """Every knob of the notifier."""

    model_config = SettingsConfigDict(env_prefix="NOTIFIER_", frozen=True, extra="ignore")

    kafka_bootstrap_servers: str
    """Kafka bootstrap servers. Required."""
    scheduler_address: str
    """``host:port`` of the scheduler's internal gRPC API (DeliveryCoordinationService). Required."""
    replica_id: str = Field(default_factory=default_replica_id)
    """Id of this replica (lease owner, Kafka client id); default host name + random suffix."""

    # --- Topics and consumer groups ----------------------------------------------------------
    events_topic: str = topics.TASK_EVENTS
    """Task events (TaskStateChanged): watch fan-out (broadcast), whose webhook hint wakes the
    delivery worker."""
    dead_letter_topic: str = topics.TASK_DEAD_LETTER
    """Dead-lettered tasks (operations alerts)."""
    provider_results_topic: str = topics.PROVIDER_RESULTS
    """Provider results (throttling alerts)."""
    webhook_group: str = "notifier-webhooks"
    """Shared consumer group that turns task events into deliveries (with enqueue_deliveries)."""
    enqueue_deliveries: bool = False
    """Also create deliveries from consumed task events (``EnqueueDeliveries``, one call per fetched
    batch). The scheduler writes them with each event (ADR 0007); turn this on only while a
    scheduler older than that may still write events (a rolling upgrade), then off."""
    dead_letter_group: str = "notifier-ops-dead-letter"
    """Consumer group of the dead-letter alerts."""
    throttle_group: str = "notifier-ops-throttle"
    """Consumer group of the provider-throttling monitor."""

    # --- Watch fan-out -----------------------------------------------------------------------
    watch_buffer_events: int = Field(default=256, ge=1, le=100_000)
    """Events buffered per subscriber; a subscriber further behind is told to resume."""

    # --- Client webhook deliveries -----------------------------------------------------------
    webhook_allow_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Hosts/addresses/CIDRs exempt from the SSRF policy (and allowed over http). Empty default."""
    webhook_ca_bundle: str = ""
    """PEM file of extra CAs to trust for receivers (empty = the system/certifi bundle)."""
    webhook_timeout_seconds: float = Field(default=15.0, gt=0, le=120)
    """Whole-attempt timeout of one delivery (connect, send, read)."""
    webhook_connect_timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    """Connect timeout of one delivery."""
    webhook_max_response_bytes: int = Field(default=64 * 1024, ge=0, le=16 * 1024 * 1024)
    """Response bytes read at most (the rest is not read)."""
    delivery_max_in_flight: int = Field(default=32, ge=1, le=1000)
    """Deliveries sent at once by this replica."""
    delivery_claim_batch: int = Field(default=16, ge=1, le=500)
    """Deliveries leased per ClaimDeliveries call."""
    delivery_lease_seconds: int = Field(default=60, ge=5, le=600)
    """Lease of a claimed delivery (longer than the attempt timeout)."""
    delivery_poll_seconds: float = Field(default=1.0, gt=0, le=60)
    """Wait between claims when nothing was due."""
    retry_period_seconds: float = Field(default=86_400.0, gt=0)
    """How long a delivery is retried after it was created (then it fails)."""
    retry_base_seconds: float = Field(default=5.0, gt=0)
    """First retry delay; doubles per attempt (with jitter)."""
    retry_max_seconds: float = Field(default=3600.0, gt=0)
    """Largest retry delay."""
    endpoint_disable_after_failures: int = Field(default=20, ge=1)
    """Consecutive failed attempts before an endpoint may be disabled..."""
    endpoint_disable_after_seconds: float = Field(default=86_400.0, ge=0)
    """...when it has also been failing for at least this long."""
    backlog_poll_seconds: float = Field(default=15.0, gt=0)
    """Period of the delivery backlog metrics poll."""

    # --- Operations alerts -------------------------------------------------------------------
    ops_webhook_url: SecretStr | None = None
    """Slack-compatible incoming webhook (POST {"text": ...}); unset = alerts go to logs only."""
    ops_alert_burst: int = Field(default=5, ge=1)
    """Alerts sent in a burst before rate limiting (token bucket size)."""
    ops_alert_per_minute: float = Field(default=2.0, gt=0)
    """Sustained alerts per minute (token bucket refill)."""
    ops_summary_seconds: float = Field(default=60.0, gt=0)
    """How often suppressed alerts are summarized (when a token is free)."""
    throttle_alert_after_seconds: float = Field(default=300.0, ge=0)
    """Alert when a provider stays rate-limited at least this long."""
    throttle_quiet_seconds: float = Field(default=60.0, gt=0)
    """A provider with no throttled result for this long (past its retry_at) has recovered."""

    @field_validator("webhook_allow_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("webhook_allow_hosts")
    @classmethod
    def _check_hosts(cls, value: list[str]) -> list[str]:
        AllowList.parse(value)  # raises ValueError naming the bad entry
        return value

    @property
    def allow_list(self) -> AllowList:
        """The parsed allow-list."""
        return AllowList.parse(self.webhook_allow_hosts)
