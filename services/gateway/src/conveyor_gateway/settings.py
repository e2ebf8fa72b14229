"""Gateway settings (env prefix ``GATEWAY_``), validated at start.

Verification keys have no defaults: at least one of ``GATEWAY_JWT_HS256_SECRET``,
``GATEWAY_JWT_HS256_SECRET_FILE``, ``GATEWAY_JWT_RS256_PUBLIC_KEY``,
``GATEWAY_JWT_RS256_PUBLIC_KEY_FILE``, ``GATEWAY_JWT_JWKS_URL`` or ``GATEWAY_JWT_OIDC_ISSUER_URL``
must be set, or the gateway refuses to start.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from conveyor_common import limits
from conveyor_common.settings import ServiceSettings
from conveyor_common.ssrf import AllowList
from conveyor_common.tls import TlsFiles
from conveyor_gateway.jwks import check_url


class GatewaySettings(ServiceSettings):
    """Everything the gateway reads from its environment."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_", frozen=True, extra="ignore")

    grpc_port: int = Field(default=50051, ge=0, le=65535)
    """Public gRPC port."""
    metrics_port: int = Field(default=9101, ge=0, le=65535)
    """Prometheus /metrics port."""

    # Downstream services.
    scheduler_address: str = Field(min_length=1)
    """host:port of the scheduler's SchedulerService (required)."""
    notifier_address: str | None = None
    """host:port of a notifier's WatchFanoutService; unset = watches poll the scheduler."""
    scheduler_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    """Downstream timeout when the caller set no deadline (or a longer one)."""
    scheduler_retry_attempts: int = Field(default=4, ge=1, le=10)
    """Attempts per scheduler call on UNAVAILABLE (the first included)."""
    scheduler_retry_base_seconds: float = Field(default=0.05, gt=0, le=5)
    """First backoff delay; doubles per attempt, with full jitter."""
    scheduler_attempt_timeout_seconds: float = Field(default=0.5, gt=0, le=60)
    """Bound of a scheduler attempt (doubled after each attempt that hit it): an unresponsive
    replica costs a caller about this much before another replica is tried."""
    scheduler_channels: int = Field(default=2, ge=1, le=16)
    """HTTP/2 connections to the scheduler (calls are spread over them)."""
    submit_coalesce: bool = True
    """Send concurrent single submits to the scheduler in SubmitTaskGroup calls (each decided alone)."""
    submit_group_max: int = Field(default=256, ge=1, le=limits.BATCH_ITEMS_CEILING)
    """Most single submits in one SubmitTaskGroup call."""
    submit_group_concurrency: int = Field(default=2, ge=1, le=64)
    """SubmitTaskGroup calls in flight at once; later submits ride the next call."""
    watch_poll_interval_seconds: float = Field(default=0.5, gt=0, le=30)
    """Poll interval of a watch when the live stream is unavailable."""

    # Authentication.
    jwt_hs256_secret: SecretStr | None = None
    """Shared HS256 verification secret (at least 32 bytes)."""
    jwt_hs256_secret_file: Path | None = None
    """File holding the HS256 secret (alternative to the variable)."""
    jwt_rs256_public_key: SecretStr | None = None
    """PEM of the RS256 verification (public) key."""
    jwt_rs256_public_key_file: Path | None = None
    """File holding the RS256 public key PEM."""
    jwt_issuer: str = Field(default="conveyor", min_length=1)
    """Required ``iss`` claim."""
    jwt_audience: str = Field(default="conveyor-gateway", min_length=1)
    """Required ``aud`` claim."""
    jwt_leeway_seconds: float = Field(default=30.0, ge=0, le=300)
    """Clock-skew leeway for ``exp``/``nbf``/``iat``."""
    jwt_max_lifetime_seconds: int = Field(default=24 * 3600, ge=60, le=366 * 24 * 3600)
    """Longest token lifetime (``exp - iat``) accepted."""
    jwt_jwks_url: str | None = None
    """JWKS URL of RS256/ES256 keys chosen by ``kid`` (https; http only to loopback)."""
    jwt_oidc_issuer_url: str | None = None
    """OIDC issuer whose discovery document names the JWKS (alternative to the JWKS URL)."""
    jwt_jwks_refresh_seconds: float = Field(default=300.0, gt=0, le=86400)
    """Period of the background JWKS refresh."""
    jwt_jwks_min_refresh_seconds: float = Field(default=10.0, ge=0, le=3600)
    """Least time between JWKS fetches caused by tokens naming an unknown ``kid``."""

    # Transport security (optional mutual TLS).
    tls_cert_file: Path | None = None
    """Server certificate chain (PEM); with the key, the port serves TLS."""
    tls_key_file: Path | None = None
    """Server private key (PEM)."""
    tls_client_ca_file: Path | None = None
    """CA bundle that signs client certificates (mutual TLS)."""
    tls_require_client_auth: bool = False
    # Mutual TLS towards the internal services (conveyor_common.tls).
    internal_tls_cert_file: Path | None = None
    """Certificate the gateway presents to the scheduler and the notifier (internal mutual TLS)."""
    internal_tls_key_file: Path | None = None
    """Private key of ``INTERNAL_TLS_CERT_FILE``."""
    internal_tls_ca_file: Path | None = None
    """CA bundle that signs the internal services' certificates."""
    internal_tls_server_name: str = ""
    """Name expected in the internal services' certificates when their addresses are IPs."""
    """Refuse clients without a certificate signed by the client CA."""

    # Validation limits.
    max_message_bytes: int = Field(default=1024 * 1024, ge=1024, le=limits.MESSAGE_BYTES_CEILING)
    """Largest request message accepted (grpc.max_receive_message_length)."""
    max_input_bytes: int = Field(default=256 * 1024, ge=16, le=limits.INPUT_BYTES_CEILING)
    """Largest serialized ``spec.input`` document."""
    max_batch_items: int = Field(default=100, ge=1, le=limits.BATCH_ITEMS_CEILING)
    """Most items in one BatchSubmitTasks call."""
    max_group_children: int = Field(default=1000, ge=1, le=limits.GROUP_CHILDREN_CEILING)
    """Most children in one CreateGroup call (the scheduler has its own cap)."""
    max_queue_deadline_seconds: int = Field(default=7 * 24 * 3600, ge=60)
    """Furthest ``queue_deadline`` from now."""
    max_run_timeout_seconds: int = Field(default=6 * 3600, ge=1)
    """Longest ``run_timeout``."""
    max_labels: int = Field(default=32, ge=0, le=limits.LABELS_CEILING)
    """Most labels on a task."""
    max_label_key_length: int = Field(default=63, ge=1, le=limits.LABEL_KEY_LENGTH_CEILING)
    """Longest label key."""
    max_label_value_length: int = Field(default=256, ge=0, le=limits.LABEL_VALUE_LENGTH_CEILING)
    """Longest label value."""
    max_input_depth: int = Field(default=20, ge=1, le=24)
    """Deepest nesting of objects and lists in ``spec.input`` (at most 24: an object level is three
    protobuf levels, and a task travels wrapped in further messages under protobuf's 100)."""
    max_input_nodes: int = Field(default=10_000, ge=1, le=1_000_000)
    """Most keys and list items in ``spec.input``, counted over every level."""
    url_allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Hosts, addresses or CIDRs exempt from the SSRF address check, and the only hosts http:// may
    name (comma-separated or a JSON list; empty in production)."""
    dns_timeout_seconds: float = Field(default=2.0, gt=0, le=30)
    """Time limit of one URL's DNS resolution."""

    # Edge rate limit, per tenant.
    rate_limit_per_second: float = Field(default=1000.0, gt=0)
    """Sustained requests per second per tenant (token bucket rate)."""
    rate_limit_burst: int = Field(default=2000, ge=1)
    """Token bucket size per tenant."""
    max_concurrent_rpcs: int | None = Field(default=None, ge=1)
    """Most RPCs handled at once (grpc maximum_concurrent_rpcs); unset = no limit."""

    @field_validator("url_allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [item.strip() for item in text.split(",") if item.strip()]
        return value

    @field_validator("url_allowed_hosts")
    @classmethod
    def _valid_hosts(cls, value: list[str]) -> list[str]:
        AllowList.parse(value)  # raises ValueError naming a bad entry
        return value

    @field_validator("jwt_jwks_url", "jwt_oidc_issuer_url")
    @classmethod
    def _jwks_urls(cls, value: str | None) -> str | None:
        return None if value is None else check_url(value, "the URL")

    @model_validator(mode="after")
    def _check(self) -> GatewaySettings:
        if not (
            self.jwt_hs256_secret
            or self.jwt_hs256_secret_file
            or self.jwt_rs256_public_key
            or self.jwt_rs256_public_key_file
            or self.jwt_jwks_url
            or self.jwt_oidc_issuer_url
        ):
            raise ValueError(
                "no JWT verification key: set GATEWAY_JWT_HS256_SECRET(_FILE), "
                "GATEWAY_JWT_RS256_PUBLIC_KEY(_FILE), GATEWAY_JWT_JWKS_URL "
                "or GATEWAY_JWT_OIDC_ISSUER_URL"
            )
        internal = [
            self.internal_tls_cert_file,
            self.internal_tls_key_file,
            self.internal_tls_ca_file,
        ]
        if any(v is not None for v in internal) and not all(v is not None for v in internal):
            raise ValueError("GATEWAY_INTERNAL_TLS_CERT_FILE, _KEY_FILE and _CA_FILE go together")
        if self.jwt_jwks_url and self.jwt_oidc_issuer_url:
            raise ValueError("set GATEWAY_JWT_JWKS_URL or GATEWAY_JWT_OIDC_ISSUER_URL, not both")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("GATEWAY_TLS_CERT_FILE and GATEWAY_TLS_KEY_FILE go together")
        if self.tls_require_client_auth and self.tls_client_ca_file is None:
            raise ValueError("GATEWAY_TLS_REQUIRE_CLIENT_AUTH needs GATEWAY_TLS_CLIENT_CA_FILE")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("GATEWAY_TLS_CLIENT_CA_FILE needs GATEWAY_TLS_CERT_FILE/KEY_FILE")
        return self

    @property
    def internal_tls(self) -> TlsFiles | None:
        """The files of internal mutual TLS, when it is on."""
        cert, key, ca = (
            self.internal_tls_cert_file,
            self.internal_tls_key_file,
            self.internal_tls_ca_file,
        )
        if cert is None or key is None or ca is None:
            return None
        return TlsFiles(cert, key, ca, server_name=self.internal_tls_server_name)
